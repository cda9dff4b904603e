"""KV transfer between instances of any two ``--tp-size``s over a slicing backend (``nixl``):
each prefill rank writes the heads it holds straight into the pools of the decode ranks that
hold them, a head slice of every token slot, so no byte goes through rank 0 or the host.

Both instances split their KV heads the same way (``kv_head_range``), so each computes the
other's from its layout; ``head_slices`` pairs them: every KV head a decode rank holds comes
from the lowest prefill rank holding it. A rank pairs with as many ranks of the peer as its
heads span (prefill TP 2 → decode TP 1: decode rank 0 receives from prefill ranks 0 and 1;
TP 1 → TP 2: prefill rank 0 writes to both decode ranks). Each pair moves the room as one
ordinary data-plane room, its *part*, with an id of its own (``part_room``: the room with the
two ranks' difference in the bits above ``ROOM_ID_BITS``, the same on both sides and distinct
on each); a prefill rank learns the decode instance's size from the ``KVSend`` that opens the
room, a decode rank the prefill instance's from its ``RegisterKVPeer`` (``rank_addresses``).
``SlicedSender`` and ``SlicedReceiver`` wrap a rank's side so that its user still sees one
room: its result once every part's is in (``combine``). Across the ranks of an instance the
parts of ``kvtransfer.tp_parts`` combine as before. Equal sizes pair rank r with rank r only,
whole pages, and a part's id is the room's own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kvtransfer.base import DuplicateRoom, KVReceiver, KVSender, RoomResult, TransferError, TransferState
from kvtransfer.tp_hub import InstanceHeads
from kvtransfer.tp_parts import combine, peer_for_rank
from protocol.dataplane import MAX_TP_SIZE, ROOM_ID_BITS, KVLayout, split_problem

MAX_RANKS = 1 << (63 - ROOM_ID_BITS)  # part ids stay below 1 << 63
assert MAX_TP_SIZE <= MAX_RANKS  # so (p - d) mod MAX_RANKS tells every pair of one rank apart


def part_room(room: int, prefill_rank: int, decode_rank: int) -> int:
    """The id under which prefill rank ``prefill_rank`` moves ``room`` to decode rank
    ``decode_rank``: distinct for the pairs of one rank, the room's own for equal ranks."""
    if not 0 <= room < 1 << ROOM_ID_BITS:
        raise ValueError(f"room {room} is not below 1 << {ROOM_ID_BITS}: it cannot be moved in parts")
    return room | ((prefill_rank - decode_rank) % MAX_RANKS) << ROOM_ID_BITS


@dataclass(frozen=True)
class HeadSlice:
    """Prefill rank ``prefill_rank`` writes ``count`` KV heads, from its pool's head
    ``src_start``, into decode rank ``decode_rank``'s pool from its head ``dst_start``."""

    prefill_rank: int
    decode_rank: int
    src_start: int
    dst_start: int
    count: int


def head_slices(prefill: InstanceHeads, decode: InstanceHeads) -> list[HeadSlice]:
    """Every pair of ranks that moves KV, with its heads: each head of each decode rank from the
    lowest prefill rank holding it (by decode rank, then head)."""
    if prefill.total != decode.total:
        raise ValueError(f"the instances hold {prefill.total} and {decode.total} KV heads")
    source: dict[int, int] = {}
    for rank, heads in enumerate(prefill.ranks):
        for head in range(heads.start, heads.stop):
            source.setdefault(head, rank)
    slices = []
    for d, heads in enumerate(decode.ranks):
        head = heads.start
        while head < heads.stop:
            p = source[head]
            stop = min(heads.stop, prefill.ranks[p].stop)
            slices.append(HeadSlice(p, d, head - prefill.ranks[p].start, head - heads.start, stop - head))
            head = stop
    return slices


def instance_heads(layout: KVLayout) -> InstanceHeads:
    """The KV heads of each rank of the instance ``layout`` describes."""
    return InstanceHeads.dealt(layout.num_kv_heads, layout.tp_size)


