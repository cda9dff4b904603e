"""The CPU kernels (``--attention-backend cpu``, what ``auto`` picks off CUDA): paged attention
that reads only the KV a request owns, with every per-step decision taken once per step
(``plan_attention``) rather than once per layer.

Decode: the batch is sorted by length and cut into a few *buckets* of similar length
(``plan_decode``); per layer and bucket, one gather of the bucket's pages (the natural
``[pages, page_size, Hkv * D]`` rows, no transpose) and, per KV head, two batched matmuls over
strided views of it with a masked softmax between them, all in float32 (a bf16 pool's pages
are upcast once per bucket). Padding is bounded by the bucketing (a bucket's rows are within a
few pages of each other), not by the longest request of the batch, and nothing is permuted.
Measured on a 2-core EPYC (one thread, 64 requests of 64–512 tokens, SmolLM2's 9 query / 3 KV
heads; ``python -m bench.cpu_attention``, bench/results/cpu-2026-12-05.md): 6.9 CPU-ms per layer
against the padded reference's 25.8, torch's fused CPU SDPA per request 13.0 (its per-call
cost), fused SDPA per padded bucket 7.0 in float32 but 23.9 in bf16 (its masked bf16 path).

Extend: per request (a step holds few), one gather of its pages and torch's fused CPU
``scaled_dot_product_attention`` (flash, causal; an explicit mask when a cached prefix comes
first).

Both are checked against ``engine.kernels.reference`` (tests/unit/engine/test_cpu_kernels.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from engine.layers.attention import AttentionMetadata

# Cost of one more bucket, in padded tokens: the fixed cost of a bucket's ~10 ops per KV head
# against the per-token cost of gathering and attending over one padded token (measured).
BUCKET_COST_TOKENS = 256


@dataclass(frozen=True)
class DecodeBucket:
    """Rows of the batch attended together, padded to the bucket's longest row."""

    rows: torch.Tensor  # [n] int64, rows of the batch
    pages: torch.Tensor  # [n * num_pages] int64, each row's first num_pages pages (0 where unused)
    num_pages: int
    beyond: torch.Tensor | None  # [n, 1, num_pages * page_size] bool: past the row's length


@dataclass(frozen=True)
class DecodePlan:
    """A decode step's buckets and how their outputs go back to batch order."""

    buckets: tuple[DecodeBucket, ...]
    unsort: torch.Tensor | None  # [B] int64: rows of the bucket outputs, concatenated, in batch order
    has_empty: bool  # some row has length 0 (it attends to nothing: output zeros)


@dataclass(frozen=True)
class ExtendSeq:
    """One request of an extend step: its rows of q, its pages, its causal mask."""

    lo: int
    hi: int
    seq_len: int
    pages: torch.Tensor  # int64
    mask: torch.Tensor | None  # [hi - lo, seq_len] bool (True: attend); None: plain causal


@dataclass(frozen=True)
class AttentionPlan:
    """What ``plan_attention`` computed once for every layer of a step."""

    decode: DecodePlan | None = None
    extend: tuple[ExtendSeq, ...] | None = None


