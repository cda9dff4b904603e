"""The front ends attached to an instance, and whether each is still there.

A front end attaches by sending ``AttachFrontend`` with its output address, and sends it again
every heartbeat interval for as long as it runs: that is its heartbeat. What the instance sends a
front end waits in a bounded queue (``transport.OUTPUT_QUEUE_FRAMES`` frames, and as many in the
front end's receive queue): a front end that falls behind fills it, the rest waits in ``backlog`` and the
scheduler forms no step until it is sent (back-pressure), so a slow front end slows the
instance down instead of growing its memory. One silent for
``heartbeat_timeout`` is detached: its socket is closed with what was queued for it, so a dead
front end cannot make the instance queue outputs without bound. A front end restarted at the
same address says so with a new request-id prefix. Either way ``_Loop`` aborts the requests
the departed front end owned (by their id prefix), and every request once no front end is left.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import zmq

from protocol import transport
from protocol.security import ClusterKeys

logger = logging.getLogger(__name__)


@dataclass
class AttachedFrontend:
    addr: str
    rid_prefix: str  # its requests' ids are "<rid_prefix>-<n>" ("" when it did not say)
    sock: zmq.Socket  # PUSH to the front end's output address, a bounded queue
    last_seen: float
    backlog: deque[bytes] = field(default_factory=deque)  # what its full queue did not take

    def owns(self, rid: str) -> bool:
        return bool(self.rid_prefix) and rid.startswith(f"{self.rid_prefix}-")

    def send(self, frame: bytes) -> None:
        """Queue ``frame`` without blocking, behind any backlog (the order is kept)."""
        if not self.backlog and _send_now(self.sock, frame):
            return
        self.backlog.append(frame)

    def send_backlog(self) -> bool:
        """Move what the queue takes now from the backlog; True when none is left."""
        if self.backlog:
            self.sock.getsockopt(zmq.EVENTS)  # zmq: take in the room freed since (send may not look)
        while self.backlog:
            if not _send_now(self.sock, self.backlog[0]):
                return False
            self.backlog.popleft()
        return True


def _send_now(sock: zmq.Socket, frame: bytes) -> bool:
    try:
        sock.send(frame, zmq.NOBLOCK, copy=False)
    except zmq.Again:
        return False
    return True


class Frontends:
    def __init__(self, ctx: zmq.Context, instance_name: str, keys: ClusterKeys | None = None) -> None:
        self._ctx = ctx
        self._keys = keys  # an attach's output address is reached only by CURVE, when given
        self._name = instance_name
        self._attached: dict[str, AttachedFrontend] = {}  # in attach order
        self._replaced: list[AttachedFrontend] = []  # earlier lives of restarted front ends

    def __bool__(self) -> bool:
        return bool(self._attached)

    def sockets(self) -> Iterator[zmq.Socket]:
        return (f.sock for f in self._attached.values())

    def send_backlogs(self) -> list[zmq.Socket]:
        """Send what each front end's queue takes of its backlog; the sockets still backlogged
        (the scheduler waits for them to take more before it forms a step)."""
        return [f.sock for f in self._attached.values() if not f.send_backlog()]

    def attach(self, addr: str, rid_prefix: str, now: float) -> zmq.Socket | None:
        """Record a beat from ``addr``; returns the new socket when it was not attached."""
        known = self._attached.get(addr)
        if known is not None:
            if known.rid_prefix != rid_prefix:
                logger.warning("%s: front end at %s restarted", self._name, addr)
                self._replaced.append(replace(known))
                known.rid_prefix = rid_prefix
            known.last_seen = now
            return None
        queue = transport.OUTPUT_QUEUE_FRAMES
        sock = transport.connect(self._ctx, zmq.PUSH, addr, keys=self._keys, hwm=queue)
        self._attached[addr] = AttachedFrontend(addr, rid_prefix, sock, now)
        logger.info("%s: front end attached at %s (%d attached)", self._name, addr, len(self._attached))
        return sock

    def get(self, addr: str) -> AttachedFrontend | None:
        return self._attached.get(addr)

    def take_departed(self, now: float, timeout: float) -> list[AttachedFrontend]:
        """Detach the front ends not heard from for ``timeout`` seconds; return them and the
        earlier lives of those restarted since the last call."""
        gone = [f for f in self._attached.values() if now - f.last_seen > timeout]
        for f in gone:
            logger.warning(
                "%s: front end at %s silent for %.1f s; detached (its queued replies dropped)",
                self._name,
                f.addr,
                now - f.last_seen,
            )
            f.sock.close(linger=0)
            del self._attached[f.addr]
        replaced, self._replaced = self._replaced, []
        return gone + replaced

    def send_all(self, frame: bytes) -> None:
        for f in self._attached.values():
            f.send(frame)
