"""KV transfer between instances of any two ``--tp-size``s, through each instance's rank 0.

An instance advertises its whole KV (``KVLayout.num_kv_heads``: every head of the model) and
its rank 0 runs the one KV sender or receiver; the other ranks never meet a peer. A prefill
instance's ranks gather the pages a step sends, right after that step, into one host staging
buffer of every head on rank 0 (``InstanceHeads.assemble``; ``engine.parallel.steps``
``gather_to_driver``), which rank 0's sender sends as it is. A decode instance's rank 0 lands
its own heads of each received chunk and keeps the others' (``HubLander``); before its next
frame it relays them to the other ranks (``KVShardPages`` over the step relay), which land them
(``land_shards``). A room's result is held back until everything landed before it was relayed
(``HeldResults``), so its pages are written on every rank when the scheduler hears of it.

So the two instances' sizes never have to match: each sees whole pages. What is lost is the
direct path: every byte crosses rank 0 and the TP group's gloo channel (the host). The ``nixl``
and ``cuda_ipc`` backends, which write pool to pool, take the direct path instead, each rank
moving its own heads (``kvtransfer.tp_parts``; between any two sizes over nixl:
``kvtransfer.tp_slices``).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kvtransfer.base import RoomResult
from kvtransfer.kernels import PagedCaches, PoolLander
from protocol.codec import encode
from protocol.dataplane import KVLayout, KVShardPages, ShardLanding, kv_head_range

HEAD_DIM_AXIS = 3  # of a staging buffer [2 * layers, pages, page_size, heads, head_dim]


@dataclass(frozen=True)
class HeadRange:
    """KV heads ``[start, start + count)`` of the model."""

    start: int
    count: int

    @property
    def stop(self) -> int:
        return self.start + self.count


@dataclass(frozen=True)
class InstanceHeads:
    """Which KV heads each rank of an instance holds (by rank, as ``ModelSplit`` splits them:
    sharded, or each replicated on several ranks)."""

    total: int
    ranks: tuple[HeadRange, ...]

    def __post_init__(self) -> None:
        covered = sorted({(r.start, r.stop) for r in self.ranks})
        edges = [0] + [stop for _, stop in covered]
        if [start for start, _ in covered] != edges[:-1] or edges[-1] != self.total:
            raise ValueError(f"the ranks' KV heads {covered} do not tile the model's {self.total} heads")

    @classmethod
    def dealt(cls, total: int, tp_size: int) -> InstanceHeads:
        """How an instance of ``tp_size`` ranks holds ``total`` KV heads (``kv_head_range``: the
        split every instance makes, ``engine.parallel.group.ModelSplit`` included, so a peer's
        is known from its layout)."""
        return cls(total, tuple(HeadRange(*kv_head_range(total, tp_size, r)) for r in range(tp_size)))

    @property
    def size(self) -> int:
        return len(self.ranks)

    def sources(self) -> list[int]:
        """The ranks whose heads, in order, make up every head once (of replicas, the lowest rank)."""
        first: dict[int, int] = {}
        for rank, heads in enumerate(self.ranks):
            first.setdefault(heads.start, rank)
        return [first[start] for start in sorted(first)]

    def assemble(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """One staging buffer of every head from the ranks' staging buffers (by rank)."""
        return torch.cat([parts[r] for r in self.sources()], dim=HEAD_DIM_AXIS)

    def shapes_of(self, staging_shape: Sequence[int]) -> list[tuple[int, ...]]:
        """Each rank's staging shape (by rank) where one rank's is ``staging_shape``."""
        shape = list(staging_shape)
        return [tuple(shape[:HEAD_DIM_AXIS] + [r.count] + shape[HEAD_DIM_AXIS + 1 :]) for r in self.ranks]

    def slice_of(self, staging: torch.Tensor, rank: int) -> torch.Tensor:
        """``rank``'s heads of a staging buffer of every head (a contiguous copy)."""
        heads = self.ranks[rank]
        return staging.narrow(HEAD_DIM_AXIS, heads.start, heads.count).contiguous()


