"""RMSNorm with the residual add on the CPU, float32 and bf16: torch's ops (``engine.kernels.
cpu.rms_norm_cpu``: the fused ``rms_norm`` after the add in float32, the reference's rounding in
bf16) against our one-pass C kernel (``rms_norm_native``), at 1, 64 and 512 rows of SmolLM2's
576 (or ``--hidden``); CPU microseconds per call, one thread.

    python -m bench.cpu_norm
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from bench.cpu_linear import cpu_us
from engine.cpu_env import tune_malloc
from engine.kernels import cpu, cpu_native


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_norm", description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 64, 512])
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--min-s", type=float, default=0.3, help="CPU seconds per measurement, at least")
    args = p.parse_args(argv)
    if (why := cpu_native.available()) is not None:
        print(f"the C kernels cannot be built here: {why}")
        return 1
    torch.set_num_threads(1)
    tune_malloc()  # as the worker does: no page faults for each new activation
    gen = torch.Generator().manual_seed(0)
    for dtype in args.dtype:
        weight = torch.randn(args.hidden, generator=gen).to(getattr(torch, dtype))
        for rows in args.rows:
            x, residual = (torch.randn(rows, args.hidden, generator=gen).to(weight.dtype) for _ in range(2))
            ours = cpu_us(partial(cpu.rms_norm_native, x, weight, 1e-5, residual), args.min_s)
            torch_ops = cpu_us(partial(cpu.rms_norm_cpu, x, weight, 1e-5, residual), args.min_s)
            print(f"{dtype:<9} {rows:>5} rows  torch ops {torch_ops:8.1f} us   C kernel {ours:8.1f} us   "
                  f"{torch_ops / ours:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
