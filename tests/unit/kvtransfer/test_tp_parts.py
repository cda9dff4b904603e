"""A room in parts (``kvtransfer.tp_parts``): each rank's reporter sends the results of its own
side's rooms to rank 0, which reports a room once every part is in; decode registrations wait
for every rank. Real zmq sockets over ipc; the sides are stand-ins that hand out results."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from kvtransfer.base import RoomResult, TransferState
from kvtransfer.tp_hub import HeadRange, InstanceHeads, instance_layout
from kvtransfer.tp_parts import (
    SUPERSEDED,
    PartReporter,
    RoomParts,
    parts_address,
    peer_for_rank,
    rank_transfer_address,
)
from protocol.dataplane import TokenLogprob
from protocol.messages import KVPeerRegistered, TransferResult
from tests.unit.kvtransfer.kv_helpers import layout

TP = 3


class Side:
    """What a reporter polls: results handed to it by the test."""

    def __init__(self) -> None:
        self._results: list[RoomResult] = []
        self._ready = threading.Condition()

    def finish(self, *results: RoomResult) -> None:
        with self._ready:
            self._results += results
            self._ready.notify_all()

    def poll(self, timeout: float = 0.0) -> list[RoomResult]:
        with self._ready:
            self._ready.wait_for(lambda: bool(self._results), timeout)
            out, self._results = self._results, []
            return out

    def link_states(self) -> dict[str, str]:
        return {"tcp://prefill:1": "registered"}


def done(room: int, token: int = 7) -> RoomResult:
    return RoomResult(room, TransferState.DONE, token, TokenLogprob(-0.5))


def failed(room: int, error: str) -> RoomResult:
    return RoomResult(room, TransferState.FAILED, error=error)


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[tuple[RoomParts, list[Side], list[PartReporter]]]:
    ctx = zmq.Context()
    address = parts_address(f"file://{tmp_path}/rendezvous")
    sides = [Side() for _ in range(TP)]
    parts = RoomParts(ctx, address, TP)
    reporters = [PartReporter(ctx, address, rank, side) for rank, side in enumerate(sides)]
    try:
        yield parts, sides, reporters
    finally:
        for reporter in reporters:
            reporter.close()
        parts.close()
        ctx.term()


def results_within(parts: RoomParts, count: int, timeout: float = 5.0) -> list[RoomResult]:
    got: list[RoomResult] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got += parts.poll(0.1)
    return got


def test_a_room_is_done_once_every_rank_s_part_is(instance) -> None:
    parts, sides, _ = instance
    sides[0].finish(done(1, token=42))
    sides[2].finish(done(1, token=42))
    assert parts.poll(0.3) == [] and parts.open_rooms == 1  # rank 1's part is still out
    sides[1].finish(done(1, token=42))
    (result,) = results_within(parts, 1)
    assert result.ok and result.first_token == 42 and result.first_logprob == TokenLogprob(-0.5)
    assert parts.open_rooms == 0
    links = {"tcp://prefill:1": "registered", "rank 1: tcp://prefill:1": "registered",
             "rank 2: tcp://prefill:1": "registered"}
    deadline = time.monotonic() + 5
    while parts.link_states() != links and time.monotonic() < deadline:
        parts.poll(0.1)
    assert parts.link_states() == links  # every rank's, each told by its reporter


def test_a_failed_part_fails_the_room_naming_the_rank_once_every_part_is_in(instance) -> None:
    parts, sides, _ = instance
    sides[1].finish(failed(5, "decode side: link lost"))
    sides[0].finish(done(5), done(6))
    assert results_within(parts, 1, timeout=0.5) == []  # rank 2 may still be writing room 5
    sides[2].finish(done(5), done(6))
    sides[1].finish(done(6))
    got = {r.room: r for r in results_within(parts, 2)}
    assert got[5].state is TransferState.FAILED and got[5].error == "rank 1: decode side: link lost"
    assert got[6].ok and parts.open_rooms == 0


def test_refusals_are_failed_parts(instance) -> None:
    """A rank's side refused the room (say, a duplicate): its part fails at once."""
    parts, sides, reporters = instance
    assert reporters[2].refused([TransferResult(9, ok=False, error="room 9 exists")]) == []
    sides[0].finish(done(9))
    sides[1].finish(done(9))
    (result,) = results_within(parts, 1)
    assert not result.ok and result.error == "rank 2: room 9 exists"


