"""Paged attention on the CPU, the candidates side by side on one layer's worth of work.

Decode: the padded reference (``decode_attention_ref``), the C kernel that serves and the Numba
one that serves without a C compiler (``engine.kernels.cpu_decode``), the bucketed gather-and-bmm
kernel before them, and torch's fused CPU SDPA over each request's gathered pages (per request,
and per padded bucket with a mask). Each call goes to the next of ``--layers`` pools (SmolLM2's
30 by default) as a step's layers do, so that the KV comes from memory as served, not from a
cache that one layer's pool fits.
Extend (``--extend``): prompts of 128, 256 and 512 tokens and a 256-token chunk after a
256-token prefix, by the C kernel that serves (``engine.kernels.cpu.extend_attention_native``),
the blocked ``bmm`` one that serves without a C compiler (``causal_attention``) and torch's fused
CPU SDPA (flash; causal, or a mask after a prefix), which served before them.
CPU time per layer (process time, one thread unless ``--threads``), and each one's largest
difference from the reference.

    python -m bench.cpu_attention                       # SmolLM2's shape: 9 / 3 heads, 64 requests
    python -m bench.cpu_attention --extend              # the extend candidates too
    python -m bench.cpu_attention --tiny                # a smoke run; its numbers mean nothing
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.cpu_env import tune_malloc
from engine.kernels import cpu_native
from engine.kernels.cpu import causal_attention, extend_attention_native
from engine.kernels.cpu_decode import decode_attention_native, decode_attention_numba, warm_up
from engine.kernels.reference import causal_attention_ref, decode_attention_ref


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


BUCKET_COST_TOKENS = 256  # one more bucket's fixed cost, in padded tokens (measured)


@dataclass(frozen=True)
class Bucket:
    """Rows of the batch attended together, padded to the bucket's longest row."""

    rows: torch.Tensor  # [n] int64
    pages: torch.Tensor  # [n * num_pages] int64, each row's first num_pages pages (0 where unused)
    beyond: torch.Tensor | None  # [n, 1, num_pages * page_size] bool: past the row's length


