"""Paged decode attention on the CPU: each request's K and V are read in place from the pool's
pages (no gather, no padded batch, no float32 copy of a bf16 pool), with float32 math throughout.

Two implementations of one contract (``decode_attention_ref``'s), chosen once at start-up
(``choose``):

- **The C kernel** (``decode_attention_native``: ``csrc/cpu_decode.c``, built by ``cpu_native``
  for the model's head dim and query group where a C compiler builds it): per request, each
  query group's q·k scores (the horizontal sums by a tree of shuffles; bf16 by AVX512-BF16 dot
  products where the CPU has them), their exponentials (a vector polynomial), then the
  probabilities times V, each pass a block of keys at a time with every KV head inside a block
  (a block's rows read from memory once), the rows ahead prefetched into L2. With ``threads`` > 1
  the rows are split by length over a thread pool.
- **Numba's** (``decode_attention_numba``, without a compiler): three passes per step and layer:
  ``_scores`` (q·k for every head and position of every request, into a [B, Hq, max_len]
  float32 buffer, -inf past each row's length), torch's softmax over it, and
  ``_weighted_values`` (accumulated per KV head so that a row of V is converted once for its
  query group). bf16 pools are passed as their uint16 bit patterns, widened in registers by
  ``cpu_numba.widen``. With ``threads`` > 1 the per-request loop runs on Numba's threads.

Measured on the 2-core EPYC, one thread, SmolLM2's 9 / 3 heads, 64 requests of 64–512 tokens, the
calls going round 30 layers' pools so that the KV comes from memory as served (``python -m
bench.cpu_attention``, bench/results/cpu_attention-2026-12-05-blocks.json): the C kernel 1.2
CPU-ms per layer in bf16 and 1.9 in float32, Numba's 4.0 and 5.0, the bucketed gather-and-bmm
kernel before them 8.9 and 8.1.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numba
import numpy as np
import torch

from engine.kernels import cpu_native
from engine.kernels.cpu_numba import as_numpy, jit, widen

if TYPE_CHECKING:
    from engine.layers.backend import DecodeAttentionFn


@numba.njit(inline="always")
def _widen_row(row, out):
    for d in range(out.shape[0]):
        out[d] = widen(row[d])


def _scores(q, k, table, lens, scale, out):  # out [B, Hq, max_len] float32
    batch, num_heads, head_dim = q.shape
    page_size, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    max_len = out.shape[2]
    for b in numba.prange(batch):
        length = lens[b]
        qf = np.empty((group, head_dim), np.float32)
        kf = np.empty(head_dim, np.float32)
        for h in range(num_kv_heads):
            for g in range(group):
                for d in range(head_dim):
                    qf[g, d] = widen(q[b, h * group + g, d]) * scale
            for start in range(0, length, page_size):
                page = table[b, start // page_size]
                for offset in range(min(page_size, length - start)):
                    _widen_row(k[page, offset, h], kf)
                    for g in range(group):
                        acc = np.float32(0.0)
                        for d in range(head_dim):
                            acc += qf[g, d] * kf[d]
                        out[b, h * group + g, start + offset] = acc
            for g in range(group):
                for t in range(length, max_len):
                    out[b, h * group + g, t] = -np.inf


def _weighted_values(probs, v, table, lens, out):  # out [B, Hq, D] float32
    batch, num_heads, head_dim = out.shape
    page_size, num_kv_heads = v.shape[1], v.shape[2]
    group = num_heads // num_kv_heads
    for b in numba.prange(batch):
        length = lens[b]
        acc = np.empty((group, head_dim), np.float32)
        vf = np.empty(head_dim, np.float32)
        for h in range(num_kv_heads):
            acc[:] = 0.0
            for start in range(0, length, page_size):
                page = table[b, start // page_size]
                for offset in range(min(page_size, length - start)):
                    _widen_row(v[page, offset, h], vf)
                    for g in range(group):
                        p = probs[b, h * group + g, start + offset]
                        for d in range(head_dim):
                            acc[g, d] += p * vf[d]
            for g in range(group):
                for d in range(head_dim):
                    out[b, h * group + g, d] = acc[g, d]


# (scores, weighted values), serial and parallel
_SERIAL = (jit(_scores, False), jit(_weighted_values, False))
_PARALLEL = (jit(_scores, True), jit(_weighted_values, True))


def decode_attention_numba(
    q: torch.Tensor,  # [B, Hq, D]
    k_cache: torch.Tensor,  # [P, page_size, Hkv, D]
    v_cache: torch.Tensor,
    page_table: torch.Tensor,  # [B, max_pages] int32
    seq_lens: torch.Tensor,  # [B] int32
    sm_scale: float,
    *,
    plan: int | None = None,  # max(seq_lens): the step's plan (``cpu.plan_attention``), shared by layers
    threads: int = 1,  # > 1: the parallel kernels on that many Numba threads
) -> torch.Tensor:
    """``decode_attention_ref``'s contract (a row of length 0 gives zeros)."""
    batch = q.shape[0]
    if batch == 0:
        return torch.empty_like(q)
    _check_pool(k_cache)
    max_len = int(seq_lens.max()) if plan is None else plan
    if threads > 1:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))  # per calling thread
    scores_fn, values_fn = _PARALLEL if threads > 1 else _SERIAL
    table, lens = page_table.numpy(), seq_lens.numpy()
    scores = torch.empty(batch, q.shape[1], max(max_len, 1), dtype=torch.float32)
    q_np = as_numpy(q.to(k_cache.dtype))
    scores_fn(q_np, as_numpy(k_cache), table, lens, np.float32(sm_scale), scores.numpy())
    probs = torch.softmax(scores, dim=-1)  # a row of length 0 is NaN here and never read
    out = torch.empty(q.shape, dtype=torch.float32)
    values_fn(probs.numpy(), as_numpy(v_cache), table, lens, out.numpy())
    return out if q.dtype == torch.float32 else out.to(q.dtype)


