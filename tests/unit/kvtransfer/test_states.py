"""Room states (forward only, final states stick), the room table, and the layout checks."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from kvtransfer import (
    DuplicateRoom,
    KVLayout,
    LayoutMismatch,
    TransferConfig,
    TransferState,
    check_caches,
    check_peer_layout,
    layout_from_caches,
    make_backend,
)
from kvtransfer.rooms import RoomTable
from protocol.codec import decode, encode
from protocol.dataplane import KVRegister
from tests.unit.kvtransfer.kv_helpers import layout, pool

S = TransferState


def table(timeout: float = 30.0) -> RoomTable:
    return RoomTable(TransferConfig.uniform(timeout))


def test_the_transition_rule() -> None:
    assert S.BOOTSTRAPPING.may_move_to(S.TRANSFERRING) and S.TRANSFERRING.may_move_to(S.TRANSFERRING)
    assert not S.TRANSFERRING.may_move_to(S.WAITING_FOR_INPUT)
    assert not S.FAILED.may_move_to(S.FAILED) and not S.DONE.may_move_to(S.FAILED)


def test_states_only_move_forward() -> None:
    t = table()
    t.add(1, S.BOOTSTRAPPING)
    assert t.advance(1, S.TRANSFERRING)
    assert not t.advance(1, S.WAITING_FOR_INPUT)  # backwards: ignored
    assert t.state(1) == S.TRANSFERRING
    assert t.advance(1, S.TRANSFERRING)  # progress in the same state re-arms its timeout


def test_failed_sticks_and_is_reported_once() -> None:
    t = table()
    t.add(1, S.TRANSFERRING)
    assert t.fail(1, "boom")
    assert not t.advance(1, S.DONE, first_token=3)
    assert not t.fail(1, "again")
    (result,) = t.poll()
    assert (result.state, result.error, result.first_token) == (S.FAILED, "boom", None)
    assert t.poll() == [] and t.state(1) is None  # forgotten once reported


def test_done_sticks_too() -> None:
    t = table()
    t.add(1, S.TRANSFERRING)
    assert t.advance(1, S.DONE, first_token=9)
    assert not t.fail(1, "late failure")
    (result,) = t.poll()
    assert result.ok and result.first_token == 9


def test_duplicate_room_is_refused_until_its_result_is_taken() -> None:
    t = table()
    t.add(4, S.BOOTSTRAPPING)
    with pytest.raises(DuplicateRoom):
        t.add(4, S.BOOTSTRAPPING)
    t.fail(4, "x")
    with pytest.raises(DuplicateRoom):
        t.claim(4, S.BOOTSTRAPPING)
    t.poll()
    t.add(4, S.BOOTSTRAPPING)


def test_a_room_the_peer_announced_is_reported_only_once_claimed() -> None:
    t = table()
    t.add(1, S.WAITING_FOR_INPUT, reported=False)
    t.fail(1, "never claimed")
    assert t.poll() == [] and t.state(1) is None
    t.add(2, S.WAITING_FOR_INPUT, reported=False)
    t.claim(2, S.BOOTSTRAPPING)
    assert t.state(2) == S.WAITING_FOR_INPUT  # adopted as it is
    with pytest.raises(DuplicateRoom):
        t.claim(2, S.BOOTSTRAPPING)
    t.fail(2, "x")
    assert [r.room for r in t.poll()] == [2]


def test_a_reported_failure_is_remembered_for_late_announcements() -> None:
    t = RoomTable(TransferConfig.uniform(0.2))
    t.add(1, S.WAITING_FOR_INPUT)
    t.add(2, S.WAITING_FOR_INPUT)
    t.fail(1, "oom")
    t.advance(2, S.DONE)
    assert t.failed_recently(1) is None  # not reported yet: the room itself still answers
    t.poll()
    assert t.failed_recently(1) == "oom" and t.failed_recently(2) is None
    time.sleep(0.25)
    assert t.failed_recently(1) is None


def test_held_failure_waits_for_the_writer() -> None:
    t = table()
    t.add(1, S.TRANSFERRING, peer="p")
    t.add(2, S.TRANSFERRING, peer="p")
    t.fail(1, "aborted", hold=True)
    t.fail(2, "aborted", hold=True)
    assert t.poll() == [] and t.state(1) == S.FAILED
    t.release(1)
    assert [r.room for r in t.poll()] == [1]
    t.release_peer("p")  # the writer died
    assert [r.room for r in t.poll()] == [2]


def test_expired_lists_rooms_past_their_state_timeout() -> None:
    t = table(timeout=0.05)
    t.add(1, S.BOOTSTRAPPING)
    t.add(2, S.WAITING_FOR_INPUT)
    t.fail(2, "final rooms never expire")
    assert t.expired(time.monotonic()) == []
    assert t.next_deadline() is not None
    assert [r.room for r in t.expired(time.monotonic() + 0.1)] == [1]


def test_poll_waits_on_a_condition_for_the_first_result() -> None:
    t = table()
    t.add(1, S.TRANSFERRING)
    timer = threading.Timer(0.05, t.advance, args=(1, S.DONE))
    timer.start()
    start = time.monotonic()
    (result,) = t.poll(timeout=5.0)
    assert result.ok and time.monotonic() - start < 2.0
    timer.join()


def test_layout_mismatch_names_the_field() -> None:
    ours = layout("zmq")
    with pytest.raises(LayoutMismatch, match="page_size mismatch") as info:
        check_peer_layout(ours, layout("zmq", page_size=32))
    assert info.value.field == "page_size"
    for name, value in [("dtype", "bfloat16"), ("num_layers", 3), ("tp_rank", 1), ("protocol_version", 0)]:
        with pytest.raises(LayoutMismatch, match=f"{name} mismatch"):
            check_peer_layout(ours, layout("zmq", **{name: value}))
    assert decode(encode(KVRegister(ours))).layout == ours  # type: ignore[attr-defined]


def test_the_layout_check_in_protocol_names_the_field_and_matches_the_error() -> None:
    ours, theirs = layout("zmq"), layout("zmq", head_dim=16)
    assert ours.mismatch(ours) is None and ours.mismatched_field(theirs) == "head_dim"
    with pytest.raises(LayoutMismatch) as info:
        check_peer_layout(ours, theirs)
    assert ours.mismatch(theirs) == str(info.value) and "head_dim mismatch" in str(info.value)


def test_layout_checks_the_local_pool() -> None:
    k, v = pool()
    check_caches(layout("zmq"), k, v)
    assert layout_from_caches(k, model="tiny", backend="zmq") == layout("zmq")
    with pytest.raises(LayoutMismatch, match="num_layers mismatch"):
        check_caches(layout("zmq", num_layers=3), k, v)
    with pytest.raises(LayoutMismatch, match="head_dim mismatch"):
        check_caches(layout("zmq", head_dim=16), k, v)
    with pytest.raises(LayoutMismatch, match="dtype mismatch"):
        check_caches(layout("zmq"), [t.to(torch.float16) for t in k], v)


def test_page_bytes_counts_every_layer_k_and_v() -> None:
    llama8b = KVLayout("llama", 32, 16, 8, 128, "bfloat16", "zmq")
    assert llama8b.page_bytes * 256 == 512 << 20  # 4096 tokens = 512 MiB


def test_make_backend_rejects_bad_arguments() -> None:
    k, v = pool()
    with pytest.raises(ValueError, match="unknown KV transfer backend"):
        make_backend("rdma", "decode", layout("zmq"), k, v)
    with pytest.raises(ValueError, match="role"):
        make_backend("zmq", "router", layout("zmq"), k, v)
    with pytest.raises(LayoutMismatch, match="backend mismatch"):
        make_backend("fake", "decode", layout("zmq"), k, v)
    with pytest.raises(ValueError, match="explicit address"):
        make_backend("zmq", "prefill", layout("zmq"), k, v)
