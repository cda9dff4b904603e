"""Python client of the pdserve wire protocol (docs/design.md, "Wire protocol").

    with Client("tcp://127.0.0.1:30001") as client:
        client.wait_ready()
        out = client.generate("Hello", max_new_tokens=16, temperature=0)
        for chunk in client.stream("Hello", max_new_tokens=16):
            print(chunk["text"], end="", flush=True)

One DEALER socket; messages for requests nobody is waiting on yet are buffered by rid, so
``submit`` + ``result`` can run many requests at once. Server errors raise ``ServerError``.
A ``Client`` is not thread-safe: use one per thread. An error with ``duplicate`` set refuses a
second request with a live request's rid and does not end the live one (``ServerError.duplicate``).

Requests are sent with ``batch_outputs`` (unless ``submit(..., batch_outputs=False)``): the
server may then put several of this connection's ``output`` messages into one ``outputs``
frame; they are unpacked here, so callers see ``output`` messages only.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict, deque
from collections.abc import Iterator
from typing import Any

import msgpack
import zmq

DEFAULT_ADDR = "tcp://127.0.0.1:30001"  # launch.py --port 30000 (HTTP) serves ZMQ on 30001


class ServerError(Exception):
    """An ``error`` reply of the server."""

    def __init__(self, code: str, message: str, rid: str | None = None, duplicate: bool = False) -> None:
        super().__init__(f"{code}: {message}" + (f" (rid {rid})" if rid is not None else ""))
        self.code = code
        self.message = message
        self.rid = rid
        self.duplicate = duplicate  # refuses a second request with ``rid``; the live one goes on


class Client:
    def __init__(self, addr: str = DEFAULT_ADDR, timeout: float | None = 300.0) -> None:
        """``timeout``: the longest wait in seconds for the next message of a request."""
        self.addr = addr
        self.timeout = timeout
        self._sock = zmq.Context.instance().socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(addr)
        self._inbox: defaultdict[str | None, deque[dict[str, Any]]] = defaultdict(deque)
        self._abandoned: set[str] = set()  # rids whose remaining messages are dropped
        self._unpacked: deque[dict[str, Any]] = deque()  # the rest of an ``outputs`` frame

    # ----------------------------------------------------------------------------- requests

    def generate(
        self, text: str | None = None, input_ids: list[int] | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """The whole answer as one final ``output`` message (blocking)."""
        return self.result(self.submit(text, input_ids, stream=False, **kwargs))

    def stream(
        self, text: str | None = None, input_ids: list[int] | None = None, **kwargs: Any
    ) -> Iterator[dict[str, Any]]:
        """Each ``output`` message as it arrives; the last has ``finished``. Leaving the loop
        early aborts the request."""
        rid = self.submit(text, input_ids, stream=True, **kwargs)
        finished = False
        try:
            while not finished:
                try:
                    msg = self._next_for(rid, self.timeout)
                except ServerError as e:
                    finished = not e.duplicate  # an error is the request's last message
                    raise
                finished = msg["finished"]
                yield msg
        finally:
            if not finished:
                self.abort(rid)
                self._abandoned.add(rid)

    def submit(
        self,
        text: str | None = None,
        input_ids: list[int] | None = None,
        *,
        rid: str | None = None,
        stream: bool = False,
        return_logprob: bool = False,
        priority: int = 0,
        batch_outputs: bool = True,
        **sampling_params: Any,
    ) -> str:
        """Send a generate request and return its rid at once; collect it with ``result``
        (or ``next_message``). ``sampling_params``: max_new_tokens, temperature, top_p,
        top_k, seed, stop, stop_token_ids, ignore_eos."""
        rid = rid or uuid.uuid4().hex
        msg: dict[str, Any] = {
            "type": "generate",
            "rid": rid,
            "stream": stream,
            "sampling_params": {k: v for k, v in sampling_params.items() if v is not None},
            "return_logprob": return_logprob,
            "priority": priority,
        }
        if batch_outputs:
            msg["batch_outputs"] = True
        if text is not None:
            msg["text"] = text
        if input_ids is not None:
            msg["input_ids"] = list(input_ids)
        self._send(msg)
        return rid

    def result(self, rid: str, timeout: float | None = None) -> dict[str, Any]:
        """The final answer of ``rid``, its streamed pieces joined if it was streamed."""
        timeout = self.timeout if timeout is None else timeout
        merged: dict[str, Any] | None = None
        while True:
            msg = self._next_for(rid, timeout)
            merged = dict(msg) if merged is None else _merge(merged, msg)
            if msg["finished"]:
                return merged

    def abort(self, rid: str) -> None:
        """Ask the server to stop ``rid``; its final message has ``finish_reason: "abort"``."""
        self._send({"type": "abort", "rid": rid})

    def status(self, timeout: float | None = None) -> dict[str, Any]:
        rid = uuid.uuid4().hex
        self._send({"type": "status", "rid": rid})
        try:
            return self._next_for(rid, self.timeout if timeout is None else timeout)
        except TimeoutError:
            self._abandoned.add(rid)
            raise

    def metrics(self, timeout: float | None = None) -> str:
        """The deployment's Prometheus metrics, as text (the exposition format ``/metrics`` serves)."""
        rid = uuid.uuid4().hex
        self._send({"type": "metrics", "rid": rid})
        try:
            return self._next_for(rid, self.timeout if timeout is None else timeout)["text"]
        except TimeoutError:
            self._abandoned.add(rid)
            raise

    def wait_ready(self, timeout: float = 60.0, interval: float = 0.05) -> dict[str, Any]:
        """Poll ``status`` until the server is ready; return that status."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            status = self.status(timeout=max(remaining, 0.001))
            if status["ready"]:
                return status
            if remaining <= interval:
                raise TimeoutError(f"server at {self.addr} not ready after {timeout}s: {status}")
            time.sleep(interval)

    def next_message(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next message for any request, errors included (not raised); None on timeout."""
        for rid, box in self._inbox.items():
            if box:
                msg = box.popleft()
                if not box:
                    del self._inbox[rid]
                return msg
        try:
            return self._recv(_deadline(timeout))
        except TimeoutError:
            return None

    # ------------------------------------------------------------------------------- plumbing

    def close(self) -> None:
        self._sock.close(linger=0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, msg: dict[str, Any]) -> None:
        self._sock.send(msgpack.packb(msg, use_bin_type=True))

    def _recv(self, deadline: float | None) -> dict[str, Any]:
        """One message from the socket (by ``deadline``, a monotonic time); drops those of
        abandoned requests."""
        while True:
            if self._unpacked:
                msg = self._unpacked.popleft()
            else:
                wait_ms = None if deadline is None else max(0, int((deadline - time.monotonic()) * 1e3))
                if not self._sock.poll(wait_ms):
                    raise TimeoutError(f"no reply from {self.addr} in time")
                msg = msgpack.unpackb(self._sock.recv(), raw=False)
                if msg.get("type") == "outputs":  # several ``output`` messages in one frame
                    self._unpacked.extend(msg["outputs"])
                    continue
            rid = msg.get("rid")
            if rid not in self._abandoned:
                return msg
            if _ends_request(msg):
                self._abandoned.discard(rid)

    def _next_for(self, rid: str, timeout: float | None) -> dict[str, Any]:
        """The next message of ``rid``, buffering those of other requests."""
        box = self._inbox.get(rid)
        if box:
            msg = box.popleft()
            return _raise_if_error(msg)
        deadline = _deadline(timeout)
        while True:
            msg = self._recv(deadline)
            if msg.get("rid") == rid or (msg.get("type") == "error" and msg.get("rid") is None):
                return _raise_if_error(msg)
            self._inbox[msg.get("rid")].append(msg)


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _ends_request(msg: dict[str, Any]) -> bool:
    """Whether ``msg`` is the last message of the request its rid names."""
    if msg.get("type") == "output":
        return bool(msg.get("finished"))
    return not (msg.get("type") == "error" and msg.get("duplicate"))


def _raise_if_error(msg: dict[str, Any]) -> dict[str, Any]:
    if msg.get("type") == "error":
        code, message = msg.get("code", "internal"), msg.get("message", "")
        raise ServerError(code, message, msg.get("rid"), bool(msg.get("duplicate")))
    return msg


def _merge(merged: dict[str, Any], msg: dict[str, Any]) -> dict[str, Any]:
    merged["text"] += msg["text"]
    merged["token_ids"] += msg["token_ids"]
    if "logprobs" in msg:
        merged["logprobs"] = merged.get("logprobs", []) + msg["logprobs"]
    if "top_logprobs" in msg:
        merged["top_logprobs"] = merged.get("top_logprobs", []) + msg["top_logprobs"]
    for key in ("finished", "finish_reason", "usage", "metrics"):
        if key in msg:
            merged[key] = msg[key]
    return merged
