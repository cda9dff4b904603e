"""Aborts at every stage, failures, timeouts, dead peers, duplicate and late rooms: every request
ends in one terminal message, and both instances get every page back."""

from __future__ import annotations

import pytest

from protocol.messages import (
    INVALID_REQUEST,
    PEER_UNAVAILABLE,
    TRANSFER_FAILED,
    AbortRequest,
    RoomAbort,
    RoomDest,
    TransferResult,
)
from scheduler_proc.disagg import check_peer
from scheduler_proc.peers import PeerState
from scheduler_proc.request import ReqState
from scheduler_proc.rooms import RoomState
from tests.fakes.disagg import (
    Cluster,
    ConnectPrefill,
    TokenizedRequest,
    expected,
    peers,
    rooms,
    sampling,
    state_of,
    with_layout,
)

PROMPT = list(range(1, 22))  # 21 tokens: 3 chunks of 8 with chunked_prefill_size=8


def cluster(**kw) -> Cluster:
    c = Cluster(chunked_prefill_size=8, **kw)
    c.connect()
    return c


def assert_aborted(c: Cluster, rid: str) -> None:
    assert c.log.finish[rid] == "abort" and not c.log.failed.get(rid)
    c.assert_no_leak()


def test_abort_while_the_decode_side_waits_for_kv_budget():
    c = cluster(worker={"num_pages": 9}, init_new_token_ratio=1.0)
    c.submit("big", PROMPT, max_new=8, stop=False)  # 6 + 2 pages of 8 usable
    c.submit("queued", [1, 2, 3, 4, 5], max_new=4, stop=False)
    c.round()
    assert c.decodes[0].core.requests["queued"].state is ReqState.PENDING
    assert c.prefills[0].core.requests["queued"].state is ReqState.PENDING  # no destination yet
    c.abort("queued")
    c.run()
    assert c.log.tokens["big"] == expected(PROMPT, stop=False)
    assert_aborted(c, "queued")


def test_abort_between_chunks():
    c = cluster()
    c.submit("a", PROMPT)
    for _ in range(6):
        c.round()
        p = c.prefills[0].core.requests.get("a")
        if p is not None and p.state is ReqState.PREFILLING and 0 < p.kv_len < len(PROMPT):
            break
    assert c.prefills[0].core.requests["a"].kv_len == 8
    c.abort("a")
    c.run()
    assert_aborted(c, "a")


def test_abort_during_a_slow_transfer_waits_for_the_room_to_close():
    c = cluster()
    room = c.submit("a", PROMPT)
    c.link.hold(room)
    c.run()
    p, d = c.prefills[0].core, c.decodes[0].core
    for core in (p, d):
        core.on_abort(AbortRequest("a"))
        assert "a" not in core.requests
        assert state_of(core, room) is RoomState.DRAINING  # the pages stay until the worker closes it
        assert core.status().free_pages + core.status().cached_pages < core.status().total_pages
    c.log.add(c.decodes[0], d.take_outbox()[0])
    c.run()
    assert_aborted(c, "a")


def test_abort_while_decoding():
    c = cluster()
    c.submit("a", PROMPT, max_new=50, stop=False)
    while "a" not in c.log.tokens or len(c.log.tokens["a"]) < 3:
        c.round()
    c.abort("a")
    c.run()
    assert_aborted(c, "a")
    assert 3 <= len(c.log.tokens["a"]) < 50


def test_transfer_failure_fails_both_sides_once():
    c = cluster()
    room = c.submit("a", PROMPT)
    c.link.hold(room)
    c.run()
    c.link.abort(room, "injected failure")
    c.run()
    codes = [f.code for f in c.log.failed["a"]]
    assert codes == [TRANSFER_FAILED, TRANSFER_FAILED] and "a" not in c.log.finish
    c.assert_no_leak()


def test_a_prefill_refusal_reaches_the_decode_side_at_once():
    c = cluster(prefill_worker={"num_pages": 4})  # too small for the prompt: refused there
    c.submit("a", PROMPT)
    c.run()
    assert {f.code for f in c.log.failed["a"]} == {INVALID_REQUEST}
    assert "a" not in c.decodes[0].core.requests and not rooms(c.decodes[0].core).count(RoomState.DRAINING)


def test_duplicate_room_is_refused_and_the_first_request_is_unharmed():
    c = cluster()
    room = c.submit("first", PROMPT, stop=False)
    c.submit("second", [1, 2, 3], room=room)
    c.run()
    assert c.log.tokens["first"] == expected(PROMPT, stop=False)
    assert {f.code for f in c.log.failed["second"]} == {INVALID_REQUEST}
    assert all("duplicate room" in f.message for f in c.log.failed["second"])
    assert "first" not in c.log.failed
    c.submit("third", [4, 5], room=room)  # reusing an ended room is refused too
    c.run()
    assert c.log.failed["third"]
    c.assert_no_leak()


def test_late_messages_for_a_finished_room_are_ignored():
    c = cluster()
    room = c.submit("a", PROMPT)
    c.run()
    p, d = c.prefills[0], c.decodes[0]
    p.core.on_peer_message(RoomDest(room, "a", d.addr, [1, 2, 3, 4, 5, 6], 0))
    d.core.on_peer_message(RoomAbort(room, "a", p.addr, TRANSFER_FAILED, "late"))
    for inst in (p, d):
        inst.core.on_worker_message(TransferResult(room, ok=True, first_token=3))
    c.run()
    assert c.log.finish["a"] in ("stop", "length") and "a" not in c.log.failed
    c.assert_no_leak()


