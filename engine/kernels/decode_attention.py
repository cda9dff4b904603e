"""Decode attention over the paged KV cache: flash-decoding, GQA-aware (reference:
``decode_attention_ref``).

Stage 1 runs one program per (request, KV head, split). The program serves every query head
that shares the KV head, as the rows of one ``tl.dot`` (the group padded to at least 16 rows,
the smallest tensor-core tile): decode is bound by reading K/V, so the padding costs idle
tensor-core slots, not bandwidth, and each K/V tile is read once for the whole group. A split
covers a contiguous, ``BLOCK_N``-aligned share of the request's context with an online
softmax in fp32, and writes its normalised partial output and its log-sum-exp (base 2).
Stage 2 combines the splits of each (request, query head) by their log-sum-exp.

CUDA-graph safety: the grid and every tensor shape depend only on static sizes (batch, heads,
page-table width, SM count), never on ``seq_lens`` values; a split beyond a request's length
does no work, and the combine kernel skips it by recomputing the same split bounds. With one
split, stage 1 writes the final output directly and stage 2 is not launched.

Tokens are gathered one by one through the page table (``page * page_size + pos % page_size``),
so every page size works, including pages smaller than the block.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.kernels.kv_store import check_kv_cache

LOG2E = 1.4426950408889634
MIN_GROUP_ROWS = 16  # smallest M of a tensor-core tl.dot
MAX_SPLITS = 64
MIN_TOKENS_PER_SPLIT = 128  # below this a split's fixed cost outweighs its share of the work
PROGRAMS_PER_SM = 4  # stage-1 programs wanted per SM when the batch alone does not fill the GPU
NOMINAL_SMS_OFF_GPU = 4  # the interpreter on CPU: few programs keep it fast


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    num_splits: int | None = None  # None: choose_num_splits() from static sizes


DEFAULT_DECODE_CONFIG = DecodeConfig()


@triton.jit
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    page_table_ptr,
    seq_lens_ptr,
    o_ptr,
    lse_ptr,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_cache_slot,
    stride_cache_head,
    stride_pt,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    group_size,
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + req)
    tokens_per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, seq_len)

    offs_g = tl.arange(0, BLOCK_H)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < group_size
    mask_d = offs_d < HEAD_DIM
    heads = kv_head * group_size + offs_g
    q = tl.load(
        q_ptr + req * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=mask_g[:, None] & mask_d[None, :],
        other=0.0,
    )

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    page_row = page_table_ptr + req.to(tl.int64) * stride_pt
    head_off = kv_head * stride_cache_head
    for block_start in range(start, end, BLOCK_N):
        pos = block_start + offs_n
        mask_n = pos < end
        page = tl.load(page_row + pos // PAGE_SIZE, mask=mask_n, other=0).to(tl.int64)
        slot = page * PAGE_SIZE + pos % PAGE_SIZE
        kv_offs = slot[:, None] * stride_cache_slot + head_off + offs_d[None, :]
        kv_mask = mask_n[:, None] & mask_d[None, :]

        k = tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
        # "ieee": float32 inputs (the greedy tests) must not drop to TF32; bf16 ignores it
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        scores = tl.where(mask_n[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    o_offs = req * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :]
    o_mask = mask_g[:, None] & mask_d[None, :]
    if NUM_SPLITS == 1:
        # The only split: final output (zeros for an empty request, e.g. CUDA-graph padding).
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        tl.store(o_ptr + o_offs, (acc / l_safe[:, None]).to(o_ptr.dtype.element_ty), mask=o_mask)
    elif start < end:
        tl.store(o_ptr + o_offs, acc / l_i[:, None], mask=o_mask)
        lse = m_i + tl.log2(l_i)
        tl.store(lse_ptr + req * stride_lb + heads * stride_lh + split, lse, mask=mask_g)


@triton.jit
def _decode_combine_kernel(
    partial_ptr,
    lse_ptr,
    seq_lens_ptr,
    o_ptr,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    req = tl.program_id(0)
    head = tl.program_id(1)

    seq_len = tl.load(seq_lens_ptr + req)
    tokens_per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    # The same split bounds as stage 1: a split that started past the end wrote nothing.
    valid = (offs_s < NUM_SPLITS) & (offs_s * tokens_per_split < seq_len)
    mask_d = offs_d < HEAD_DIM

    lse = tl.load(lse_ptr + req * stride_lb + head * stride_lh + offs_s, mask=valid, other=float("-inf"))
    m = tl.maximum(tl.max(lse, 0), -1e30)  # finite even when no split is valid
    w = tl.exp2(lse - m)
    partial = tl.load(
        partial_ptr + req * stride_pb + head * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
        mask=valid[:, None] & mask_d[None, :],
        other=0.0,
    )
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * partial, 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(o_ptr + req * stride_ob + head * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty), mask=mask_d)


def decode_attention(
    q: torch.Tensor,  # [B, Hq, D], one query token per request
    k_cache: torch.Tensor,  # [P, page_size, Hkv, D]
    v_cache: torch.Tensor,
    page_table: torch.Tensor,  # [B, max_pages] int32
    seq_lens: torch.Tensor,  # [B] int32, including the current token
    sm_scale: float,
    *,
    config: DecodeConfig = DEFAULT_DECODE_CONFIG,
) -> torch.Tensor:
    batch, num_heads, head_dim = q.shape
    _, page_size, num_kv_heads, _ = k_cache.shape
    check_kv_cache(k_cache, v_cache, num_kv_heads, head_dim)
    _check_decode_inputs(q, page_table, seq_lens, num_kv_heads)
    out = torch.empty_like(q)
    if batch == 0:
        return out
    group_size = num_heads // num_kv_heads
    num_splits = config.num_splits or choose_num_splits(
        batch, num_kv_heads, page_table.shape[1] * page_size, _num_sms(q.device)
    )
    block_d = triton.next_power_of_2(head_dim)
    if num_splits == 1:
        partial, lse = out.unsqueeze(2), q.new_empty(1, 1, dtype=torch.float32)  # lse unused
    else:
        partial = q.new_empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32)
        lse = q.new_empty(batch, num_heads, num_splits, dtype=torch.float32)

    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, page_table, seq_lens, partial, lse,
        sm_scale * LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(1), k_cache.stride(2),
        page_table.stride(0),
        partial.stride(0), partial.stride(1), partial.stride(2),
        lse.stride(0), lse.stride(1),
        group_size,
        PAGE_SIZE=page_size,
        HEAD_DIM=head_dim,
        NUM_SPLITS=num_splits,
        BLOCK_H=max(MIN_GROUP_ROWS, triton.next_power_of_2(group_size)),
        BLOCK_N=config.block_n,
        BLOCK_D=block_d,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if num_splits > 1:
        _decode_combine_kernel[(batch, num_heads)](
            partial, lse, seq_lens, out,
            partial.stride(0), partial.stride(1), partial.stride(2),
            lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim,
            NUM_SPLITS=num_splits,
            BLOCK_N=config.block_n,
            BLOCK_S=triton.next_power_of_2(num_splits),
            BLOCK_D=block_d,
            num_warps=4,
        )
    return out


def choose_num_splits(batch: int, num_kv_heads: int, max_context: int, num_sms: int) -> int:
    """Splits per (request, KV head), from static sizes only: enough programs to fill the GPU
    when the batch alone does not, but never splits shorter than ``MIN_TOKENS_PER_SPLIT`` of the
    longest possible context. A power of two, so the captured batch sizes share a few compiled
    variants (``NUM_SPLITS`` is a compile-time constant)."""
    wanted = triton.cdiv(PROGRAMS_PER_SM * num_sms, batch * num_kv_heads)
    useful = triton.cdiv(max_context, MIN_TOKENS_PER_SPLIT)
    bound = max(1, min(wanted, useful, MAX_SPLITS))
    return 1 << (bound.bit_length() - 1)


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return NOMINAL_SMS_OFF_GPU


def _check_decode_inputs(
    q: torch.Tensor, page_table: torch.Tensor, seq_lens: torch.Tensor, num_kv_heads: int
) -> None:
    batch, num_heads, _ = q.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not group over {num_kv_heads} KV heads")
    if q.stride(-1) != 1:
        raise ValueError("q needs a contiguous head dimension")
    if page_table.shape[0] < batch or seq_lens.shape[0] < batch:
        raise ValueError(
            f"page_table {tuple(page_table.shape)} / seq_lens {tuple(seq_lens.shape)} "
            f"shorter than batch {batch}"
        )
    if page_table.stride(1) != 1:
        raise ValueError("page_table rows must be contiguous")
