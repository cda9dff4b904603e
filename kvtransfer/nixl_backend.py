"""``nixl`` backend: one-sided NIXL (UCX) WRITEs of the scattered pages straight into the decode
pool; control frames on the same zmq link as the other backends (``link_sender`` /
``link_receiver``: registration with layout checks, heartbeats, rooms, aborts, CURVE keys).

At registration the decode side registers its pool with its NIXL agent and shares a
``protocol.dataplane.NixlPool`` (the agent's metadata, the arrays' addresses and page size);
the prefill side loads the agent and prepares the descriptors of every remote page once. Each
``send`` is then one WRITE of ``pages × arrays`` descriptors (indices by array math), posted by
the I/O thread, which goes back to its loop at once and polls the posted WRITEs every turn
(never blocking: a dead or slow peer stalls no other link). Once a chunk's WRITE, and those of
its room's earlier chunks, are done, its header-only ``KVChunk`` goes out on the link, so the
decode side's room states, its checks of the pages and its ACK are those of every backend.
The last chunk carries the first token as usual (NIXL notifications are not needed).

Because the prefill process writes the decode pages itself, a decode-side abort or timeout is
reported only after the prefill side acknowledges it (or is found dead), as with cuda_ipc; and
the prefill side acknowledges (or sends its own ABORT, or reports the room's result) only once
no WRITE of the room is posted any more. A WRITE that errors or does not complete within the
transfer timeout fails its room and drops the link (UNREGISTERED): the decode side fails its
rooms and registers again, which loads its agent afresh; the WRITEs still posted to a lost link
are cancelled (released) before its rooms are reported.
"""

from __future__ import annotations

import collections
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import zmq

from kvtransfer.base import RoomResult, TransferError, log
from kvtransfer.kernels import PagedCaches
from kvtransfer.link_receiver import LinkReceiver
from kvtransfer.link_sender import Chunk, LinkSender
from kvtransfer.links import Link
from kvtransfer.nixl_agent import (
    DONE,
    IN_PROGRESS,
    Agent,
    Pump,
    SlotSlice,
    page_indices,
    page_rows,
    release,
    slot_rows,
    write_failure,
)
from kvtransfer.rooms import Room
from kvtransfer.tp_slices import instance_heads, slice_between
from protocol.codec import ProtocolError, build
from protocol.dataplane import KVAbort, KVAbortAck, KVLayout, NixlPool, dtype_bytes

MEMORY_KINDS = ("DRAM", "VRAM")
WRITE_POLL_S = 0.0005  # how often the I/O loop polls posted WRITEs (its poll has 1 ms steps)


def check_pool(extra: dict[str, Any], agent: Agent, page_bytes: int) -> NixlPool:
    """The peer's ``NixlPool``, checked against our own pool and the ``page_bytes`` its layout
    gives its pages; raises ValueError naming the problem."""
    raw = extra.get("nixl")
    if not isinstance(raw, dict):
        raise ValueError("the decode side shared no NIXL pool (is it running the nixl backend?)")
    try:
        pool = build(NixlPool, raw)
    except ProtocolError as e:
        raise ValueError(f"malformed NIXL pool: {e}") from None
    if pool.memory not in MEMORY_KINDS:
        raise ValueError(f"NIXL pool memory {pool.memory!r} is not one of {', '.join(MEMORY_KINDS)}")
    if len(pool.addresses) != agent.num_arrays:
        shared = len(pool.addresses)
        raise ValueError(f"the decode side shared {shared} KV arrays; this pool has {agent.num_arrays}")
    if pool.page_bytes != page_bytes:
        raise ValueError(f"decode pages are {pool.page_bytes} bytes; its layout makes them {page_bytes}")
    if pool.num_pages < 1 or pool.device_id < 0 or min(pool.addresses) <= 0:
        raise ValueError("a NIXL pool needs pages, a device id >= 0 and non-null addresses")
    return pool


@dataclass(frozen=True)
class SlicedWrites:
    """Where this rank's head slice for a decode peer lies in each token slot: of our pages and
    of the peer's (``tp_slices``: the instances' sizes differ)."""

    ours: SlotSlice
    theirs: SlotSlice
    pool: NixlPool  # the peer's


