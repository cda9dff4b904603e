"""The prefill side of a socket link: room bookkeeping and frames; a backend's ``SenderMover``
moves the page data (host-staged frames for zmq, device-to-device copies for cuda_ipc)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
import zmq

from kvtransfer import link
from kvtransfer.base import KVLayout, LayoutMismatch, TransferState, log
from kvtransfer.rooms import Room
from kvtransfer.sides import PoolSender


@dataclass
class Chunk:
    """Pages one ``send`` call completed; ``ready`` fires when the forward that wrote them is done."""

    room: int
    src_pages: list[int]
    dst_pages: list[int]
    first_token: int | None
    ready: torch.cuda.Event | None

    @property
    def last(self) -> bool:
        return self.first_token is not None


class SenderMover(Protocol):
    def open_peer(self, peer: str, extra: dict[str, Any]) -> None:
        """Prepare to write to a newly registered decode peer; raise ValueError to refuse it."""

    def close_peer(self, peer: str) -> None: ...

    def transmit(self, peer: str, chunk: Chunk) -> list[Any]:
        """Move the chunk's pages; returns the payload frames (buffers) to send with its header.
        When it returns, the source pages are no longer read."""


class LinkSender(PoolSender):
    """A backend names its page mover with ``mover_class`` (built once, over the pool)."""

    mover_class: ClassVar[type[SenderMover]]

    def _bind(self, address: str) -> str:
        self._mover = self.mover_class(self.pool)
        self._cuda = self.pool.device.type == "cuda"
        self._peers: dict[str, float] = {}  # registered decode peer -> last time heard from
        self._io = link.IoLoop(
            f"kv-sender-{address}", self.rooms, self._on_frames, self._on_expired, self._on_heartbeat
        )
        self._router = link.socket(self._io.ctx, zmq.ROUTER)
        self._router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted decode worker keeps its name
        self._router.bind(address)
        self._io.add_socket(self._router)
        self._io.start()
        return self._router.getsockopt_string(zmq.LAST_ENDPOINT)

    # ---- API (worker thread) -----------------------------------------------------------

    def send(
        self, room: int, src_pages: Sequence[int], dst_pages: Sequence[int], first_token: int | None = None
    ) -> bool:
        if self.rooms.live(room) is None:
            return False
        ready = None
        if self._cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.pool.device))
        chunk = Chunk(room, [int(p) for p in src_pages], [int(p) for p in dst_pages], first_token, ready)
        self._io.submit(self._send_chunk, chunk)
        return True

    def abort(self, room: int, reason: str = "aborted") -> None:
        self._io.submit(self._fail, room, f"prefill side: {reason}")

    def close(self) -> None:
        self._io.close()

    # ---- I/O thread --------------------------------------------------------------------

    def _send_chunk(self, chunk: Chunk) -> None:
        entry = self.rooms.live(chunk.room)
        if entry is None:
            return
        if entry.dst_pages is None:  # not announced by the decode side yet
            entry.pending.append(chunk)
            return
        self._transmit(entry, chunk)

    def _transmit(self, entry: Room, chunk: Chunk) -> None:
        problem = entry.check_send(chunk.src_pages, chunk.dst_pages)
        if problem:
            self._fail(entry.room, f"prefill side: {problem}")
            return
        assert entry.peer is not None
        try:
            payload = self._mover.transmit(entry.peer, chunk)
        except Exception as e:  # a device error must fail this room, not the link
            log.exception("room %d: transfer failed", entry.room)
            self._fail(entry.room, f"prefill side: transfer failed: {e}")
            return
        header = link.pack(
            link.CHUNK, room=entry.room, dst_pages=chunk.dst_pages, last=chunk.last,
            first_token=chunk.first_token,
        )
        self._router.send_multipart([entry.peer.encode("latin-1"), header, *payload], copy=False)
        self.rooms.advance(entry.room, TransferState.TRANSFERRING)

    def _fail(self, room: int, error: str) -> None:
        entry = self.rooms.live(room)
        if entry is None:
            return
        peer = entry.peer
        self.rooms.fail(room, error)
        if peer in self._peers:
            self._reply(peer, link.ABORT, room=room, reason=error)

    def _on_frames(self, sock: zmq.Socket, frames: list[zmq.Frame]) -> None:
        peer = frames[0].bytes.decode("latin-1")  # a bijection: any zmq identity round-trips
        msg = link.unpack(frames[1])
        kind = msg["k"]
        if kind == link.REGISTER:
            self._register(peer, msg)
            return
        if peer not in self._peers:
            self._refuse_unregistered(peer)
            return
        self._peers[peer] = time.monotonic()
        if kind == link.ROOM:
            self._announce(peer, int(msg["room"]), [int(p) for p in msg["dst_pages"]])
        elif kind == link.ACK and self._owns(peer, int(msg["room"])):
            self.rooms.advance(int(msg["room"]), TransferState.DONE)
        elif kind == link.ABORT:
            # Every page copy of this room already ran to completion on this thread, so the
            # decode side may reuse its pages as soon as it reads the ABORT_ACK.
            room = int(msg["room"])
            if self._owns(peer, room):
                self.rooms.fail(room, f"decode side: {msg.get('reason', 'aborted')}")
            self._reply(peer, link.ABORT_ACK, room=room)

    def _owns(self, peer: str, room: int) -> bool:
        entry = self.rooms.get(room)
        return entry is not None and entry.peer == peer

    def _refuse_unregistered(self, peer: str) -> None:
        """A peer we never registered, or dropped as dead, learns that it must register again."""
        error = "decode peer is not registered (or was dropped as unresponsive)"
        self._reply(peer, link.UNREGISTERED, error=error)

    def _register(self, peer: str, msg: dict[str, Any]) -> None:
        if peer in self._peers:
            self._drop_peer(peer, f"decode peer {peer} registered again (restarted?)")
        try:
            self.layout.check_matches(KVLayout.from_dict(msg["layout"]))
            self._mover.open_peer(peer, msg.get("extra") or {})
        except (LayoutMismatch, ValueError, TypeError, RuntimeError) as e:
            log.warning("refused decode peer %s: %s", peer, e)
            self._reply(peer, link.REGISTERED, ok=False, error=str(e))
            return
        self._peers[peer] = time.monotonic()
        self._reply(peer, link.REGISTERED, ok=True, error=None)
        log.info("decode peer %s registered", peer)

    def _announce(self, peer: str, room: int, dst_pages: list[int]) -> None:
        refused = self.rooms.announce(room, peer, dst_pages)
        if refused is not None:
            self._reply(peer, link.ROOM_REFUSED, room=room, error=refused)
            return
        self._reply(peer, link.ROOM_OK, room=room)
        entry = self.rooms.get(room)
        assert entry is not None  # announced just now, on this thread
        pending, entry.pending = entry.pending, []
        for chunk in pending:
            if self.rooms.live(room) is not None:
                self._transmit(entry, chunk)

    def _on_expired(self, entry: Room) -> None:
        self._fail(entry.room, f"prefill side: timed out in {entry.state.name}")

    def _on_heartbeat(self, now: float) -> None:
        for peer, seen in list(self._peers.items()):
            if now - seen > self.rooms.config.heartbeat_timeout:
                self._drop_peer(peer, f"decode peer {peer} stopped answering")
            else:
                self._reply(peer, link.HEARTBEAT)

    def _drop_peer(self, peer: str, error: str) -> None:
        """Forget a peer and fail its rooms; if it is in fact alive, it learns so at once."""
        log.warning("%s; failing its rooms", error)
        del self._peers[peer]
        self._refuse_unregistered(peer)
        for entry in self.rooms.rooms_of(peer):
            self.rooms.fail(entry.room, error)
        self._mover.close_peer(peer)

    def _reply(self, peer: str, kind: str, **fields: Any) -> None:
        self._router.send_multipart([peer.encode("latin-1"), link.pack(kind, **fields)])
