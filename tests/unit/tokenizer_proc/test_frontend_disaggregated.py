"""The front end of a disaggregated deployment, against fake prefill and decode instances."""

from __future__ import annotations

import time

import pytest

from protocol.config import EMBEDDED
from protocol.messages import TRANSFER_FAILED
from protocol.transport import ipc_addr
from tests.fakes.frontend import FakeDecode
from tokenizer_proc.client import ServerError

BOS = EMBEDDED.bos_token_id


def barrier(client) -> None:
    """Return once every instance has handled what the front end sent it so far: a status
    query travels behind those messages, and each fake answers it only after them."""
    assert all(inst["alive"] for inst in client.status()["instances"])


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def test_both_sides_get_the_request_with_one_room_and_the_decode_side_answers(make_pd):
    dep = make_pd()
    (prefill,), (decode,) = dep.prefills, dep.decodes
    with dep.client() as client:
        out = client.generate("hi", max_new_tokens=5, temperature=0)
        second = client.generate("hi", max_new_tokens=1)
        barrier(client)  # the prefill side, which does not answer, has seen everything
    assert out["text"] == "Hello" and out["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "cached_tokens": 0}
    assert second["text"] == "H"
    p_reqs, d_reqs = prefill.requests(), decode.requests()
    assert len(p_reqs) == len(d_reqs) == 2
    for p_req, d_req in zip(p_reqs, d_reqs, strict=True):
        assert p_req.rid == d_req.rid and p_req.input_ids == d_req.input_ids == [BOS, *b"hi"]
        assert p_req.sampling == d_req.sampling
        assert p_req.room is not None and p_req.room == d_req.room
        assert p_req.prefill_addr is None and d_req.prefill_addr == prefill.input_addr
    assert p_reqs[0].room != p_reqs[1].room
    (connect, *_) = decode.connects()
    assert connect.prefill_addrs == [prefill.input_addr]
    assert not prefill.aborts()  # a request the decode side finished is not aborted anywhere


def test_connect_prefill_is_repeated_until_the_decode_side_lists_every_prefill(make_pd):
    dep = make_pd(prefill=[{}, {}], decode=[{"ignore_connects": 2}])
    (decode,) = dep.decodes
    assert len(decode.connects()) >= 3
    assert set(decode.peers) == {p.input_addr for p in dep.prefills}
    sent = len(decode.connects())
    time.sleep(0.2)  # four heartbeat intervals: no more introductions once registered
    assert len(decode.connects()) == sent


def test_status_lists_every_instance_with_its_role(make_pd):
    dep = make_pd(prefill=[{}], decode=[{}, {}])
    with dep.client() as client:
        status = client.status()
    assert status["ready"] is True
    roles = [(i["name"], i["role"], i["alive"]) for i in status["instances"]]
    assert roles == [("prefill0", "prefill", True), ("decode0", "decode", True), ("decode1", "decode", True)]
    for inst in status["instances"]:
        assert inst["free_pages"] + inst["cached_pages"] == inst["total_pages"]


def test_refused_registration_is_named_in_the_error(make_pd, ipc_dir):
    refuse = {ipc_addr(ipc_dir, "prefill-0"): "page_size mismatch (decode 16, prefill 32)"}
    dep = make_pd(decode=[{"refuse": refuse}], wait_ready=False)
    (prefill,), (decode,) = dep.prefills, dep.decodes
    assert prefill.input_addr in refuse
    with dep.client() as client:

        def error_message() -> str:
            with pytest.raises(ServerError) as err:
                client.generate("x", max_new_tokens=1)
            assert err.value.code == "peer_unavailable"
            return err.value.message

        wait_for(lambda: "refused" in error_message())
        assert "decode0 refused by prefill0: page_size mismatch (decode 16, prefill 32)" in error_message()
        assert client.status()["ready"] is False
    assert not prefill.requests() and not decode.requests()


@pytest.mark.parametrize("policy", ["round_robin", "least_load", "prefix"])
def test_every_policy_serves_over_pairs(make_pd, policy):
    dep = make_pd(prefill=[{}, {}], decode=[{}, {}], routing_policy=policy)
    with dep.client() as client:
        rids = [client.submit(input_ids=[BOS, i % 2] * 3, max_new_tokens=2) for i in range(8)]
        assert all(client.result(rid)["text"] == "He" for rid in rids)
        barrier(client)
    p_rooms = {r.room for p in dep.prefills for r in p.requests()}
    d_rooms = {r.room for d in dep.decodes for r in d.requests()}
    assert len(p_rooms) == 8 and p_rooms == d_rooms
    if policy == "prefix":  # each prompt meets one prefill instance's cache
        for prompt in ([BOS, 0] * 3, [BOS, 1] * 3):
            assert sum(any(r.input_ids == prompt for r in p.requests()) for p in dep.prefills) == 1
    if policy == "round_robin":
        assert [len(d.requests()) for d in dep.decodes] == [4, 4]


def test_client_abort_reaches_both_sides_and_decode_answers(make_pd):
    dep = make_pd()
    (prefill,), (decode,) = dep.prefills, dep.decodes
    with dep.client() as client:
        rid = client.submit("x", stream=True, max_new_tokens=200, ignore_eos=True)
        assert not client.next_message(timeout=5)["finished"]
        client.abort(rid)
        out = client.result(rid)
        assert out["finish_reason"] == "abort" and out["usage"]["completion_tokens"] < 200
        wait_for(lambda: prefill.aborts())
        (p_req,) = prefill.requests()
        assert [a.rid for a in prefill.aborts()] == [a.rid for a in decode.aborts()] == [p_req.rid]
        status = client.status()
    assert all(i["prefilling"] == i["decoding"] == 0 for i in status["instances"])


@pytest.mark.parametrize("stream", [True, False])
def test_a_failure_that_answers_a_client_abort_ends_as_an_abort(make_pd, stream):
    """The decode side may fail a request its prefill side dropped on the abort (transfer_failed)
    before the abort reaches it: the client still gets the abort it asked for."""
    dep = make_pd(decode=[{"fail_on_abort": (TRANSFER_FAILED, "the prefill side aborted the room")}])
    (decode,) = dep.decodes
    with dep.client() as client:
        rid = client.submit("x", stream=stream, max_new_tokens=200, ignore_eos=True)
        wait_for(lambda: decode.requests())
        client.abort(rid)
        out = client.result(rid)
        assert out["finished"] and out["finish_reason"] == "abort"
        assert out["usage"]["completion_tokens"] < 200
        assert client.generate("x", max_new_tokens=2)["finish_reason"] == "length"  # still serving


def test_stop_string_aborts_both_sides(make_pd):
    dep = make_pd()
    (prefill,), (decode,) = dep.prefills, dep.decodes
    with dep.client() as client:
        out = client.generate("x", max_new_tokens=100, stop=["o, w"])
        assert out["text"] == "Hell" and out["finish_reason"] == "stop"
        wait_for(lambda: prefill.aborts() and decode.aborts())
    assert prefill.aborts()[0].reason == decode.aborts()[0].reason == "stop"


def test_prefill_failure_reaches_the_client_once_and_aborts_decode(make_pd):
    dep = make_pd(prefill=[{"fail": (TRANSFER_FAILED, "transfer to decode0 timed out")}])
    (decode,) = dep.decodes
    decode.generating.clear()  # the decode side holds the request while the prefill side fails
    with dep.client() as client:
        with pytest.raises(ServerError) as err:
            client.generate("x", max_new_tokens=3)
        assert err.value.code == TRANSFER_FAILED and "timed out" in err.value.message
        wait_for(lambda: decode.aborts())
        (d_req,) = decode.requests()
        assert [a.rid for a in decode.aborts()] == [d_req.rid]
        decode.generating.set()
        assert client.next_message(timeout=0.1) is None  # decode's abort answer is dropped


def test_late_prefill_failure_does_not_end_a_request_the_decode_side_streams(make_pd):
    dep = make_pd(prefill=[{"late_fail": (TRANSFER_FAILED, "the acknowledgement was lost")}])
    (decode,) = dep.decodes
    with dep.client() as client:
        rid = client.submit("x", stream=True, max_new_tokens=10, ignore_eos=True)
        assert not client.next_message(timeout=5)["finished"]
        decode.generating.clear()
        client.status()  # the prefill fake sends its late failure first, on the same socket
        decode.generating.set()
        out = client.result(rid)
    assert out["finish_reason"] == "length"


def test_dead_decode_fails_its_requests_and_new_ones_go_to_the_live_one(make_pd):
    dep = make_pd(prefill=[{}], decode=[{}, {}], routing_policy="round_robin")
    (prefill,), (d0, d1) = dep.prefills, dep.decodes
    d0.generating.clear()
    with dep.client() as client:
        on_d0 = client.submit("x", max_new_tokens=3)
        on_d1 = client.submit("x", max_new_tokens=3)
        assert client.result(on_d1)["text"] == "Hel"
        d0.heartbeats.clear()
        with pytest.raises(ServerError) as err:
            client.result(on_d0)
        assert err.value.code == "peer_unavailable" and "decode0" in err.value.message
        (lost,) = d0.requests()
        wait_for(lambda: prefill.aborts())
        assert [a.rid for a in prefill.aborts()] == [lost.rid]
        rids = [client.submit("x", max_new_tokens=2) for _ in range(4)]
        assert all(client.result(rid)["text"] == "He" for rid in rids)
        status = client.status()
    assert len(d0.requests()) == 1 and len(d1.requests()) == 5
    alive = {i["name"]: i["alive"] for i in status["instances"]}
    assert alive == {"prefill0": True, "decode0": False, "decode1": True}


def test_a_restarted_decode_instance_is_introduced_again(make_pd):
    dep = make_pd()
    (prefill,), (decode,) = dep.prefills, dep.decodes
    decode.stop()
    replacement = FakeDecode(decode.input_addr, name="decode0-restarted")
    dep.fakes[dep.fakes.index(decode)] = replacement.start()  # stopped by the fixture
    wait_for(lambda: replacement.peers == {prefill.input_addr: "registered"})
    with dep.client() as client:
        status = client.wait_ready(timeout=5)
        assert "decode0-restarted" in [i["name"] for i in status["instances"]]
        assert client.generate("x", max_new_tokens=2)["text"] == "He"
    assert replacement.connects()[0].prefill_addrs == [prefill.input_addr]


def test_dead_prefill_fails_requests_in_prefill_but_not_those_already_decoding(make_pd):
    dep = make_pd()
    (prefill,), (decode,) = dep.prefills, dep.decodes
    with dep.client() as client:
        decoding = client.submit("x", stream=True, max_new_tokens=20, ignore_eos=True)
        assert not client.next_message(timeout=5)["finished"]
        decode.generating.clear()
        prefilling = client.submit("y", max_new_tokens=3)
        wait_for(lambda: len(decode.requests()) == 2)
        prefill.heartbeats.clear()
        with pytest.raises(ServerError) as err:
            client.result(prefilling)
        assert err.value.code == "peer_unavailable" and "prefill0" in err.value.message
        wait_for(lambda: decode.aborts())
        assert [a.rid for a in decode.aborts()] == [decode.requests()[1].rid]
        decode.generating.set()
        out = client.result(decoding)
    assert out["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 20