@dataclass
class RemotePool:
    """A registered decode peer as our agent knows it."""

    agent_name: str
    descs: Any  # its prepared page descriptors; None where this rank writes it a head slice
    num_pages: int
    sliced: SlicedWrites | None = None


@dataclass
class PostedChunk:
    """A chunk whose WRITE is posted (``handle``; None when it has no pages to write): its
    header goes to the decode side once the WRITE is done, after the room's earlier chunks."""

    chunk: Chunk
    peer: str
    handle: Any | None
    deadline: float


class NixlSenderMover:
    """The sender's NIXL agent and its decode peers (I/O thread only). A peer rank holding
    exactly this rank's heads gets whole pages (descriptors prepared at registration); any
    other gets the slice of its heads this rank holds, in every token slot (``tp_slices``)."""

    def __init__(self, pool: PagedCaches, layout: KVLayout) -> None:
        self._pool = pool
        self._layout = layout
        self._agent = Agent(f"pdserve-prefill-{uuid.uuid4().hex[:12]}", pool.arrays)
        self._peers: dict[str, RemotePool] = {}

    def open_peer(self, peer: str, extra: dict[str, Any], theirs: KVLayout) -> None:
        part = slice_between(self._layout, theirs)  # ValueError: this rank holds none of its heads
        ours, page_size = self._layout, self._layout.page_size
        head_bytes = ours.head_dim * dtype_bytes(ours.dtype)
        own_heads = instance_heads(ours).ranks[ours.tp_rank].count
        their_heads = instance_heads(theirs).ranks[theirs.tp_rank].count
        pool = check_pool(extra, self._agent, page_size * their_heads * head_bytes)
        self.close_peer(peer)
        whole = part.count == own_heads == their_heads
        rows = page_rows(pool.addresses, pool.num_pages, pool.page_bytes, pool.device_id) if whole else None
        try:
            name, descs = self._agent.add_peer(pool.agent_metadata, rows, pool.memory)
        except Exception as e:  # NIXL's errors derive from Exception only
            raise ValueError(f"NIXL could not load the decode side's agent: {e}") from None
        sliced = None
        if not whole:
            length = part.count * head_bytes
            sliced = SlicedWrites(
                SlotSlice(own_heads * head_bytes, part.src_start * head_bytes, length),
                SlotSlice(their_heads * head_bytes, part.dst_start * head_bytes, length),
                pool,
            )
        self._peers[peer] = RemotePool(name, descs, pool.num_pages, sliced)

    def close_peer(self, peer: str) -> None:
        """Forget the peer's agent (every WRITE to it released first: ``NixlSender._lose``)."""
        remote = self._peers.pop(peer, None)
        if remote is not None:
            self._agent.remove_peer(remote.agent_name, remote.descs)

    def post(self, peer: str, chunk: Chunk) -> Any | None:
        """Post the chunk's WRITE; its handle, or None for a chunk without pages. Raises
        ValueError for pages out of range, TransferError when NIXL cannot post it."""
        if chunk.staged is not None:
            raise ValueError("the nixl backend writes pool pages; it takes no staged (tensor-parallel) chunk")
        if not chunk.src_pages:
            return None
        remote = self._peers[peer]
        beyond = [p for p in chunk.dst_pages if not 0 <= p < remote.num_pages]
        stray = [p for p in chunk.src_pages if not 0 <= p < self._pool.num_pages]
        if beyond or stray:
            raise ValueError(f"pages out of range: destination {beyond[:8]}, source {stray[:8]}")
        if chunk.ready is not None:
            chunk.ready.synchronize()  # NIXL reads device memory directly: the forward must be done
        agent, sliced = self._agent, remote.sliced
        if sliced is not None:
            page_size = self._layout.page_size
            local = slot_rows(agent.addresses, chunk.src_pages, sliced.ours, page_size, agent.device_id)
            theirs = sliced.pool
            dst = slot_rows(theirs.addresses, chunk.dst_pages, sliced.theirs, page_size, theirs.device_id)
            return agent.post_rows(remote.agent_name, local, dst, theirs.memory)
        local = page_indices(chunk.src_pages, agent.num_arrays, agent.num_pages)
        dst = page_indices(chunk.dst_pages, agent.num_arrays, remote.num_pages)
        return agent.post_write(remote.agent_name, remote.descs, local, dst)

    def state(self, posted: PostedChunk) -> str:
        return DONE if posted.handle is None else self._agent.write_state(posted.handle)

    def close(self) -> None:
        for peer in list(self._peers):
            self.close_peer(peer)
        self._agent.close()