def decode_attention_native(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    *,
    plan: int | None = None,
    threads: int = 1,  # > 1: the rows split by their lengths over that many threads
) -> torch.Tensor:
    """``decode_attention_numba``'s contract, by the C kernel (``cpu_native``, csrc/cpu_decode.c)."""
    batch, num_heads, head_dim = q.shape
    if batch == 0:
        return torch.empty_like(q)
    if not cpu_native.takes_pool(k_cache, v_cache):  # Numba's reads strided pools (or refuses)
        return decode_attention_numba(q, k_cache, v_cache, page_table, seq_lens, sm_scale, plan=plan,
                                      threads=threads)
    num_kv_heads = k_cache.shape[2]
    f32, bf16 = cpu_native.decode_kernels(head_dim, num_heads // num_kv_heads)
    kernel = bf16 if k_cache.dtype == torch.bfloat16 else f32
    max_len = int(seq_lens.max()) if plan is None else plan
    score_stride = -(-max(max_len, 1) // 16) * 16  # the kernel writes scores 16 keys at a time
    table, lens = cpu_native.int32_rows(page_table), cpu_native.int32_rows(seq_lens)
    parts = cpu_native.split_by_cost(lens.numpy(), threads)
    # per thread: an int64 pool row per key, a score row per query head, an accumulator row per query
    # head; each thread's part whole cache lines (its int64 rows aligned, no line shared)
    part = -(-((num_heads + 2) * score_stride + num_heads * head_dim) // 16) * 16
    scratch = torch.empty(len(parts), part, dtype=torch.float32)
    qf = q.float().contiguous()
    out = torch.empty(q.shape, dtype=torch.float32)
    fixed = (qf.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), table.data_ptr(), table.stride(0),
             lens.data_ptr())

    cpu_native.run_parts(parts, lambda i, begin, end: kernel(
        *fixed, begin, end, num_kv_heads, k_cache.shape[1], sm_scale, scratch[i].data_ptr(), score_stride,
        out.data_ptr()), threads)
    return out if q.dtype == torch.float32 else out.to(q.dtype)


def _check_pool(k_cache: torch.Tensor) -> None:
    if k_cache.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"CPU decode attention takes a float32 or bfloat16 pool, not {k_cache.dtype}")


def choose(threads: int) -> DecodeAttentionFn:
    """The decode attention this machine runs: the C kernel where a C compiler is found, else
    Numba's; chosen once, at start-up."""
    fn = decode_attention_native if cpu_native.available() is None else decode_attention_numba
    return functools.partial(fn, threads=threads)


def warm_up(dtype: torch.dtype, shapes: Iterable[tuple[int, int, int]] = (), *, threads: int = 1) -> None:
    """Build (or load from the caches) what decode attention runs for a pool of ``dtype`` and
    the model's attention ``shapes`` ((query heads, KV heads, head dim) per layer): at start-up,
    not in the first decode step. Numba compiles per array layout: q as a contiguous tensor and
    as the strided view of the fused QKV projection that the model passes."""
    if cpu_native.available() is None:
        for num_heads, num_kv_heads, head_dim in set(shapes):
            cpu_native.decode_kernels(head_dim, num_heads // num_kv_heads)
        return
    pool = torch.zeros(2, 1, 1, 8, dtype=dtype)
    table, lens = torch.ones(2, 1, dtype=torch.int32), torch.ones(2, dtype=torch.int32)
    for q in (torch.zeros(2, 1, 8, dtype=dtype), torch.zeros(2, 3, 8, dtype=dtype)[:, :1]):
        decode_attention_numba(q, pool, pool, table, lens, 1.0, threads=threads)
