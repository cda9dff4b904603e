"""Small-batch matmul for decode (``F.linear`` with at most ``MAX_GEMV_ROWS`` rows of x): at batch
1..16 a linear layer is bound by reading its weight once, so the kernel is built to stream the
weight at copy speed and nothing else.

- One program per ``BLOCK_N`` output columns, grid ``(cdiv(N, BLOCK_N),)``: each program reads
  its ``BLOCK_N`` weight rows exactly once, in ``BLOCK_K`` chunks along K (the contiguous axis of
  the ``nn.Linear`` layout, so every load is coalesced into 16-byte vectors), and the weight is
  read exactly once per call. No split-K: one launch, no workspace, no reduction pass.
- The rows of x are padded to 16 in registers (masked loads of the real ``M`` rows; masked-off
  rows cost no memory traffic) so the product is a ``tl.dot``: tensor cores do the arithmetic,
  and Triton's software pipeliner keeps ``num_stages - 1`` weight chunks in flight through shared
  memory, which is what a bandwidth-bound loop needs. The padding wastes tensor-core slots, not
  bandwidth. Every M shares one compiled kernel per config (besides Triton's own M == 1
  specialisation).
- Products accumulate in float32 and the result is rounded once, after the bias (float32) is
  added, as ``F.linear`` does. ``input_precision="ieee"`` keeps float32 inputs in float32 (the
  GPU default would be TF32); bf16/fp16 ignore it.
- The grid and every argument depend only on shapes and strides: CUDA-graph capturable, no
  host sync.

No single tile is best for every shape: N = 4096 needs narrow blocks (16-32 columns) to give
each of the 132 SMs of an H100 a program, while N = 14336..128256 has programs to spare and
prefers wider blocks with fewer, larger loads. ``GEMV_CONFIGS`` is the spread the engine times
at start-up against cuBLAS, per weight shape and batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MAX_GEMV_ROWS = 16  # the largest M the kernel serves: x's rows fill one 16-row tensor-core tile


@dataclass(frozen=True)
class GemvConfig:
    block_n: int  # output columns (weight rows) per program, >= 16 (a tl.dot operand)
    block_k: int  # weight columns per loop step, >= 16
    num_warps: int
    num_stages: int


# Shared memory per stage is (block_n + 16) * block_k elements (x's padded rows ride along);
# num_stages - 1 stages are in flight. HBM3 wants some 32-64 KB of loads in flight per SM: a bf16
# stage of 8-32 KB of weight with 2-3 stages in flight gets there with 1-3 programs per SM. Every
# config also fits sm_90's 227 KB of shared memory in float32 (sm90_compile checks both).
GEMV_CONFIGS: tuple[GemvConfig, ...] = (
    GemvConfig(block_n=16, block_k=256, num_warps=4, num_stages=4),  # N = 4096: 256 programs, 2 per SM
    GemvConfig(block_n=16, block_k=512, num_warps=4, num_stages=4),  # the same, twice the bytes in flight
    GemvConfig(block_n=32, block_k=256, num_warps=4, num_stages=4),  # N = 4096: 128 programs, one wave
    GemvConfig(block_n=32, block_k=512, num_warps=4, num_stages=3),
    GemvConfig(block_n=64, block_k=128, num_warps=4, num_stages=4),  # N = 6144..28672
    GemvConfig(block_n=64, block_k=256, num_warps=8, num_stages=3),
    GemvConfig(block_n=128, block_k=128, num_warps=8, num_stages=3),  # N = 28672..128256
    GemvConfig(block_n=256, block_k=64, num_warps=8, num_stages=4),  # lm_head: 501 programs
)
DEFAULT_GEMV_CONFIG = GEMV_CONFIGS[2]  # 32 x 256: no extreme of the spread


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_om,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]  # N * K may pass 2**31

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0)
        else:
            mask_k = offs_k < K - k
            x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def gemv(
    x: torch.Tensor,  # [M, K], M <= MAX_GEMV_ROWS, contiguous last dim, any row stride
    weight: torch.Tensor,  # [N, K] contiguous (nn.Linear layout)
    bias: torch.Tensor | None = None,  # [N]
    config: GemvConfig = DEFAULT_GEMV_CONFIG,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` -> [M, N] in x's dtype: products accumulated in float32,
    the bias added in float32, rounded once at the end."""
    check_gemv_args(x, weight, bias)
    rows, k = x.shape
    n = weight.shape[0]
    out = torch.empty(rows, n, device=x.device, dtype=x.dtype)
    if rows == 0 or n == 0:
        return out
    _gemv_kernel[(triton.cdiv(n, config.block_n),)](
        x, weight, bias if bias is not None else weight, out,
        rows, n, k, x.stride(0), out.stride(0),
        HAS_BIAS=bias is not None,
        EVEN_K=k % config.block_k == 0,
        BLOCK_M=MAX_GEMV_ROWS,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


def check_gemv_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Shapes, dtypes and strides only (no host sync): ValueError before any launch."""
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"gemv needs x [M, K] and weight [N, K]: {tuple(x.shape)}, {tuple(weight.shape)}")
    if x.shape[0] > MAX_GEMV_ROWS:
        raise ValueError(f"gemv serves at most {MAX_GEMV_ROWS} rows, got {x.shape[0]}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x has K={x.shape[1]} but weight has K={weight.shape[1]}")
    if x.dtype != weight.dtype:
        raise ValueError(f"x is {x.dtype} but weight is {weight.dtype}")
    if x.stride(1) != 1 and x.shape[1] > 1:
        raise ValueError("gemv needs x with a contiguous last dimension")
    if not weight.is_contiguous():
        raise ValueError("gemv needs a contiguous weight")
    if bias is not None and (bias.shape != weight.shape[:1] or not bias.is_contiguous()):
        raise ValueError(f"bias must be a contiguous [{weight.shape[0]}], got {tuple(bias.shape)}")
