"""The KVSender / KVReceiver contract, run against every backend that works on CPU (zmq, fake, and
nixl when its package is installed)."""

from __future__ import annotations

import pytest

from kvtransfer import DuplicateRoom, RegistrationRefused, TransferConfig, TransferState, make_backend
from tests.unit.kvtransfer.kv_helpers import (
    CPU_BACKENDS,
    FAST,
    HEAD_DIM,
    Pair,
    address,
    connect,
    layout,
    pages_equal,
    pool,
    wait_results,
)


def test_pages_move_exactly_over_several_chunks_with_first_token_and_ack(pair: Pair) -> None:
    s, r = pair.sender, pair.receiver
    r.expect(7, pair.peer, [9, 3, 12, 5])
    s.add_room(7)
    assert s.state(7) in (TransferState.BOOTSTRAPPING, TransferState.WAITING_FOR_INPUT)
    assert s.send(7, [1, 2], [9, 3])
    assert s.send(7, [4], [12])
    assert s.send(7, [6], [5], first_token=42)

    (done,) = wait_results(r)
    assert (done.room, done.state, done.first_token, done.error) == (7, TransferState.DONE, 42, None)
    assert pages_equal(pair.src, [1, 2, 4, 6], pair.dst, [9, 3, 12, 5])
    untouched = [p for p in range(16) if p not in (9, 3, 12, 5)]
    assert all(float(c[untouched].abs().sum()) == 0.0 for caches in pair.dst for c in caches)
    (acked,) = wait_results(s)  # the sender's DONE is the decode side's acknowledgement
    assert (acked.room, acked.state) == (7, TransferState.DONE)
    assert s.state(7) is None and r.state(7) is None  # reported once, then forgotten


def test_sends_issued_before_the_decode_side_announces_are_held(pair: Pair) -> None:
    s, r = pair.sender, pair.receiver
    s.add_room(3)
    s.send(3, [1], [4])
    s.send(3, [2], [5], first_token=7)
    assert r.poll() == []
    r.expect(3, pair.peer, [4, 5])
    (done,) = wait_results(r)
    assert done.ok and done.first_token == 7
    assert pages_equal(pair.src, [1, 2], pair.dst, [4, 5])
    assert wait_results(s)[0].ok


def test_final_send_may_carry_no_pages(pair: Pair) -> None:
    pair.receiver.expect(1, pair.peer, [2])
    pair.sender.add_room(1)
    pair.sender.send(1, [3], [2])
    pair.sender.send(1, [], [], first_token=5)
    (done,) = wait_results(pair.receiver)
    assert done.ok and done.first_token == 5


def test_abort_from_the_decode_side_fails_both_sides(pair: Pair) -> None:
    pair.receiver.expect(11, pair.peer, [1, 2])
    pair.sender.add_room(11)
    pair.sender.send(11, [3], [1])
    pair.receiver.abort(11, "client went away")
    (failed,) = wait_results(pair.receiver)
    assert failed.state == TransferState.FAILED and "client went away" in (failed.error or "")
    (failed,) = wait_results(pair.sender)
    assert failed.state == TransferState.FAILED and "decode side" in (failed.error or "")
    assert not pair.sender.send(11, [4], [2], first_token=1)  # late send: ignored


def test_abort_from_the_prefill_side_fails_both_sides(pair: Pair) -> None:
    pair.receiver.expect(12, pair.peer, [1])
    pair.sender.add_room(12)
    pair.sender.abort(12, "prefill oom")
    (failed,) = wait_results(pair.sender)
    assert failed.state == TransferState.FAILED and "prefill oom" in (failed.error or "")
    (failed,) = wait_results(pair.receiver)
    assert failed.state == TransferState.FAILED and "prefill oom" in (failed.error or "")


