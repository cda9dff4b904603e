"""``nixl`` backend: one-sided NIXL (UCX) WRITEs of the scattered pages straight into the decode
pool; control frames on the same zmq link as the other backends (``link_sender`` /
``link_receiver``: registration with layout checks, heartbeats, rooms, aborts, CURVE keys).

At registration the decode side registers its pool with its NIXL agent and shares a
``protocol.dataplane.NixlPool`` (the agent's metadata, the arrays' addresses and page size);
the prefill side loads the agent and prepares the descriptors of every remote page once. Each
``send`` is then one WRITE of ``pages × arrays`` descriptors (indices by array math), waited
for on the I/O thread; only then does the header-only ``KVChunk`` go out on the link, so the
decode side's room states, its checks of the pages and its ACK are those of every backend.
The last chunk carries the first token as usual (NIXL notifications are not needed).

Because the prefill process writes the decode pages itself, a decode-side abort or timeout is
reported only after the prefill side acknowledges it (or is found dead), as with cuda_ipc. A
WRITE that errors or does not complete fails its room and drops the link (UNREGISTERED): the
decode side fails its rooms and registers again, which loads its agent afresh.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import zmq

from kvtransfer.base import RoomResult
from kvtransfer.kernels import PagedCaches
from kvtransfer.link_receiver import LinkReceiver
from kvtransfer.link_sender import Chunk, LinkSender
from kvtransfer.nixl_agent import Agent, Pump, page_indices, page_rows
from kvtransfer.rooms import Room
from protocol.codec import ProtocolError, build
from protocol.dataplane import NixlPool

MEMORY_KINDS = ("DRAM", "VRAM")


def check_pool(extra: dict[str, Any], agent: Agent) -> NixlPool:
    """The peer's ``NixlPool``, checked against our own pool; raises ValueError naming the problem."""
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
    if pool.page_bytes != agent.page_bytes:
        raise ValueError(f"decode pages are {pool.page_bytes} bytes; ours are {agent.page_bytes}")
    if pool.num_pages < 1 or pool.device_id < 0 or min(pool.addresses) <= 0:
        raise ValueError("a NIXL pool needs pages, a device id >= 0 and non-null addresses")
    return pool


@dataclass
class RemotePool:
    """A registered decode peer as our agent knows it."""

    agent_name: str
    descs: Any  # its prepared page descriptors
    num_pages: int


class NixlSenderMover:
    def __init__(self, pool: PagedCaches, timeout: float) -> None:
        self._pool = pool
        self._agent = Agent(f"pdserve-prefill-{uuid.uuid4().hex[:12]}", pool.arrays)
        self._timeout = timeout
        self._peers: dict[str, RemotePool] = {}
        self.broken: set[str] = set()  # peers whose last WRITE failed: their link must be dropped

    def open_peer(self, peer: str, extra: dict[str, Any]) -> None:
        pool = check_pool(extra, self._agent)
        self.close_peer(peer)
        rows = page_rows(pool.addresses, pool.num_pages, pool.page_bytes, pool.device_id)
        try:
            name, descs = self._agent.add_peer(pool.agent_metadata, rows, pool.memory)
        except Exception as e:  # NIXL's errors derive from Exception only
            raise ValueError(f"NIXL could not load the decode side's agent: {e}") from None
        self._peers[peer] = RemotePool(name, descs, pool.num_pages)

    def close_peer(self, peer: str) -> None:
        self.broken.discard(peer)
        remote = self._peers.pop(peer, None)
        if remote is not None:
            self._agent.remove_peer(remote.agent_name, remote.descs)

    def transmit(self, peer: str, chunk: Chunk) -> list[Any]:
        if not chunk.src_pages:
            return []
        remote = self._peers[peer]
        beyond = [p for p in chunk.dst_pages if not 0 <= p < remote.num_pages]
        stray = [p for p in chunk.src_pages if not 0 <= p < self._pool.num_pages]
        if beyond or stray:
            raise ValueError(f"pages out of range: destination {beyond[:8]}, source {stray[:8]}")
        if chunk.ready is not None:
            chunk.ready.synchronize()  # NIXL reads device memory directly: the forward must be done
        local = page_indices(chunk.src_pages, self._agent.num_arrays, self._agent.num_pages)
        dst = page_indices(chunk.dst_pages, self._agent.num_arrays, remote.num_pages)
        try:
            self._agent.write(remote.agent_name, remote.descs, local, dst, self._timeout)
        except Exception:
            self.broken.add(peer)
            raise
        return []

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
    """Prefill side of the nixl backend; binds ``address`` for its peers' control frames."""

    def _bind(self, address: str) -> str:
        config = self.rooms.config
        # The I/O thread waits for each WRITE; it must answer heartbeats in time meanwhile.
        self._nixl = NixlSenderMover(self.pool, min(config.transfer_timeout, config.heartbeat_timeout / 2))
        return super()._bind(address)

    def mover_class(self, pool: PagedCaches) -> NixlSenderMover:  # type: ignore[override]
        """The link's mover: built in ``_bind`` already (it needs this side's timeouts)."""
        return self._nixl

    def _transmit(self, entry: Room, chunk: Chunk) -> None:
        peer = entry.peer
        super()._transmit(entry, chunk)
        if peer is not None and peer in self._nixl.broken:
            peer_link = self._links.get(peer)
            if peer_link is not None and peer_link.registered:
                self._lose(peer_link, f"NIXL WRITE to decode peer {peer} failed", tell=True)

    def close(self) -> None:
        super().close()
        self._nixl.close()


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