def test_registration_waits_for_every_other_rank(instance) -> None:
    parts, _, reporters = instance
    reporters[1].registered(1, KVPeerRegistered("tcp://p:1", ok=True))
    reporters[2].registered(1, KVPeerRegistered("tcp://p:1", ok=True))
    waiting = threading.Thread(target=lambda: results_within(parts, 1, timeout=1.0))  # drains the channel
    waiting.start()
    assert parts.registrations.wait("tcp://p:1", 1, timeout=5.0) is None
    waiting.join()


def test_registration_names_the_ranks_that_failed_or_did_not_answer(instance) -> None:
    parts, _, reporters = instance
    reporters[1].registered(2, KVPeerRegistered("tcp://p:1", ok=False, error="tp_rank mismatch"))
    reporters[2].registered(1, KVPeerRegistered("tcp://p:1", ok=True))  # an earlier attempt's
    drain = threading.Thread(target=lambda: results_within(parts, 1, timeout=1.5))
    drain.start()
    assert parts.registrations.wait("tcp://p:1", 2, timeout=1.0) == "ranks [2] did not register within 1s"
    drain.join()
    reporters[1].registered(3, KVPeerRegistered("tcp://p:1", ok=False, error="tp_rank mismatch"))
    reporters[2].registered(3, KVPeerRegistered("tcp://p:1", ok=True))
    drain = threading.Thread(target=lambda: results_within(parts, 1, timeout=1.0))
    drain.start()
    assert parts.registrations.wait("tcp://p:1", 3, timeout=5.0) == "rank 1: tp_rank mismatch"
    drain.join()


def test_an_attempt_decided_later_is_superseded_and_a_failed_one_settled(instance) -> None:
    """A second RegisterKVPeer for the same prefill instance decided first supersedes the first
    (not reported); rank 0's own failure settles its attempt, dropping what the others sent."""
    parts, _, reporters = instance
    barrier = parts.registrations
    first: list[str | None] = []
    waiting = threading.Thread(target=lambda: first.append(barrier.wait("tcp://p:1", 1, timeout=10.0)))
    waiting.start()
    reporters[1].registered(2, KVPeerRegistered("tcp://p:1", ok=True))
    reporters[2].registered(2, KVPeerRegistered("tcp://p:1", ok=True))
    results_within(parts, 1, timeout=0.5)  # drains the channel
    assert barrier.wait("tcp://p:1", 2, timeout=5.0) is None
    waiting.join(timeout=5.0)
    assert first == [SUPERSEDED]
    reporters[1].registered(3, KVPeerRegistered("tcp://p:1", ok=True))
    results_within(parts, 1, timeout=0.5)
    barrier.settle("tcp://p:1", 3)  # rank 0's own registration failed
    reporters[2].registered(3, KVPeerRegistered("tcp://p:1", ok=True))  # too late: dropped
    results_within(parts, 1, timeout=0.5)
    assert barrier.wait("tcp://p:1", 3, timeout=0.1) == SUPERSEDED


def test_addresses_and_layouts_of_the_ranks() -> None:
    assert rank_transfer_address("tcp://10.0.0.1:*", 1) == "tcp://10.0.0.1:*"  # a free port each
    assert rank_transfer_address("ipc:///run/pd/prefill0-kv", 0) == "ipc:///run/pd/prefill0-kv"
    assert rank_transfer_address("ipc:///run/pd/prefill0-kv", 2) == "ipc:///run/pd/prefill0-kv2"
    assert parts_address("file:///run/pd/decode0-tp-ab") == "ipc:///run/pd/decode0-tp-ab-kv-parts"
    with pytest.raises(ValueError, match="ranks on one host"):
        parts_address("tcp://10.0.0.1:29500")
    assert peer_for_rank(["a", "b"], 1) == "b"
    with pytest.raises(ValueError, match="advertised 1 rank senders; rank 1 has none"):
        peer_for_rank(["a"], 1)
    two, one = InstanceHeads(2, (HeadRange(0, 1), HeadRange(1, 1))), InstanceHeads(2, (HeadRange(0, 2),))
    mine = instance_layout(layout("cuda_ipc", num_kv_heads=1), two, tp_rank=1)
    assert (mine.num_kv_heads, mine.tp_size, mine.tp_rank) == (2, 2, 1)
    assert mine.mismatched_field(instance_layout(layout("cuda_ipc"), two, 0)) == "tp_rank"
    assert mine.mismatched_field(instance_layout(layout("cuda_ipc"), one, 1)) == "tp_size"
