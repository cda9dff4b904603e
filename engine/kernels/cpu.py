"""The CPU kernels (``--attention-backend cpu``, what ``auto`` picks off CUDA): paged attention
that reads only the KV a request owns, with every per-step decision taken once per step
(``plan_attention``) rather than once per layer.

Decode: ``engine.kernels.cpu_decode``, our C kernel (Numba's without a C compiler), reads
each request's pages in place (the plan is the batch's longest row).

Extend: ``extend_attention_native``, our C kernel (``csrc/cpu_extend.c``, built by
``cpu_native``): per request and KV head, its keys gathered once from the pages (K transposed),
then tiles of query vectors scored against whole vectors of keys by multiply-adds alone (bf16 by
AVX512-BF16 dot products where the CPU has them), only up to each tile's last row (the causal
tail masked), softmax, and the probabilities times V. Served, it gave bf16 6 % more tokens/s than
the torch path below (no per-request page gather and float copies of K and V); alone, on
contiguous keys, 3.7 against 5.6 CPU-ms for a 512-token bf16 prompt, 4.8 against 5.1 in float32
(``python -m bench.cpu_attention --extend``). Without a C compiler, ``extend_attention_cpu``: per
request one gather of its pages, then ``causal_attention``: blocks of ``EXTEND_BLOCK`` query
rows, each against only the keys it can see, so the masked half of the square is never computed
(torch's flash CPU kernel computes it below 512 keys: 8.3 CPU-ms for a 512-token bf16 prompt of
SmolLM2's 9 / 3 heads against 5.2 here); a prompt of one block with nothing cached goes to the
flash kernel, cheaper per call. float32 math throughout, the output rounded once: bf16 scores
were 10× less accurate, bf16 probabilities times V 1.6× (for 10 % less time).

Both are checked against ``engine.kernels.reference`` (tests/unit/engine/test_cpu_kernels.py);
the backend is assembled in ``engine.layers.backend``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from engine.kernels import cpu_decode, cpu_native

if TYPE_CHECKING:
    from engine.layers.attention import AttentionMetadata


EXTEND_BLOCK = 64  # query rows per block of causal_attention (64 and 128 measured alike)
# -inf above the diagonal of a block's own keys, shaped [row, query group, key]
_TRIANGLE = torch.full((EXTEND_BLOCK, EXTEND_BLOCK), float("-inf")).triu_(1).unsqueeze(1)


@dataclass(frozen=True)
class ExtendSeq:
    """One request of an extend step: its rows of q, its cached prefix, its pages."""

    lo: int
    hi: int
    prefix: int
    pages: torch.Tensor  # int64

    @property
    def seq_len(self) -> int:
        return self.prefix + self.hi - self.lo

    @property
    def one_block(self) -> bool:
        """A prompt of one block with nothing cached: torch's flash kernel costs less per call
        (measured: 0.04 against 0.11 CPU-ms at 8 rows; about even at 96)."""
        return self.prefix == 0 and self.hi - self.lo <= EXTEND_BLOCK


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
        seqs.append(ExtendSeq(lo, hi, prefix, page_table[i, : -(-seq_len // page_size)].long()))
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
    """``extend_attention_ref``'s contract, a request at a time through ``causal_attention``."""
    if plan is None:
        plan = plan_extend(page_table, qo_indptr, prefix_lens, k_cache.shape[1])
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    out = torch.empty_like(q)
    for seq in plan:
        k = k_cache.index_select(0, seq.pages).view(-1, num_kv_heads, head_dim)[: seq.seq_len]
        v = v_cache.index_select(0, seq.pages).view(-1, num_kv_heads, head_dim)[: seq.seq_len]
        q_seq = q[seq.lo : seq.hi].to(k.dtype)
        if seq.one_block:
            out[seq.lo : seq.hi] = flash_attention(q_seq, k, v, sm_scale)
        else:
            causal_attention(q_seq, k, v, seq.prefix, sm_scale, out[seq.lo : seq.hi])
    return out