def bucket_bounds(lengths: list[int], page_size: int, bucket_cost: int = BUCKET_COST_TOKENS) -> list[int]:
    """Cut ``lengths`` (sorted ascending) into contiguous buckets: returns each bucket's end.

    Greedy: a row joins the current bucket unless the padding it adds (every row padded to its
    page-rounded length) costs more than opening a new bucket."""
    ends: list[int] = []
    start, top = 0, 0
    for i, length in enumerate(lengths):
        padded = -(-length // page_size) * page_size
        count = i - start
        if count and count * (padded - top) > bucket_cost:
            ends.append(i)
            start = i
        top = padded
    if lengths:
        ends.append(len(lengths))
    return ends


def plan_decode(page_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int) -> DecodePlan:
    lengths = seq_lens.tolist()
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    sorted_lengths = [lengths[i] for i in order]
    buckets = []
    start = 0
    for end in bucket_bounds(sorted_lengths, page_size):
        rows = order[start:end]
        buckets.append(_bucket(page_table, rows, sorted_lengths[start:end], page_size))
        start = end
    identity = order == list(range(len(order)))
    unsort = None if identity else torch.tensor(order).argsort()
    return DecodePlan(tuple(buckets), unsort, has_empty=bool(lengths) and min(lengths) == 0)


def _bucket(page_table: torch.Tensor, rows: list[int], lengths: list[int], page_size: int) -> DecodeBucket:
    num_pages = max(1, -(-lengths[-1] // page_size))
    rows_t = torch.tensor(rows, dtype=torch.int64)
    lens_t = torch.tensor(lengths, dtype=torch.int64)
    used = torch.arange(num_pages)[None, :] * page_size < lens_t[:, None]
    pages = torch.where(used, page_table[rows_t, :num_pages].long(), 0).reshape(-1)
    padded_len = num_pages * page_size
    beyond = None
    if any(length != padded_len for length in lengths):
        beyond = (torch.arange(padded_len)[None, :] >= lens_t[:, None]).unsqueeze(1)
    return DecodeBucket(rows_t, pages, num_pages, beyond)


def plan_extend(
    page_table: torch.Tensor, qo_indptr: torch.Tensor, prefix_lens: torch.Tensor, page_size: int
) -> tuple[ExtendSeq, ...]:
    starts, prefixes = qo_indptr.tolist(), prefix_lens.tolist()
    seqs = []
    for i, prefix in enumerate(prefixes):
        lo, hi = starts[i], starts[i + 1]
        if hi == lo:
            continue
        seq_len = prefix + hi - lo
        pages = page_table[i, : -(-seq_len // page_size)].long()
        mask = None
        if prefix:
            q_pos = torch.arange(prefix, seq_len)
            mask = torch.arange(seq_len)[None, :] <= q_pos[:, None]
        seqs.append(ExtendSeq(lo, hi, seq_len, pages, mask))
    return tuple(seqs)


def plan_attention(meta: AttentionMetadata, page_size: int) -> AttentionPlan:
    """The per-step part of decode and extend attention, shared by every layer."""
    decode = extend = None
    if meta.decode_page_table is not None:
        decode = plan_decode(meta.decode_page_table, meta.decode_seq_lens, page_size)
    if meta.extend_page_table is not None:
        extend = plan_extend(
            meta.extend_page_table, meta.extend_qo_indptr, meta.extend_prefix_lens, page_size
        )
    return AttentionPlan(decode, extend)


def decode_attention_cpu(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [P, page_size, Hkv, D]
    v_cache: torch.Tensor,
    page_table: torch.Tensor,  # [B, max_pages] int32
    seq_lens: torch.Tensor,  # [B] int32
    sm_scale: float,
    *,
    plan: DecodePlan | None = None,
) -> torch.Tensor:
    """``decode_attention_ref``'s contract, bucket by bucket (see the module docstring)."""
    if q.shape[0] == 0:
        return torch.empty_like(q)
    if plan is None:
        plan = plan_decode(page_table, seq_lens, k_cache.shape[1])
    outs = [_decode_bucket(q, k_cache, v_cache, b, sm_scale, plan.has_empty) for b in plan.buckets]
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    if plan.unsort is not None:
        out = out.index_select(0, plan.unsort)
    return out.view_as(q)


def _decode_bucket(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, bucket: DecodeBucket, sm_scale: float,
    has_empty: bool,
) -> torch.Tensor:
    """[n, Hq, D] for the bucket's rows, computed in float32 (a bf16 pool's gathered pages are
    upcast once per bucket: measured 3% more time than bf16 matmuls, for 16× less error)."""
    n = bucket.rows.numel()
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    k = k_cache.index_select(0, bucket.pages).view(n, -1, num_kv_heads * head_dim).float()  # [n, L, Hkv*D]
    v = v_cache.index_select(0, bucket.pages).view(n, -1, num_kv_heads * head_dim).float()
    qb = q.index_select(0, bucket.rows).view(n, num_kv_heads, group, head_dim).float()
    out = torch.empty(n, num_kv_heads, group, head_dim, dtype=q.dtype)
    for h in range(num_kv_heads):
        cols = slice(h * head_dim, (h + 1) * head_dim)
        scores = torch.bmm(qb[:, h], k[:, :, cols].transpose(1, 2)).mul_(sm_scale)  # [n, G, L]
        if bucket.beyond is not None:
            scores.masked_fill_(bucket.beyond, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if has_empty:
            probs = probs.nan_to_num_(0.0)  # a length-0 row attends to nothing: zeros
        out[:, h] = torch.bmm(probs, v[:, :, cols])
    return out.view(n, num_heads, head_dim)


def extend_attention_cpu(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,  # [R, max_pages] int32
    qo_indptr: torch.Tensor,  # [R + 1] int32
    prefix_lens: torch.Tensor,  # [R] int32
    sm_scale: float,
    *,
    max_extend_len: int | None = None,  # the Triton kernel's launch bound; unused here
    plan: tuple[ExtendSeq, ...] | None = None,
) -> torch.Tensor:
    """``extend_attention_ref``'s contract through torch's fused CPU attention."""
    if plan is None:
        plan = plan_extend(page_table, qo_indptr, prefix_lens, k_cache.shape[1])
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    out = torch.empty_like(q)
    for seq in plan:
        k = k_cache.index_select(0, seq.pages).view(-1, num_kv_heads, head_dim)[: seq.seq_len]
        v = v_cache.index_select(0, seq.pages).view(-1, num_kv_heads, head_dim)[: seq.seq_len]
        # 4-D inputs: torch's flash CPU kernel takes them (GQA included); 3-D ones fall back to
        # the unfused math path (measured 3× slower at 512 tokens)
        out[seq.lo : seq.hi] = F.scaled_dot_product_attention(
            q[seq.lo : seq.hi].transpose(0, 1).to(k.dtype)[None],
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            attn_mask=seq.mask,
            is_causal=seq.mask is None,
            scale=sm_scale,
            enable_gqa=True,
        )[0].transpose(0, 1)
    return out


def rms_norm_cpu(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``rms_norm_ref``'s contract. In float32 torch's fused ``rms_norm`` (one kernel, bit-equal
    to the reference: measured); in other dtypes the reference's Hugging Face rounding
    (normalize in float32, round, then scale), which the fused kernel does not follow."""
    if residual is not None:
        x = x + residual
        residual = x
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps), residual
    xf = x.float()
    normed = xf.mul(torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))).to(x.dtype)
    return weight * normed, residual


def silu_and_mul_cpu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` with one temporary: silu into a fresh tensor, then the product in place."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)