class NixlReceiverMover:
    remote_writes = True

    def __init__(self, pool: PagedCaches, name: str) -> None:
        self.agent = Agent(f"{name}-{uuid.uuid4().hex[:12]}", pool.arrays)

    def registration(self) -> dict[str, Any]:
        a = self.agent
        with a.lock:
            metadata = a.metadata()
        pool = NixlPool(metadata, a.memory, a.device_id, a.num_pages, a.page_bytes, list(a.addresses))
        return {"nixl": pool}

    def apply(self, dst_pages: list[int], payload: list[zmq.Frame]) -> None:
        if payload:
            raise ValueError("a nixl chunk carries no payload (its pages were written by NIXL)")


class NixlSender(LinkSender):
    """Prefill side of the nixl backend; binds ``address`` for its peers' control frames.

    ``_transmit`` posts a chunk's WRITE and returns; ``_on_turn`` (every turn of the I/O loop,
    every ``WRITE_POLL_S`` while any is posted) polls the posted WRITEs of each room in order
    and sends a chunk's header once its WRITE and those of the room's earlier chunks are done.
    A room that fails with WRITEs posted is held (``_still_reading``) until they stopped."""

    def _bind(self, address: str) -> str:
        self._nixl = NixlSenderMover(self.pool, self.layout)
        self._write_timeout = self.rooms.config.transfer_timeout
        self._posted: dict[int, collections.deque[PostedChunk]] = {}  # by room, in send order
        self._ack_when_stopped: dict[int, str] = {}  # decode-side aborts held: room -> peer
        return super()._bind(address)

    def mover_class(self, pool: PagedCaches) -> NixlSenderMover:  # type: ignore[override]
        """The link's mover: built in ``_bind`` already (the I/O loop's hooks use it)."""
        return self._nixl

    def close(self) -> None:
        super().close()
        for room in list(self._posted):
            for posted in self._posted.pop(room):
                if posted.handle is not None:
                    release(posted.handle)
        self._nixl.close()

    # ---- I/O thread --------------------------------------------------------------------

    def _transmit(self, entry: Room, chunk: Chunk) -> None:
        problem = entry.check_send(chunk.src_pages, chunk.dst_pages)
        if problem:
            self._fail(entry.room, f"prefill side: {problem}")
            return
        peer = entry.peer
        assert peer is not None
        try:
            handle = self._nixl.post(peer, chunk)
        except Exception as e:  # NIXL's errors derive from Exception only
            log.warning("room %d: NIXL WRITE not posted: %s", entry.room, e)
            self._write_failed(entry.room, peer, f"prefill side: transfer failed: {e}",
                               drop=isinstance(e, TransferError))
            return
        posted = PostedChunk(chunk, peer, handle, time.monotonic() + self._write_timeout)
        self._posted.setdefault(entry.room, collections.deque()).append(posted)

    def _on_turn(self, now: float) -> float | None:
        failed: list[tuple[int, str, str]] = []
        for room in list(self._posted):
            failure = self._advance(room, now)
            if failure is not None:
                failed.append((room, *failure))
        for room, peer, error in failed:
            self._write_failed(room, peer, error, drop=True)
        return now + WRITE_POLL_S if self._posted else None

    def _advance(self, room: int, now: float) -> tuple[str, str] | None:
        """Move the room's posted chunks on, in order: the header of each done WRITE goes out;
        returns (peer, error) when a WRITE failed or ran past its deadline."""
        queue = self._posted[room]
        failure = None
        while queue and failure is None:
            posted = queue[0]
            state = self._nixl.state(posted)
            if state == IN_PROGRESS and now < posted.deadline:
                break
            if state == IN_PROGRESS:
                state = f"not done within {self._write_timeout:g} s"
            if posted.handle is not None and not release(posted.handle):
                break  # NIXL cannot cancel it: polled again until it stops
            queue.popleft()
            entry = self.rooms.live(room)
            if state != DONE:
                failure = posted.peer, f"prefill side: transfer failed: {write_failure(posted.peer, state)}"
            elif entry is not None:
                self._send_header(entry, posted.chunk, [])
        if not queue:
            self._stopped(room)
        return failure

    def _stopped(self, room: int) -> None:
        """No WRITE of ``room`` is posted any more: a room held failed is reported now, and
        its peer told (ABORT_ACK for its own abort, ABORT for ours): the pages are free."""
        self._posted.pop(room, None)
        entry = self.rooms.get(room)
        held = entry is not None and entry.held
        self.rooms.release(room)
        ack_peer = self._ack_when_stopped.pop(room, None)
        if ack_peer is not None:
            self._tell(ack_peer, KVAbortAck(room))
        elif held and entry is not None and entry.peer is not None:
            self._tell(entry.peer, KVAbort(room, entry.error or "failed on the prefill side"))

    def _tell(self, peer: str, msg: KVAbort | KVAbortAck) -> None:
        peer_link = self._links.get(peer)
        if peer_link is not None and peer_link.registered:
            self._reply(peer, msg)

    def _write_failed(self, room: int, peer: str, error: str, drop: bool) -> None:
        """A WRITE failed: its room fails; with ``drop`` (NIXL's failure, not a bad chunk) the
        link is dropped too (UNREGISTERED): the decode side registers again, which reloads
        its agent here."""
        self._fail(room, error)
        peer_link = self._links.get(peer)
        if drop and peer_link is not None and peer_link.registered:
            self._lose(peer_link, f"NIXL WRITE to decode peer {peer} failed", tell=True)

    def _still_reading(self, room: int) -> bool:
        return room in self._posted

    def _on_abort(self, peer_link: Link, msg: KVAbort) -> None:
        super()._on_abort(peer_link, msg)
        if self._still_reading(msg.room):
            self._ack_when_stopped[msg.room] = peer_link.peer

    def _lose(self, peer_link: Link, error: str, tell: bool) -> None:
        """Cancel every WRITE to the lost peer first (the decode side stops waiting for them),
        so that its rooms are reported at once and its agent can be removed."""
        for room in [r for r, queue in self._posted.items() if queue[0].peer == peer_link.peer]:
            queue = self._posted[room]
            while queue and (queue[0].handle is None or release(queue[0].handle)):
                queue.popleft()
            if not queue:
                self._ack_when_stopped.pop(room, None)  # the link goes: nobody to tell
                self._stopped(room)
        super()._lose(peer_link, error, tell)


class NixlReceiver(LinkReceiver):
    """Decode side of the nixl backend: registers its pool with NIXL once, and drives NIXL's
    progress (``Pump``) from ``expect`` until the room's result is polled."""

    def _start(self) -> None:
        self._nixl = NixlReceiverMover(self.pool, self.name)
        self._pump = Pump(self._nixl.agent, f"kv-nixl-pump-{self.name}")
        super()._start()

    def mover_class(self, pool: PagedCaches) -> NixlReceiverMover:  # type: ignore[override]
        """The link's mover: built in ``_start`` already (the pump shares its agent)."""
        return self._nixl

    def expect(self, room: int, peer: str, dst_pages: Sequence[int]) -> None:
        super().expect(room, peer, dst_pages)
        self._pump.hold()

    def poll(self, timeout: float = 0.0) -> list[RoomResult]:
        results = super().poll(timeout)
        if results:
            self._pump.drop(len(results))
        return results

    def close(self) -> None:
        super().close()
        self._pump.close()
        with self._nixl.agent.lock:
            self._nixl.agent.close()
