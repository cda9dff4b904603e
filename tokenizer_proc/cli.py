"""Command-line client: stream answers to prompts and show each answer's timings.

python -m tokenizer_proc.cli "Once upon a time" "The capital of France is" --max-new-tokens 32
python -m tokenizer_proc.cli --file prompts.txt --temperature 0
python -m tokenizer_proc.cli --status
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from typing import TextIO

from tokenizer_proc.client import DEFAULT_ADDR, Client, ServerError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tokenizer_proc.cli", description=__doc__.splitlines()[0])
    p.add_argument("prompts", nargs=argparse.ZERO_OR_MORE, help="prompts to send, one request each, in order")
    p.add_argument("--file", help="a file with one prompt per line (blank lines are skipped)")
    p.add_argument("--addr", default=DEFAULT_ADDR, help="front end address (default %(default)s)")
    p.add_argument("--status", action="store_true", help="print the server status as JSON and exit")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=None, help="0 means greedy")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for each message")
    args = p.parse_args(argv)
    if not (args.status or args.prompts or args.file):
        p.error("give prompts, --file or --status")
    return args


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompts)
    if args.file:
        with open(args.file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    return prompts


def timings_line(final: dict) -> str:
    metrics, usage = final["metrics"], final["usage"]
    tokens = usage["completion_tokens"]
    seconds = metrics["latency_ms"] / 1e3
    rate = tokens / seconds if seconds > 0 else 0.0
    return (
        f"[{final['finish_reason']} | ttft {metrics['ttft_ms']:.1f} ms"
        f" | latency {metrics['latency_ms']:.1f} ms | {usage['prompt_tokens']} prompt + {tokens} tokens"
        f" | {rate:.1f} tokens/s]"
    )


def stream_answers(client: Client, prompts: Iterable[str], sampling: dict, out: TextIO, err: TextIO) -> int:
    """Stream each prompt's answer to ``out``; return how many failed."""
    failures = 0
    for prompt in prompts:
        try:
            for msg in client.stream(prompt, **sampling):
                out.write(msg["text"])
                out.flush()
            out.write(f"\n{timings_line(msg)}\n")
        except ServerError as e:
            failures += 1
            err.write(f"error: {e}\n")
    return failures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with Client(args.addr, timeout=args.timeout) as client:
        if args.status:
            print(json.dumps(client.status(), indent=2))
            return 0
        sampling = {
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "top_k": args.top_k,
            "seed": args.seed,
            "stop": args.stop,
            "ignore_eos": args.ignore_eos or None,
        }
        failures = stream_answers(client, read_prompts(args), sampling, sys.stdout, sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
