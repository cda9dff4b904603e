"""The CPU kernels (``--attention-backend cpu``, what ``auto`` picks off CUDA): paged attention
that reads only the KV a request owns, with every per-step decision taken once per step
(``plan_attention``) rather than once per layer.

Decode: ``engine.kernels.cpu_decode``, compiled by Numba, reads each request's pages in place
(the plan is the batch's longest row). Measured against the alternatives in
``python -m bench.cpu_attention`` (bench/results/).

Extend: per request (a step holds few), one gather of its pages and torch's fused CPU
``scaled_dot_product_attention`` (flash, causal; an explicit mask when a cached prefix comes
first).

Both are checked against ``engine.kernels.reference`` (tests/unit/engine/test_cpu_kernels.py);
the backend is assembled in ``engine.layers.backend``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from engine.layers.attention import AttentionMetadata


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

    decode: int | None = None  # the longest decode row (the width of its score buffer)
    extend: tuple[ExtendSeq, ...] | None = None


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
        decode = int(meta.decode_seq_lens.max()) if meta.decode_seq_lens.numel() else 0
    if meta.extend_page_table is not None:
        extend = plan_extend(
            meta.extend_page_table, meta.extend_qo_indptr, meta.extend_prefix_lens, page_size
        )
    return AttentionPlan(decode, extend)


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
