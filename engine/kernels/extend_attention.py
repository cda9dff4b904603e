"""Extend (prefill) attention over the paged KV cache, FlashAttention-2 style (reference:
``extend_attention_ref``).

A ragged batch: request ``r`` owns query rows ``qo_indptr[r]:qo_indptr[r+1]`` at sequence
positions ``prefix_lens[r]..``; they attend to the cached prefix and causally to themselves,
with every K/V row (prefix and new) read through the page table. One program handles
``BLOCK_M`` query rows of one request and one query head, with an online softmax in fp32 and
``tl.dot`` for both products. Its KV loop stops at the block's last query position (fully
masked blocks are never loaded) and runs in two phases: blocks entirely at or before the
block's first query position need no causal mask; only the blocks on the diagonal do.

The grid is ``(query blocks, query heads, requests)``. Without a host-side ``max_extend_len``
it bounds the query blocks by the total token count (no device sync); programs past their
request's length exit at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.kernels.kv_store import check_kv_cache

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class ExtendConfig:
    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 2


DEFAULT_EXTEND_CONFIG = ExtendConfig()


@triton.jit
def _attend_kv_block(
    q, m_i, l_i, acc, q_pos, block_start, kv_end,
    k_cache_ptr, v_cache_ptr, page_row, head_off, stride_cache_slot, qk_scale,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    """One online-softmax step over KV positions ``block_start .. block_start + BLOCK_N``."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    pos = block_start + offs_n
    in_range = pos < kv_end
    page = tl.load(page_row + pos // PAGE_SIZE, mask=in_range, other=0).to(tl.int64)
    slot = page * PAGE_SIZE + pos % PAGE_SIZE
    kv_offs = slot[:, None] * stride_cache_slot + head_off + offs_d[None, :]
    kv_mask = in_range[:, None] & (offs_d[None, :] < HEAD_DIM)

    k = tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
    # "ieee": float32 inputs (the greedy tests) must not drop to TF32; bf16 ignores it
    scores = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
    if CAUSAL:
        visible = (pos[None, :] <= q_pos[:, None]) & in_range[None, :]
        scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l_i, acc


@triton.jit
def _extend_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    page_table_ptr,
    qo_indptr_ptr,
    prefix_lens_ptr,
    o_ptr,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cache_slot,
    stride_cache_head,
    stride_pt,
    group_size,
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Last query block first: under the causal mask it has the most KV blocks, so the longest
    # programs start early and the short ones fill the tail.
    q_block = tl.num_programs(0) - 1 - tl.program_id(0)
    head = tl.program_id(1)
    req = tl.program_id(2)

    q_start = tl.load(qo_indptr_ptr + req)
    extend_len = tl.load(qo_indptr_ptr + req + 1) - q_start
    if q_block * BLOCK_M < extend_len:
        prefix = tl.load(prefix_lens_ptr + req)
        offs_m = q_block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < extend_len
        mask_d = offs_d < HEAD_DIM
        rows = (q_start + offs_m).to(tl.int64)
        q = tl.load(
            q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
            mask=mask_m[:, None] & mask_d[None, :],
            other=0.0,
        )

        q_pos = prefix + offs_m
        first_q_pos = prefix + q_block * BLOCK_M
        kv_end = tl.minimum(prefix + extend_len, first_q_pos + BLOCK_M)
        unmasked_end = (first_q_pos + 1) // BLOCK_N * BLOCK_N  # blocks every row sees whole

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        page_row = page_table_ptr + req.to(tl.int64) * stride_pt
        head_off = (head // group_size) * stride_cache_head
        for block_start in range(0, unmasked_end, BLOCK_N):
            m_i, l_i, acc = _attend_kv_block(
                q, m_i, l_i, acc, q_pos, block_start, kv_end,
                k_cache_ptr, v_cache_ptr, page_row, head_off, stride_cache_slot, qk_scale,
                PAGE_SIZE, BLOCK_N, BLOCK_D, HEAD_DIM, False,
            )
        for block_start in range(unmasked_end, kv_end, BLOCK_N):
            m_i, l_i, acc = _attend_kv_block(
                q, m_i, l_i, acc, q_pos, block_start, kv_end,
                k_cache_ptr, v_cache_ptr, page_row, head_off, stride_cache_slot, qk_scale,
                PAGE_SIZE, BLOCK_N, BLOCK_D, HEAD_DIM, True,
            )

        out = acc / l_i[:, None]
        tl.store(
            o_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
            out.to(o_ptr.dtype.element_ty),
            mask=mask_m[:, None] & mask_d[None, :],
        )


def extend_attention(
    q: torch.Tensor,  # [T, Hq, D], new tokens of all requests, packed
    k_cache: torch.Tensor,  # [P, page_size, Hkv, D]
    v_cache: torch.Tensor,
    page_table: torch.Tensor,  # [R, max_pages] int32
    qo_indptr: torch.Tensor,  # [R + 1] int32, offsets of each request's tokens in q
    prefix_lens: torch.Tensor,  # [R] int32, tokens already cached before this step
    sm_scale: float,
    *,
    max_extend_len: int | None = None,  # host-side bound on new tokens per request, if known
    config: ExtendConfig = DEFAULT_EXTEND_CONFIG,
) -> torch.Tensor:
    num_tokens, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    num_requests = prefix_lens.shape[0]
    check_kv_cache(k_cache, v_cache, num_kv_heads, head_dim)
    _check_extend_inputs(q, page_table, qo_indptr, num_requests, num_kv_heads)
    out = torch.empty_like(q)
    if num_tokens == 0 or num_requests == 0:
        return out
    longest = num_tokens if max_extend_len is None else min(max_extend_len, num_tokens)
    grid = (triton.cdiv(longest, config.block_m), num_heads, num_requests)
    _extend_kernel[grid](
        q, k_cache, v_cache, page_table, qo_indptr, prefix_lens, out,
        sm_scale * LOG2E,
        q.stride(0), q.stride(1),
        out.stride(0), out.stride(1),
        k_cache.stride(1), k_cache.stride(2),
        page_table.stride(0),
        num_heads // num_kv_heads,
        PAGE_SIZE=page_size,
        HEAD_DIM=head_dim,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


def _check_extend_inputs(
    q: torch.Tensor,
    page_table: torch.Tensor,
    qo_indptr: torch.Tensor,
    num_requests: int,
    num_kv_heads: int,
) -> None:
    num_heads = q.shape[1]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not group over {num_kv_heads} KV heads")
    if q.stride(-1) != 1:
        raise ValueError("q needs a contiguous head dimension")
    if qo_indptr.shape[0] != num_requests + 1 or page_table.shape[0] < num_requests:
        raise ValueError(
            f"qo_indptr {tuple(qo_indptr.shape)} / page_table {tuple(page_table.shape)} "
            f"do not match {num_requests} requests"
        )
    if page_table.stride(1) != 1:
        raise ValueError("page_table rows must be contiguous")
