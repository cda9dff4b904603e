"""Serving benchmark: drive a running front end with synthetic requests and measure it.

    python -m bench.serving --addr tcp://127.0.0.1:30000 --num-prompts 200 \
        --input-len 64 512 --output-len 16 256 --request-rate 8 --output bench/results/serving.json

Requests have random input and output lengths in the given ranges: random token ids below
``--vocab-size`` (or random text with ``--text``), ``ignore_eos`` so every output has its
length. They are sent all at once (``--request-rate inf``) or with Poisson arrivals. Reported:
request throughput, input and output tokens/s, and TTFT, TPOT, ITL and end-to-end latency
(mean, p50, p90, p99), measured at the client. Seeded: the same flags send the same requests.
"""

from __future__ import annotations

import argparse
import json
import math
import string
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from protocol.config import EMBEDDED
from tokenizer_proc.client import DEFAULT_ADDR, Client

PERCENTILES = (50, 90, 99)


@dataclass
class BenchRequest:
    prompt: str | list[int]
    output_len: int
    rid: str = ""
    sent_at: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    done_at: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.sent_at

    @property
    def latency(self) -> float:
        assert self.done_at is not None
        return self.done_at - self.sent_at


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.splitlines()[0])
    p.add_argument("--addr", default=DEFAULT_ADDR)
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, nargs=2, default=(32, 256), metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=(16, 128), metavar=("MIN", "MAX"))
    p.add_argument(
        "--vocab-size", type=int, default=EMBEDDED.vocab_size, help="token ids are drawn below this"
    )
    p.add_argument(
        "--text",
        action="store_true",
        help="send random text (input lengths in characters) instead of token ids",
    )
    p.add_argument(
        "--request-rate", type=float, default=math.inf, help="requests/s (Poisson); inf: all at once"
    )
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds without any reply before giving up")
    p.add_argument("--output", type=Path, default=None, help="write the results here as JSON")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for name in ("input_len", "output_len"):
        low, high = getattr(args, name)
        if not 1 <= low <= high:
            p.error(f"--{name.replace('_', '-')} needs 1 <= MIN <= MAX")
    return args


def make_requests(args: argparse.Namespace, rng: np.random.Generator) -> list[BenchRequest]:
    input_lens = rng.integers(args.input_len[0], args.input_len[1], endpoint=True, size=args.num_prompts)
    output_lens = rng.integers(args.output_len[0], args.output_len[1], endpoint=True, size=args.num_prompts)
    letters = np.array(list(string.ascii_lowercase + " "))
    requests = []
    for n_in, n_out in zip(input_lens.tolist(), output_lens.tolist(), strict=True):
        if args.text:
            prompt: str | list[int] = "".join(rng.choice(letters, size=n_in).tolist())
        else:
            prompt = rng.integers(0, args.vocab_size, size=n_in).tolist()
        requests.append(BenchRequest(prompt=prompt, output_len=n_out))
    return requests


def arrival_offsets(n: int, rate: float, rng: np.random.Generator) -> list[float]:
    if math.isinf(rate):
        return [0.0] * n
    return np.cumsum(rng.exponential(1.0 / rate, size=n)).tolist()


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed)
    requests = make_requests(args, rng)
    offsets = arrival_offsets(len(requests), args.request_rate, rng)
    with Client(args.addr, timeout=args.timeout) as client:
        client.wait_ready(timeout=args.timeout)
        duration = _drive(client, requests, offsets, args)
    return summarize(requests, duration)


