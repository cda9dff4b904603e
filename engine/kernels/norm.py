"""RMSNorm with the residual add fused in: one read of x and the residual, one write of each
result (reference: ``rms_norm_ref``): one launch where torch eager runs about nine (add, cast,
square, mean, add eps, rsqrt, multiply, cast, scale). ``bench/kernels.py`` measures it against
torch eager.

One program per row: a Llama hidden size (≤ 16384) fits one block, so the mean of squares is a
single in-register reduction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # Rounded to the activation dtype before normalizing, exactly like ``x + residual`` in torch.
        x = x + tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        tl.store(residual_out_ptr + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(xf * xf, 0) / hidden + eps)
    normed = (xf * inv_rms).to(x.dtype).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor,  # [N, H]
    weight: torch.Tensor,  # [H]
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(normalized, x + residual or None), as ``rms_norm_ref``."""
    rows, hidden = x.shape
    if x.stride(-1) != 1 or (residual is not None and residual.stride(-1) != 1):
        raise ValueError("rms_norm needs rows with a contiguous hidden dimension")
    out = torch.empty(rows, hidden, device=x.device, dtype=torch.promote_types(weight.dtype, x.dtype))
    new_residual = torch.empty_like(x) if residual is not None else None
    if rows == 0:
        return out, new_residual
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(rows,)](
        x, residual if residual is not None else x, weight, out,
        new_residual if new_residual is not None else out,
        x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0),
        new_residual.stride(0) if new_residual is not None else 0,
        hidden, eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=num_warps_for(block),
    )
    return out, new_residual


def num_warps_for(block: int) -> int:
    """About 16 elements per thread: 8 warps for a 4096-wide row."""
    return min(16, max(1, block // 512))
