"""bench.serving against a real unified deployment of the embedded model (launch.py, HTTP API
included): both backends send the same requests and report consistent numbers; a two-rate sweep
writes every run and its plots."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bench import serving
from bench.serving_backends import Endpoint, OpenAIBackend
from bench.serving_workload import BenchRequest, Workload, workload_at
from protocol.config import EMBEDDED
from tests.e2e.server import Server, running_server, wait_no_leak

NUM_PROMPTS = 6
WORKLOAD = ["--num-prompts", str(NUM_PROMPTS), "--input-len", "4", "12", "--output-len", "3", "8",
            "--no-progress", "--timeout", "120"]


@pytest.fixture(scope="module")
def deployment() -> Iterator[tuple[Server, str]]:
    with running_server() as server:
        yield server, f"{server.http_url}/v1"


def _run(tmp_path: Path, *flags: str) -> dict:
    out = tmp_path / "serving.json"
    assert serving.main([*WORKLOAD, *flags, "--output", str(out)]) == 0
    return json.loads(out.read_text())


def _expected_lengths(vocab_size: int, seed: int = 0) -> tuple[int, int]:
    """Prompt and output tokens of the workload the flags describe."""
    args = serving.parse_args([*WORKLOAD, "--vocab-size", str(vocab_size), "--seed", str(seed)])
    workload = Workload(args.num_prompts, tuple(args.input_len), tuple(args.output_len), vocab_size, seed)
    requests, _ = workload_at(workload, 1.0)
    return sum(len(r.prompt) for r in requests), sum(r.output_len for r in requests)


def _check_consistent(results: dict, vocab_size: int, seed: int = 0) -> None:
    assert results["completed"] == NUM_PROMPTS and results["failed"] == 0, results["errors"]
    assert (results["input_tokens"], results["output_tokens"]) == _expected_lengths(vocab_size, seed)
    duration = results["duration_s"]
    assert duration > 0
    assert results["request_throughput"] == pytest.approx(NUM_PROMPTS / duration)
    assert results["output_throughput"] == pytest.approx(results["output_tokens"] / duration)
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_latency_ms"):
        stats = results[key]
        assert 0 < stats["p50"] <= stats["p90"] <= stats["p99"], (key, stats)
    assert results["ttft_ms"]["p99"] <= results["e2e_latency_ms"]["p99"]
    assert len(results["samples"]["ttft_ms"]) == NUM_PROMPTS


def test_both_backends_send_the_same_requests_and_agree_on_counts(
    deployment: tuple[Server, str], tmp_path: Path
) -> None:
    server, base_url = deployment
    by_zmq = _run(tmp_path, "--addr", server.addr)  # the vocabulary asked of the server
    assert by_zmq["config"]["vocab_size"] == EMBEDDED.vocab_size
    _check_consistent(by_zmq["results"], EMBEDDED.vocab_size)
    by_http = _run(tmp_path, "--backend", "openai", "--base-url", base_url,
                   "--vocab-size", str(EMBEDDED.vocab_size))
    _check_consistent(by_http["results"], EMBEDDED.vocab_size)
    with server.client() as client:
        wait_no_leak(client)


def test_openai_backend_needs_the_vocabulary_size() -> None:
    with pytest.raises(SystemExit):
        serving.parse_args(["--backend", "openai"])


def test_sweep_writes_every_run_and_draws_them(deployment: tuple[Server, str], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    _, base_url = deployment
    plots = tmp_path / "plots"
    report = _run(tmp_path, "--backend", "openai", "--base-url", base_url, "--vocab-size",
                  str(EMBEDDED.vocab_size), "--request-rate", "20", "inf", "--plot", str(plots))
    assert [run["request_rate"] for run in report["runs"]] == [20.0, "inf"]
    assert report["config"]["request_rate"] == [20.0, "inf"]
    for seed, run in enumerate(report["runs"]):  # run i is seeded --seed + i
        _check_consistent(run["results"], EMBEDDED.vocab_size, seed)
    names = {"ttft_cdf.png", "tpot_cdf.png", "throughput_vs_rate.png", "latency_vs_rate.png"}
    assert {p.name for p in plots.iterdir()} == names
    assert all((plots / name).read_bytes().startswith(b"\x89PNG") for name in names)


class _Events:
    """The lines of a streamed response, as httpx gives them."""

    def __init__(self, *chunks: dict | str) -> None:
        self.lines = [f"data: {c if isinstance(c, str) else json.dumps(c)}" for c in chunks]

    async def aiter_lines(self) -> AsyncIterator[str]:
        for line in [": keep-alive", *self.lines]:
            yield line


def test_chat_chunks_without_usage_are_counted() -> None:
    backend = OpenAIBackend("http://unused/v1", Endpoint.CHAT)
    req = BenchRequest(prompt=[5, 6, 7], output_len=3)
    role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    token = {"choices": [{"index": 0, "delta": {"content": "a"}}]}
    asyncio.run(backend._read_events(_Events(role, token, token, "[DONE]"), req))
    assert len(req.chunk_times) == 2 and req.output_tokens == 0  # usage absent: _one counts chunks


def test_completion_usage_and_stream_errors_are_recorded() -> None:
    backend = OpenAIBackend("http://unused/v1")
    req = BenchRequest(prompt=[5, 6, 7], output_len=2)
    text = {"choices": [{"index": 0, "text": "x"}], "usage": None}
    usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    asyncio.run(backend._read_events(_Events(text, {"choices": [{"text": ""}]}, usage, "[DONE]"), req))
    assert (len(req.chunk_times), req.prompt_tokens, req.output_tokens, req.error) == (1, 3, 2, None)
    failed = BenchRequest(prompt=[5], output_len=2)
    asyncio.run(backend._read_events(_Events(text, {"error": {"message": "boom"}}), failed))
    assert failed.error == "stream error: boom"
