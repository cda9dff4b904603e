"""Paged attention over the KV pool, with the kernels of the step's ``KernelBackend``.

A step's tokens are packed extend-first: the first ``num_extend_tokens`` rows of q belong to
extend requests (new prompt tokens, ragged), the remaining rows are one token per decode
request. Every layer rotates q and k and stores the step's K/V into the pool (one fused
kernel), then runs extend attention on the first part and decode attention on the rest.
Signatures of the kernels follow ``engine.kernels.reference``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.layers.backend import KernelBackend


@dataclass
class AttentionMetadata:
    """Per-step inputs of attention, built once per step by the runner (all on the device).

    ``extend_*`` are None when the step has no extend part, ``decode_*`` when it has no decode
    part. ``out_loc`` holds the flat KV slot (``page * page_size + offset``) of every token.
    """

    num_extend_tokens: int
    out_loc: torch.Tensor  # [T] int64
    extend_page_table: torch.Tensor | None = None  # [R, max_pages] int32
    extend_qo_indptr: torch.Tensor | None = None  # [R + 1] int32
    extend_prefix_lens: torch.Tensor | None = None  # [R] int32
    extend_max_new_tokens: int | None = None  # longest run of new tokens: bounds the kernel's grid
    decode_page_table: torch.Tensor | None = None  # [B, max_pages] int32
    decode_seq_lens: torch.Tensor | None = None  # [B] int32, including the current token
    plan: object | None = None  # KernelBackend.plan_attention's, when the backend has one


def paged_attention(
    kernels: KernelBackend,
    q: torch.Tensor,  # [T, Hq, D], extend rows first
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    sm_scale: float,
) -> torch.Tensor:
    """Extend attention on the step's first ``num_extend_tokens`` rows, decode attention on the
    rest (the step's K/V are already in the cache)."""
    if meta.decode_page_table is None:
        return _extend(kernels, q, k_cache, v_cache, meta, sm_scale)
    if meta.extend_page_table is None:
        return _decode(kernels, q, k_cache, v_cache, meta, sm_scale)
    n = meta.num_extend_tokens
    out = torch.empty_like(q)
    out[:n] = _extend(kernels, q[:n], k_cache, v_cache, meta, sm_scale)
    out[n:] = _decode(kernels, q[n:], k_cache, v_cache, meta, sm_scale)
    return out


def _decode(
    kernels: KernelBackend,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    sm_scale: float,
) -> torch.Tensor:
    plan = {} if meta.plan is None else {"plan": meta.plan.decode}
    return kernels.decode_attention(
        q, k_cache, v_cache, meta.decode_page_table, meta.decode_seq_lens, sm_scale, **plan
    )


def _extend(
    kernels: KernelBackend,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    sm_scale: float,
) -> torch.Tensor:
    return kernels.extend_attention(
        q,
        k_cache,
        v_cache,
        meta.extend_page_table,
        meta.extend_qo_indptr,
        meta.extend_prefix_lens,
        sm_scale,
        max_extend_len=meta.extend_max_new_tokens,
        **({} if meta.plan is None else {"plan": meta.plan.extend}),
    )


@dataclass
class ForwardContext:
    """What every layer needs in one step: the kernels, the pool, the attention metadata."""

    kernels: KernelBackend
    k_caches: list[torch.Tensor]  # one [P, page_size, Hkv, D] per layer
    v_caches: list[torch.Tensor]
    meta: AttentionMetadata


class PagedAttention(nn.Module):
    """The attention of one layer over the paged KV pool (no parameters)."""

    def __init__(self, layer_id: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.sm_scale = head_dim**-0.5

    def forward(
        self, qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        """qkv [T, (Hq + 2 * Hkv) * D] → [T, Hq * D]: rotary on q and k, K/V into the pool,
        then attention over the pool."""
        k_cache, v_cache = ctx.k_caches[self.layer_id], ctx.v_caches[self.layer_id]
        q = ctx.kernels.rotary_store_kv(
            qkv, positions, cos_sin, k_cache, v_cache, ctx.meta.out_loc, self.num_heads
        )
        out = paged_attention(ctx.kernels, q, k_cache, v_cache, ctx.meta, self.sm_scale)
        return out.reshape(qkv.shape[0], self.num_heads * self.head_dim)


def attention_shapes(model: nn.Module) -> set[tuple[int, int, int]]:
    """(query heads, KV heads, head dim) of the model's attention layers, on this rank."""
    layers = (m for m in model.modules() if isinstance(m, PagedAttention))
    return {(m.num_heads, m.num_kv_heads, m.head_dim) for m in layers}
