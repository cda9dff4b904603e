"""Write the current step's K and V into their KV-cache slots (reference: ``store_kv_ref``).

One program per token moves that token's K and V rows (all KV heads) in a single launch.
The slot is the flat index ``page * page_size + offset`` into ``[num_pages, page_size, ...]``.
Fusing rotary embedding into this store is a candidate that needs a GPU measurement (owed).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_loc_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cache_slot,
    stride_cache_head,
    num_kv_heads,
    head_dim,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(out_loc_ptr + token).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < num_kv_heads) & (offs_d[None, :] < head_dim)

    k_offs = token.to(tl.int64) * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :]
    v_offs = token.to(tl.int64) * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :]
    cache_offs = slot * stride_cache_slot + offs_h[:, None] * stride_cache_head + offs_d[None, :]

    k = tl.load(k_ptr + k_offs, mask=mask)
    v = tl.load(v_ptr + v_offs, mask=mask)
    tl.store(k_cache_ptr + cache_offs, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + cache_offs, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [P, page_size, Hkv, D]
    v_cache: torch.Tensor,
    out_loc: torch.Tensor,  # [T] int32 or int64, flat token slots
) -> None:
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    check_kv_cache(k_cache, v_cache, num_kv_heads, head_dim)
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("store_kv needs the head dimension of k and v to be contiguous")
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, out_loc,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(1), k_cache.stride(2),
        num_kv_heads, head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4,
    )


def check_kv_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, num_kv_heads: int, head_dim: int) -> None:
    """Both caches share one contiguous ``[P, page_size, Hkv, D]`` layout, so kernels take one set of
    strides for both. Shape checks only: no device sync, safe under CUDA-graph capture."""
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    if tuple(k_cache.shape[2:]) != (num_kv_heads, head_dim) or not k_cache.is_contiguous():
        raise ValueError(
            f"cache must be contiguous [P, page_size, {num_kv_heads}, {head_dim}], got {tuple(k_cache.shape)}"
        )