def slice_between(prefill: KVLayout, decode: KVLayout) -> HeadSlice:
    """What the prefill rank of ``prefill`` writes to the decode rank of ``decode``; raises
    ValueError when it holds none of that rank's heads (that rank should not register here)."""
    for s in head_slices(instance_heads(prefill), instance_heads(decode)):
        if (s.prefill_rank, s.decode_rank) == (prefill.tp_rank, decode.tp_rank):
            return s
    raise ValueError(
        f"prefill rank {prefill.tp_rank} of {prefill.tp_size} holds none of the KV heads that "
        f"decode rank {decode.tp_rank} of {decode.tp_size} takes from it"
    )


class PartedRooms:
    """One rank's rooms, each moved as parts (ids of ``part_room``): a room's result once every
    part's is in. Thread-safe: rooms open on the worker's thread, results are polled on the
    notifier's."""

    def __init__(self, names: Callable[[int], str]) -> None:
        self._names = names  # a part's name in a combined error, from its peer rank
        self._lock = threading.Lock()
        self._rooms: dict[int, dict[int, RoomResult | None]] = {}  # room -> part -> its result
        self._peer_rank: dict[int, int] = {}  # part -> the peer rank it pairs with
        self._room_of: dict[int, int] = {}  # part -> room
        self._done: list[RoomResult] = []  # rooms whose parts are all in, not polled yet

    def open(self, room: int, parts: dict[int, int], open_part: Callable[[int], object],
             abort_part: Callable[[int, str], object]) -> None:
        """Open ``room`` as ``parts`` (part id -> peer rank) with ``open_part``. When the first
        part cannot open, nothing is left open and its error is raised; when a later one cannot,
        the room fails once the parts already open have stopped (they are aborted)."""
        with self._lock:
            if room in self._rooms:
                raise DuplicateRoom(f"room {room} is already in use on this side")
            self._rooms[room] = dict.fromkeys(parts)
            self._peer_rank.update(parts)
            self._room_of.update((part, room) for part in parts)
        ids = list(parts)
        for i, part in enumerate(ids):
            try:
                open_part(part)
            except (TransferError, ValueError) as e:
                if i == 0:
                    self._forget(room)
                    raise
                for opened in ids[:i]:
                    abort_part(opened, str(e))
                self._settle([RoomResult(p, TransferState.FAILED, error=str(e)) for p in ids[i:]])
                return
        if not ids:
            self._settle([], room)

    def parts(self, room: int) -> list[int]:
        with self._lock:
            return list(self._rooms.get(room, ()))

    def take(self, results: Sequence[RoomResult]) -> list[RoomResult]:
        """The rooms of these part results (and earlier ones) whose every part is in."""
        self._settle(results)
        with self._lock:
            done, self._done = self._done, []
        return done

    @property
    def ready(self) -> bool:
        return bool(self._done)

    def _settle(self, results: Sequence[RoomResult], empty_room: int | None = None) -> None:
        with self._lock:
            if empty_room is not None:
                self._rooms.pop(empty_room, None)
                self._done.append(RoomResult(empty_room, TransferState.DONE))
            for result in results:
                room = self._room_of.get(result.room)
                if room is None:
                    continue
                parts = self._rooms[room]
                parts[result.room] = result
                if all(r is not None for r in parts.values()):
                    named = [(self._names(self._peer_rank[p]), r) for p, r in parts.items()]
                    self._done.append(combine(room, named))  # type: ignore[arg-type]
                    self._drop(room)

    def _forget(self, room: int) -> None:
        with self._lock:
            self._drop(room)

    def _drop(self, room: int) -> None:
        for part in self._rooms.pop(room, {}):
            self._peer_rank.pop(part, None)
            self._room_of.pop(part, None)


