"""How ``bench.serving`` sends its requests: over pdserve's ZMQ wire protocol (``ZmqBackend``) or
to any OpenAI-compatible HTTP server, streaming (``OpenAIBackend``; pdserve's ``api_server``, vLLM,
SGLang). Each sends every request at its offset and records on it when its content chunks arrived,
when it ended and its token counts; the metrics are computed from those alike (``bench.serving``).
The protocols are in docs/design.md ("Wire protocol", "HTTP API")."""

from __future__ import annotations

import asyncio
import enum
import json
import time
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
from tqdm import tqdm

from bench.serving_workload import BenchRequest
from tokenizer_proc.client import Client


class Endpoint(enum.StrEnum):
    COMPLETIONS = "completions"
    CHAT = "chat"


@dataclass(frozen=True)
class DriveSettings:
    temperature: float
    timeout: float  # seconds without any reply before giving up
    progress: bool


class Backend(Protocol):
    def drive(self, requests: list[BenchRequest], offsets: list[float], settings: DriveSettings) -> float:
        """Send each request at its offset, record every reply; return the wall time taken."""
        ...


# ------------------------------------------------------------------------------------------ ZMQ


@dataclass(frozen=True)
class ZmqBackend:
    addr: str

    def client(self, timeout: float) -> Client:
        return Client(self.addr, timeout=timeout)

    def vocab_size(self, timeout: float) -> int:
        """The served model's vocabulary size, from the front end's ``status`` reply."""
        with self.client(timeout) as client:
            model = client.wait_ready(timeout=timeout).get("model")
        if not model or not model.get("vocab_size"):
            raise RuntimeError(f"the server at {self.addr} did not report its model; pass --vocab-size")
        return int(model["vocab_size"])

    def drive(self, requests: list[BenchRequest], offsets: list[float], settings: DriveSettings) -> float:
        with self.client(settings.timeout) as client:
            client.wait_ready(timeout=settings.timeout)
            return _drive_zmq(client, requests, offsets, settings)


def _drive_zmq(
    client: Client, requests: list[BenchRequest], offsets: list[float], settings: DriveSettings
) -> float:
    by_rid: dict[str, BenchRequest] = {}
    bar = tqdm(total=len(requests), disable=not settings.progress, desc="requests", unit="req")
    start = time.perf_counter()
    next_up, done, last_reply = 0, 0, start
    while done < len(requests):
        while next_up < len(requests) and offsets[next_up] <= time.perf_counter() - start:
            req = requests[next_up]
            req.rid = _submit(client, req, settings)
            req.sent_at = time.perf_counter()
            by_rid[req.rid] = req
            next_up += 1
        wait = offsets[next_up] - (time.perf_counter() - start) if next_up < len(requests) else 1.0
        msg = client.next_message(timeout=max(0.0, min(wait, 1.0)))
        now = time.perf_counter()
        if msg is None:
            if now - last_reply > settings.timeout:
                raise TimeoutError(
                    f"no reply for {settings.timeout}s; {len(requests) - done} requests unfinished"
                )
            continue
        last_reply = now
        if _record(by_rid.get(msg.get("rid")), msg, now):
            done += 1
            bar.update(1)
    bar.close()
    return time.perf_counter() - start


def _submit(client: Client, req: BenchRequest, settings: DriveSettings) -> str:
    prompt = {"text": req.prompt} if isinstance(req.prompt, str) else {"input_ids": req.prompt}
    return client.submit(
        **prompt,
        stream=True,
        max_new_tokens=req.output_len,
        temperature=settings.temperature,
        ignore_eos=True,
        seed=req.seed,
    )


def _record(req: BenchRequest | None, msg: dict[str, Any], now: float) -> bool:
    """Note one reply; True when it ended its request."""
    if req is None:
        return False
    if msg["type"] == "error":
        req.error, req.done_at = f"{msg['code']}: {msg['message']}", now
        return True
    if msg["token_ids"]:
        req.chunk_times.append(now)
    if not msg["finished"]:
        return False
    req.done_at = now
    req.prompt_tokens = msg["usage"]["prompt_tokens"]
    req.output_tokens = msg["usage"]["completion_tokens"]
    return True


# ---------------------------------------------------------------------------------------- OpenAI


@dataclass(frozen=True)
class OpenAIBackend:
    base_url: str  # ending in /v1
    endpoint: Endpoint = Endpoint.COMPLETIONS
    model: str | None = None  # None: the first the server lists
    api_key: str | None = None

    def drive(self, requests: list[BenchRequest], offsets: list[float], settings: DriveSettings) -> float:
        return asyncio.run(self._drive(requests, offsets, settings))

    async def _drive(
        self, requests: list[BenchRequest], offsets: list[float], settings: DriveSettings
    ) -> float:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        timeout = httpx.Timeout(settings.timeout, connect=settings.timeout)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(
            base_url=self.base_url.rstrip("/"), headers=headers, timeout=timeout, limits=limits
        ) as http:
            model = self.model or await _first_model(http)
            bar = tqdm(total=len(requests), disable=not settings.progress, desc="requests", unit="req")
            start = time.perf_counter()
            tasks = [
                asyncio.create_task(self._one(http, model, req, start + offset, settings, bar))
                for req, offset in zip(requests, offsets, strict=True)
            ]
            await asyncio.gather(*tasks)
            bar.close()
            return time.perf_counter() - start

    async def _one(
        self,
        http: httpx.AsyncClient,
        model: str,
        req: BenchRequest,
        send_at: float,
        settings: DriveSettings,
        bar: tqdm,
    ) -> None:
        await asyncio.sleep(max(0.0, send_at - time.perf_counter()))
        path, body = self._request(model, req, settings)
        req.sent_at = time.perf_counter()
        try:
            async with http.stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    req.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:300]}"
                else:
                    await self._read_events(response, req)
        except httpx.HTTPError as e:
            req.error = f"{type(e).__name__}: {e}"
        req.done_at = time.perf_counter()
        if req.error is None and req.output_tokens == 0:  # the server did not report usage
            req.output_tokens = len(req.chunk_times)
            req.prompt_tokens = len(req.prompt) if isinstance(req.prompt, list) else 0
        bar.update(1)

    def _request(self, model: str, req: BenchRequest, settings: DriveSettings) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": req.output_len,
            "temperature": settings.temperature,
            "seed": req.seed,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.endpoint is Endpoint.CHAT:
            return "/chat/completions", {**body, "messages": [{"role": "user", "content": req.prompt_text()}]}
        return "/completions", {**body, "prompt": req.prompt}

    async def _read_events(self, response: httpx.Response, req: BenchRequest) -> None:
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                return
            chunk = json.loads(data)
            now = time.perf_counter()
            if "error" in chunk:
                req.error = f"stream error: {chunk['error'].get('message', chunk['error'])}"
                return
            if any(self._content(choice) for choice in chunk.get("choices") or []):
                req.chunk_times.append(now)
            if usage := chunk.get("usage"):
                req.prompt_tokens = usage.get("prompt_tokens", 0)
                req.output_tokens = usage.get("completion_tokens", 0)

    def _content(self, choice: dict[str, Any]) -> str:
        if self.endpoint is Endpoint.CHAT:
            return (choice.get("delta") or {}).get("content") or ""
        return choice.get("text") or ""


async def _first_model(http: httpx.AsyncClient) -> str:
    response = await http.get("/models")
    response.raise_for_status()
    models = response.json().get("data") or []
    if not models:
        raise RuntimeError("the server lists no model (GET /models); pass --model")
    return models[0]["id"]
