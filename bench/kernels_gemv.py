"""The small-batch GEMV of ``bench/kernels.py`` (decode's linear layers at M = 1..16) against
cuBLAS (``F.linear``) on the same inputs. Both are bound by reading the weight once: scored by
effective bandwidth (weight + x + out bytes / time), so the ratio to the copy ceiling says how
close each comes to streaming the weights at copy speed.

Every config of ``GEMV_CONFIGS`` is timed first and the fastest is the row (named in its shape
column), as the engine's start-up selection would pick it."""

from __future__ import annotations

from collections.abc import Callable

import torch

from bench.kernels_base import Case, KernelShapes


def gemv_case(
    shapes: KernelShapes, name: str, n: int, k: int, rows: int, device: str, timer: Callable
) -> Case:
    from engine.kernels.gemv import GEMV_CONFIGS, gemv

    x = torch.randn(rows, k, device=device, dtype=shapes.dtype)
    weight = torch.randn(n, k, device=device, dtype=shapes.dtype) / k**0.5
    best = min(GEMV_CONFIGS, key=lambda config: timer(lambda: gemv(x, weight, config=config)))
    tag = f"{best.block_n}/{best.block_k}/{best.num_warps}/{best.num_stages}"
    return Case(
        "gemv", f"{name} M={rows} cfg={tag}",
        ours=lambda: gemv(x, weight, config=best),
        peers={"cublas": lambda: torch.nn.functional.linear(x, weight)},
        metric="GB/s", work=(n * k + rows * k + rows * n) * x.element_size(),
        reference=lambda: torch.nn.functional.linear(x, weight),
    )