def instance_layout(pool_layout: KVLayout, heads: InstanceHeads, tp_rank: int = 0) -> KVLayout:
    """What rank ``tp_rank`` advertises: its pool's layout with every head of the instance (rank
    0 here; each rank where every rank moves its own heads: ``kvtransfer.tp_parts``)."""
    return dataclasses.replace(pool_layout, num_kv_heads=heads.total, tp_size=heads.size, tp_rank=tp_rank)


def staging_to_bytes(staging: torch.Tensor) -> bytes:
    return staging.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def staging_from_bytes(data: bytes, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).view(tuple(shape))


class HubLander:
    """Rank 0 of a tensor-parallel decode instance: lands its own heads of each received chunk
    and keeps the other ranks' until ``flush``. ``landed`` / ``flushed`` count chunks, so that
    ``HeldResults`` knows when everything landed before a result has reached every rank."""

    def __init__(self, pool: PagedCaches, heads: InstanceHeads) -> None:
        self._own = PoolLander(pool)
        self._heads = heads
        self.dtype = pool.dtype
        self._pool_shape = pool.page_shape
        self._pending: list[ShardLanding] = []
        self.landed = 0
        self.flushed = 0
        self.changed = threading.Condition()

    def staging_shape(self, num_pages: int) -> tuple[int, ...]:
        page_size, _, head_dim = self._pool_shape
        return (self._own.pool.num_arrays, num_pages, page_size, self._heads.total, head_dim)

    def land(self, dst_pages: list[int], staging: torch.Tensor) -> None:
        heads = self._heads
        self._own.land(dst_pages, heads.slice_of(staging, 0))
        shards = [b"" if r == 0 else staging_to_bytes(heads.slice_of(staging, r)) for r in range(heads.size)]
        with self.changed:
            self._pending.append(ShardLanding(list(dst_pages), shards))
            self.landed += 1

    def flush(self, send: Callable[[bytes], None]) -> bool:
        """Send what the other ranks have not landed yet (one ``KVShardPages`` frame); False
        when nothing waits. Runs on the worker's thread, between frames."""
        with self.changed:
            pending, self._pending = self._pending, []
            upto = self.landed
        if not pending:
            return False
        send(encode(KVShardPages(pending)))
        with self.changed:
            self.flushed = upto
            self.changed.notify_all()
        return True


def land_shards(lander: PoolLander, msg: KVShardPages, rank: int) -> None:
    """A rank other than 0 of a decode instance: land its heads of the pages rank 0 received."""
    pool = lander.pool
    for landing in msg.landings:
        shape = pool.staging_shape(len(landing.pages))
        lander.land(landing.pages, staging_from_bytes(landing.shards[rank], pool.dtype, shape))


class HeldResults:
    """A decode rank 0's room results as its notifier polls them: each held until every chunk
    landed before it was polled has been relayed to the other ranks (``HubLander.flushed``)."""

    def __init__(self, side, lander: HubLander) -> None:  # side: the KVReceiver
        self._side = side
        self._lander = lander
        self._held: list[tuple[int, RoomResult]] = []

    def link_states(self) -> dict[str, str]:
        return self._side.link_states()

    def poll(self, timeout: float = 0.0) -> list[RoomResult]:
        lander = self._lander
        if self._held:
            oldest = min(tag for tag, _ in self._held)
            with lander.changed:
                lander.changed.wait_for(lambda: lander.flushed >= oldest, timeout)
            timeout = 0.0
        results = self._side.poll(timeout)
        tag = lander.landed  # read after the poll: covers every chunk of these rooms
        self._held.extend((tag, r) for r in results)
        flushed = lander.flushed
        ready = [r for t, r in self._held if t <= flushed]
        self._held = [(t, r) for t, r in self._held if t > flushed]
        return ready