def test_an_announcement_after_the_prefill_side_failed_the_room_is_refused(pair: Pair) -> None:
    pair.sender.add_room(13)
    pair.sender.abort(13, "prefill oom")
    assert wait_results(pair.sender)[0].state == TransferState.FAILED  # reported and forgotten
    pair.receiver.expect(13, pair.peer, [1])  # arrives late: must not look like a new room
    (failed,) = wait_results(pair.receiver)
    assert failed.state == TransferState.FAILED and "prefill oom" in (failed.error or "")


def test_abort_of_an_unknown_room_is_ignored(pair: Pair) -> None:
    pair.sender.abort(99)
    pair.receiver.abort(99)
    assert pair.sender.poll(timeout=0.1) == [] and pair.receiver.poll(timeout=0.1) == []


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_each_non_final_state_times_out(backend: str) -> None:
    p = connect(backend, TransferConfig.uniform(0.3, heartbeat_interval=0.05, heartbeat_timeout=5.0))
    try:
        p.receiver.expect(1, p.peer, [5])  # the prefill never sends: WAITING_FOR_INPUT expires
        p.sender.add_room(2)  # never announced: BOOTSTRAPPING expires
        p.receiver.expect(3, p.peer, [6, 7])
        p.sender.add_room(3)
        p.sender.send(3, [1], [6])  # and never the rest: TRANSFERRING expires
        decode = {r.room: r.error or "" for r in wait_results(p.receiver, count=2)}
        prefill = {r.room: r.error or "" for r in wait_results(p.sender, count=2)}
        assert "timed out in WAITING_FOR_INPUT" in decode[1] and "timed out in BOOTSTRAPPING" in prefill[2]
        assert "timed out in TRANSFERRING" in decode[3] + prefill[3]
        assert set(prefill) == {2, 3}  # room 1 was never added on the prefill side: not reported
    finally:
        p.close()


def test_duplicate_rooms_are_refused(pair: Pair) -> None:
    pair.receiver.expect(5, pair.peer, [1])
    with pytest.raises(DuplicateRoom):
        pair.receiver.expect(5, pair.peer, [2])
    pair.sender.add_room(5)
    with pytest.raises(DuplicateRoom):
        pair.sender.add_room(5)
    # A second decode worker announcing the same room to this prefill worker is refused too.
    other = make_backend(pair.backend, "decode", layout(pair.backend), *pool(), config=FAST)
    try:
        other.expect(5, other.register(pair.sender.address), [3])
        (refused,) = wait_results(other)
        assert refused.state == TransferState.FAILED and "already announced" in (refused.error or "")
    finally:
        other.close()


def test_sends_outside_the_announced_pages_fail_the_room(pair: Pair) -> None:
    pair.receiver.expect(6, pair.peer, [1, 2])
    pair.sender.add_room(6)
    pair.sender.send(6, [3], [8], first_token=1)
    (failed,) = wait_results(pair.sender)
    assert failed.state == TransferState.FAILED and "not announced" in (failed.error or "")
    assert wait_results(pair.receiver)[0].state == TransferState.FAILED
    assert all(float(c.abs().sum()) == 0.0 for caches in pair.dst for c in caches)


def test_a_last_chunk_that_leaves_pages_unwritten_fails(pair: Pair) -> None:
    pair.receiver.expect(8, pair.peer, [1, 2])
    pair.sender.add_room(8)
    pair.sender.send(8, [3], [1], first_token=1)
    (failed,) = wait_results(pair.receiver)
    assert failed.state == TransferState.FAILED and "unwritten" in (failed.error or "")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_registration_refuses_a_mismatching_layout_naming_the_field(backend: str) -> None:
    sender = make_backend(backend, "prefill", layout(backend), *pool(0), address=address(backend))
    wide = layout(backend, head_dim=2 * HEAD_DIM)
    receiver = make_backend(backend, "decode", wide, *pool(head_dim=2 * HEAD_DIM))
    try:
        with pytest.raises(RegistrationRefused, match="head_dim mismatch"):
            receiver.register(sender.address, timeout=5.0)
        with pytest.raises(Exception, match="not a registered prefill peer"):
            receiver.expect(1, sender.address, [1])
    finally:
        receiver.close()
        sender.close()
