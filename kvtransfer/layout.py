"""The torch side of ``protocol.dataplane.KVLayout``: a worker's layout from its own KV pool,
the pool checked against a layout (its byte sizes: ``KVLayout.page_bytes``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvtransfer.base import LayoutMismatch
from protocol.dataplane import KVLayout


def layout_from_caches(
    k_caches: Sequence[torch.Tensor], *, model: str, backend: str, tp_size: int = 1, tp_rank: int = 0
) -> KVLayout:
    """The layout of a worker's own pool (per-layer ``[pages, page_size, heads, dim]``)."""
    _, page_size, num_kv_heads, head_dim = k_caches[0].shape
    dtype = str(k_caches[0].dtype).removeprefix("torch.")
    return KVLayout(model, len(k_caches), page_size, num_kv_heads, head_dim, dtype, backend, tp_size, tp_rank)


def torch_dtype(layout: KVLayout) -> torch.dtype:
    return getattr(torch, layout.dtype)


def check_peer_layout(ours: KVLayout, theirs: KVLayout) -> None:
    """Raise LayoutMismatch naming the first field on which the peer's layout differs."""
    name = ours.mismatched_field(theirs)
    if name is not None:
        raise LayoutMismatch(name, getattr(ours, name), getattr(theirs, name))


def check_caches(
    layout: KVLayout, k_caches: Sequence[torch.Tensor], v_caches: Sequence[torch.Tensor]
) -> None:
    """Raise LayoutMismatch naming the first field the local KV pool contradicts."""
    for name, caches in (("k", k_caches), ("v", v_caches)):
        if len(caches) != layout.num_layers:
            raise LayoutMismatch("num_layers", layout.num_layers, len(caches), f"{name}-cache list")
        for t in caches:
            got = {"page_size": t.shape[1], "num_kv_heads": t.shape[2], "head_dim": t.shape[3]}
            for key, value in got.items():
                if value != getattr(layout, key):
                    raise LayoutMismatch(key, getattr(layout, key), value, f"{name}-cache")
            if t.dtype != torch_dtype(layout):
                theirs = str(t.dtype).removeprefix("torch.")
                raise LayoutMismatch("dtype", layout.dtype, theirs, f"{name}-cache")
