"""Serving benchmark: drive a running server with synthetic requests and measure it.

    python -m bench.serving --addr tcp://127.0.0.1:30001 --num-prompts 200 \
        --input-len 64 512 --output-len 16 256 --request-rate 8 --output bench/results/serving.json
    python -m bench.serving --backend openai --base-url http://127.0.0.1:30000/v1 --vocab-size 32000 \
        --request-rate 1 2 4 inf --output sweep.json --plot plots/

Backends (``bench.serving_backends``): ``zmq``, pdserve's wire protocol; ``openai``, any
OpenAI-compatible server (pdserve's ``--port``, vLLM, SGLang), streaming completions of
token-id prompts (or chat completions of their text), so peers see identical inputs.
Requests have random input and output lengths in the given ranges: random token ids below the
vocabulary size (or random text with ``--text``), ``ignore_eos`` so every output has its length.
They are sent all at once (rate ``inf``) or with Poisson arrivals; several rates make a sweep,
one run per rate (run ``i`` seeded ``--seed + i``, so no run finds an earlier one's prompts
cached). Reported per run: request throughput, input and output tokens/s, and TTFT, TPOT, ITL
and end-to-end latency (mean, p50, p90, p99), measured at the client; ``--plot`` draws them
(``bench.serving_plots``). Seeded: the same flags send the same requests.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from bench.serving_backends import Backend, DriveSettings, Endpoint, OpenAIBackend, ZmqBackend
from bench.serving_workload import BenchRequest, Workload, workload_at
from tokenizer_proc.client import DEFAULT_ADDR

PERCENTILES = (50, 90, 99)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=("zmq", "openai"), default="zmq", help="default: zmq")
    p.add_argument("--addr", default=DEFAULT_ADDR, help="zmq: the front end's client address")
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="openai: the API's base URL")
    p.add_argument(
        "--endpoint", choices=[e.value for e in Endpoint], default=Endpoint.COMPLETIONS.value,
        help="openai: /v1/completions (token-id prompts) or /v1/chat/completions (the prompt as text)",
    )
    p.add_argument("--model", default=None, help="openai: the model (default: the first /v1/models lists)")
    p.add_argument("--api-key", default=None, help="openai: sent as a bearer token")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, nargs=2, default=(32, 256), metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=(16, 128), metavar=("MIN", "MAX"))
    p.add_argument(
        "--vocab-size", type=int, default=None,
        help="token ids are drawn below this. zmq: by default the server's status says (its model's "
        "vocabulary). openai: required with token-id prompts, since "
        "an OpenAI server does not say (give the smaller vocabulary when comparing two models)",
    )
    p.add_argument(
        "--text",
        action="store_true",
        help="send random text (input lengths in characters) instead of token ids",
    )
    p.add_argument(
        "--request-rate", type=float, nargs="+", default=[math.inf],
        help="requests/s (Poisson); inf: all at once. Several: one run at each (a sweep)",
    )
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds without any reply before giving up")
    p.add_argument("--output", type=Path, default=None, help="write the results here as JSON")
    p.add_argument("--plot", type=Path, default=None, metavar="DIR", help="draw the runs here (PNG files)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for name in ("input_len", "output_len"):
        low, high = getattr(args, name)
        if not 1 <= low <= high:
            p.error(f"--{name.replace('_', '-')} needs 1 <= MIN <= MAX")
    if any(not rate > 0 for rate in args.request_rate):
        p.error("--request-rate values must be positive")
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        p.error("--plot needs matplotlib: pip install 'pdserve[bench]'")
    if args.backend == "openai" and args.vocab_size is None and not args.text:
        p.error("--backend openai needs --vocab-size with token-id prompts (an OpenAI server does not say)")
    return args


def make_backend(args: argparse.Namespace) -> Backend:
    if args.backend == "openai":
        return OpenAIBackend(args.base_url, Endpoint(args.endpoint), args.model, args.api_key)
    return ZmqBackend(args.addr)


def make_workload(args: argparse.Namespace, backend: Backend) -> Workload:
    vocab_size = None
    if not args.text:
        vocab_size = args.vocab_size
        if vocab_size is None:
            assert isinstance(backend, ZmqBackend)  # parse_args requires it of the others
            vocab_size = backend.vocab_size(args.timeout)
    return Workload(args.num_prompts, tuple(args.input_len), tuple(args.output_len), vocab_size, args.seed)


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Every run (one per request rate) and the config they ran with, the vocabulary size the
    server told included."""
    backend = make_backend(args)
    workload = make_workload(args, backend)
    settings = DriveSettings(args.temperature, args.timeout, progress=not args.no_progress)
    runs = []
    for i, rate in enumerate(args.request_rate):
        requests, offsets = workload_at(replace(workload, seed=workload.seed + i), rate)
        duration = backend.drive(requests, offsets, settings)
        runs.append({"request_rate": _json_value(rate), "results": summarize(requests, duration)})
    config = {**_json_config(args), "vocab_size": workload.vocab_size}
    return {"config": config, "runs": runs}


def _stats_ms(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, **{f"p{q}": None for q in PERCENTILES}}
    arr = np.asarray(values) * 1e3
    return {"mean": float(arr.mean()), **{f"p{q}": float(np.percentile(arr, q)) for q in PERCENTILES}}


def summarize(requests: list[BenchRequest], duration: float) -> dict[str, Any]:
    ok = [r for r in requests if r.error is None and r.chunk_times]
    input_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    tpots = [r.tpot for r in ok if r.tpot is not None]
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
        "samples": {"ttft_ms": [r.ttft * 1e3 for r in ok], "tpot_ms": [t * 1e3 for t in tpots]},
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


def _json_value(value: Any) -> Any:
    """``value`` as plain JSON: no Infinity, no tuples, no paths."""
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, (tuple, list)):
        return [_json_value(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def _json_config(args: argparse.Namespace) -> dict[str, Any]:
    return {key: _json_value(value) for key, value in vars(args).items()}


def report_json(report: dict[str, Any]) -> dict[str, Any]:
    """What ``--output`` holds: one run as ``{"config", "results"}`` (``bench.report`` reads it),
    a sweep as ``{"config", "runs": [{"request_rate", "results"}]}``."""
    runs = report["runs"]
    if len(runs) == 1:
        return {"config": report["config"], "results": runs[0]["results"]}
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run_benchmark(args)
    for run in report["runs"]:
        if len(report["runs"]) > 1:
            print(f"\nrequest rate {run['request_rate']} req/s")
        print(format_table(run["results"]))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report_json(report), indent=2, allow_nan=False) + "\n")
    if args.plot is not None:
        from bench.serving_plots import draw_runs  # matplotlib only when plotting

        for path in draw_runs(report["runs"], args.plot):
            print(f"plot: {path}")
    return 0 if all(run["results"]["failed"] == 0 for run in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