def extend_attention_native(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,  # [R, max_pages] int32
    qo_indptr: torch.Tensor,  # [R + 1] int32
    prefix_lens: torch.Tensor,  # [R] int32
    sm_scale: float,
    *,
    max_extend_len: int | None = None,
    plan: tuple[ExtendSeq, ...] | None = None,
    threads: int = 1,  # > 1: (request, KV head) items split by their cost over that many threads
) -> torch.Tensor:
    """``extend_attention_ref``'s contract by the C kernel (``csrc/cpu_extend.c``), which reads
    each request's pages once per KV head; a pool it does not read (another dtype, strided) goes
    to ``extend_attention_cpu``."""
    if not cpu_native.takes_pool(k_cache, v_cache):
        return extend_attention_cpu(q, k_cache, v_cache, page_table, qo_indptr, prefix_lens, sm_scale,
                                    plan=plan)
    tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    f32, bf16 = cpu_native.extend_kernels(head_dim, num_heads // num_kv_heads)
    kernel = bf16 if k_cache.dtype == torch.bfloat16 else f32
    starts, prefixes = cpu_native.int32_rows(qo_indptr), cpu_native.int32_rows(prefix_lens)
    new = np.diff(starts.numpy()).astype(np.int64)
    keys = prefixes.numpy() + new
    out = torch.empty(q.shape, dtype=torch.float32)
    if tokens == 0 or new.size == 0:
        return out.to(q.dtype)
    key_stride = -(-int(keys.max()) // 64) * 64  # K^T rows and score rows, whole tiles of keys
    parts = cpu_native.split_by_cost(np.repeat(new * (keys - new // 2), num_kv_heads), threads)
    # per thread: K^T and V of a request's KV head, a score row per query of a tile (at most 4),
    # then an int64 pool row per key
    scratch = torch.empty(len(parts), (2 * head_dim + 6) * key_stride, dtype=torch.float32)
    qf = q.float().contiguous()
    table = cpu_native.int32_rows(page_table)
    fixed = (qf.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), table.data_ptr(), table.stride(0),
             starts.data_ptr(), prefixes.data_ptr())
    cpu_native.run_parts(parts, lambda i, begin, end: kernel(
        *fixed, begin, end, num_kv_heads, k_cache.shape[1], sm_scale, scratch[i].data_ptr(), key_stride,
        out.data_ptr()), threads)
    return out if q.dtype == torch.float32 else out.to(q.dtype)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float) -> torch.Tensor:
    """Causal attention of a whole prompt (q [L, Hq, D], k / v [L, Hkv, D]) by torch's fused CPU
    kernel. 4-D inputs: 3-D ones fall back to its unfused math path (3× slower at 512 tokens)."""
    return F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        is_causal=True, scale=sm_scale, enable_gqa=True,
    )[0].transpose(0, 1)


def causal_attention(
    q: torch.Tensor,  # [L, Hq, D]: positions prefix .. prefix + L - 1
    k: torch.Tensor,  # [prefix + L, Hkv, D]
    v: torch.Tensor,  # [prefix + L, Hkv, D]
    prefix: int,
    sm_scale: float,
    out: torch.Tensor,  # [L, Hq, D]
) -> None:
    """Causal attention of L new rows after ``prefix`` cached ones, into ``out``: a block of
    ``EXTEND_BLOCK`` rows at a time, each against the keys up to its last row, with the
    triangle of its own keys masked; a query group's rows (GQA) share their KV head's product."""
    rows, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    k_t = k.permute(1, 2, 0).float()  # [Hkv, D, S]: float32 scores
    v_h = v.transpose(0, 1).float()  # [Hkv, S, D]
    q_g = q.view(rows, num_kv_heads, group, head_dim).transpose(0, 1)  # [Hkv, L, group, D]
    out_g = out.view(rows, num_kv_heads, group, head_dim)
    for start in range(0, rows, EXTEND_BLOCK):
        n = min(EXTEND_BLOCK, rows - start)
        keys = prefix + start + n
        # out of place: a block of one row is a view of q
        q_b = q_g[:, start : start + n].reshape(num_kv_heads, n * group, head_dim).float() * sm_scale
        scores = torch.bmm(q_b, k_t[:, :, :keys])  # [Hkv, n * group, keys]
        scores.view(num_kv_heads, n, group, keys)[..., keys - n :].add_(_TRIANGLE[:n, :, :n])
        probs = torch.softmax(scores, dim=-1)
        block = torch.bmm(probs, v_h[:, :keys]).view(num_kv_heads, n, group, head_dim)
        out_g[start : start + n] = block.transpose(0, 1)


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


def _native_rows(*tensors: torch.Tensor | None) -> bool:
    """float32 or bf16 [rows, n] tensors of one dtype with contiguous rows: what the C kernels
    take."""
    dtype = tensors[0].dtype
    return dtype in (torch.float32, torch.bfloat16) and all(
        t is None or (t.dtype == dtype and t.dim() == 2 and t.stride(1) == 1) for t in tensors)


def rms_norm_native(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``rms_norm_cpu``'s contract; float32 or bf16 rows in one pass of the C kernel
    (``csrc/cpu_elementwise.c``), the add and each rounding where the reference has them
    (``python -m bench.cpu_norm``, SmolLM2's 576: float32 1.65× torch's ops at 1, 64 and 512
    rows; bf16 1.3× at 512 rows, 1.5× at 64, 2.3× at one)."""
    if not _native_rows(x, weight[None], residual):
        return rms_norm_cpu(x, weight, eps, residual)
    rms_norm = cpu_native.rms_norm_kernels()[x.dtype]
    rows, hidden = x.shape
    out = torch.empty(rows, hidden, dtype=x.dtype)
    summed = torch.empty_like(out) if residual is not None else None
    rms_norm(x.data_ptr(), x.stride(0), 0 if residual is None else residual.data_ptr(),
             0 if residual is None else residual.stride(0), weight.data_ptr(), eps, rows, hidden,
             out.data_ptr(), 0 if summed is None else summed.data_ptr())
    return out, summed


def warm_up(
    dtype: torch.dtype, shapes: Iterable[tuple[int, int, int]], decodes: bool, *, threads: int
) -> None:
    """Build (or load) the attention kernels for the model's ``shapes`` ((query heads, KV heads,
    head dim)) at start-up: extend's C kernels, and decode's when the worker decodes."""
    shapes = set(shapes)
    if cpu_native.available() is None:
        for num_heads, num_kv_heads, head_dim in shapes:
            cpu_native.extend_kernels(head_dim, num_heads // num_kv_heads)
    if decodes:
        cpu_decode.warm_up(dtype, shapes, threads=threads)
