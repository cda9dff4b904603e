"""Instances of different ``--tp-size``s over a slicing backend (``kvtransfer.tp_slices``): which
rank sends which heads to which, the ids of a room's parts, a rank's rooms combined from their
parts, and nixl head-slice WRITEs between pools of different head counts, in both directions,
on fresh random pools (in one process, each rank a sender or receiver of its own)."""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from collections.abc import Iterator

import pytest
import torch

from kvtransfer import make_backend
from kvtransfer.base import DuplicateRoom, RoomResult, TransferError, TransferState
from kvtransfer.tp_hub import HeadRange, InstanceHeads
from kvtransfer.tp_slices import (
    HeadSlice,
    SlicedReceiver,
    SlicedSender,
    head_slices,
    part_room,
    slice_between,
)
from protocol.dataplane import ROOM_ID_BITS, kv_head_range
from tests.unit.kvtransfer.kv_helpers import FAST, NEEDS_NIXL, NUM_LAYERS, NUM_PAGES, PAGE_SIZE, layout

HEAD_DIM = 8
TOTAL_HEADS = 4


def test_every_decode_head_comes_from_the_lowest_prefill_rank_holding_it() -> None:
    one, two = InstanceHeads.dealt(4, 1), InstanceHeads.dealt(4, 2)
    assert head_slices(two, one) == [HeadSlice(0, 0, 0, 0, 2), HeadSlice(1, 0, 0, 2, 2)]
    assert head_slices(one, two) == [HeadSlice(0, 0, 0, 0, 2), HeadSlice(0, 1, 2, 0, 2)]
    assert head_slices(two, two) == [HeadSlice(0, 0, 0, 0, 2), HeadSlice(1, 1, 0, 0, 2)]
    uneven_two, three = InstanceHeads.dealt(3, 2), InstanceHeads.dealt(3, 3)  # 2 + 1 heads; 1 + 1 + 1
    assert head_slices(uneven_two, three) == [
        HeadSlice(0, 0, 0, 0, 1), HeadSlice(0, 1, 1, 0, 1), HeadSlice(1, 2, 0, 0, 1)
    ]
    replicated = InstanceHeads.dealt(2, 4)  # each head on two ranks: the lower one sends
    one_of_two = InstanceHeads.dealt(2, 1)
    assert head_slices(replicated, one_of_two) == [HeadSlice(0, 0, 0, 0, 1), HeadSlice(2, 0, 0, 1, 1)]
    assert head_slices(one_of_two, replicated) == [
        HeadSlice(0, d, d // 2, 0, 1) for d in range(4)
    ]
    with pytest.raises(ValueError, match="4 and 2 KV heads"):
        head_slices(one, InstanceHeads.dealt(2, 1))


@pytest.mark.parametrize("seed", range(3))
def test_the_slices_cover_every_head_of_every_decode_rank_once(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(50):
        total = rng.choice([1, 2, 3, 4, 6, 8])
        sizes = [t for t in (1, 2, 3, 4, 8) if t <= total or t % total == 0]
        prefill, decode = (InstanceHeads.dealt(total, rng.choice(sizes)) for _ in range(2))
        covered = {d: [] for d in range(decode.size)}
        for s in head_slices(prefill, decode):
            src = prefill.ranks[s.prefill_rank]
            assert s.src_start >= 0 and s.src_start + s.count <= src.count
            model_heads = range(src.start + s.src_start, src.start + s.src_start + s.count)
            dst = decode.ranks[s.decode_rank]
            first = dst.start + s.dst_start
            assert list(model_heads) == list(range(first, first + s.count))
            covered[s.decode_rank] += model_heads
        assert all(sorted(heads) == list(range(decode.ranks[d].start, decode.ranks[d].stop))
                   for d, heads in covered.items())


def test_the_split_is_the_engine_s() -> None:
    assert [kv_head_range(3, 2, r) for r in range(2)] == [(0, 2), (2, 1)]
    assert [kv_head_range(2, 4, r) for r in range(4)] == [(0, 1), (0, 1), (1, 1), (1, 1)]
    assert InstanceHeads.dealt(3, 2) == InstanceHeads(3, (HeadRange(0, 2), HeadRange(2, 1)))


def test_part_ids_are_distinct_per_rank_and_the_room_s_own_for_equal_ranks() -> None:
    room = (12345 << 32) | 7
    assert part_room(room, 1, 1) == room
    by_sender = {part_room(room, 0, d) for d in range(8)}
    by_receiver = {part_room(room, p, 0) for p in range(8)}
    assert len(by_sender) == len(by_receiver) == 8
    low_bits = (1 << ROOM_ID_BITS) - 1
    assert all(part < 1 << 63 and part & low_bits == room for part in by_sender | by_receiver)
    with pytest.raises(ValueError, match="not below"):
        part_room(1 << ROOM_ID_BITS, 0, 1)


def test_a_rank_that_holds_none_of_a_peer_rank_s_heads_refuses_it() -> None:
    two = layout("nixl", num_kv_heads=TOTAL_HEADS, tp_size=2, tp_rank=1)
    assert slice_between(two, layout("nixl", num_kv_heads=TOTAL_HEADS)) == HeadSlice(1, 0, 0, 2, 2)
    with pytest.raises(ValueError, match="prefill rank 1 of 2 holds none of the KV heads"):
        slice_between(two, layout("nixl", num_kv_heads=TOTAL_HEADS, tp_size=2, tp_rank=0))


class StandIn:
    """A side that records what it is asked and hands out the results the test gives it."""

    def __init__(self, tp_size: int, tp_rank: int, refuse: set[int] = frozenset()) -> None:
        self.layout = layout("nixl", num_kv_heads=TOTAL_HEADS, tp_size=tp_size, tp_rank=tp_rank)
        self.address = "tcp://prefill:1"
        self.opened: list[tuple[int, str | None]] = []
        self.sent: list[int] = []
        self.aborted: list[int] = []
        self.results: list[RoomResult] = []
        self.refuse = refuse

    def add_room(self, room: int) -> None:
        self._open(room, None)

    def expect(self, room: int, peer: str, dst_pages: list[int]) -> None:
        self._open(room, peer)

    def _open(self, room: int, peer: str | None) -> None:
        if room in self.refuse:
            raise DuplicateRoom(f"room {room} is already in use on this side")
        self.opened.append((room, peer))

    def send(self, room: int, *args: object, **kwargs: object) -> bool:
        self.sent.append(room)
        return True

    def abort(self, room: int, reason: str = "aborted") -> None:
        self.aborted.append(room)

    def poll(self, timeout: float = 0.0) -> list[RoomResult]:
        out, self.results = self.results, []
        return out

    def link_states(self) -> dict[str, str]:
        return {}


def done(part: int, token: int = 9) -> RoomResult:
    return RoomResult(part, TransferState.DONE, token)


def test_a_sender_s_room_is_done_once_every_part_is_and_fails_naming_the_decode_rank() -> None:
    side = StandIn(tp_size=1, tp_rank=0)
    sender = SlicedSender(side)  # type: ignore[arg-type]
    sender.add_room(5, decode_tp_size=2)
    parts = [part_room(5, 0, 0), part_room(5, 0, 1)]
    assert [room for room, _ in side.opened] == parts and parts[0] == 5
    sender.send(5, [1], [2])
    assert side.sent == parts
    side.results = [done(parts[1])]
    assert sender.poll() == []
    side.results = [done(parts[0])]
    assert sender.poll() == [RoomResult(5, TransferState.DONE, 9)]
    sender.add_room(6, decode_tp_size=2)
    gone = RoomResult(part_room(6, 0, 1), TransferState.FAILED, error="gone")
    side.results = [done(part_room(6, 0, 0)), gone]
    (failed,) = sender.poll()
    assert failed.state is TransferState.FAILED and failed.error == "decode rank 1: gone"
    sender.add_room(7, decode_tp_size=1)
    with pytest.raises(DuplicateRoom):
        sender.add_room(7, decode_tp_size=1)


def test_a_prefill_replica_that_sends_nothing_reports_its_part_done_at_once() -> None:
    side = StandIn(tp_size=8, tp_rank=1)  # 4 heads over 8 ranks: rank 0 sends head 0, rank 1 nothing
    sender = SlicedSender(side)  # type: ignore[arg-type]
    sender.add_room(5, decode_tp_size=1)
    assert side.opened == [] and sender.poll() == [RoomResult(5, TransferState.DONE)]


def test_a_receiver_expects_each_part_from_its_prefill_rank_and_a_later_refusal_fails_the_room() -> None:
    side = StandIn(tp_size=1, tp_rank=0)
    receiver = SlicedReceiver(side)  # type: ignore[arg-type]
    with pytest.raises(TransferError, match="no prefill instance"):
        receiver.expect(5, "tcp://p0", [3])
    assert receiver.sources("tcp://p0", ["tcp://p0", "tcp://p1"]) == ["tcp://p0", "tcp://p1"]
    receiver.expect(5, "tcp://p0", [3])
    assert side.opened == [(5, "tcp://p0"), (part_room(5, 1, 0), "tcp://p1")]
    side.refuse = {part_room(6, 1, 0)}
    receiver.expect(6, "tcp://p0", [4])  # part 0 is open: the room fails once it stopped
    assert side.aborted == [6]
    assert receiver.poll() == []
    side.results = [RoomResult(6, TransferState.FAILED, error="aborted")]
    (failed,) = receiver.poll()
    assert failed.room == 6 and "prefill rank 1: room" in (failed.error or "")
    side.refuse = {7}
    with pytest.raises(DuplicateRoom):  # the first part refused: nothing stays open
        receiver.expect(7, "tcp://p0", [5])
    side.refuse = set()
    receiver.expect(7, "tcp://p0", [5])
    receiver.abort(7)
    assert side.aborted[-2:] == [7, part_room(7, 1, 0)]


# ---- nixl: head-slice WRITEs between pools of different head counts --------------------------------


def rank_pool(heads: int, seed: int | None, device: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    shape = (NUM_PAGES, PAGE_SIZE, heads, HEAD_DIM)
    g = torch.Generator(device).manual_seed(seed or 0)
    if seed is None:
        make = lambda: torch.zeros(shape, device=device)  # noqa: E731
    else:
        make = lambda: torch.randn(shape, generator=g, device=device)  # noqa: E731
    return [make() for _ in range(NUM_LAYERS)], [make() for _ in range(NUM_LAYERS)]


class Instance:
    """Every rank's pool and sliced side of an instance of ``tp_size`` ranks (4 KV heads)."""

    def __init__(self, role: str, tp_size: int, seed: int | None, device: str = "cpu") -> None:
        self.pools, self.sides = [], []
        for rank in range(tp_size):
            heads = InstanceHeads.dealt(TOTAL_HEADS, tp_size).ranks[rank].count
            pool = rank_pool(heads, None if seed is None else seed + rank, device)
            pool_layout = layout("nixl", num_kv_heads=heads, head_dim=HEAD_DIM)
            rank_layout = dataclasses.replace(
                pool_layout, num_kv_heads=TOTAL_HEADS, tp_size=tp_size, tp_rank=rank
            )
            address = "tcp://127.0.0.1:*" if role == "prefill" else None
            side = make_backend("nixl", role, rank_layout, *pool, config=FAST, address=address,
                                pool_layout=pool_layout if tp_size > 1 else None)
            self.pools.append(pool)
            self.sides.append(SlicedSender(side) if role == "prefill" else SlicedReceiver(side))

    def every_head(self, k_or_v: int, layer: int, pages: list[int]) -> torch.Tensor:
        """``pages`` of one layer's K or V with every KV head (the ranks' side by side)."""
        return torch.cat([pool[k_or_v][layer][pages] for pool in self.pools], dim=2)

    def close(self) -> None:
        for side in self.sides:
            side.close()


@pytest.fixture
def instances(request: pytest.FixtureRequest) -> Iterator[tuple[Instance, Instance]]:
    with deployed(*request.param) as pair:
        yield pair


@contextlib.contextmanager
def deployed(prefill_tp: int, decode_tp: int, device: str = "cpu") -> Iterator[tuple[Instance, Instance]]:
    prefill = Instance("prefill", prefill_tp, random.randrange(1 << 30), device)  # fresh pools each run
    decode = Instance("decode", decode_tp, None, device)
    try:
        yield prefill, decode
    finally:
        decode.close()
        prefill.close()


def poll_one(side: SlicedSender | SlicedReceiver, timeout: float = 20.0) -> list[RoomResult]:
    end, results = time.monotonic() + timeout, []
    while not results and time.monotonic() < end:
        results = side.poll(0.05)
    return results


@NEEDS_NIXL
@pytest.mark.parametrize(
    "instances", [(2, 1), (1, 2), (2, 4), (1, 1)], indirect=True,
    ids=["tp2-to-tp1", "tp1-to-tp2", "tp2-to-tp4", "tp1-to-tp1"],
)
def test_nixl_writes_each_rank_s_heads_into_the_ranks_that_hold_them(instances) -> None:
    check_sliced_writes(*instances)


def check_sliced_writes(prefill: Instance, decode: Instance) -> None:
    """One room of two sends from every prefill rank: each decode rank's pages hold exactly the
    model's heads it holds, and nothing else was written."""
    addresses = [s.address for s in prefill.sides]
    for receiver in decode.sides:
        for address in receiver.sources(addresses[0], addresses):
            receiver.register(address, timeout=10.0)
    src_pages, dst_pages = [1, 4, 7], [9, 2, 5]
    for receiver in decode.sides:
        receiver.expect(11, addresses[0], dst_pages)
    for sender in prefill.sides:
        sender.add_room(11, decode_tp_size=len(decode.sides))
        sender.send(11, src_pages[:2], dst_pages[:2])
        sender.send(11, src_pages[2:], dst_pages[2:], first_token=42)
    for receiver in decode.sides:
        results = [(r.room, r.state, r.first_token) for r in poll_one(receiver)]
        assert results == [(11, TransferState.DONE, 42)]
    for sender in prefill.sides:
        assert [(r.room, r.state) for r in poll_one(sender)] == [(11, TransferState.DONE)]
    for k_or_v in range(2):
        for layer in range(NUM_LAYERS):
            expected = prefill.every_head(k_or_v, layer, src_pages)
            assert torch.equal(decode.every_head(k_or_v, layer, dst_pages), expected)
    untouched = [p for p in range(NUM_PAGES) if p not in dst_pages]
    assert not decode.every_head(0, 0, untouched).any()


@NEEDS_NIXL
@pytest.mark.parametrize("instances", [(2, 1), (1, 2)], indirect=True, ids=["tp2-to-tp1", "tp1-to-tp2"])
def test_an_abort_mid_room_fails_every_part_once_and_the_links_serve_on(instances) -> None:
    """A decode-side abort reaches every part (each from its own prefill rank): the room fails
    once on every rank of both instances, and the next room moves as before."""
    prefill, decode = instances
    addresses = [s.address for s in prefill.sides]
    for receiver in decode.sides:
        for address in receiver.sources(addresses[0], addresses):
            receiver.register(address, timeout=10.0)
    for receiver in decode.sides:
        receiver.expect(3, addresses[0], [2, 3])
    for sender in prefill.sides:
        sender.add_room(3, decode_tp_size=len(decode.sides))
        sender.send(3, [5], [2])  # not the last chunk: the room stays open
    for receiver in decode.sides:
        receiver.abort(3, "client left")
    for side in [*decode.sides, *prefill.sides]:
        (failed,) = poll_one(side)
        assert (failed.room, failed.state) == (3, TransferState.FAILED)
        assert "client left" in (failed.error or ""), failed
        assert side.poll(0.2) == []  # once
    check_sliced_writes(prefill, decode)


def test_a_peer_claiming_an_impossible_split_is_refused_before_anything_is_sized_by_it() -> None:
    ours = layout("nixl", num_kv_heads=TOTAL_HEADS)
    huge = layout("nixl", num_kv_heads=TOTAL_HEADS, tp_size=10**9)
    assert "impossible split: tp_size 1000000000 is not between 1 and 128" in (ours.mismatch(huge) or "")
    six = layout("nixl", num_kv_heads=TOTAL_HEADS, tp_size=6)
    assert "6 ranks cannot split 4 KV heads" in (ours.mismatch(six) or "")
    assert ours.mismatched_field(layout("nixl", num_kv_heads=TOTAL_HEADS, tp_size=2, tp_rank=2)) == "tp_rank"
    receiver = SlicedReceiver(StandIn(tp_size=1, tp_rank=0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="advertised 200 rank senders: tp_size 200 is not between"):
        receiver.sources("tcp://p0", [f"tcp://p{i}" for i in range(200)])
