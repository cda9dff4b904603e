"""The decode side of a socket link: registration with prefill peers (and registering again by
itself after a link is lost), room announcements, chunk validation and acknowledgements; a
backend's ``ReceiverMover`` lands the page data."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import zmq

from kvtransfer import link
from kvtransfer.base import RegistrationRefused, TransferError, TransferState, log
from kvtransfer.links import Link, LinkState, LinkTable
from kvtransfer.rooms import Room
from kvtransfer.sides import PoolReceiver
from protocol.codec import Message
from protocol.dataplane import (
    KVAbort,
    KVAbortAck,
    KVAck,
    KVChunk,
    KVHeartbeat,
    KVRegister,
    KVRegistered,
    KVRoom,
    KVRoomOk,
    KVRoomRefused,
    KVUnregistered,
)

CONTROL_HWM = 1000  # frames queued for a prefill peer that does not read; later ones are dropped


class ReceiverMover(Protocol):
    remote_writes: bool  # True: the prefill process writes our pages itself (cuda_ipc)

    def registration(self) -> dict[str, Any]:
        """What the prefill side needs to write to us (msgpack-able: bytes, ints, lists)."""

    def apply(self, dst_pages: list[int], payload: list[zmq.Frame]) -> None:
        """Land one chunk's payload in ``dst_pages``; when it returns the pages are written."""


@dataclass
class Waiter:
    """A ``register`` call waiting for the peer's answer."""

    done: threading.Event = field(default_factory=threading.Event)
    error: str | None = None

    def answer(self, error: str | None) -> None:
        self.error = error
        self.done.set()


@dataclass
class PrefillLink(Link):
    """A prefill peer: its link state, its connection (one for the link's lifetime; zmq
    reconnects it) and the ``register`` calls waiting for an answer."""

    sock: zmq.Socket | None = None
    waiters: list[Waiter] = field(default_factory=list)

    def answer(self, error: str | None) -> None:
        waiters, self.waiters = self.waiters, []
        for w in waiters:
            w.answer(error)


