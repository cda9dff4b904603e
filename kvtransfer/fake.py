"""``fake`` backend: both sides in one process, for scheduler and worker tests.

It keeps the real contract (states, timeouts, one result per room, duplicate rooms refused,
late sends ignored) but has no thread and no socket: a ``send`` copies the pages straight into
the receiver's pool with torch, on the caller's thread. ``address`` is any string naming the
sender in this process (e.g. ``"fake://prefill-0"``).

Fault injection, through the sender's ``faults``:
  ``faults.delay(room, seconds)`` — every chunk of ``room`` lands ``seconds`` after its send
  (delivered by a later ``poll`` of either side), to slow a transfer down on purpose;
  ``faults.fail(room, reason)`` — the next send of ``room`` fails it on both sides;
  ``faults.kill()`` — the sender is dead: its rooms fail on both sides, sends are ignored.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from kvtransfer.base import LayoutMismatch, RegistrationRefused, RoomResult, TransferError, TransferState
from kvtransfer.kernels import gather_pages_ref
from kvtransfer.layout import check_peer_layout
from kvtransfer.rooms import Room, RoomTable
from kvtransfer.sides import PoolReceiver, PoolSender
from protocol.dataplane import TokenLogprob

_LOCK = threading.RLock()  # every fake side of this process: one transfer at a time
_SENDERS: dict[str, FakeSender] = {}


@dataclass
class FakeFaults:
    delays: dict[int, float] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)
    dead: bool = False

    def delay(self, room: int, seconds: float) -> None:
        self.delays[room] = seconds

    def fail(self, room: int, reason: str = "injected failure") -> None:
        self.failures[room] = reason

    def kill(self) -> None:
        self.dead = True


@dataclass
class _Delivery:
    """One ``send``, kept in its room's ``pending`` list until it is due and announced."""

    due: float
    src_pages: list[int]
    dst_pages: list[int]
    first_token: int | None
    first_logprob: TokenLogprob | None
    staged: torch.Tensor | None = None


class FakeSender(PoolSender):
    def _bind(self, address: str) -> str:
        self.faults = FakeFaults()
        self._peers: dict[str, FakeReceiver] = {}  # registered receivers by name
        with _LOCK:
            if address in _SENDERS:
                raise ValueError(f"fake KV sender address {address!r} is in use")
            _SENDERS[address] = self
        return address

    def send(
        self,
        room: int,
        src_pages: Sequence[int],
        dst_pages: Sequence[int],
        first_token: int | None = None,
        first_logprob: TokenLogprob | None = None,
        staged: torch.Tensor | None = None,
    ) -> bool:
        with _LOCK:
            entry = self.rooms.live(room)
            if entry is None or self.faults.dead:
                return False
            if room in self.faults.failures:
                self._fail_both(room, f"injected failure: {self.faults.failures.pop(room)}")
                return True
            due = time.monotonic() + self.faults.delays.get(room, 0.0)
            delivery = _Delivery(due, list(src_pages), list(dst_pages), first_token, first_logprob, staged)
            entry.pending.append(delivery)
            if entry.dst_pages is not None:  # announced: the chunk is on its way
                self.rooms.advance(room, TransferState.TRANSFERRING)
            self._pump()
            return True

    def abort(self, room: int, reason: str = "aborted") -> None:
        with _LOCK:
            self._fail_both(room, f"prefill side: {reason}")

    def poll(self, timeout: float = 0.0) -> list[RoomResult]:
        return _poll(self.rooms, self._pump, self._next_due, timeout)

    def close(self) -> None:
        with _LOCK:
            if _SENDERS.get(self.address) is self:
                del _SENDERS[self.address]

    # ---- the receiver's side of the handshake ------------------------------------------

    def _register(self, receiver: FakeReceiver) -> None:
        check_peer_layout(self.layout, receiver.layout)
        self._peers[receiver.name] = receiver

    def _announce(self, receiver: FakeReceiver, room: int, dst_pages: list[int]) -> str | None:
        """A receiver announces ``room``; returns why it is refused, or None."""
        if self.faults.dead:
            return "prefill peer is dead"
        return self.rooms.announce(room, receiver.name, dst_pages)

    # ---- moving pages ------------------------------------------------------------------

    def _next_due(self) -> float | None:
        return min((r.pending[0].due for r in self.rooms.live_rooms() if r.pending), default=None)

    def _pump(self) -> None:
        """Land every delivery that is due, kill rooms of a dead sender, expire timeouts."""
        with _LOCK:
            now = time.monotonic()
            if self.faults.dead:
                for entry in self.rooms.live_rooms():
                    self._fail_both(entry.room, "prefill peer is dead")
            for entry in self.rooms.live_rooms():
                self._deliver_due(entry, now)
            for entry in self.rooms.expired(now):
                self._fail_both(entry.room, f"prefill side: timed out in {entry.state.name}")
            for receiver in list(self._peers.values()):
                for entry in receiver.rooms.expired(now):
                    if entry.peer == self.address:
                        error = f"decode side: timed out in {entry.state.name}"
                        self._fail_room_of(receiver, entry.room, error)

    def _deliver_due(self, entry: Room, now: float) -> None:
        """Land ``entry``'s due sends in order, once the decode side announced the room."""
        receiver = self._peers.get(entry.peer or "")
        while entry.pending and entry.pending[0].due <= now and receiver is not None:
            target = receiver.rooms.live(entry.room)
            if entry.dst_pages is None or target is None:
                return
            self._deliver(entry, entry.pending.pop(0), receiver, target)
            if self.rooms.live(entry.room) is None:
                return

    def _deliver(self, entry: Room, d: _Delivery, receiver: FakeReceiver, target: Room) -> None:
        problem = _prefixed("prefill side", entry.check_send(d.src_pages, d.dst_pages))
        problem = problem or _prefixed("decode side", target.check_landing(d.dst_pages))
        if problem is None:
            staging = d.staged if d.staged is not None else gather_pages_ref(self.pool, d.src_pages)
            receiver.lander.land(d.dst_pages, staging)
            landed = receiver.rooms.land(target, d.dst_pages, d.first_token, d.first_logprob)
            problem = _prefixed("decode side", landed)
        if problem is not None:
            self._fail_both(entry.room, problem)
        elif d.first_token is None:
            self.rooms.advance(entry.room, TransferState.TRANSFERRING)
        else:
            self.rooms.advance(entry.room, TransferState.DONE)

    def _fail_both(self, room: int, error: str) -> None:
        entry = self.rooms.get(room)
        receiver = self._peers.get(entry.peer or "") if entry is not None else None
        if receiver is None:
            self.rooms.fail(room, error)
        else:
            self._fail_room_of(receiver, room, error)

    def _fail_room_of(self, receiver: FakeReceiver, room: int, error: str) -> None:
        """Fail ``room`` on ``receiver`` and here, if it is this receiver's room here."""
        entry = self.rooms.get(room)
        if entry is not None and entry.peer == receiver.name:
            self.rooms.fail(room, error)
        receiver.rooms.fail(room, error)


