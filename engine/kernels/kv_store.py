"""Rotary embedding fused into the KV store (reference: ``rotary_store_kv_ref``): one launch per
layer and step reads the qkv projection's output, rotates q and k (neox / ``rotate_half`` layout,
float32 math), writes the rotated q to a new contiguous ``[T, Hq, D]`` tensor and the rotated k
and the unrotated v into their KV-cache slots (flat index ``page * page_size + offset``).

Why one program per token, holding all of its heads: the token's position and its cos/sin row
are loaded once and broadcast over every q and k head, and the launch is the same single kernel
for decode (T = 1: one program moves ~24 KiB at Llama-3-8B's shape, latency- not
bandwidth-bound, where splitting heads over programs would buy nothing but more launch work)
and for prefill (T in the thousands: one program per token already fills the GPU). The grid
depends only on T, so the launch is CUDA-graph capturable.

Head counts and the head dimension are compile-time constants (fixed per model): every offset
but the token's and the slot's folds into the kernel. Floating-point contraction (mul + add →
fma) is disabled so the rotation rounds exactly as the reference's separate float32 multiplies
and adds do; it costs nothing in a kernel bound by memory traffic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(x_ptr, offs, mask, cos, sin, HALF: tl.constexpr):
    """Rotated halves (float32) of the heads at ``x_ptr + offs`` (first halves; the second
    halves sit ``HALF`` further on)."""
    x1 = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    x2 = tl.load(x_ptr + offs + HALF, mask=mask).to(tl.float32)
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


@triton.jit
def _rotary_store_kv_kernel(
    qkv_ptr,
    positions_ptr,
    cos_sin_ptr,
    q_out_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_loc_ptr,
    stride_qkv_t,
    stride_cos_sin,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HKV: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    slot = tl.load(out_loc_ptr + token).to(tl.int64)

    offs_d = tl.arange(0, BLOCK_HALF)
    mask_d = offs_d < HALF
    cos = tl.load(cos_sin_ptr + pos * stride_cos_sin + offs_d, mask=mask_d).to(tl.float32)[None, :]
    sin = tl.load(cos_sin_ptr + pos * stride_cos_sin + HALF + offs_d, mask=mask_d).to(tl.float32)[None, :]
    row_ptr = qkv_ptr + token * stride_qkv_t
    out_ty = qkv_ptr.dtype.element_ty
    cache_ty = k_cache_ptr.dtype.element_ty

    offs_hq = tl.arange(0, BLOCK_HQ)
    q_offs = offs_hq[:, None] * HEAD_DIM + offs_d[None, :]
    q_mask = (offs_hq[:, None] < NUM_HEADS) & mask_d[None, :]
    q1, q2 = _rotate_heads(row_ptr, q_offs, q_mask, cos, sin, HALF)
    q_row_ptr = q_out_ptr + token * (NUM_HEADS * HEAD_DIM)
    tl.store(q_row_ptr + q_offs, q1.to(out_ty), mask=q_mask)
    tl.store(q_row_ptr + q_offs + HALF, q2.to(out_ty), mask=q_mask)

    # The caches are contiguous [P, page_size, Hkv, D] (check_kv_cache): a slot is Hkv * D apart.
    offs_hkv = tl.arange(0, BLOCK_HKV)
    kv_offs = offs_hkv[:, None] * HEAD_DIM + offs_d[None, :]
    kv_mask = (offs_hkv[:, None] < NUM_KV_HEADS) & mask_d[None, :]
    slot_offs = slot * (NUM_KV_HEADS * HEAD_DIM) + kv_offs
    k1, k2 = _rotate_heads(row_ptr + NUM_HEADS * HEAD_DIM, kv_offs, kv_mask, cos, sin, HALF)
    # Rounded to qkv's dtype first, then to the cache's, as the reference does.
    tl.store(k_cache_ptr + slot_offs, k1.to(out_ty).to(cache_ty), mask=kv_mask)
    tl.store(k_cache_ptr + slot_offs + HALF, k2.to(out_ty).to(cache_ty), mask=kv_mask)

    v_ptr = row_ptr + (NUM_HEADS + NUM_KV_HEADS) * HEAD_DIM
    v1 = tl.load(v_ptr + kv_offs, mask=kv_mask)
    v2 = tl.load(v_ptr + kv_offs + HALF, mask=kv_mask)
    tl.store(v_cache_ptr + slot_offs, v1.to(cache_ty), mask=kv_mask)
    tl.store(v_cache_ptr + slot_offs + HALF, v2.to(cache_ty), mask=kv_mask)


def rotary_store_kv(
    qkv: torch.Tensor,  # [T, (Hq + 2 * Hkv) * D], any row stride, contiguous columns
    positions: torch.Tensor,  # [T] int64 or int32
    cos_sin: torch.Tensor,  # [max_positions, D] float32: cos of the D/2 frequencies, then their sin
    k_cache: torch.Tensor,  # [P, page_size, Hkv, D]
    v_cache: torch.Tensor,
    out_loc: torch.Tensor,  # [T] int64 or int32, flat token slots
    num_heads: int,
) -> torch.Tensor:
    """Rotate q and k, store k and v into their slots; return the rotated q, ``[T, Hq, D]``.
    Shape checks only: no device sync, safe under CUDA-graph capture."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    check_kv_cache(k_cache, v_cache, num_kv_heads, head_dim)
    _check_rotary_inputs(qkv, positions, cos_sin, out_loc, num_heads, num_kv_heads, head_dim)
    num_tokens = qkv.shape[0]
    q = torch.empty(num_tokens, num_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    if num_tokens == 0:
        return q
    _rotary_store_kv_kernel[(num_tokens,)](
        qkv, positions, cos_sin, q, k_cache, v_cache, out_loc,
        qkv.stride(0), cos_sin.stride(0),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_HQ=triton.next_power_of_2(num_heads),
        BLOCK_HKV=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
        num_warps=num_warps_for(num_heads, num_kv_heads, head_dim),
        enable_fp_fusion=False,
    )
    return q


def num_warps_for(num_heads: int, num_kv_heads: int, head_dim: int) -> int:
    """About 32 elements of the token's qkv row per thread (Llama-3-8B's 6144: 8 warps), 2 to 8."""
    elements = triton.next_power_of_2((num_heads + 2 * num_kv_heads) * head_dim)
    return min(8, max(2, elements // 1024))


def _check_rotary_inputs(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    out_loc: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
) -> None:
    width = (num_heads + 2 * num_kv_heads) * head_dim
    if qkv.dim() != 2 or qkv.shape[1] != width or (qkv.shape[0] > 0 and qkv.stride(1) != 1):
        raise ValueError(f"qkv must be [T, {width}] with contiguous columns, got {tuple(qkv.shape)}")
    if head_dim % 2:
        raise ValueError(f"rotary needs an even head_dim, got {head_dim}")
    if cos_sin.dim() != 2 or cos_sin.shape[1] != head_dim or cos_sin.stride(1) != 1:
        raise ValueError(f"cos_sin must be [max_positions, {head_dim}], got {tuple(cos_sin.shape)}")
    for name, index in (("positions", positions), ("out_loc", out_loc)):
        if tuple(index.shape) != (qkv.shape[0],) or (qkv.shape[0] > 1 and index.stride(0) != 1):
            raise ValueError(f"{name} must be a contiguous [{qkv.shape[0]}], got {tuple(index.shape)}")


def check_kv_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, num_kv_heads: int, head_dim: int) -> None:
    """Both caches share one contiguous ``[P, page_size, Hkv, D]`` layout, so kernels take one set of
    strides for both. Shape checks only: no device sync, safe under CUDA-graph capture."""
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    if tuple(k_cache.shape[2:]) != (num_kv_heads, head_dim) or not k_cache.is_contiguous():
        raise ValueError(
            f"cache must be contiguous [P, page_size, {num_kv_heads}, {head_dim}], got {tuple(k_cache.shape)}"
        )
