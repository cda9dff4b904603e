"""The CPU matmuls of a model's shapes: ``F.linear`` on the plain weight against oneDNN's linear on
the weight packed once (``engine.kernels.cpu_linear``), CPU time per call (process time, one
thread unless ``--threads``), the rate in GFLOP/s, and the largest difference between the two.

    python -m bench.cpu_linear                 # SmolLM2-135M's five shapes, 1 / 16 / 64 / 512 rows
    python -m bench.cpu_linear --tiny          # a smoke run; its numbers mean nothing
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.cpu_env import tune_malloc
from engine.kernels.cpu_linear import can_pack, linear_cpu, pack

# (name, N, K) of SmolLM2-135M: fused q/k/v, o, fused gate/up, down, the LM head
SHAPES = (("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536),
          ("lm_head", 49152, 576))
ROWS = (1, 16, 64, 512)
TINY_SHAPES = (("tiny", 48, 32),)
TINY_ROWS = (1, 5)


def cpu_us(fn: Callable[[], torch.Tensor], min_s: float) -> float:
    """CPU microseconds per call, repeated for at least ``min_s`` of CPU time."""
    fn()
    calls, start = 0, time.process_time()
    while (spent := time.process_time() - start) < min_s or calls == 0:
        fn()
        calls += 1
    return spent / calls * 1e6


def measure(dtype: torch.dtype, shapes: tuple, rows: tuple[int, ...], min_s: float) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for name, n, k in shapes:
        weight = torch.randn(n, k, generator=gen).to(dtype)
        packed = pack(weight)
        for m in rows:
            x = torch.randn(m, k, generator=gen).to(dtype)
            plain_us = cpu_us(lambda x=x, w=weight: F.linear(x, w), min_s)
            packed_us = cpu_us(lambda x=x, w=packed: linear_cpu(x, w), min_s)
            diff = (linear_cpu(x, packed).float() - F.linear(x, weight).float()).abs().max().item()
            gflop = 2 * m * n * k / 1e9
            row = {"dtype": str(dtype).removeprefix("torch."), "shape": name, "n": n, "k": k, "rows": m,
                   "f_linear_us": plain_us, "packed_us": packed_us, "packed_gflops": gflop / packed_us * 1e6,
                   "speedup": plain_us / packed_us, "max_abs_diff": diff}
            out.append(row)
            print(f"{row['dtype']:<9} {name:<8} {m:>4} rows  F.linear {plain_us:9.1f} µs  packed "
                  f"{packed_us:9.1f} µs ({row['packed_gflops']:5.1f} GFLOP/s)  ×{row['speedup']:.2f}  "
                  f"max |diff| {diff:.1e}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_linear", description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--min-seconds", type=float, default=0.3, help="CPU time per measurement")
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tune_malloc()
    shapes, rows, min_s = (TINY_SHAPES, TINY_ROWS, 0.0) if args.tiny else (SHAPES, ROWS, args.min_seconds)
    results = []
    for name in args.dtype:
        dtype = getattr(torch, name)
        if not can_pack(dtype):
            print(f"{name}: oneDNN has no packed linear for it on this CPU")
            continue
        results += measure(dtype, shapes, rows, min_s)
    if args.output:
        args.output.write_text(json.dumps({"threads": args.threads, "rows": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