def test_waiting_for_a_destination_has_no_timeout_and_ends_by_abort():
    c = cluster()
    c.prefills[0].inbox.append(TokenizedRequest("lonely", PROMPT, sampling(), room=7))
    c.run()
    c.advance(31.0)  # past the transfer timeout: the decode side may be queueing it
    assert not c.log.failed.get("lonely") and "lonely" in c.prefills[0].core.requests
    c.prefills[0].inbox.append(AbortRequest("lonely"))
    c.run()
    assert not c.log.failed.get("lonely")
    c.assert_no_leak()


def test_registration_refused_for_another_page_size():
    c = Cluster(decode_worker={"page_size": 8}, chunked_prefill_size=8)
    for d in c.decodes:
        d.inbox.append(ConnectPrefill([c.prefills[0].addr]))
    c.run()
    (state,) = c.decodes[0].core.peer_states().values()
    assert state.startswith("refused: page_size mismatch") and "4" in state and "8" in state
    assert not peers(c.prefills[0].core)
    c.submit("a", [1, 2, 3])
    c.run()
    assert {f.code for f in c.log.failed["a"]} == {PEER_UNAVAILABLE}
    c.assert_no_leak()


def test_dead_decode_instance_fails_its_requests_and_the_prefill_side_keeps_serving():
    c = cluster(num_decode=2)
    room = c.submit("victim", PROMPT, d=0)
    c.link.hold(room)
    c.run()
    c.kill(c.decodes[0])
    c.advance(6.0)  # past the heartbeat timeout
    assert [f.code for f in c.log.failed["victim"]] == [PEER_UNAVAILABLE]
    assert "stopped answering" in c.log.failed["victim"][0].message
    assert peers(c.prefills[0].core).get(c.decodes[0].addr).state is PeerState.LOST
    c.submit("after", PROMPT, d=1, stop=False)
    c.run()
    assert c.log.tokens["after"] == expected(PROMPT, stop=False)
    c.instances.pop(c.decodes[0].addr)
    c.assert_no_leak()


def test_dead_prefill_instance_fails_its_requests_on_the_decode_side():
    c = cluster(num_prefill=2)
    room = c.submit("victim", PROMPT, p=0)
    c.link.hold(room)
    c.run()
    c.kill(c.prefills[0])
    c.advance(6.0)
    assert [f.code for f in c.log.failed["victim"]] == [PEER_UNAVAILABLE]
    assert "stopped answering" in c.log.failed["victim"][0].message
    assert c.decodes[0].core.peer_states()[c.prefills[0].addr] == "connecting"
    c.submit("after", PROMPT, p=1, stop=False)
    c.run()
    assert c.log.tokens["after"] == expected(PROMPT, stop=False)
    c.instances.pop(c.prefills[0].addr)
    c.assert_no_leak()


def test_a_decode_instance_dropped_after_a_silence_registers_again():
    c = cluster()
    d = c.decodes[0]
    d.dead = True  # a long pause: nothing reaches it, it sends nothing
    c.advance(6.0)
    assert peers(c.prefills[0].core).get(d.addr).state is PeerState.LOST
    d.dead = False
    c.advance(3.0)
    assert c.decodes[0].core.peer_states() == {c.prefills[0].addr: "registered"}
    assert peers(c.prefills[0].core).registered(d.addr) is not None
    c.submit("after", PROMPT, stop=False)
    c.run()
    assert c.log.tokens["after"] == expected(PROMPT, stop=False)
    c.assert_no_leak()


def test_a_prefill_instance_tells_an_unregistered_decode_instance_to_register_again():
    c = cluster()
    p, d = c.prefills[0], c.decodes[0]
    peer = peers(p.core).get(d.addr)
    peers(p.core).move(peer, PeerState.LOST, c.now)  # lost while the decode side counts itself registered
    c.advance(1.0)
    assert d.core.peer_states() == {p.addr: "connecting"}  # told by the prefill side's answer
    c.advance(1.0)
    assert d.core.peer_states() == {p.addr: "registered"} and peers(p.core).registered(d.addr) is not None
    c.submit("after", [1, 2, 3], stop=False)
    c.run()
    assert c.log.tokens["after"] == expected([1, 2, 3], stop=False)
    c.assert_no_leak()


@pytest.mark.parametrize("decode_first", [False, True])
def test_a_decode_refusal_ends_the_request_on_the_prefill_side_whatever_the_order(decode_first):
    c = cluster(decode_worker={"num_pages": 4})  # the decode pool is too small for this prompt
    c.submit("a", PROMPT, decode_first=decode_first)
    c.run()
    assert {f.code for f in c.log.failed["a"]} == {INVALID_REQUEST}
    assert not c.prefills[0].core.requests  # at once, not after a timeout
    c.advance(31.0)
    assert not rooms(c.prefills[0].core).count(RoomState.REFUSED)  # remembered a while, then forgotten
    c.assert_no_leak()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model", "another-model"),
        ("dtype", "bfloat16"),
        ("num_kv_heads", 8),
        ("backend", "zmq"),
        ("protocol_version", 0),
        ("tp_rank", 1),
    ],
)
def test_registration_check_names_the_mismatching_field(field, value):
    c = Cluster()
    ours = c.prefills[0].core.role.pairing.info
    theirs = with_layout(c.decodes[0].core.role.pairing.info, **{field: value})
    error = check_peer(ours, theirs)
    assert error is not None and error.startswith(f"{field} mismatch") and repr(value) in error
    assert check_peer(ours, c.decodes[0].core.role.pairing.info) is None


def test_registration_pairs_instances_of_different_tp_sizes_over_a_mapping_backend():
    """The fake (and zmq) backend moves each instance's KV through its rank 0: sizes may differ."""
    c = Cluster()
    ours = c.prefills[0].core.role.pairing.info
    assert check_peer(ours, with_layout(c.decodes[0].core.role.pairing.info, tp_size=2)) is None
