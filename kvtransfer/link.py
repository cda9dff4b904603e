"""The worker-to-worker link both socket backends share: frames on the wire and the background
I/O thread that owns the sockets.

Topology: the prefill worker's sender binds one ROUTER at an explicit address; every decode
worker's receiver connects one DEALER to it (identity = the receiver's name). All frames of a
(decode, prefill) pair travel on that connection, in order, both ways. Each frame is a typed
message of ``protocol.dataplane`` (``KVRegister``, ``KVChunk``, ...; see ``docs/design.md``
for who sends what), followed by raw payload frames for ``KVChunk`` on the zmq backend. The
link's own lifecycle (registered, lost, registering again) is in ``kvtransfer.links``.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import zmq

from kvtransfer.base import log
from protocol.codec import Message, decode, encode
from protocol.security import ClusterKeys, make_client, make_server

if TYPE_CHECKING:
    from kvtransfer.rooms import Room, RoomTable

_instances = itertools.count()


def header(msg: Message) -> bytes:
    """The first frame of a data-plane message."""
    return encode(msg)


def read(frame: zmq.Frame | bytes) -> Message:
    """The typed message of a first frame; raises ``protocol.codec.ProtocolError``."""
    return decode(frame.bytes if isinstance(frame, zmq.Frame) else frame)


def dispatch(handlers: Mapping[type[Message], Callable[..., None]], msg: Message, *args: Any) -> None:
    """Run the handler of ``msg``'s type with ``(*args, msg)``; other messages are logged, dropped."""
    handle = handlers.get(type(msg))
    if handle is None:
        log.warning("kvtransfer: ignoring an unexpected %s frame", msg.TYPE)
        return
    handle(*args, msg)


def socket(
    ctx: zmq.Context,
    kind: int,
    identity: bytes | None = None,
    keys: ClusterKeys | None = None,
    serve: bool = False,
) -> zmq.Socket:
    """A data-plane socket: no linger, no high-water mark (chunks are bounded by the pool). With
    ``keys``, a CURVE server (``serve``: it will bind) or client (docs/design.md, "Security")."""
    sock = ctx.socket(kind)
    if keys is not None:
        (make_server if serve else make_client)(sock, keys)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    return sock


class IoLoop:
    """One background thread that owns a backend's sockets and runs every state change.

    API calls from the worker thread never touch a socket: they queue a command (a callable)
    and wake the thread through an inproc pipe. The thread sleeps in ``zmq.Poller.poll`` until a
    frame, a command, the next heartbeat, the next deadline of a room in ``rooms`` or the time
    ``on_turn`` last asked for; a room that overstays its state is handed to ``on_expired``.
    ``on_turn(now)`` runs at the end of every turn (a backend polling transfers it posted) and
    returns when it next needs a turn, or None.
    """

    def __init__(
        self,
        name: str,
        rooms: RoomTable,
        on_frames: Callable[[zmq.Socket, list[zmq.Frame]], None],
        on_expired: Callable[[Room], None],
        on_heartbeat: Callable[[float], None],
        on_turn: Callable[[float], float | None] | None = None,
    ) -> None:
        self.ctx = zmq.Context()
        self._rooms = rooms
        self._on_frames, self._on_expired, self._on_heartbeat = on_frames, on_expired, on_heartbeat
        self._on_turn = on_turn
        self._interval = rooms.config.heartbeat_interval
        wake_addr = f"inproc://kvtransfer-wake-{next(_instances)}"
        self._wake_rx = socket(self.ctx, zmq.PULL)
        self._wake_rx.bind(wake_addr)
        self._wake_tx = socket(self.ctx, zmq.PUSH)
        self._wake_tx.connect(wake_addr)
        self._wake_lock = threading.Lock()
        self._commands: collections.deque[tuple[Callable[..., None], tuple[Any, ...]]] = collections.deque()
        self._poller = zmq.Poller()
        self._poller.register(self._wake_rx, zmq.POLLIN)
        self._sockets: list[zmq.Socket] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add_socket(self, sock: zmq.Socket) -> None:
        """Register a socket for reading (from the I/O thread, or before ``start``)."""
        self._sockets.append(sock)
        self._poller.register(sock, zmq.POLLIN)

    def remove_socket(self, sock: zmq.Socket) -> None:
        self._poller.unregister(sock)
        self._sockets.remove(sock)
        sock.close(linger=0)

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the I/O thread, after every command submitted before it."""
        self._commands.append((fn, args))
        with self._wake_lock:
            if not self._stopping:
                self._wake_tx.send(b"", zmq.NOBLOCK)

    def close(self) -> None:
        with self._wake_lock:
            if self._stopping:
                return
            self._stopping = True
            self._wake_tx.send(b"", zmq.NOBLOCK)
        if self._thread.is_alive():
            self._thread.join(timeout=10.0)
        for sock in [*self._sockets, self._wake_rx, self._wake_tx]:
            sock.close(linger=0)
        self.ctx.term()

    def _run(self) -> None:
        next_tick, wanted = 0.0, None
        while not self._stopping:
            now = time.monotonic()
            if now >= next_tick:
                self._expire(now)
                self._guard(self._on_heartbeat, now)
                next_tick = now + self._interval
            deadline = self._rooms.next_deadline()
            wake_at = min(t for t in (next_tick, deadline, wanted) if t is not None)
            ready = dict(self._poller.poll(max(0, int((wake_at - now) * 1000)) + 1))
            if self._wake_rx in ready:
                self._drain_wakeups()
            while self._commands and not self._stopping:
                fn, args = self._commands.popleft()
                self._guard(fn, *args)
            for sock in list(self._sockets):
                if sock in ready:
                    self._guard(self._read, sock)
            if deadline is not None and time.monotonic() >= deadline:
                self._expire(time.monotonic())
            wanted = self._turn()

    def _turn(self) -> float | None:
        """``on_turn``'s next wanted turn; a failing ``on_turn`` is logged and asks for none."""
        if self._on_turn is None:
            return None
        try:
            return self._on_turn(time.monotonic())
        except Exception:
            log.exception("kvtransfer I/O thread: on_turn failed")
            return None

    def _expire(self, now: float) -> None:
        for entry in self._rooms.expired(now):
            self._guard(self._on_expired, entry)

    def _drain_wakeups(self) -> None:
        try:
            while True:
                self._wake_rx.recv(zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _read(self, sock: zmq.Socket) -> None:
        while not self._stopping and not sock.closed:  # a frame's handler may close its socket
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._guard(self._on_frames, sock, frames)

    @staticmethod
    def _guard(fn: Callable[..., None], *args: Any) -> None:
        """A bad frame or a failing command must not kill the link; it is logged."""
        try:
            fn(*args)
        except Exception:
            log.exception("kvtransfer I/O thread: %s failed", getattr(fn, "__name__", fn))