class FakeReceiver(PoolReceiver):
    def _start(self) -> None:
        self._senders: dict[str, FakeSender] = {}

    def register(self, address: str, timeout: float = 30.0) -> str:
        with _LOCK:
            sender = _SENDERS.get(address)
            if sender is None or sender.faults.dead:
                raise TransferError(f"no fake KV sender at {address!r}")
            try:
                sender._register(self)
            except LayoutMismatch as e:
                raise RegistrationRefused(f"prefill KV sender at {address} refused us: {e}") from None
            self._senders[address] = sender
            return address

    def expect(self, room: int, peer: str, dst_pages: Sequence[int]) -> None:
        with _LOCK:
            sender = self._senders.get(peer)
            if sender is None:
                raise TransferError(f"{peer} is not a registered prefill peer; call register() first")
            pages = [int(p) for p in dst_pages]
            self.rooms.add(room, TransferState.BOOTSTRAPPING, peer=peer, dst_pages=pages)
            refused = sender._announce(self, room, pages)
            if refused:
                self.rooms.fail(room, f"prefill side refused the room: {refused}")
            else:
                self.rooms.advance(room, TransferState.WAITING_FOR_INPUT)
            sender._pump()

    def abort(self, room: int, reason: str = "aborted") -> None:
        with _LOCK:
            entry = self.rooms.live(room)
            if entry is None:
                return
            sender = self._senders.get(entry.peer or "")
            if sender is not None:
                sender._fail_room_of(self, room, f"decode side: {reason}")
            self.rooms.fail(room, f"decode side: {reason}")

    def poll(self, timeout: float = 0.0) -> list[RoomResult]:
        senders = list(self._senders.values())

        def pump() -> None:
            for s in senders:
                s._pump()

        def next_due() -> float | None:
            return min((t for s in senders if (t := s._next_due()) is not None), default=None)

        return _poll(self.rooms, pump, next_due, timeout)

    def close(self) -> None:
        self._senders.clear()


def _poll(
    rooms: RoomTable, pump: Callable[[], None], next_due: Callable[[], float | None], timeout: float
) -> list[RoomResult]:
    """Results of ``rooms``, landing due deliveries while waiting up to ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        pump()
        now = time.monotonic()
        due = next_due()
        wait = min(end, due if due is not None else end, _next_deadline(rooms, end)) - now
        results = rooms.poll(max(wait, 0.0))
        if results or time.monotonic() >= end:
            return results


def _next_deadline(rooms: RoomTable, default: float) -> float:
    deadline = rooms.next_deadline()
    return default if deadline is None else deadline


def _prefixed(side: str, problem: str | None) -> str | None:
    return None if problem is None else f"{side}: {problem}"
