"""The per-token kernels of ``bench/kernels.py``, each against torch eager doing the same work on
the same inputs: the rotary + KV store, the fused RMSNorm(+residual) and SiLU-and-mul. All are
memory-bound: scored by effective bandwidth (bytes read and written / time)."""

from __future__ import annotations

import torch

from bench.kernels_base import Case, KernelShapes


def rotary_store_kv_case(shapes: KernelShapes, tokens: int, device: str) -> Case:
    """One layer's rotary + KV store for ``tokens`` tokens (decode: one per request; prefill:
    a long prompt), scattered over a shuffled page pool; the peer is the reference's torch ops
    (split, two rotaries, indexed stores)."""
    from engine.kernels.kv_store import rotary_store_kv
    from engine.kernels.reference import rotary_store_kv_ref

    hq, hkv, d, ps = shapes.num_heads, shapes.num_kv_heads, shapes.head_dim, shapes.page_size
    num_pages = 1 + 2 * -(-tokens // ps)
    k_cache = torch.zeros(num_pages, ps, hkv, d, device=device, dtype=shapes.dtype)
    v_cache = torch.zeros_like(k_cache)
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, device=device, dtype=shapes.dtype)
    positions = torch.randint(0, shapes.max_positions, (tokens,), device=device)
    freqs = torch.rand(shapes.max_positions, d // 2, device=device) * shapes.max_positions  # any angles
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    out_loc = torch.randperm((num_pages - 1) * ps, device=device)[:tokens] + ps
    args = (qkv, positions, cos_sin, k_cache, v_cache, out_loc, hq)
    index_bytes = positions.element_size() + out_loc.element_size()
    moved = qkv.numel() * qkv.element_size()  # q, k, v read; q, k, v written
    return Case(
        "rotary_store_kv", f"T={tokens}",
        ours=lambda: rotary_store_kv(*args),
        peers={"torch": lambda: rotary_store_kv_ref(*args)},
        metric="GB/s", work=2 * moved + tokens * (d * cos_sin.element_size() + index_bytes),
        reference=lambda: rotary_store_kv_ref(*args),
    )


def rms_norm_case(shapes: KernelShapes, rows: int, device: str) -> Case:
    from engine.kernels.norm import rms_norm
    from engine.kernels.reference import rms_norm_ref

    x = torch.randn(rows, shapes.hidden, device=device, dtype=shapes.dtype)
    residual = torch.randn_like(x)
    weight = torch.randn(shapes.hidden, device=device, dtype=shapes.dtype)
    return Case(
        "rms_norm+residual", f"N={rows} H={shapes.hidden}",
        ours=lambda: rms_norm(x, weight, 1e-6, residual)[0],
        peers={"torch": lambda: rms_norm_ref(x, weight, 1e-6, residual)},
        metric="GB/s", work=4 * x.numel() * x.element_size(),  # x, residual in; out, residual out
        reference=lambda: rms_norm_ref(x, weight, 1e-6, residual)[0],
    )


def silu_and_mul_case(shapes: KernelShapes, rows: int, device: str) -> Case:
    from engine.kernels.activation import silu_and_mul
    from engine.kernels.reference import silu_and_mul_ref

    gate_up = torch.randn(rows, 2 * shapes.intermediate, device=device, dtype=shapes.dtype)
    return Case(
        "silu_and_mul", f"N={rows} I={shapes.intermediate}",
        ours=lambda: silu_and_mul(gate_up),
        peers={"torch": lambda: silu_and_mul_ref(gate_up)},
        metric="GB/s", work=1.5 * gate_up.numel() * gate_up.element_size(),
        reference=lambda: silu_and_mul_ref(gate_up),
    )