def buckets(
    page_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int
) -> tuple[list[Bucket], torch.Tensor]:
    """The batch sorted by length and cut greedily where padding a row to the bucket's longest
    costs more than a new bucket: (buckets, the permutation that restores batch order)."""
    lengths = seq_lens.tolist()
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    cuts, start, top = [], 0, 0
    for i, row in enumerate(order):
        padded = -(-lengths[row] // page_size) * page_size
        if i > start and (i - start) * (padded - top) > BUCKET_COST_TOKENS:
            cuts.append((start, i))
            start = i
        top = padded
    cuts.append((start, len(order)))
    out = []
    for lo, hi in cuts:
        rows = torch.tensor(order[lo:hi])
        lens = seq_lens[rows].long()
        num_pages = max(1, -(-int(lens.max()) // page_size))
        used = torch.arange(num_pages)[None, :] * page_size < lens[:, None]
        pages = torch.where(used, page_table[rows, :num_pages].long(), 0).reshape(-1)
        beyond = (torch.arange(num_pages * page_size)[None, :] >= lens[:, None]).unsqueeze(1)
        out.append(Bucket(rows, pages, beyond))
    return out, torch.tensor(order).argsort()


def buckets_bmm(q, k_cache, v_cache, page_table, seq_lens, sm_scale):
    """The CPU kernel before Numba: per bucket one gather of its pages, upcast to float32, and
    per KV head two batched matmuls over strided views with a masked softmax between them."""
    page_size, kv_heads, head_dim = k_cache.shape[1:]
    group = q.shape[1] // kv_heads
    outs = []
    parts, unsort = buckets(page_table, seq_lens, page_size)
    for b in parts:
        n = b.rows.numel()
        k = k_cache.index_select(0, b.pages).view(n, -1, kv_heads * head_dim).float()
        v = v_cache.index_select(0, b.pages).view(n, -1, kv_heads * head_dim).float()
        qb = q.index_select(0, b.rows).view(n, kv_heads, group, head_dim).float()
        out = torch.empty(n, kv_heads, group, head_dim, dtype=q.dtype)
        for h in range(kv_heads):
            cols = slice(h * head_dim, (h + 1) * head_dim)
            scores = torch.bmm(qb[:, h], k[:, :, cols].transpose(1, 2)).mul_(sm_scale)
            probs = torch.softmax(scores.masked_fill_(b.beyond, float("-inf")), dim=-1)
            out[:, h] = torch.bmm(probs, v[:, :, cols])
        outs.append(out.view(n, -1, head_dim))
    return torch.cat(outs)[unsort]


def sdpa_per_bucket(q, k_cache, v_cache, page_table, seq_lens, sm_scale):
    """The same buckets, each through fused SDPA with a padding mask."""
    page_size, kv_heads, head_dim = k_cache.shape[1:]
    outs = []
    parts, unsort = buckets(page_table, seq_lens, page_size)
    for b in parts:
        n = b.rows.numel()
        k = k_cache.index_select(0, b.pages).view(n, -1, kv_heads, head_dim).transpose(1, 2)
        v = v_cache.index_select(0, b.pages).view(n, -1, kv_heads, head_dim).transpose(1, 2)
        attended = F.scaled_dot_product_attention(
            q[b.rows][:, :, None], k, v, attn_mask=~b.beyond[:, :, None, :], scale=sm_scale, enable_gqa=True
        )
        outs.append(attended[:, :, 0])
    return torch.cat(outs)[unsort]


def candidates(threads: int) -> dict[str, Callable[..., torch.Tensor]]:
    return {
        "reference (padded batch)": decode_attention_ref,
        **({"C kernel (in place, serves)": partial(decode_attention_native, threads=threads)}
           if cpu_native.available() is None else {}),
        "Numba kernel (in place)": partial(decode_attention_numba, threads=threads),
        "buckets, gather + bmm (before)": buckets_bmm,
        "fused SDPA per request": sdpa_per_request,
        "fused SDPA per bucket (masked)": sdpa_per_bucket,
    }


def sdpa_extend(q, k, v, prefix, sm_scale, out):
    """What served before the blocked kernel: torch's fused CPU attention of the whole request."""
    mask = None
    if prefix:
        mask = torch.arange(k.shape[0])[None, :] <= torch.arange(prefix, k.shape[0])[:, None]
    out.copy_(F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=mask, is_causal=mask is None, scale=sm_scale, enable_gqa=True,
    )[0].transpose(0, 1))


def native_extend(q, k, v, prefix, sm_scale, out):
    """The C kernel that serves, over the request's keys as one page."""
    rows, keys = q.shape[0], k.shape[0]
    out.copy_(extend_attention_native(
        q, k.view(1, keys, *k.shape[1:]), v.view(1, keys, *v.shape[1:]), torch.zeros(1, 1, dtype=torch.int32),
        torch.tensor([0, rows], dtype=torch.int32), torch.tensor([prefix], dtype=torch.int32), sm_scale,
    ))


EXTEND_CANDIDATES = {
    **({"C kernel (serves)": native_extend} if cpu_native.available() is None else {}),
    "blocked bmm (serves without a C compiler)": causal_attention,
    "fused SDPA per request (before)": sdpa_extend,
}
EXTEND_SHAPES = ((128, 0), (256, 0), (512, 0), (256, 256))  # (new rows, cached prefix)
TINY_EXTEND_SHAPES = ((20, 0), (9, 30))


def extend_rows(dtype: str, tiny: bool, reps: int) -> list[dict]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for new, prefix in TINY_EXTEND_SHAPES if tiny else EXTEND_SHAPES:
        q = torch.randn(new, 9, 64, generator=gen).to(getattr(torch, dtype))
        k, v = (torch.randn(prefix + new, 3, 64, generator=gen).to(q.dtype) for _ in range(2))
        ref = causal_attention_ref(q, k, v, 0.125, prefix)
        for name, fn in EXTEND_CANDIDATES.items():
            out = torch.empty_like(q)
            ms = cpu_ms(partial(fn, q, k, v, prefix, 0.125, out), reps)
            err = (out.float() - ref).abs().max().item()
            rows.append({"dtype": dtype, "extend": [new, prefix], "candidate": name,
                         "cpu_ms_per_layer": ms, "max_abs_diff": err})
            print(f"{dtype:<9} extend {new:>3} after {prefix:>3}  {name:<32} {ms:8.2f} CPU-ms/layer   "
                  f"max |diff| {err:.1e}")
    return rows


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
    p.add_argument("--layers", type=int, default=30, help="pools the decode calls go round")
    p.add_argument("--output", type=Path, default=None)
    p.add_argument("--extend", action="store_true", help="the extend (prefill) candidates too")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tune_malloc()
    batch, lengths, reps = (4, (3, 40), 1) if args.tiny else (64, (64, 512), args.reps)
    rows = []
    for dtype in args.dtype:
        warm_up(getattr(torch, dtype), [(9, 3, 64)], threads=args.threads)
        inputs = make_inputs(batch, lengths, (9, 3), 64, 16, getattr(torch, dtype))
        ref = decode_attention_ref(**inputs).float()
        layers = [inputs] + [{**inputs, "k_cache": torch.randn_like(inputs["k_cache"]),
                              "v_cache": torch.randn_like(inputs["v_cache"])} for _ in range(args.layers - 1)]
        for name, fn in candidates(args.threads).items():
            ms = cpu_ms(lambda fn=fn, layers=layers: [fn(**layer) for layer in layers], reps) / len(layers)
            err = (fn(**inputs).float() - ref).abs().max().item()
            rows.append({"dtype": dtype, "candidate": name, "cpu_ms_per_layer": ms, "max_abs_diff": err})
            print(f"{dtype:<9} {name:<32} {ms:8.2f} CPU-ms/layer   max |diff| {err:.1e}")
        if args.extend:
            rows += extend_rows(dtype, args.tiny, reps)
    if args.output:
        args.output.write_text(json.dumps({"batch": batch, "lengths": lengths, "threads": args.threads,
                                           "decode_layers": args.layers, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
