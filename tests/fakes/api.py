"""A stand-in for the pdserve front end's client socket, for the HTTP server's tests.

A thread with a ROUTER answers ``generate`` by the prompt text: ``error:<code>`` with that
error; ``silent`` never; ``fail-mid:<code>`` one output, then that error; anything else with
``tokens`` outputs of one token each (text "a"), streamed or joined. ``status`` answers with
``ready``. Every message received is kept, so tests can see the aborts.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq

from tests.ports import free_tcp_port

USAGE = {"prompt_tokens": 3, "completion_tokens": 0, "cached_tokens": 0}


@dataclass
class FakeFrontend:
    ready: bool = True
    tokens: int = 3
    addr: str = ""
    received: list[dict[str, Any]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> FakeFrontend:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        port = free_tcp_port(count=1)
        sock.bind(f"tcp://127.0.0.1:{port}")
        self.addr = f"tcp://127.0.0.1:{port}"
        self._thread = threading.Thread(target=self._run, args=(sock,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> FakeFrontend:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in list(self.received) if m.get("type") == kind]

    def _run(self, sock: zmq.Socket) -> None:
        try:
            while not self._stop.is_set():
                if not sock.poll(20):
                    continue
                identity, frame = sock.recv_multipart()
                msg = msgpack.unpackb(frame, raw=False)
                self.received.append(msg)
                for reply in self._answer(msg):
                    sock.send_multipart([identity, msgpack.packb(reply, use_bin_type=True)])
        finally:
            sock.close(linger=0)

    def _answer(self, msg: dict[str, Any]) -> list[dict[str, Any]]:
        rid = msg.get("rid")
        if msg["type"] == "status":
            return [{"type": "status", "rid": rid, "ready": self.ready, "instances": []}]
        if msg["type"] == "abort":
            return [_output(rid, "", [], True, "abort")]
        text = msg.get("text") or ""
        if text.startswith("error:"):
            return [_error(rid, text.removeprefix("error:"))]
        if text == "silent":
            return []
        if text.startswith("fail-mid:"):
            return [_output(rid, "a", [97], False, None), _error(rid, text.removeprefix("fail-mid:"))]
        n = self.tokens
        if msg.get("stream"):
            return [_output(rid, "a", [97], i == n - 1, "length", n) for i in range(n)]
        return [_output(rid, "a" * n, [97] * n, True, "length", n)]


def _output(
    rid: str, text: str, ids: list[int], finished: bool, reason: str | None, generated: int = 0
) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": "output", "rid": rid, "text": text, "token_ids": ids, "finished": finished,
                           "finish_reason": reason if finished else None}
    if finished:
        msg["usage"] = {**USAGE, "completion_tokens": generated}
        msg["metrics"] = {"queue_ms": 0.0, "ttft_ms": 0.0, "latency_ms": 0.0}
    return msg


def _error(rid: str, code: str) -> dict[str, Any]:
    return {"type": "error", "rid": rid, "code": code, "message": f"fake {code}"}
