"""Paged decode attention on the CPU, the candidates side by side on one layer's worth of work:
the padded reference (``decode_attention_ref``), the bucketed CPU kernel
(``engine.kernels.cpu``, what serves), and torch's fused CPU SDPA over each request's gathered
pages (per request, and per padded bucket with a mask). CPU time per layer (process time, one
thread unless ``--threads``), and each one's largest difference from the reference.

    python -m bench.cpu_attention                       # SmolLM2's shape: 9 / 3 heads, 64 requests
    python -m bench.cpu_attention --tiny                # a smoke run; its numbers mean nothing
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.cpu_env import tune_malloc
from engine.kernels import cpu
from engine.kernels.reference import decode_attention_ref


def make_inputs(batch: int, lengths: tuple[int, int], heads: tuple[int, int], head_dim: int, page_size: int,
                dtype: torch.dtype, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    seq_lens = torch.randint(lengths[0], lengths[1] + 1, (batch,), generator=gen, dtype=torch.int32)
    width = -(-lengths[1] // page_size)
    num_pages = batch * width + 1
    shape = (num_pages, page_size, heads[1], head_dim)
    table = (torch.randperm(num_pages - 1, generator=gen) + 1).int().view(batch, width)
    return {
        "q": torch.randn(batch, heads[0], head_dim, generator=gen).to(dtype),
        "k_cache": torch.randn(shape, generator=gen).to(dtype),
        "v_cache": torch.randn(shape, generator=gen).to(dtype),
        "page_table": table,
        "seq_lens": seq_lens,
        "sm_scale": head_dim**-0.5,
    }


def sdpa_per_request(q, k_cache, v_cache, page_table, seq_lens, sm_scale):
    page_size, kv_heads, head_dim = k_cache.shape[1:]
    out = torch.empty_like(q)
    for i, length in enumerate(seq_lens.tolist()):
        pages = page_table[i, : -(-length // page_size)].long()
        k = k_cache.index_select(0, pages).view(-1, kv_heads, head_dim)[:length].transpose(0, 1)
        v = v_cache.index_select(0, pages).view(-1, kv_heads, head_dim)[:length].transpose(0, 1)
        out[i] = F.scaled_dot_product_attention(q[i, :, None], k, v, scale=sm_scale, enable_gqa=True)[:, 0]
    return out


def sdpa_per_bucket(q, k_cache, v_cache, page_table, seq_lens, sm_scale):
    """The CPU kernel's buckets, each through fused SDPA with a padding mask."""
    page_size, kv_heads, head_dim = k_cache.shape[1:]
    plan = cpu.plan_decode(page_table, seq_lens, page_size)
    outs = []
    for b in plan.buckets:
        n = b.rows.numel()
        k = k_cache.index_select(0, b.pages).view(n, -1, kv_heads, head_dim).transpose(1, 2)
        v = v_cache.index_select(0, b.pages).view(n, -1, kv_heads, head_dim).transpose(1, 2)
        mask = None if b.beyond is None else ~b.beyond[:, :, None, :]
        attended = F.scaled_dot_product_attention(
            q[b.rows][:, :, None], k, v, attn_mask=mask, scale=sm_scale, enable_gqa=True
        )
        outs.append(attended[:, :, 0])
    out = torch.cat(outs)
    return out if plan.unsort is None else out[plan.unsort]


CANDIDATES: dict[str, Callable[..., torch.Tensor]] = {
    "reference (padded batch)": decode_attention_ref,
    "cpu kernel (buckets, bmm)": cpu.decode_attention_cpu,
    "fused SDPA per request": sdpa_per_request,
    "fused SDPA per bucket (masked)": sdpa_per_bucket,
}


def cpu_ms(fn: Callable[[], torch.Tensor], reps: int) -> float:
    fn()
    start = time.process_time()
    for _ in range(reps):
        fn()
    return (time.process_time() - start) / reps * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_attention", description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tune_malloc()
    batch, lengths, reps = (4, (3, 40), 1) if args.tiny else (64, (64, 512), args.reps)
    rows = []
    for dtype in args.dtype:
        inputs = make_inputs(batch, lengths, (9, 3), 64, 16, getattr(torch, dtype))
        ref = decode_attention_ref(**inputs).float()
        for name, fn in CANDIDATES.items():
            ms = cpu_ms(lambda fn=fn, inputs=inputs: fn(**inputs), reps)
            err = (fn(**inputs).float() - ref).abs().max().item()
            rows.append({"dtype": dtype, "candidate": name, "cpu_ms_per_layer": ms, "max_abs_diff": err})
            print(f"{dtype:<9} {name:<32} {ms:8.2f} CPU-ms/layer   max |diff| {err:.1e}")
    if args.output:
        args.output.write_text(json.dumps({"batch": batch, "lengths": lengths, "threads": args.threads,
                                           "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