class LinkReceiver(PoolReceiver):
    """A backend names its page mover with ``mover_class`` (built once, over the pool)."""

    mover_class: ClassVar[type[ReceiverMover]]

    def _start(self) -> None:
        self._mover = self.mover_class(self.pool)
        self._session = uuid.uuid4().hex[:12]  # this incarnation, in every REGISTER
        self._registration: dict[str, Any] | None = None  # what the mover shares, made once
        self._links: LinkTable[PrefillLink] = LinkTable()  # one per prefill peer asked to register with
        self._handlers = {
            KVRegistered: self._on_registered, KVUnregistered: self._on_unregistered,
            KVRoomOk: self._on_room_ok, KVRoomRefused: self._on_room_refused,
            KVAbort: self._on_abort, KVAbortAck: self._on_abort_ack, KVHeartbeat: lambda *_: None,
        }
        self._io = link.IoLoop(
            f"kv-receiver-{self.name}", self.rooms, self._on_frames, self._on_expired, self._on_heartbeat
        )
        self._io.start()

    # ---- API (worker thread) -----------------------------------------------------------

    def register(self, address: str, timeout: float = 30.0) -> str:
        """Register with the prefill peer at ``address``; at once if the link is up. A lost link
        registers again by itself; calling this then only makes it try now."""
        current = self._links.get(address)
        if current is not None and current.registered:
            return address
        waiter = Waiter()
        self._io.submit(self._register_now, address, waiter)
        if not waiter.done.wait(timeout):
            self._io.submit(self._give_up, address, waiter)
            raise TransferError(f"prefill KV sender at {address} did not answer within {timeout:.0f}s")
        if waiter.error is not None:
            raise RegistrationRefused(f"registration with the prefill KV sender at {address}: {waiter.error}")
        return address

    def expect(self, room: int, peer: str, dst_pages: Sequence[int]) -> None:
        """A peer whose link is lost fails the room (through ``poll``) rather than raising: that
        is a runtime condition, while a never-registered peer is a caller's bug."""
        peer_link = self._links.get(peer)
        if peer_link is None or peer_link.state in (LinkState.CONNECTING, LinkState.CLOSED):
            raise TransferError(f"{peer} is not a registered prefill peer; call register() first")
        pages = [int(p) for p in dst_pages]
        if len(set(pages)) != len(pages):
            raise ValueError(f"room {room}: destination pages repeat: {pages}")
        self.rooms.add(room, TransferState.BOOTSTRAPPING, peer=peer, dst_pages=pages)
        self._io.submit(self._announce, room)

    def abort(self, room: int, reason: str = "aborted") -> None:
        self._io.submit(self._abort, room, f"decode side: {reason}")

    def link_states(self) -> dict[str, str]:
        return self._links.states()

    def close(self) -> None:
        self._io.close()

    # ---- I/O thread: registration ------------------------------------------------------

    def _register_now(self, address: str, waiter: Waiter) -> None:
        peer_link = self._links.get(address)
        if peer_link is not None and peer_link.registered:
            waiter.answer(None)
            return
        if peer_link is None:
            peer_link = self._links.add(PrefillLink(address))
            peer_link.waiters.append(waiter)
            if not self._connect(peer_link):
                return
        else:
            peer_link.waiters.append(waiter)
        if peer_link.state is LinkState.LOST:
            self._links.move(peer_link, LinkState.RE_REGISTERING)
        self._send_register(peer_link)

    def _give_up(self, address: str, waiter: Waiter) -> None:
        """A ``register`` call stopped waiting: a first registration is abandoned; a link that
        was registered before keeps trying."""
        peer_link = self._links.get(address)
        if peer_link is None or waiter not in peer_link.waiters:
            return
        peer_link.waiters.remove(waiter)
        if peer_link.state is LinkState.CONNECTING and not peer_link.waiters:
            self._close(peer_link)

    def _connect(self, peer_link: PrefillLink) -> bool:
        """Open the link's connection; False (the link closed) if that is impossible."""
        try:
            if self._registration is None:
                self._registration = self._mover.registration()
            sock = link.socket(
                self._io.ctx, zmq.DEALER, identity=self.name.encode(), keys=self.rooms.config.keys
            )
            sock.setsockopt(zmq.SNDHWM, CONTROL_HWM)  # only small control frames go this way
            sock.connect(peer_link.peer)
        except Exception as e:  # a bad address or an unshareable pool: register() raises it
            peer_link.answer(f"could not connect: {e}")
            self._close(peer_link)
            return False
        peer_link.sock = sock
        self._io.add_socket(sock)
        return True

    def _send_register(self, peer_link: PrefillLink) -> None:
        register = KVRegister(self.layout, self._registration or {}, self._session, peer_link.epoch)
        self._send(peer_link, register)

    def _close(self, peer_link: PrefillLink) -> None:
        if peer_link.sock is not None:
            self._io.remove_socket(peer_link.sock)
            peer_link.sock = None
        self._links.move(peer_link, LinkState.CLOSED)

    def _on_registered(self, peer_link: PrefillLink, msg: KVRegistered) -> None:
        waiting = peer_link.state in (LinkState.CONNECTING, LinkState.RE_REGISTERING)
        if not waiting or msg.epoch != peer_link.epoch:
            return  # the answer to a repeated or an older REGISTER
        if not msg.ok:
            self._refused(peer_link, msg.error or "refused")
            return
        peer_link.last_seen = time.monotonic()
        again = peer_link.state is LinkState.RE_REGISTERING
        self._links.move(peer_link, LinkState.REGISTERED)
        peer_link.answer(None)
        if again:
            log.info("registered again with prefill peer %s", peer_link.peer)

    def _refused(self, peer_link: PrefillLink, error: str) -> None:
        """A first registration is over; a link registering again stays lost and tries again."""
        peer_link.answer(error)
        if peer_link.state is LinkState.CONNECTING:
            self._close(peer_link)
            return
        log.warning("prefill peer %s refused us again: %s", peer_link.peer, error)
        self._links.move(peer_link, LinkState.LOST)

    def _on_unregistered(self, peer_link: PrefillLink, msg: KVUnregistered) -> None:
        if peer_link.registered:  # the sender dropped us as dead
            self._lose(peer_link, f"prefill peer {peer_link.peer} dropped us: {msg.error}")

    def _on_heartbeat(self, now: float) -> None:
        """Heartbeats on registered links, loss of silent ones, and REGISTER again on lost ones
        (every heartbeat interval until one is answered)."""
        for peer_link in self._links:
            if peer_link.registered:
                if now - peer_link.last_seen > self.rooms.config.heartbeat_timeout:
                    self._lose(peer_link, f"prefill peer {peer_link.peer} stopped answering")
                else:
                    self._send(peer_link, KVHeartbeat())
            elif peer_link.state in (LinkState.LOST, LinkState.RE_REGISTERING):
                if peer_link.state is LinkState.LOST:
                    self._links.move(peer_link, LinkState.RE_REGISTERING)
                self._send_register(peer_link)

    def _lose(self, peer_link: PrefillLink, error: str) -> None:
        """A dead writer writes no more: fail its rooms and report the held ones. The link
        registers again by itself from the next heartbeat on (a new epoch)."""
        log.warning("%s; failing its rooms", error)
        self._links.move(peer_link, LinkState.LOST)
        peer_link.epoch += 1
        for entry in self.rooms.rooms_of(peer_link.peer):
            self.rooms.fail(entry.room, error)
        self.rooms.release_peer(peer_link.peer)

    # ---- I/O thread: rooms -------------------------------------------------------------

    def _announce(self, room: int) -> None:
        entry = self.rooms.live(room)
        if entry is None:
            return
        peer_link = self._links.get(entry.peer or "")
        if peer_link is None or not peer_link.registered or peer_link.sock is None:
            self.rooms.fail(room, f"prefill peer {entry.peer} is unavailable")
            return
        self._send(peer_link, KVRoom(room, entry.dst_pages or []))

    def _abort(self, room: int, error: str) -> None:
        entry = self.rooms.live(room)
        if entry is not None:
            self._fail_and_tell(entry, error)

    def _fail_and_tell(self, entry: Room, error: str) -> None:
        """Fail a room we stop waiting for. If the prefill side writes our pages itself, the
        result waits for its ABORT_ACK (or its death): until then it may still be writing."""
        peer_link = self._links.get(entry.peer or "")
        alive = peer_link is not None and peer_link.registered and peer_link.sock is not None
        self.rooms.fail(entry.room, error, hold=self._mover.remote_writes and alive)
        if alive:
            assert peer_link is not None
            self._send(peer_link, KVAbort(entry.room, error))

    def _on_frames(self, sock: zmq.Socket, frames: list[zmq.Frame]) -> None:
        peer_link = next((p for p in self._links if p.sock is sock), None)
        if peer_link is None:
            return
        peer_link.last_seen = time.monotonic()
        msg = link.read(frames[0])
        if isinstance(msg, KVChunk):
            self._on_chunk(peer_link, msg, frames[1:])
        else:
            link.dispatch(self._handlers, msg, peer_link)

    def _entry_of(self, peer_link: PrefillLink, room: int) -> Room | None:
        """The live room ``room`` if ``peer_link``'s peer is its writer."""
        entry = self.rooms.live(room)
        return entry if entry is not None and entry.peer == peer_link.peer else None

    def _on_room_ok(self, peer_link: PrefillLink, msg: KVRoomOk) -> None:
        if self._entry_of(peer_link, msg.room) is not None:
            self.rooms.advance(msg.room, TransferState.WAITING_FOR_INPUT)

    def _on_room_refused(self, peer_link: PrefillLink, msg: KVRoomRefused) -> None:
        if self._entry_of(peer_link, msg.room) is not None:
            self.rooms.fail(msg.room, f"prefill side refused the room: {msg.error}")

    def _on_abort(self, peer_link: PrefillLink, msg: KVAbort) -> None:
        """The writer itself stopped: the pages are ours again at once."""
        if self._entry_of(peer_link, msg.room) is not None:
            self.rooms.fail(msg.room, msg.reason)

    def _on_abort_ack(self, peer_link: PrefillLink, msg: KVAbortAck) -> None:
        self.rooms.release(msg.room)

    def _on_chunk(self, peer_link: PrefillLink, msg: KVChunk, payload: list[zmq.Frame]) -> None:
        entry = self._entry_of(peer_link, msg.room)
        if entry is None:
            log.debug("ignoring a late chunk for room %s", msg.room)
            return
        dst_pages = [int(p) for p in msg.dst_pages]
        first_token = int(msg.first_token) if msg.last and msg.first_token is not None else None
        problem = entry.check_landing(dst_pages)
        if problem is None:
            try:
                self._mover.apply(dst_pages, payload)
            except Exception as e:  # a malformed payload fails this room only
                problem = f"could not land the pages: {e}"
        problem = problem or self.rooms.land(entry, dst_pages, first_token, msg.first_logprob)
        if problem is not None:
            self._fail_and_tell(entry, f"decode side: {problem}")
        elif first_token is not None:
            self._send(peer_link, KVAck(entry.room))

    def _on_expired(self, entry: Room) -> None:
        self._fail_and_tell(entry, f"decode side: timed out in {entry.state.name}")

    def _send(self, peer_link: PrefillLink, msg: Message) -> None:
        """Queue ``msg`` for the peer; dropped if ``CONTROL_HWM`` frames already wait for a peer
        that does not read (the heartbeat tells the link is lost; REGISTER is sent again)."""
        assert peer_link.sock is not None
        try:
            peer_link.sock.send(link.header(msg), zmq.NOBLOCK)
        except zmq.Again:
            log.debug("prefill peer %s is not reading; dropped a %s frame", peer_link.peer, msg.TYPE)
