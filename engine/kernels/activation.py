"""``silu(gate) * up`` over the fused gate_up projection output in one pass (reference:
``silu_and_mul_ref``): one launch and one read of the projection where torch eager runs two
kernels and writes the intermediate; ``bench/kernels.py`` measures it against torch eager."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(
    gate_up_ptr,
    out_ptr,
    stride_in,
    stride_out,
    inter,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + row * stride_in + inter + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    # Rounded to the activation dtype between the two products, as torch's silu(gate) * up is.
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    out = (silu * up.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_out + cols, out, mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2 * I] -> [..., I]."""
    inter = gate_up.shape[-1] // 2
    flat = gate_up.reshape(-1, 2 * inter)
    if flat.stride(-1) != 1:
        raise ValueError("silu_and_mul needs a contiguous last dimension")
    out = torch.empty(flat.shape[0], inter, device=gate_up.device, dtype=gate_up.dtype)
    if flat.shape[0]:
        _silu_and_mul_kernel[(flat.shape[0], triton.cdiv(inter, BLOCK))](
            flat, out, flat.stride(0), out.stride(0), inter, BLOCK=BLOCK, num_warps=4
        )
    return out.view(*gate_up.shape[:-1], inter)
