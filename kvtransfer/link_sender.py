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
from kvtransfer.base import LayoutMismatch, TransferState, log
from kvtransfer.layout import check_peer_layout
from kvtransfer.links import Link, LinkState, LinkTable
from kvtransfer.rooms import Room
from kvtransfer.sides import PoolSender
from protocol.codec import Message
from protocol.dataplane import (
    KVAbort,
    KVAbortAck,
    KVAck,
    KVChunk,
    KVHeartbeat,
    KVLayout,
    KVRegister,
    KVRegistered,
    KVRoom,
    KVRoomOk,
    KVRoomRefused,
    KVUnregistered,
    TokenLogprob,
)


@dataclass
class Chunk:
    """Pages one ``send`` call completed; ``ready`` fires when the forward that wrote them is done."""

    room: int
    src_pages: list[int]
    dst_pages: list[int]
    first_token: int | None
    first_logprob: TokenLogprob | None
    ready: torch.cuda.Event | None
    staged: torch.Tensor | None = None  # the pages already gathered (a tensor-parallel instance's)

    @property
    def last(self) -> bool:
        return self.first_token is not None


class SenderMover(Protocol):
    def open_peer(self, peer: str, extra: dict[str, Any], theirs: KVLayout) -> None:
        """Prepare to write to a newly registered decode peer (``theirs``: its layout, checked
        against ours already); raise ValueError to refuse it."""

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
        self._links: LinkTable[Link] = LinkTable()  # one per decode peer that registered
        self._handlers = {KVRoom: self._on_room, KVAck: self._on_ack, KVAbort: self._on_abort,
                          KVHeartbeat: lambda link, msg: None}
        self._io = link.IoLoop(
            f"kv-sender-{address}", self.rooms, self._on_frames, self._on_expired, self._on_heartbeat,
            self._on_turn,
        )
        self._router = link.socket(self._io.ctx, zmq.ROUTER, keys=self.rooms.config.keys, serve=True)
        self._router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted decode worker keeps its name
        self._router.bind(address)
        self._io.add_socket(self._router)
        self._io.start()
        return self._router.getsockopt_string(zmq.LAST_ENDPOINT)

    # ---- API (worker thread) -----------------------------------------------------------

    def send(
        self,
        room: int,
        src_pages: Sequence[int],
        dst_pages: Sequence[int],
        first_token: int | None = None,
        first_logprob: TokenLogprob | None = None,
        staged: torch.Tensor | None = None,
    ) -> bool:
        if self.rooms.live(room) is None:
            return False
        ready = None
        if self._cuda and staged is None:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.pool.device))
        src, dst = [int(p) for p in src_pages], [int(p) for p in dst_pages]
        self._io.submit(self._send_chunk, Chunk(room, src, dst, first_token, first_logprob, ready, staged))
        return True

    def abort(self, room: int, reason: str = "aborted") -> None:
        self._io.submit(self._fail, room, f"prefill side: {reason}")

    def link_states(self) -> dict[str, str]:
        return self._links.states()

    def close(self) -> None:
        self._io.close()

    # ---- I/O thread: rooms -------------------------------------------------------------

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
        self._send_header(entry, chunk, payload)

    def _send_header(self, entry: Room, chunk: Chunk, payload: list[Any]) -> None:
        """The chunk's pages are moved (or travel as ``payload``): tell the decode side."""
        assert entry.peer is not None
        header = link.header(
            KVChunk(entry.room, chunk.dst_pages, chunk.last, chunk.first_token, chunk.first_logprob)
        )
        self._router.send_multipart([entry.peer.encode("latin-1"), header, *payload], copy=False)
        self.rooms.advance(entry.room, TransferState.TRANSFERRING)

    # ---- extension points of backends whose transfers outlive ``transmit`` (nixl) ------

    def _on_turn(self, now: float) -> float | None:
        """Run by the I/O loop at the end of every turn; returns when it next needs a turn
        (None: none before the next frame, command, heartbeat or room deadline)."""
        return None

    def _still_reading(self, room: int) -> bool:
        """Whether a transfer of ``room`` may still read its source pages (and write the
        peer's). A room failing meanwhile is held: its result, and the ABORT or ABORT_ACK the
        peer is due, wait until the backend has stopped the transfer (it then reports the
        room with ``rooms.release`` and tells the peer)."""
        return False

    def _fail(self, room: int, error: str) -> None:
        entry = self.rooms.live(room)
        if entry is None:
            return
        peer, held = entry.peer, self._still_reading(room)
        self.rooms.fail(room, error, hold=held)
        peer_link = self._links.get(peer or "")
        if peer_link is not None and peer_link.registered and not held:
            self._reply(peer_link.peer, KVAbort(room, error))

    def _on_room(self, peer_link: Link, msg: KVRoom) -> None:
        peer, room = peer_link.peer, msg.room
        refused = self.rooms.announce(room, peer, [int(p) for p in msg.dst_pages])
        if refused is not None:
            self._reply(peer, KVRoomRefused(room, refused))
            return
        self._reply(peer, KVRoomOk(room))
        entry = self.rooms.get(room)
        assert entry is not None  # announced just now, on this thread
        pending, entry.pending = entry.pending, []
        for chunk in pending:
            if self.rooms.live(room) is not None:
                self._transmit(entry, chunk)

    def _on_ack(self, peer_link: Link, msg: KVAck) -> None:
        if self._owns(peer_link.peer, msg.room):
            self.rooms.advance(msg.room, TransferState.DONE)

    def _on_abort(self, peer_link: Link, msg: KVAbort) -> None:
        # Every page copy of this room already ran to completion on this thread (or, for a
        # transfer still reading, the backend acks once it stopped), so the decode side may
        # reuse its pages as soon as it reads the ABORT_ACK.
        if self._owns(peer_link.peer, msg.room):
            self.rooms.fail(msg.room, f"decode side: {msg.reason}", hold=self._still_reading(msg.room))
        if not self._still_reading(msg.room):
            self._reply(peer_link.peer, KVAbortAck(msg.room))

    def _owns(self, peer: str, room: int) -> bool:
        entry = self.rooms.get(room)
        return entry is not None and entry.peer == peer

    def _on_expired(self, entry: Room) -> None:
        self._fail(entry.room, f"prefill side: timed out in {entry.state.name}")

    # ---- I/O thread: links -------------------------------------------------------------

    def _on_frames(self, sock: zmq.Socket, frames: list[zmq.Frame]) -> None:
        peer = frames[0].bytes.decode("latin-1")  # a bijection: any zmq identity round-trips
        msg = link.read(frames[1])
        if isinstance(msg, KVRegister):
            self._register(peer, msg)
            return
        peer_link = self._links.get(peer)
        if peer_link is None or not peer_link.registered:
            self._refuse_unregistered(peer)
            return
        peer_link.last_seen = time.monotonic()
        link.dispatch(self._handlers, msg, peer_link)

    def _refuse_unregistered(self, peer: str) -> None:
        """A peer we never registered, or dropped as dead, learns that it must register again."""
        error = "decode peer is not registered (or was dropped as unresponsive)"
        self._reply(peer, KVUnregistered(error))

    def _register(self, peer: str, msg: KVRegister) -> None:
        """A first registration, or a decode side registering again after it lost the link: one
        path. A repeat of the registration already held is only answered."""
        peer_link = self._links.get(peer)
        if peer_link is not None and peer_link.registered:
            if (peer_link.session, peer_link.epoch) == (msg.session, msg.epoch):
                peer_link.last_seen = time.monotonic()
                self._reply(peer, KVRegistered(ok=True, epoch=msg.epoch))
                return
            anew = f"decode peer {peer} registered anew (it lost the link, or restarted)"
            self._lose(peer_link, anew, tell=False)
        if peer_link is None:
            peer_link = self._links.add(Link(peer))
        else:
            self._links.move(peer_link, LinkState.RE_REGISTERING)
        try:
            check_peer_layout(self.layout, msg.layout)
            self._mover.open_peer(peer, msg.extra, msg.layout)
        except (LayoutMismatch, ValueError, TypeError, RuntimeError) as e:
            log.warning("refused decode peer %s: %s", peer, e)
            first = peer_link.state is LinkState.CONNECTING
            self._links.move(peer_link, LinkState.CLOSED if first else LinkState.LOST)
            self._reply(peer, KVRegistered(ok=False, error=self._told(e), epoch=msg.epoch))
            return
        peer_link.session, peer_link.epoch, peer_link.last_seen = msg.session, msg.epoch, time.monotonic()
        self._links.move(peer_link, LinkState.REGISTERED)
        self._reply(peer, KVRegistered(ok=True, epoch=msg.epoch))
        log.info("decode peer %s registered (epoch %d)", peer, msg.epoch)

    def _told(self, refusal: Exception) -> str:
        """What the refused peer hears: everything when it is authenticated (CURVE keys, or an
        ipc address only this host's user reaches); else only the field that mismatched, so a
        stranger does not learn this side's values (they are in the local log)."""
        if self.rooms.config.keys is not None or self.address.startswith(("ipc://", "inproc://")):
            return str(refusal)
        return f"{refusal.field} mismatch" if isinstance(refusal, LayoutMismatch) else "registration refused"

    def _on_heartbeat(self, now: float) -> None:
        for peer_link in self._links:
            if not peer_link.registered:
                continue
            if now - peer_link.last_seen > self.rooms.config.heartbeat_timeout:
                self._lose(peer_link, f"decode peer {peer_link.peer} stopped answering", tell=True)
            else:
                self._reply(peer_link.peer, KVHeartbeat())

    def _lose(self, peer_link: Link, error: str, tell: bool) -> None:
        """The link is lost: fail its rooms and forget the peer's pool until it registers again.
        With ``tell``, a peer that is in fact alive learns so at once (UNREGISTERED)."""
        log.warning("%s; failing its rooms", error)
        self._links.move(peer_link, LinkState.LOST)
        if tell:
            self._refuse_unregistered(peer_link.peer)
        for entry in self.rooms.rooms_of(peer_link.peer):
            self.rooms.fail(entry.room, error, hold=self._still_reading(entry.room))
        self._mover.close_peer(peer_link.peer)

    def _reply(self, peer: str, msg: Message) -> None:
        self._router.send_multipart([peer.encode("latin-1"), link.header(msg)])
