"""ZeroMQ socket helpers: every process uses these, so socket options live in one place.

``keys`` (``protocol.security.ClusterKeys``) makes a socket between pdserve processes a CURVE
server (``bind``) or client (``connect``); docs/design.md, "Security".
"""

from __future__ import annotations

import os
import tempfile

import zmq

from protocol.messages import Message, decode, encode
from protocol.security import ClusterKeys, make_client, make_server

# Frames queued from an instance towards a front end, and in the front end's receive queue,
# before the instance holds back its next step (scheduler_proc/frontends.py: back-pressure).
OUTPUT_QUEUE_FRAMES = 1024


def bind(
    ctx: zmq.Context,
    kind: int,
    addr: str,
    max_message_bytes: int | None = None,
    keys: ClusterKeys | None = None,
    hwm: int = 0,
) -> zmq.Socket:
    """Bind a socket of ``kind`` to an explicit address (never all interfaces by default).
    ``hwm``: how many messages it queues each way before sends block (0: no limit)."""
    sock = _socket(ctx, kind, max_message_bytes, hwm)
    if keys is not None:
        make_server(sock, keys)
    sock.bind(addr)
    return sock


def connect(
    ctx: zmq.Context,
    kind: int,
    addr: str,
    max_message_bytes: int | None = None,
    keys: ClusterKeys | None = None,
    hwm: int = 0,
) -> zmq.Socket:
    sock = _socket(ctx, kind, max_message_bytes, hwm)
    if keys is not None:
        make_client(sock, keys)
    sock.connect(addr)
    return sock


def _socket(ctx: zmq.Context, kind: int, max_message_bytes: int | None, hwm: int = 0) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if kind in (zmq.PUSH, zmq.DEALER, zmq.ROUTER):
        sock.setsockopt(zmq.SNDHWM, hwm)
    if kind in (zmq.PULL, zmq.DEALER, zmq.ROUTER):
        sock.setsockopt(zmq.RCVHWM, hwm)
    if max_message_bytes is not None:
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    return sock


def send(sock: zmq.Socket, msg: Message, flags: int = 0) -> None:
    sock.send(encode(msg), flags=flags, copy=False)


def recv(sock: zmq.Socket, flags: int = 0) -> Message:
    return decode(sock.recv(flags=flags, copy=True))


def recv_all(sock: zmq.Socket) -> list[Message]:
    """Every message already queued on ``sock``, without blocking."""
    out = []
    while True:
        try:
            out.append(recv(sock, zmq.NOBLOCK))
        except zmq.Again:
            return out


def ipc_dir() -> str:
    """A private directory (0700: only this user may connect) for this deployment's ipc:// endpoints."""
    return tempfile.mkdtemp(prefix="pdserve-")  # mkdtemp makes it 0700


def is_private(addr: str) -> bool:
    """Whether only this host's processes of this user can reach ``addr`` (ipc in an ``ipc_dir``,
    or inproc): where an instance's launcher, and no network peer, may talk to it."""
    return addr.startswith(("ipc://", "inproc://"))


def ipc_addr(directory: str, name: str) -> str:
    return f"ipc://{os.path.join(directory, name)}"

