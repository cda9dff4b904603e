"""What every row of ``bench/kernels.py`` is built from: the shapes of a run and one benchmark
case (our kernel, its peers on the same inputs, and how to score a time)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class KernelShapes:
    dtype: torch.dtype
    num_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    decode_batches: tuple[int, ...]
    decode_contexts: tuple[int, ...]
    extend_contexts: tuple[int, ...]
    rotary_tokens: tuple[int, ...]  # of the rotary + KV store: decode batches and a prefill
    max_positions: int  # of the rotary table
    pointwise_rows: tuple[int, ...]  # rows of the norm / activation kernels
    hidden: int
    intermediate: int
    gemv_linears: tuple[tuple[str, int, int], ...]  # (name, N, K) of the decode matmuls
    gemv_rows: tuple[int, ...]  # M of the decode matmuls
    copy_bytes: int  # of the bandwidth ceiling's copy
    matmul_n: int  # of the FLOP/s ceiling's square matmul


FULL_SHAPES = KernelShapes(  # Llama-3-8B
    dtype=torch.bfloat16, num_heads=32, num_kv_heads=8, head_dim=128, page_size=16,
    decode_batches=(1, 16, 64), decode_contexts=(512, 4096), extend_contexts=(512, 4096),
    rotary_tokens=(1, 64, 128, 4096), max_positions=8192, pointwise_rows=(64, 4096), hidden=4096,
    intermediate=14336,
    gemv_linears=(("qkv", 6144, 4096), ("o_proj", 4096, 4096), ("gate_up", 28672, 4096),
                  ("down", 4096, 14336), ("lm_head", 128256, 4096)),
    gemv_rows=(1, 8), copy_bytes=1 << 30, matmul_n=8192,
)
# fp32: the interpreter's bf16 tl.dot is wrong (and the numbers mean nothing on CPU anyway).
TINY_SHAPES = KernelShapes(
    dtype=torch.float32, num_heads=4, num_kv_heads=2, head_dim=64, page_size=4,
    decode_batches=(1, 2), decode_contexts=(24,), extend_contexts=(16,),
    rotary_tokens=(1, 8), max_positions=64, pointwise_rows=(3,), hidden=64, intermediate=96,
    gemv_linears=(("odd", 40, 72),), gemv_rows=(1, 3), copy_bytes=1 << 20, matmul_n=128,
)


@dataclass
class Case:
    """One shape: our kernel, its peers on the same inputs, and how to score a time."""

    kernel: str
    shape: str
    ours: Callable[[], torch.Tensor | None]
    peers: dict[str, Callable[[], object]]
    metric: str
    work: float  # bytes or FLOPs that must be moved / done
    reference: Callable[[], torch.Tensor] | None = None  # a peer's output, to check ours against

    def speed(self, ms: float) -> float:
        return self.work / ms / (1e6 if self.metric == "GB/s" else 1e9)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def write_report(path: Path, report: object) -> None:
    """The report as JSON at ``path`` (rewritten whole: the last write is the complete one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(report), indent=2) + "\n")
