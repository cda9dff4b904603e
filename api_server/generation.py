"""The front-end requests of one HTTP request, run as a group.

An OpenAI request becomes ``len(prompts) * n`` generate requests to the front end; they start
together, their replies arrive on one queue, and they all end together: when the HTTP request
ends, however it ends (answered, failed, or its client gone), the ones still live are aborted.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from api_server.backend import FrontendBridge, Message, next_reply, raise_if_error

Receive = Callable[[], Awaitable[dict[str, Any]]]
_CLIENT_GONE: Message = {"type": "client_gone"}  # put on the queue by the disconnect watch


class ClientGone(Exception):
    """The HTTP client disconnected; its requests were aborted."""


@dataclass
class GenerateSpec:
    """One generate request to the front end (docs/design.md, "Wire protocol")."""

    text: str | None
    input_ids: list[int] | None
    sampling_params: dict[str, Any]
    return_logprob: bool = False

    def message(self, rid: str, stream: bool) -> Message:
        msg: Message = {
            "type": "generate",
            "rid": rid,
            "stream": stream,
            "sampling_params": self.sampling_params,
            "return_logprob": self.return_logprob,
        }
        if self.text is not None:
            msg["text"] = self.text
        else:
            msg["input_ids"] = self.input_ids
        return msg


@dataclass
class Output:
    """One request's answer so far: its ``output`` messages joined."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[list[float]]] = field(default_factory=list)  # per token: [id, logprob] pairs
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def add(self, msg: Message) -> None:
        self.text += msg.get("text") or ""
        self.token_ids += msg.get("token_ids") or []
        self.logprobs += msg.get("logprobs") or []
        self.top_logprobs += msg.get("top_logprobs") or []
        if msg.get("finished"):
            self.finish_reason = msg.get("finish_reason")
            self.usage = msg.get("usage") or {}
            self.metrics = msg.get("metrics") or {}


class RequestGroup:
    """Owns the rids of one HTTP request's front-end requests, their reply queue and the task
    that watches for the client's disconnect. Use as ``async with``, or call ``close``."""

    def __init__(self, bridge: FrontendBridge, receive: Receive, kind: str) -> None:
        self._bridge = bridge
        self._receive = receive
        self._kind = kind
        self._queue: asyncio.Queue[Message] = asyncio.Queue()
        self._index: dict[str, int] = {}  # rid -> request index
        self._live: set[str] = set()
        self._primed: list[tuple[int, Message]] = []
        self._watch: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RequestGroup:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def start(self, specs: list[GenerateSpec], stream: bool) -> None:
        for i, spec in enumerate(specs):
            rid = self._bridge.new_rid(self._kind)
            self._index[rid] = i
            self._live.add(rid)
            self._bridge.submit(spec.message(rid, stream), self._queue)
        self._watch = asyncio.create_task(self._watch_disconnect(), name=f"{self._kind}-disconnect")

    def close(self) -> None:
        """Abort the requests still live and stop watching (idempotent)."""
        self._abort_live()
        if self._watch is not None and self._watch is not asyncio.current_task():
            self._watch.cancel()

    async def next_event(self) -> tuple[int, Message]:
        """The next ``output`` of any request of the group, with its index. A front end error
        ends the whole group (``FrontendError``), and so does the client leaving (``ClientGone``)."""
        msg = await next_reply(self._queue, self._bridge.response_timeout_s)
        if msg is _CLIENT_GONE:
            raise ClientGone()
        rid = msg["rid"]
        if msg.get("finished") or msg.get("type") == "error":  # the request's last message
            self._live.discard(rid)
            self._bridge.release(rid, abort=False)
        return self._index[rid], raise_if_error(msg)

    async def prime(self) -> None:
        """Wait for every request's first message, so that an early error (a prompt too long,
        a full queue) becomes an HTTP error status rather than an error inside a stream."""
        seen: set[int] = set()
        while len(seen) < len(self._index):
            index, msg = await self.next_event()
            seen.add(index)
            self._primed.append((index, msg))

    async def events(self) -> AsyncIterator[tuple[int, Message]]:
        """Every ``output`` message (primed ones first) until all requests have finished."""
        while self._primed:
            yield self._primed.pop(0)
        while self._live:
            yield await self.next_event()

    async def results(self) -> list[Output]:
        """Each request's whole answer, in request order."""
        outputs = [Output() for _ in self._index]
        async for index, msg in self.events():
            outputs[index].add(msg)
        return outputs

    def _abort_live(self) -> None:
        for rid in self._live:
            self._bridge.release(rid, abort=True)
        self._live.clear()

    async def _watch_disconnect(self) -> None:
        """After the body was read, the ASGI ``receive`` returns only when the client is gone
        (or the response is complete, by then the group is closed)."""
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self._abort_live()
        self._queue.put_nowait(_CLIENT_GONE)