def _drive(
    client: Client, requests: list[BenchRequest], offsets: list[float], args: argparse.Namespace
) -> float:
    """Send each request at its offset, collect every reply; return the wall time taken."""
    by_rid: dict[str, BenchRequest] = {}
    bar = tqdm(total=len(requests), disable=args.no_progress, desc="requests", unit="req")
    start = time.perf_counter()
    next_up, done, last_reply = 0, 0, start
    while done < len(requests):
        while next_up < len(requests) and offsets[next_up] <= time.perf_counter() - start:
            req = requests[next_up]
            req.rid = _submit(client, req, args, seed=args.seed + next_up)
            req.sent_at = time.perf_counter()
            by_rid[req.rid] = req
            next_up += 1
        wait = offsets[next_up] - (time.perf_counter() - start) if next_up < len(requests) else 1.0
        msg = client.next_message(timeout=max(0.0, min(wait, 1.0)))
        now = time.perf_counter()
        if msg is None:
            if now - last_reply > args.timeout:
                raise TimeoutError(
                    f"no reply for {args.timeout}s; {len(requests) - done} requests unfinished"
                )
            continue
        last_reply = now
        if _record(by_rid.get(msg.get("rid")), msg, now):
            done += 1
            bar.update(1)
    bar.close()
    return time.perf_counter() - start


def _submit(client: Client, req: BenchRequest, args: argparse.Namespace, seed: int) -> str:
    prompt = {"text": req.prompt} if isinstance(req.prompt, str) else {"input_ids": req.prompt}
    return client.submit(
        **prompt,
        stream=True,
        max_new_tokens=req.output_len,
        temperature=args.temperature,
        ignore_eos=True,
        seed=seed,
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


def _stats_ms(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, **{f"p{q}": None for q in PERCENTILES}}
    arr = np.asarray(values) * 1e3
    return {"mean": float(arr.mean()), **{f"p{q}": float(np.percentile(arr, q)) for q in PERCENTILES}}


def summarize(requests: list[BenchRequest], duration: float) -> dict[str, Any]:
    ok = [r for r in requests if r.error is None and r.chunk_times]
    input_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itls = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:], strict=False)]
    return {
        "completed": len(ok),
        "failed": len(requests) - len(ok),
        "errors": sorted({r.error for r in requests if r.error})[:5],
        "duration_s": duration,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "request_throughput": len(ok) / duration,
        "input_throughput": input_tokens / duration,
        "output_throughput": output_tokens / duration,
        "ttft_ms": _stats_ms([r.ttft for r in ok]),
        "tpot_ms": _stats_ms(tpots),
        "itl_ms": _stats_ms(itls),
        "e2e_latency_ms": _stats_ms([r.latency for r in ok]),
    }


def format_table(results: dict[str, Any]) -> str:
    lines = [
        f"{'completed / failed':<28}{results['completed']} / {results['failed']}",
        f"{'duration (s)':<28}{results['duration_s']:.2f}",
        f"{'request throughput (req/s)':<28}{results['request_throughput']:.2f}",
        f"{'input tokens/s':<28}{results['input_throughput']:.1f}",
        f"{'output tokens/s':<28}{results['output_throughput']:.1f}",
        f"{'(ms)':<28}{'mean':>10}" + "".join(f"{f'p{q}':>10}" for q in PERCENTILES),
    ]
    for key, label in (
        ("ttft_ms", "TTFT"),
        ("tpot_ms", "TPOT"),
        ("itl_ms", "ITL"),
        ("e2e_latency_ms", "E2E"),
    ):
        row = results[key]
        lines.append(
            f"{label:<28}" + "".join(_cell(row[k]) for k in ("mean", *(f"p{q}" for q in PERCENTILES)))
        )
    lines += [f"error: {e}" for e in results["errors"]]
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return f"{value:>10.2f}" if value is not None else f"{'n/a':>10}"


def _json_config(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as plain JSON (no Infinity, no tuples, no paths)."""
    config = {}
    for key, value in vars(args).items():
        if isinstance(value, float) and math.isinf(value):
            value = "inf"
        elif isinstance(value, (tuple, Path)):
            value = list(value) if isinstance(value, tuple) else str(value)
        config[key] = value
    return config


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run_benchmark(args)
    print(format_table(results))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        report = {"config": _json_config(args), "results": results}
        args.output.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    return 0 if results["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
