"""The decode side of a socket link: registration with prefill peers, room announcements,
chunk validation and acknowledgements; a backend's ``ReceiverMover`` lands the page data."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import zmq

from kvtransfer import link
from kvtransfer.base import RegistrationRefused, TransferError, TransferState, log
from kvtransfer.rooms import Room
from kvtransfer.sides import PoolReceiver


class ReceiverMover(Protocol):
    remote_writes: bool  # True: the prefill process writes our pages itself (cuda_ipc)

    def registration(self) -> dict[str, Any]:
        """What the prefill side needs to write to us (msgpack-able: bytes, ints, lists)."""

    def apply(self, dst_pages: list[int], payload: list[zmq.Frame]) -> None:
        """Land one chunk's payload in ``dst_pages``; when it returns the pages are written."""


@dataclass
class _Peer:
    address: str
    sock: zmq.Socket | None = None
    answered: threading.Event = field(default_factory=threading.Event)
    error: str | None = None
    registered: bool = False
    dead: bool = False  # was registered, then stopped answering or was dropped by the sender
    last_seen: float = 0.0


class LinkReceiver(PoolReceiver):
    """A backend names its page mover with ``mover_class`` (built once, over the pool)."""

    mover_class: ClassVar[type[ReceiverMover]]

    def _start(self) -> None:
        self._mover = self.mover_class(self.pool)
        self._peers: dict[str, _Peer] = {}
        self._by_sock: dict[zmq.Socket, _Peer] = {}
        self._io = link.IoLoop(
            f"kv-receiver-{self.name}", self.rooms, self._on_frames, self._on_expired, self._on_heartbeat
        )
        self._io.start()

    # ---- API (worker thread) -----------------------------------------------------------

    def register(self, address: str, timeout: float = 30.0) -> str:
        current = self._peers.get(address)
        if current is not None and current.registered:
            return address
        peer = _Peer(address)
        self._peers[address] = peer
        self._io.submit(self._connect, peer)
        if not peer.answered.wait(timeout):
            self._io.submit(self._disconnect, peer)
            raise TransferError(f"prefill KV sender at {address} did not answer within {timeout:.0f}s")
        if peer.error is not None:
            self._io.submit(self._disconnect, peer)
            raise RegistrationRefused(f"registration with the prefill KV sender at {address}: {peer.error}")
        return address

    def expect(self, room: int, peer: str, dst_pages: Sequence[int]) -> None:
        """A peer that died since it registered fails the room (through ``poll``) rather than
        raising: that is a runtime condition, while a never-registered peer is a caller's bug."""
        info = self._peers.get(peer)
        if info is None or not (info.registered or info.dead):
            raise TransferError(f"{peer} is not a registered prefill peer; call register() first")
        pages = [int(p) for p in dst_pages]
        if len(set(pages)) != len(pages):
            raise ValueError(f"room {room}: destination pages repeat: {pages}")
        self.rooms.add(room, TransferState.BOOTSTRAPPING, peer=peer, dst_pages=pages)
        self._io.submit(self._announce, room)

    def abort(self, room: int, reason: str = "aborted") -> None:
        self._io.submit(self._abort, room, f"decode side: {reason}")

    def close(self) -> None:
        self._io.close()

    # ---- I/O thread --------------------------------------------------------------------

    def _connect(self, peer: _Peer) -> None:
        try:
            extra = self._mover.registration()
            sock = link.socket(self._io.ctx, zmq.DEALER, identity=self.name.encode())
            sock.connect(peer.address)
        except Exception as e:  # a bad address or an unshareable pool: register() raises it
            peer.error = f"could not connect: {e}"
            peer.answered.set()
            return
        peer.sock = sock
        self._io.add_socket(sock)
        self._by_sock[sock] = peer
        sock.send(link.pack(link.REGISTER, layout=self.layout.to_dict(), extra=extra))

    def _disconnect(self, peer: _Peer) -> None:
        if peer.sock is not None and peer.sock in self._by_sock:
            del self._by_sock[peer.sock]
            self._io.remove_socket(peer.sock)
        if self._peers.get(peer.address) is peer:
            del self._peers[peer.address]

    def _announce(self, room: int) -> None:
        entry = self.rooms.live(room)
        if entry is None:
            return
        peer = self._peers.get(entry.peer or "")
        if peer is None or not peer.registered or peer.sock is None:
            self.rooms.fail(room, f"prefill peer {entry.peer} is unavailable")
            return
        peer.sock.send(link.pack(link.ROOM, room=room, dst_pages=entry.dst_pages))

    def _abort(self, room: int, error: str) -> None:
        entry = self.rooms.live(room)
        if entry is not None:
            self._fail_and_tell(entry, error)

    def _fail_and_tell(self, entry: Room, error: str) -> None:
        """Fail a room we stop waiting for. If the prefill side writes our pages itself, the
        result waits for its ABORT_ACK (or its death): until then it may still be writing."""
        peer = self._peers.get(entry.peer or "")
        alive = peer is not None and peer.registered and peer.sock is not None
        self.rooms.fail(entry.room, error, hold=self._mover.remote_writes and alive)
        if alive:
            peer.sock.send(link.pack(link.ABORT, room=entry.room, reason=error))

    def _on_frames(self, sock: zmq.Socket, frames: list[zmq.Frame]) -> None:
        peer = self._by_sock.get(sock)
        if peer is None:
            return
        peer.last_seen = time.monotonic()
        msg = link.unpack(frames[0])
        kind = msg["k"]
        if kind == link.REGISTERED:
            peer.registered, peer.error = bool(msg["ok"]), msg.get("error")
            peer.answered.set()
        elif kind == link.UNREGISTERED and peer.registered:  # the sender dropped us as dead
            self._peer_died(peer, f"prefill peer {peer.address} dropped us: {msg.get('error')}")
        elif kind == link.CHUNK:
            self._on_chunk(peer, msg, frames[1:])
        elif kind == link.ROOM_OK:
            waiting = TransferState.WAITING_FOR_INPUT
            self._on_room_reply(peer, msg, lambda room: self.rooms.advance(room, waiting))
        elif kind == link.ROOM_REFUSED:
            error = f"prefill side refused the room: {msg.get('error')}"
            self._on_room_reply(peer, msg, lambda room: self.rooms.fail(room, error))
        elif kind == link.ABORT:  # the writer itself stopped: the pages are ours again at once
            error = str(msg.get("reason", "prefill side aborted"))
            self._on_room_reply(peer, msg, lambda room: self.rooms.fail(room, error))
        elif kind == link.ABORT_ACK:
            self.rooms.release(int(msg["room"]))

    def _on_room_reply(self, peer: _Peer, msg: dict[str, Any], apply: Any) -> None:
        entry = self.rooms.live(int(msg["room"]))
        if entry is not None and entry.peer == peer.address:
            apply(entry.room)

    def _on_chunk(self, peer: _Peer, msg: dict[str, Any], payload: list[zmq.Frame]) -> None:
        entry = self.rooms.live(int(msg["room"]))
        if entry is None or entry.peer != peer.address:
            log.debug("ignoring a late chunk for room %s", msg["room"])
            return
        dst_pages = [int(p) for p in msg["dst_pages"]]
        first_token = int(msg["first_token"]) if msg["last"] else None
        problem = entry.check_landing(dst_pages)
        if problem is None:
            try:
                self._mover.apply(dst_pages, payload)
            except Exception as e:  # a malformed payload fails this room only
                problem = f"could not land the pages: {e}"
        problem = problem or self.rooms.land(entry, dst_pages, first_token)
        if problem is not None:
            self._fail_and_tell(entry, f"decode side: {problem}")
        elif first_token is not None:
            assert peer.sock is not None
            peer.sock.send(link.pack(link.ACK, room=entry.room))

    def _on_expired(self, entry: Room) -> None:
        self._fail_and_tell(entry, f"decode side: timed out in {entry.state.name}")

    def _on_heartbeat(self, now: float) -> None:
        for peer in list(self._peers.values()):
            if not peer.registered or peer.sock is None:
                continue
            if now - peer.last_seen > self.rooms.config.heartbeat_timeout:
                self._peer_died(peer, f"prefill peer {peer.address} stopped answering")
            else:
                peer.sock.send(link.pack(link.HEARTBEAT))

    def _peer_died(self, peer: _Peer, error: str) -> None:
        """A dead writer writes no more: fail its rooms and report the held ones. The peer
        stays known as dead (``expect`` fails rooms for it) until ``register`` is called again."""
        log.warning("%s; failing its rooms", error)
        peer.registered, peer.dead = False, True
        for entry in self.rooms.rooms_of(peer.address):
            self.rooms.fail(entry.room, error)
        self.rooms.release_peer(peer.address)
        if peer.sock is not None:
            del self._by_sock[peer.sock]
            self._io.remove_socket(peer.sock)
            peer.sock = None
