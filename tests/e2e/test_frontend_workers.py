"""``--tokenizer-worker-num 2``: two front ends, each with its HTTP server, behind one HTTP port.
Concurrent streams spread over both HTTP servers and get the same greedy text as a ZMQ client of
either front end; every scrape, whichever server answers it, counts the whole deployment; a
drain stops all of them (``running_server`` checks that no process is left)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

import openai

from tests.e2e.server import running_server, wait_no_leak
from tests.e2e.test_metrics import get, scrape
from tests.ports import free_tcp_port
from tokenizer_proc.client import Client

MODEL = "pdserve-embedded-llama"
PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3,", "Hello"]
STREAMS = 64  # concurrent, each on a connection of its own
MAX_TOKENS = 16


def cpu_seconds(pid: int) -> float:
    """CPU time of the process's threads so far, in ns steps (/proc/<pid>/stat counts 10 ms ticks)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{task}/schedstat") as f:
            total += int(f.read().split()[0])
    return total / 1e9


async def stream_all(base_url: str) -> list[str]:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)

    async def one(prompt: str) -> str:
        stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in stream])

    try:
        return await asyncio.gather(*(one(PROMPTS[i % len(PROMPTS)]) for i in range(STREAMS)))
    finally:
        await client.close()


def test_two_front_ends_share_the_http_port_the_work_and_the_metrics() -> None:
    zmq_port = free_tcp_port(count=2)
    flags = ("--tokenizer-worker-num", "2", "--zmq-port", str(zmq_port), "--heartbeat-interval", "0.2")
    with running_server(*flags) as server:
        assert {"frontend", "frontend1", "http", "http1"} <= server.child_pids.keys()
        expected = {}
        for i, prompt in enumerate(PROMPTS):  # each front end takes ZMQ clients on its own port
            with Client(f"tcp://127.0.0.1:{zmq_port + i % 2}", timeout=120) as client:
                expected[prompt] = client.generate(prompt, max_new_tokens=MAX_TOKENS, temperature=0)["text"]
        http_pids = [server.child_pids["http"], server.child_pids["http1"]]
        before = [cpu_seconds(pid) for pid in http_pids]
        texts = asyncio.run(stream_all(f"{server.http_url}/v1"))
        used = [cpu_seconds(pid) - b for pid, b in zip(http_pids, before, strict=True)]
        assert texts == [expected[PROMPTS[i % len(PROMPTS)]] for i in range(STREAMS)]
        # connections hash over the two sockets: each server streams a share (all but certainly
        # more than 1/8 of 64 connections each; its CPU time shows it)
        assert min(used) > 0.12 * sum(used), f"CPU seconds of the two HTTP servers: {used}"
        served = len(PROMPTS) + STREAMS
        deadline = time.monotonic() + 10
        for _ in range(6):  # scrapes land on either server; each counts both front ends
            samples = scrape(server.http_url)  # type: ignore[arg-type]
            while get(samples, "pdserve:request_success_total", finished_reason="length") < served:
                assert time.monotonic() < deadline, "a front end's requests are missing from the scrape"
                time.sleep(0.05)
                samples = scrape(server.http_url)  # type: ignore[arg-type]
            assert get(samples, "pdserve:request_success_total", finished_reason="length") == served
            assert get(samples, "pdserve:generation_tokens_total") == served * MAX_TOKENS
            assert get(samples, "pdserve:time_to_first_token_seconds_count") == served
        with Client(f"tcp://127.0.0.1:{zmq_port + 1}", timeout=30) as client:
            wait_no_leak(client)
