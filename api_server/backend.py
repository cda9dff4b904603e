"""The asyncio bridge from the HTTP server to the pdserve front end.

One ``zmq.asyncio`` DEALER, shared by every HTTP request, speaks the front end's client protocol
(docs/design.md, "Wire protocol"). A reader task hands each reply to the queue registered for
its rid; rids are minted here, unique on this connection. Generate requests ask for
``batch_outputs``: the outputs of many requests arrive in one ``outputs`` frame per front-end
step, unpacked here. Nothing here blocks the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import uuid
from typing import Any

import msgpack
import zmq
import zmq.asyncio

log = logging.getLogger("pdserve.api")

Message = dict[str, Any]
FRONTEND_TIMEOUT = "frontend_timeout"
CLOSE_LINGER_MS = 1000


class FrontendError(Exception):
    """An ``error`` reply of the front end, or no reply in time (code ``frontend_timeout``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class FrontendBridge:
    """Owns the DEALER socket and the rid -> queue routes of the replies."""

    def __init__(self, addr: str, response_timeout_s: float) -> None:
        self.addr = addr
        self.response_timeout_s = response_timeout_s
        self._ctx: zmq.asyncio.Context | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._reader: asyncio.Task[None] | None = None
        self._routes: dict[str, asyncio.Queue[Message]] = {}
        self._rid_prefix = uuid.uuid4().hex[:12]
        self._rid_counter = itertools.count()

    async def start(self) -> None:
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, CLOSE_LINGER_MS)  # the last aborts still go out on close
        self._sock.connect(self.addr)
        self._reader = asyncio.create_task(self._read_replies(), name="frontend-reader")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._sock is not None:
            self._sock.close()
        if self._ctx is not None:
            self._ctx.term()

    def new_rid(self, kind: str) -> str:
        return f"{kind}-{self._rid_prefix}-{next(self._rid_counter)}"

    @property
    def live_rids(self) -> int:
        return len(self._routes)

    def submit(self, message: Message, replies: asyncio.Queue[Message]) -> None:
        """Send ``message`` (a generate or status request); its replies go to ``replies``."""
        self._routes[message["rid"]] = replies
        if message.get("type") == "generate":
            message = {**message, "batch_outputs": True}
        self._send(message)

    def release(self, rid: str, abort: bool) -> None:
        """Stop routing ``rid``'s replies (idempotent); ``abort`` also ends it on the front end."""
        if self._routes.pop(rid, None) is not None and abort:
            self._send({"type": "abort", "rid": rid})

    async def status(self, timeout_s: float) -> Message:
        """The front end's ``status`` reply; ``FrontendError`` when it does not answer in time."""
        rid = self.new_rid("status")
        replies: asyncio.Queue[Message] = asyncio.Queue()
        self.submit({"type": "status", "rid": rid}, replies)
        try:
            return raise_if_error(await next_reply(replies, timeout_s))
        finally:
            self.release(rid, abort=False)

    def _send(self, message: Message) -> None:
        assert self._sock is not None, "bridge not started"
        # DEALER sends do not block below the high-water mark; the returned future is done
        self._sock.send(msgpack.packb(message, use_bin_type=True))

    async def _read_replies(self) -> None:
        assert self._sock is not None
        while True:
            frame = await self._sock.recv()
            try:
                msg = msgpack.unpackb(frame, raw=False)
                msgs = msg["outputs"] if msg.get("type") == "outputs" else [msg]
            except Exception:  # msgpack raises several unrelated types
                log.exception("unreadable frame from the front end")
                continue
            for one in msgs:
                self._route(one)

    def _route(self, msg: Message) -> None:
        rid = msg.get("rid") if isinstance(msg, dict) else None
        replies = self._routes.get(rid) if isinstance(rid, str) else None
        if replies is not None:
            replies.put_nowait(msg)
        elif isinstance(msg, dict) and msg.get("type") == "error":
            log.warning("front end error for no live request (rid %s): %s", rid, msg.get("message"))


async def next_reply(replies: asyncio.Queue[Message], timeout_s: float) -> Message:
    """The next reply in ``replies``; none in time raises ``FrontendError``."""
    try:
        return await asyncio.wait_for(replies.get(), timeout_s)
    except TimeoutError:
        message = f"the front end did not answer within {timeout_s:g} s"
        raise FrontendError(FRONTEND_TIMEOUT, message) from None


def raise_if_error(msg: Message) -> Message:
    """``msg``, unless it is an ``error`` reply: that raises ``FrontendError``."""
    if msg.get("type") == "error":
        raise FrontendError(str(msg.get("code", "internal")), str(msg.get("message", "")))
    return msg
