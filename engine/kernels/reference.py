"""Plain-torch references of the layer kernels (attention, rotary KV store, RMSNorm,
SiLU-and-mul): the path that runs on CPU, and the oracle that every Triton kernel is tested
against.

KV cache layout (per layer): ``k_cache``/``v_cache`` of shape ``[num_pages, page_size,
num_kv_heads, head_dim]``. Token ``pos`` of a request lives at page
``page_table[row, pos // page_size]``, offset ``pos % page_size``; its flat location is
``page * page_size + offset`` (``out_loc`` below). Page 0 is the padding page.

Attention reads *everything* through the page table, including the tokens of the current
step: their K/V are stored first (``rotary_store_kv_ref``), then attention runs.
"""

from __future__ import annotations

import torch


def store_kv_ref(
    k: torch.Tensor,  # [T, Hkv, D]
    v: torch.Tensor,  # [T, Hkv, D]
    k_cache: torch.Tensor,  # [P, page_size, Hkv, D]
    v_cache: torch.Tensor,
    out_loc: torch.Tensor,  # [T] int64, flat token slots
) -> None:
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, num_kv_heads, head_dim)[out_loc] = k.to(k_cache.dtype)
    v_cache.view(-1, num_kv_heads, head_dim)[out_loc] = v.to(v_cache.dtype)


def apply_rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the neox / Hugging Face ``rotate_half`` layout: ``x`` [T, H, D] rotated
    in float32 by ``cos``, ``sin`` [T, 1, D // 2] and returned in its own dtype."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def rotary_store_kv_ref(
    qkv: torch.Tensor,  # [T, (Hq + 2 * Hkv) * D]: each token's q, k, v heads (the qkv projection)
    positions: torch.Tensor,  # [T] int64
    cos_sin: torch.Tensor,  # [max_positions, D] float32: cos of the D/2 rotary frequencies, then their sin
    k_cache: torch.Tensor,  # [P, page_size, Hkv, D]
    v_cache: torch.Tensor,
    out_loc: torch.Tensor,  # [T] int64, flat token slots
    num_heads: int,
) -> torch.Tensor:
    """Rotate q and k (``apply_rotary_ref``), store k and v into their slots (``store_kv_ref``),
    and return the rotated q as a new contiguous [T, Hq, D] tensor in qkv's dtype."""
    num_kv_heads, head_dim = k_cache.shape[-2:]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)
    q = apply_rotary_ref(q.reshape(-1, num_heads, head_dim), cos, sin)
    k = apply_rotary_ref(k.reshape(-1, num_kv_heads, head_dim), cos, sin)
    store_kv_ref(k, v.reshape(-1, num_kv_heads, head_dim), k_cache, v_cache, out_loc)
    return q.contiguous()


def gather_kv_ref(
    cache: torch.Tensor, page_table_row: torch.Tensor, seq_len: int
) -> torch.Tensor:
    """The first ``seq_len`` tokens of one request, contiguous: [seq_len, Hkv, D]."""
    page_size = cache.shape[1]
    num_pages = (seq_len + page_size - 1) // page_size
    pages = page_table_row[:num_pages].long()
    return cache[pages].flatten(0, 1)[:seq_len]


def causal_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float, q_start: int
) -> torch.Tensor:
    """q [Tq, Hq, D] at positions q_start.. ; k, v [Tk, Hkv, D]; causal; fp32 math."""
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    group = num_heads // num_kv_heads
    qf = q.float().transpose(0, 1)  # [Hq, Tq, D]
    kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, Tk, D]
    vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    scores = torch.matmul(qf, kf.transpose(1, 2)) * sm_scale  # [Hq, Tq, Tk]
    q_pos = torch.arange(q.shape[0], device=q.device) + q_start
    k_pos = torch.arange(k.shape[0], device=q.device)
    scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, vf).transpose(0, 1)  # [Tq, Hq, D]


def decode_attention_ref(
    q: torch.Tensor,  # [B, Hq, D], one query token per request
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,  # [B, max_pages] int32
    seq_lens: torch.Tensor,  # [B] int32, including the current token
    sm_scale: float,
) -> torch.Tensor:
    """The whole batch at once over its KV padded to the longest sequence (masked), so that
    the CPU path costs a few tensor ops per layer rather than a Python loop over requests."""
    batch, num_heads, head_dim = q.shape
    if batch == 0:
        return torch.empty_like(q)
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    max_len = int(seq_lens.max())
    num_pages = (max_len + page_size - 1) // page_size
    lens = seq_lens.long()
    page_idx = torch.arange(num_pages, device=q.device)
    used = page_idx[None, :] * page_size < lens[:, None]  # [B, P]: pages that hold tokens
    pages = torch.where(used, page_table[:, :num_pages].long(), 0)
    k = k_cache[pages].flatten(1, 2)[:, :max_len].float()  # [B, L, Hkv, D]
    v = v_cache[pages].flatten(1, 2)[:, :max_len].float()
    qf = q.float().view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.einsum("bhgd,blhd->bhgl", qf, k) * sm_scale
    beyond = torch.arange(max_len, device=q.device)[None, :] >= lens[:, None]  # [B, L]
    scores = scores.masked_fill(beyond[:, None, None, :], float("-inf"))
    # a length-0 row (CUDA-graph padding) attends to nothing: zeros, not the NaN of an empty softmax
    probs = torch.softmax(scores, dim=-1).masked_fill(beyond[:, None, None, :], 0.0)
    out = torch.einsum("bhgl,blhd->bhgd", probs, v)
    return out.reshape(batch, num_heads, head_dim).to(q.dtype)


def extend_attention_ref(
    q: torch.Tensor,  # [T, Hq, D], new tokens of all requests, packed
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,  # [R, max_pages] int32
    qo_indptr: torch.Tensor,  # [R + 1] int32, offsets of each request's tokens in q
    prefix_lens: torch.Tensor,  # [R] int32, tokens already cached before this step
    sm_scale: float,
    *,
    max_extend_len: int | None = None,  # a launch bound for the kernel; the reference needs none
) -> torch.Tensor:
    """Each request's new tokens attend to its cached prefix and causally to themselves."""
    out = torch.empty_like(q)
    starts = qo_indptr.tolist()
    prefixes = prefix_lens.tolist()
    for i, prefix in enumerate(prefixes):
        lo, hi = starts[i], starts[i + 1]
        if hi == lo:
            continue
        seq_len = prefix + (hi - lo)
        k = gather_kv_ref(k_cache, page_table[i], seq_len)
        v = gather_kv_ref(v_cache, page_table[i], seq_len)
        out[lo:hi] = causal_attention_ref(q[lo:hi], k, v, sm_scale, prefix).to(q.dtype)
    return out


def rms_norm_ref(
    x: torch.Tensor,  # [N, H]
    weight: torch.Tensor,  # [H]
    eps: float,
    residual: torch.Tensor | None = None,  # [N, H]: added to x first, when given
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(normalized, x + residual or None). Normalizes in float32, rounds to x's dtype, then
    scales by the weight, as Hugging Face's LlamaRMSNorm does."""
    if residual is not None:
        x = x + residual
        residual = x
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight * normed, residual


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for the fused ``[..., 2 * I]`` output of the gate_up projection."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
