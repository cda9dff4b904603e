"""Paged attention: one interface, several kernel backends, chosen once at start-up.

A step's tokens are packed extend-first: the first ``num_extend_tokens`` rows of q belong to
extend requests (new prompt tokens, ragged), the remaining rows are one token per decode
request. Every layer stores the step's K/V into the pool, then runs extend attention on the
first part and decode attention on the rest. Signatures of the three kernels follow
``engine.kernels.reference``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

StoreKV = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
ExtendAttention = Callable[..., torch.Tensor]
DecodeAttention = Callable[..., torch.Tensor]


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


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    store_kv: StoreKV
    extend_attention: ExtendAttention
    decode_attention: DecodeAttention

    def forward(
        self,
        q: torch.Tensor,  # [T, Hq, D]
        k: torch.Tensor,  # [T, Hkv, D]
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        sm_scale: float,
    ) -> torch.Tensor:
        self.store_kv(k, v, k_cache, v_cache, meta.out_loc)
        if meta.decode_page_table is None:
            return self._extend(q, k_cache, v_cache, meta, sm_scale)
        if meta.extend_page_table is None:
            return self.decode_attention(
                q, k_cache, v_cache, meta.decode_page_table, meta.decode_seq_lens, sm_scale
            )
        n = meta.num_extend_tokens
        out = torch.empty_like(q)
        out[:n] = self._extend(q[:n], k_cache, v_cache, meta, sm_scale)
        out[n:] = self.decode_attention(
            q[n:], k_cache, v_cache, meta.decode_page_table, meta.decode_seq_lens, sm_scale
        )
        return out

    def _extend(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        sm_scale: float,
    ) -> torch.Tensor:
        return self.extend_attention(
            q,
            k_cache,
            v_cache,
            meta.extend_page_table,
            meta.extend_qo_indptr,
            meta.extend_prefix_lens,
            sm_scale,
            max_extend_len=meta.extend_max_new_tokens,
        )


def make_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """``torch``: the plain-torch references; ``triton``: our Triton kernels; ``auto``: Triton
    on CUDA, torch elsewhere."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        from engine.kernels.reference import decode_attention_ref, extend_attention_ref, store_kv_ref

        return AttentionBackend("torch", store_kv_ref, extend_attention_ref, decode_attention_ref)
    if name == "triton":
        from engine.kernels.triton_backend import TRITON_FUNCTIONS

        store_kv, extend_attention, decode_attention = TRITON_FUNCTIONS
        return AttentionBackend("triton", store_kv, extend_attention, decode_attention)
    raise ValueError(f"unknown attention backend {name!r} (expected auto, torch or triton)")


@dataclass
class ForwardContext:
    """What every attention layer needs in one step: the kernels, the pool, the metadata."""

    backend: AttentionBackend
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

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] → [T, Hq * D]."""
        out = ctx.backend.forward(
            q, k, v, ctx.k_caches[self.layer_id], ctx.v_caches[self.layer_id], ctx.meta, self.sm_scale
        )
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)