class _Sliced:
    """What a wrapped side offers unchanged, and its results combined per room."""

    def __init__(self, side: KVSender | KVReceiver, peer_role: str) -> None:
        self.side = side
        self._rooms = PartedRooms(lambda rank: f"{peer_role} rank {rank}")
        self._heads = instance_heads(side.layout)  # this rank's instance
        self._rank = side.layout.tp_rank

    @property
    def layout(self) -> KVLayout:
        return self.side.layout

    def link_states(self) -> dict[str, str]:
        return self.side.link_states()

    def poll(self, timeout: float = 0.0) -> list[RoomResult]:
        return self._rooms.take(self.side.poll(0.0 if self._rooms.ready else timeout))

    def abort(self, room: int, reason: str = "aborted") -> None:
        for part in self._rooms.parts(room):
            self.side.abort(part, reason)

    def close(self) -> None:
        self.side.close()


class SlicedSender(_Sliced):
    """A prefill rank's sender whose rooms go to the decode ranks holding its heads."""

    def __init__(self, sender: KVSender) -> None:
        super().__init__(sender, "decode")
        self.sender = sender

    @property
    def address(self) -> str:
        return self.sender.address

    def add_room(self, room: int, decode_tp_size: int = 1) -> None:
        """Open ``room`` towards a decode instance of ``decode_tp_size`` ranks: one part per decode
        rank this rank writes to (none where other ranks hold the same heads and write them)."""
        decode = InstanceHeads.dealt(self._heads.total, decode_tp_size)
        targets = [s.decode_rank for s in head_slices(self._heads, decode) if s.prefill_rank == self._rank]
        parts = {part_room(room, self._rank, d): d for d in targets}
        self._rooms.open(room, parts, self.sender.add_room, self.sender.abort)

    def send(self, room: int, *args: Any, **kwargs: Any) -> bool:
        """``KVSender.send`` of each part of ``room`` (every part is sent: no short cut)."""
        sent = [self.sender.send(part, *args, **kwargs) for part in self._rooms.parts(room)]
        return any(sent)


class SlicedReceiver(_Sliced):
    """A decode rank's receiver whose rooms come from the prefill ranks holding its heads."""

    def __init__(self, receiver: KVReceiver) -> None:
        super().__init__(receiver, "prefill")
        self.receiver = receiver
        self._instances: dict[str, list[str]] = {}  # prefill rank 0's address -> every rank's
        self._lock = threading.Lock()

    def sources(self, prefill_addr: str, rank_addresses: Sequence[str]) -> list[str]:
        """The senders, of the prefill instance whose rank 0 sends from ``prefill_addr`` and whose
        ranks from ``rank_addresses`` (none: one rank), that this rank registers with: those
        holding its heads."""
        rank_addresses = list(rank_addresses) or [prefill_addr]
        if problem := split_problem(self._heads.total, len(rank_addresses)):
            raise ValueError(f"the prefill instance advertised {len(rank_addresses)} rank senders: {problem}")
        with self._lock:
            self._instances[prefill_addr] = list(rank_addresses)
        return [peer_for_rank(rank_addresses, p) for p in self._sources(len(rank_addresses))]

    def register(self, address: str, timeout: float = 30.0) -> str:
        return self.receiver.register(address, timeout)

    def expect(self, room: int, peer: str, dst_pages: Sequence[int]) -> None:
        """``peer``: the prefill instance's rank 0 address; each part is expected from its rank."""
        with self._lock:
            addresses = self._instances.get(peer)
        if addresses is None:
            raise TransferError(f"no prefill instance sending from {peer} registered with this rank")
        sources = {part_room(room, p, self._rank): p for p in self._sources(len(addresses))}

        def expect_part(part: int) -> None:
            self.receiver.expect(part, addresses[sources[part]], dst_pages)

        self._rooms.open(room, sources, expect_part, self.receiver.abort)

    def _sources(self, prefill_tp_size: int) -> list[int]:
        prefill = InstanceHeads.dealt(self._heads.total, prefill_tp_size)
        slices = head_slices(prefill, self._heads)
        return sorted({s.prefill_rank for s in slices if s.decode_rank == self._rank})
