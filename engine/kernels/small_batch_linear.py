"""The matmuls of small batches: cuBLAS, or our Triton GEMV where it measured faster here.

At a few rows a decode step's matmuls read every weight once and do little else: bound by HBM
bandwidth, where cuBLAS's kernels for these shapes reach about 87% of a device-to-device copy
on an H100 and a GEMV that does better shortens the whole step. Which one wins depends on the
device, the weight's shape and the rows, so the worker measures both at start-up (``choose``),
once per weight shape and row bucket, and keeps the GEMV only where it is clearly faster; the
call is then a dict lookup (made once per batch size at CUDA-graph capture).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from engine.kernels.gemv import GEMV_CONFIGS, MAX_GEMV_ROWS, GemvConfig, gemv

logger = logging.getLogger("pdserve.worker")

ROW_BUCKETS = tuple(b for b in (1, 2, 4, 8, 16) if b <= MAX_GEMV_ROWS)
MIN_GAIN = 0.03  # the GEMV must beat cuBLAS by this much: timing noise must not pick it

Timer = Callable[[Callable[[], object]], float]  # milliseconds of one call
ShapeKey = tuple[int, int, int]  # (row bucket, N, K)


@dataclass(frozen=True)
class LinearChoice:
    """What start-up measured for one (rows, N, K): cuBLAS's time, the best GEMV config's."""

    rows: int
    n: int
    k: int
    cublas_ms: float
    gemv_ms: float
    config: GemvConfig  # the fastest GEMV config

    @property
    def use_gemv(self) -> bool:
        return self.gemv_ms < (1.0 - MIN_GAIN) * self.cublas_ms


def row_bucket(rows: int) -> int:
    """The smallest bucket that holds ``rows`` (rows <= ROW_BUCKETS[-1])."""
    return ROW_BUCKETS[bisect.bisect_left(ROW_BUCKETS, rows)]


@dataclass
class SmallBatchLinear:
    """``F.linear``, except for the (row bucket, N, K) where ``choose`` kept the GEMV."""

    choices: dict[ShapeKey, GemvConfig] = field(default_factory=dict)
    measured: list[LinearChoice] = field(default_factory=list)  # by ``choose``, for the record

    def __call__(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        rows = x.shape[0]
        if rows <= ROW_BUCKETS[-1]:
            config = self.choices.get((row_bucket(rows), weight.shape[0], weight.shape[1]))
            if config is not None:
                return gemv(x, weight, bias, config)
        return F.linear(x, weight, bias)

    def choose(
        self, weights: Iterable[tuple[torch.Tensor, torch.Tensor | None]], timer: Timer
    ) -> list[LinearChoice]:
        """Time cuBLAS and every GEMV config on each distinct weight shape at each row bucket;
        keep the GEMV where it wins by ``MIN_GAIN``. Returns every measurement."""
        shapes: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor | None]] = {}
        for weight, bias in weights:
            shapes.setdefault((weight.shape[0], weight.shape[1]), (weight, bias))
        measured = []
        for (n, k), (weight, bias) in shapes.items():
            for rows in ROW_BUCKETS:
                x = torch.randn(rows, k, dtype=weight.dtype, device=weight.device)
                choice = _measure(x, weight, bias, timer)
                measured.append(choice)
                if choice.use_gemv:
                    self.choices[(rows, n, k)] = choice.config
        self.measured = measured
        return measured


def _measure(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, timer: Timer) -> LinearChoice:
    cublas_ms = timer(lambda: F.linear(x, weight, bias))
    times = {config: timer(lambda c=config: gemv(x, weight, bias, c)) for config in GEMV_CONFIGS}
    best = min(times, key=times.__getitem__)
    n, k = weight.shape
    return LinearChoice(x.shape[0], n, k, cublas_ms, times[best], best)


def device_timer(warmup_ms: float = 5.0, rep_ms: float = 20.0) -> Timer:
    """Median milliseconds by Triton's ``do_bench`` (CUDA events, L2 flushed between calls, as a
    decode step finds the weights: not in L2)."""
    import triton.testing

    return lambda fn: float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def describe(measured: list[LinearChoice]) -> str:
    """One line per (rows, N, K): the winner and both times."""
    lines = []
    for c in measured:
        winner = f"gemv {c.config}" if c.use_gemv else "cublas"
        lines.append(
            f"rows={c.rows} {c.n}x{c.k}: {winner} (cublas {c.cublas_ms * 1e3:.1f} us, "
            f"best gemv {c.gemv_ms * 1e3:.1f} us)"
        )
    return "\n".join(lines)
