"""The client socket's connections: who a frame comes from, and who has left.

The front end keys requests by the routing identity the ROUTER gives a connection (libzmq's
own: a zero byte, then a 4-byte counter). Clients must not choose theirs (``ZMQ_ROUTING_ID``):
the front end refuses their frames (``assigned_by_router``), and with ``ROUTER_HANDOVER`` off
(the default) libzmq ignores a connection claiming an identity in use, so no connection can
receive another's replies or abort its requests. libzmq starts the counter at libc's
``rand()``, which nothing seeds: a client that claims the identity the next connection will
get makes libzmq abort the process when that connection arrives (an assertion), so
``bind_client_socket`` seeds ``rand`` first.

A departure is seen without sending anything (``ClientConnections``): the socket monitor
reports each accepted and each closed TCP connection by file descriptor, and each frame names
the descriptor it came in on (``zmq.SRCFD``), which maps a descriptor to its identity. A
descriptor is reused after a close, so each one counts its connections: an identity is gone
when the descriptor has closed as many connections as it had accepted when the identity first
spoke (the monitor is read before each frame, so that count is current).
"""

from __future__ import annotations

import ctypes
import secrets
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import recv_monitor_message

CLIENT_QUEUE_MESSAGES = 1000  # replies queued for one client before it counts as gone
_ROUTER_ID_LEN = 5  # b"\0" + a 4-byte counter


def bind_client_socket(ctx: zmq.Context, addr: str, max_message_bytes: int) -> zmq.Socket:
    """The client ROUTER: a bounded reply queue per client (options apply to connections
    accepted after ``bind``, so they are set before it), unroutable sends raise."""
    _seed_routing_ids()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, CLIENT_QUEUE_MESSAGES)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.bind(addr)
    return sock


def _seed_routing_ids() -> None:
    ctypes.CDLL(None).srand(secrets.randbits(32))


def assigned_by_router(identity: bytes) -> bool:
    """True for an identity the ROUTER made up; False for one a client claimed (most)."""
    return len(identity) == _ROUTER_ID_LEN and identity[0] == 0


@dataclass
class _Descriptor:
    accepted: int = 0  # connections accepted on it so far
    closed: int = 0
    identity: bytes | None = None  # of the latest connection that spoke on it
    connection: int = 0  # that connection's number (1 = the first accepted)


class ClientConnections:
    """Maps the client socket's descriptors to identities; reports the identities that left."""

    def __init__(self, router: zmq.Socket) -> None:
        self._monitor = router.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self._router = router
        self._fds: dict[int, _Descriptor] = {}

    def close(self) -> None:
        self._router.disable_monitor()
        self._monitor.close(linger=0)

    def spoke(self, identity: bytes, fd: int) -> bytes | None:
        """Record a frame of ``identity`` on ``fd``; return the identity it replaces there, whose
        connection must have closed (its close may not be reported yet)."""
        desc = self._fds.setdefault(fd, _Descriptor())
        if desc.identity == identity:
            return None
        replaced = desc.identity
        desc.identity, desc.connection = identity, max(desc.accepted, desc.connection + 1)
        return replaced

    def departed(self) -> list[bytes]:
        """The identities whose connection closed since the last call (reads the monitor)."""
        gone: list[bytes] = []
        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return gone
            desc = self._fds.setdefault(event["value"], _Descriptor())
            if event["event"] == zmq.EVENT_ACCEPTED:
                desc.accepted += 1
                continue
            desc.closed += 1
            if desc.identity is not None and desc.connection <= desc.closed:
                gone.append(desc.identity)
                desc.identity = None
