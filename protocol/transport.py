"""ZeroMQ socket helpers: every process uses these, so socket options live in one place."""

from __future__ import annotations

import os
import tempfile

import zmq

from protocol.messages import Message, decode, encode


def bind(ctx: zmq.Context, kind: int, addr: str, max_message_bytes: int | None = None) -> zmq.Socket:
    """Bind a socket of ``kind`` to an explicit address (never all interfaces by default)."""
    sock = _socket(ctx, kind, max_message_bytes)
    sock.bind(addr)
    return sock


def connect(ctx: zmq.Context, kind: int, addr: str, max_message_bytes: int | None = None) -> zmq.Socket:
    sock = _socket(ctx, kind, max_message_bytes)
    sock.connect(addr)
    return sock


def _socket(ctx: zmq.Context, kind: int, max_message_bytes: int | None) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if kind in (zmq.PUSH, zmq.DEALER, zmq.ROUTER):
        sock.setsockopt(zmq.SNDHWM, 0)
    if kind in (zmq.PULL, zmq.DEALER, zmq.ROUTER):
        sock.setsockopt(zmq.RCVHWM, 0)
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
    """A private directory for this deployment's ipc:// endpoints."""
    return tempfile.mkdtemp(prefix="pdserve-")


def ipc_addr(directory: str, name: str) -> str:
    return f"ipc://{os.path.join(directory, name)}"

