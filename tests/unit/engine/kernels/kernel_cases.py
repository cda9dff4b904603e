"""Kernel test cases and their checks, shared by the interpreter tests (CPU, fp32/fp16) and the GPU
tests (CUDA, bf16). Each check builds fresh random inputs from the case's seed, runs the Triton
kernel and the torch reference on the same inputs, and raises AssertionError on a mismatch.

The cases are pairwise over the factors (page size × GQA group × head dim, plus splits / block
sizes / dtype spread over them) rather than a full cross-product, to keep the interpreter fast.
The kernels are imported inside the checks, so only the process that runs them imports triton.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.kernels.reference import (
    apply_rotary_ref,
    decode_attention_ref,
    extend_attention_ref,
    rms_norm_ref,
    rotary_store_kv_ref,
    silu_and_mul_ref,
)

NUM_KV_HEADS = 2


@dataclass(frozen=True)
class DecodeCase:
    page_size: int
    group: int  # query heads per KV head
    head_dim: int
    seq_lens: tuple[int, ...]
    num_splits: int | None = None  # None: the kernel's own static choice
    block_n: int = 64
    dtype: str = "float32"
    seed: int = 0


@dataclass(frozen=True)
class ExtendCase:
    page_size: int
    group: int
    head_dim: int
    requests: tuple[tuple[int, int], ...]  # (prefix_len, extend_len) per request
    bound_grid: bool = False  # pass the host-side max_extend_len (a smaller grid)
    block_m: int = 128
    block_n: int = 64
    dtype: str = "float32"
    seed: int = 0


@dataclass(frozen=True)
class RotaryStoreCase:
    page_size: int
    group: int
    head_dim: int
    num_tokens: int
    row_pad: int = 0  # extra columns after each qkv row: a row stride larger than its width
    dtype: str = "float32"  # of qkv (and of the rotated q)
    cache_dtype: str | None = None  # None: qkv's
    loc_dtype: str = "int64"
    max_positions: int = 64
    num_kv_heads: int = NUM_KV_HEADS
    seed: int = 0


@dataclass(frozen=True)
class NormCase:
    rows: int
    hidden: int
    residual: bool
    dtype: str = "float32"
    weight_dtype: str = "float32"
    seed: int = 0


@dataclass(frozen=True)
class ActivationCase:
    rows: int
    inter: int
    dtype: str = "float32"
    seed: int = 0


@dataclass(frozen=True)
class GemvCase:
    rows: int  # M
    n: int
    k: int
    bias: bool
    all_configs: bool = False  # every entry of GEMV_CONFIGS on the same inputs (else the default)
    row_pad: int = 0  # extra columns after each row of x: a row stride larger than K
    dtype: str = "float32"
    seed: int = 0


def _boundary_lens(page_size: int, longest: int) -> tuple[int, ...]:
    """1 token, exactly one page, one past a page, and a ragged long one."""
    lens = (1, page_size, page_size + 1, 2 * page_size - 1, longest)
    return tuple(dict.fromkeys(min(n, longest) for n in lens))


DECODE_CASES = [
    DecodeCase(1, 1, 64, (1, 2, 3, 70), num_splits=None, seed=1),
    DecodeCase(1, 4, 128, (5, 1, 33), num_splits=3, block_n=16, seed=2),
    DecodeCase(1, 8, 64, (0, 1, 19), num_splits=1, block_n=16, seed=3),  # 0: CUDA-graph padding row
    DecodeCase(4, 1, 128, _boundary_lens(4, 70), num_splits=1, seed=4),
    DecodeCase(4, 4, 64, _boundary_lens(4, 61), num_splits=None, block_n=16, seed=5),
    DecodeCase(4, 8, 128, _boundary_lens(4, 40), num_splits=4, block_n=16, dtype="float16", seed=6),
    DecodeCase(16, 1, 64, _boundary_lens(16, 77), num_splits=2, block_n=32, seed=7),
    DecodeCase(16, 4, 128, _boundary_lens(16, 90), num_splits=None, seed=8),
    DecodeCase(16, 8, 64, _boundary_lens(16, 50), num_splits=5, block_n=16, seed=9),
    DecodeCase(256, 4, 128, (1, 255, 256, 257), num_splits=None, seed=10),
]

EXTEND_CASES = [
    ExtendCase(1, 1, 64, ((0, 1), (0, 19), (3, 5)), bound_grid=True, block_m=16, block_n=16, seed=1),
    ExtendCase(1, 4, 128, ((0, 33), (7, 1)), seed=2),
    ExtendCase(1, 8, 64, ((2, 17), (0, 0), (0, 9)), block_m=16, block_n=32, seed=3),  # an empty request
    ExtendCase(4, 1, 128, ((4, 4), (0, 37), (9, 12)), block_m=16, block_n=16, seed=4),
    ExtendCase(4, 4, 64, ((0, 20), (16, 16)), seed=5),
    ExtendCase(4, 8, 128, ((5, 11), (0, 4)), block_m=32, block_n=16, dtype="float16", seed=6),
    ExtendCase(16, 1, 64, ((0, 40), (16, 17), (31, 2)), bound_grid=True, block_m=16, block_n=16, seed=7),
    ExtendCase(16, 4, 128, ((32, 17), (0, 16)), block_m=16, block_n=32, seed=8),
    ExtendCase(16, 8, 64, ((15, 1), (0, 48)), seed=9),
    ExtendCase(256, 4, 128, ((200, 60), (0, 7)), block_m=32, block_n=64, seed=10),
]

ROTARY_STORE_CASES = [
    RotaryStoreCase(1, 1, 64, 1, seed=1),
    RotaryStoreCase(3, 4, 128, 9, loc_dtype="int32", row_pad=16, seed=2),
    RotaryStoreCase(5, 8, 64, 13, dtype="float16", seed=3),
    RotaryStoreCase(16, 1, 128, 6, dtype="float16", row_pad=8, seed=4),
    RotaryStoreCase(4, 4, 64, 1, dtype="float16", max_positions=4096, seed=5),
    RotaryStoreCase(1, 8, 128, 7, cache_dtype="float16", seed=6),  # k rounded to fp32, then to fp16
    RotaryStoreCase(5, 2, 80, 5, dtype="float16", num_kv_heads=3, seed=7),  # no power of two
]


NORM_CASES = [
    NormCase(3, 64, residual=False, seed=1),
    NormCase(5, 96, residual=True, seed=2),  # hidden not a power of two
    NormCase(4, 128, residual=True, dtype="float16", weight_dtype="float16", seed=3),
    NormCase(2, 64, residual=False, dtype="float16", weight_dtype="float32", seed=4),  # fp32 output
]

ACTIVATION_CASES = [
    ActivationCase(3, 64, seed=1),
    ActivationCase(2, 1500, seed=2),  # two column blocks, the second ragged
    ActivationCase(4, 96, dtype="float16", seed=3),
]


GEMV_CASES = [
    GemvCase(1, 40, 72, bias=False, all_configs=True, seed=1),  # odd N and K: one masked K step
    GemvCase(3, 40, 72, bias=True, all_configs=True, dtype="float16", seed=2),
    GemvCase(8, 97, 600, bias=True, all_configs=True, row_pad=3, seed=3),  # several K steps, last ragged
    GemvCase(16, 64, 512, bias=False, all_configs=True, row_pad=8, dtype="float16", seed=4),  # K even
    GemvCase(16, 33, 40, bias=True, row_pad=5, seed=5),
    GemvCase(1, 130, 256, bias=True, dtype="float16", seed=6),
]


def case_id(case: object, skip: tuple[str, ...] = ("seed",)) -> str:
    """``page_size=16,group=4,...``: the scalar fields (lengths are in the case list)."""
    return ",".join(f"{k}={v}" for k, v in vars(case).items() if not isinstance(v, tuple) and k not in skip)


# ----------------------------------------------------------------------------- inputs


@dataclass
class PagedKV:
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    page_table: torch.Tensor  # [R, max_pages] int32, pages scattered, 0 = padding


def make_paged_kv(
    seq_lens: list[int], page_size: int, head_dim: int, dtype: torch.dtype, device: str, gen: torch.Generator
) -> PagedKV:
    """Random caches (every slot filled, padding page included, so a stray read shows) and a
    page table that scatters each request over shuffled, non-contiguous pages."""
    pages_per_req = [-(-n // page_size) for n in seq_lens]
    num_pages = 1 + 2 * sum(pages_per_req) + 1  # spare pages stay unused
    shape = (num_pages, page_size, NUM_KV_HEADS, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    free = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    max_pages = max(pages_per_req + [1]) + 2  # extra columns of padding
    page_table = torch.zeros(len(seq_lens), max_pages, dtype=torch.int32)
    for row, count in enumerate(pages_per_req):
        page_table[row, :count] = torch.tensor(free[:count], dtype=torch.int32)
        free = free[count:]
    return PagedKV(k_cache.to(device), v_cache.to(device), page_table.to(device))


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- comparison


def assert_matches(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> float:
    """fp32: elementwise tight. fp16/bf16: relative error ≤ 1e-2 overall and ≤ 3e-2 per row (so one
    wrong row cannot hide in a large tensor). Returns the overall relative error."""
    out, ref = out.float(), ref.float()
    assert torch.isfinite(out).all(), "non-finite output"
    diff = (out - ref).flatten(1)
    rel = (diff.norm() / ref.norm().clamp_min(1e-12)).item()
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        return rel
    row_rel = diff.norm(dim=1) / ref.flatten(1).norm(dim=1).clamp_min(1e-3)
    assert rel <= 1e-2, f"relative error {rel:.3e} > 1e-2"
    assert row_rel.max().item() <= 3e-2, f"row relative error {row_rel.max().item():.3e} > 3e-2"
    return rel


# ----------------------------------------------------------------------------- checks


def check_decode(case: DecodeCase, device: str = "cpu", dtype: str | None = None) -> float:
    from engine.kernels.decode_attention import DecodeConfig, decode_attention

    dt = _dtype(dtype or case.dtype)
    gen = _generator(case.seed)
    seq_lens = list(case.seq_lens)
    kv = make_paged_kv(seq_lens, case.page_size, case.head_dim, dt, device, gen)
    num_heads = NUM_KV_HEADS * case.group
    q = torch.randn(len(seq_lens), num_heads, case.head_dim, generator=gen).to(dt).to(device)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    scale = case.head_dim**-0.5

    config = DecodeConfig(block_n=case.block_n, num_splits=case.num_splits)
    out = decode_attention(q, kv.k_cache, kv.v_cache, kv.page_table, lens, scale, config=config)
    ref = decode_attention_ref(q.float(), kv.k_cache.float(), kv.v_cache.float(), kv.page_table, lens, scale)
    return assert_matches(out, ref, dt)


def check_extend(case: ExtendCase, device: str = "cpu", dtype: str | None = None) -> float:
    from engine.kernels.extend_attention import ExtendConfig, extend_attention

    dt = _dtype(dtype or case.dtype)
    gen = _generator(case.seed)
    prefixes = [p for p, _ in case.requests]
    extends = [e for _, e in case.requests]
    kv = make_paged_kv([p + e for p, e in case.requests], case.page_size, case.head_dim, dt, device, gen)
    num_heads = NUM_KV_HEADS * case.group
    q = torch.randn(sum(extends), num_heads, case.head_dim, generator=gen).to(dt).to(device)
    indptr = torch.tensor([0] + extends, dtype=torch.int32).cumsum(0).to(torch.int32).to(device)
    prefix_lens = torch.tensor(prefixes, dtype=torch.int32, device=device)
    scale = case.head_dim**-0.5

    config = ExtendConfig(block_m=case.block_m, block_n=case.block_n)
    out = extend_attention(
        q, kv.k_cache, kv.v_cache, kv.page_table, indptr, prefix_lens, scale,
        max_extend_len=max(extends) if case.bound_grid else None, config=config,
    )
    ref = extend_attention_ref(
        q.float(), kv.k_cache.float(), kv.v_cache.float(), kv.page_table, indptr, prefix_lens, scale
    )
    return assert_matches(out, ref, dt)


def check_rotary_store_kv(case: RotaryStoreCase, device: str = "cpu", dtype: str | None = None) -> float:
    """Against the reference on the same inputs: q and k within one rounding step of their dtype
    (the kernel is meant to round exactly as the reference does), v exact, every slot not written
    untouched. Returns q's relative error against a float32 rotation of the same inputs."""
    from engine.kernels.kv_store import rotary_store_kv

    dt = _dtype(dtype or case.dtype)
    cache_dt = _dtype(case.cache_dtype) if case.cache_dtype else dt
    gen = _generator(case.seed)
    heads, kv_heads, dim = case.group * case.num_kv_heads, case.num_kv_heads, case.head_dim
    tokens, width = case.num_tokens, (heads + 2 * kv_heads) * dim
    num_pages = 2 + 2 * -(-tokens // case.page_size)
    cache_shape = (num_pages, case.page_size, kv_heads, dim)
    k_cache = torch.randn(cache_shape, generator=gen).to(cache_dt).to(device)
    v_cache = torch.randn(cache_shape, generator=gen).to(cache_dt).to(device)
    qkv = torch.randn(tokens, width + case.row_pad, generator=gen).to(dt).to(device)[:, :width]
    positions = torch.randint(0, case.max_positions, (tokens,), generator=gen).to(device)
    cos_sin = rotary_table(case.max_positions, dim).to(device)
    usable = num_pages * case.page_size - case.page_size  # every slot but the padding page's
    slots = torch.randperm(usable, generator=gen)[:tokens] + case.page_size  # scattered over pages
    out_loc = slots.to(_dtype(case.loc_dtype)).to(device)

    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q_ref = rotary_store_kv_ref(qkv, positions, cos_sin, k_ref, v_ref, out_loc.long(), heads)
    q = rotary_store_kv(qkv, positions, cos_sin, k_cache, v_cache, out_loc, heads)
    assert q.shape == q_ref.shape and q.dtype == dt and q.is_contiguous(), (q.shape, q.dtype)
    eps = max(torch.finfo(dt).eps, torch.finfo(cache_dt).eps)
    torch.testing.assert_close(q, q_ref, rtol=eps, atol=1e-5, msg=lambda m: f"q: {m}")
    torch.testing.assert_close(k_cache, k_ref, rtol=eps, atol=1e-5, msg=lambda m: f"k_cache: {m}")
    assert torch.equal(v_cache, v_ref), "v_cache differs from the reference store"
    untouched = torch.ones(num_pages * case.page_size, dtype=torch.bool, device=device)
    untouched[slots.to(device)] = False
    assert torch.equal(k_cache.flatten(0, 1)[untouched], k_ref.flatten(0, 1)[untouched]), "stray k write"

    cos, sin = cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)
    q32 = apply_rotary_ref(qkv[:, : heads * dim].float().view(tokens, heads, dim), cos, sin)
    return assert_matches(q, q32, dt)


def rotary_table(max_positions: int, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """``cos_sin`` [max_positions, head_dim] float32: the cosines of the frequencies, then their sines."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    freqs = torch.outer(torch.arange(max_positions).float(), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def check_rms_norm(case: NormCase, device: str = "cpu", dtype: str | None = None) -> float:
    from engine.kernels.norm import rms_norm

    dt = _dtype(dtype or case.dtype)
    gen = _generator(case.seed)
    x = torch.randn(case.rows, case.hidden, generator=gen).to(dt).to(device)
    weight = (1 + 0.1 * torch.randn(case.hidden, generator=gen)).to(_dtype(case.weight_dtype)).to(device)
    residual = torch.randn(case.rows, case.hidden, generator=gen).to(dt).to(device) if case.residual else None
    out, new_residual = rms_norm(x, weight, 1e-6, residual)
    ref, ref_residual = rms_norm_ref(x, weight, 1e-6, residual)
    assert out.dtype == ref.dtype, (out.dtype, ref.dtype)
    if case.residual:
        assert torch.equal(new_residual, ref_residual), "the residual sum differs"
    else:
        assert new_residual is None
    return assert_matches(out, ref, dt)


def check_silu_and_mul(case: ActivationCase, device: str = "cpu", dtype: str | None = None) -> float:
    from engine.kernels.activation import silu_and_mul

    dt = _dtype(dtype or case.dtype)
    gate_up = torch.randn(case.rows, 2 * case.inter, generator=_generator(case.seed)).to(dt).to(device)
    return assert_matches(silu_and_mul(gate_up), silu_and_mul_ref(gate_up), dt)


def check_gemv(case: GemvCase, device: str = "cpu", dtype: str | None = None) -> float:
    """Every config against ``F.linear`` in float32 on the same inputs; in fp16/bf16 also within
    one rounding of the output dtype (the kernel accumulates in float32 and rounds once).
    Returns the largest relative error over the configs."""
    from engine.kernels.gemv import DEFAULT_GEMV_CONFIG, GEMV_CONFIGS, gemv

    dt = _dtype(dtype or case.dtype)
    gen = _generator(case.seed)
    x = torch.randn(case.rows, case.k + case.row_pad, generator=gen).to(dt).to(device)[:, : case.k]
    weight = torch.randn(case.n, case.k, generator=gen).to(dt).to(device)
    bias = torch.randn(case.n, generator=gen).to(dt).to(device) if case.bias else None
    ref = torch.nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float())
    worst = 0.0
    for config in GEMV_CONFIGS if case.all_configs else (DEFAULT_GEMV_CONFIG,):
        out = gemv(x, weight, bias, config=config)
        assert out.shape == ref.shape and out.dtype == dt and out.is_contiguous(), (out.shape, out.dtype)
        try:
            worst = max(worst, assert_matches(out, ref, dt))
            if dt != torch.float32:
                atol = 1e-5 * ref.abs().max().item()
                torch.testing.assert_close(out.float(), ref, rtol=torch.finfo(dt).eps, atol=atol)
        except AssertionError as exc:
            raise AssertionError(f"{config}: {exc}") from exc
    return worst


CHECKS = {
    "decode": (check_decode, DecodeCase),
    "extend": (check_extend, ExtendCase),
    "rotary_store_kv": (check_rotary_store_kv, RotaryStoreCase),
    "rms_norm": (check_rms_norm, NormCase),
    "silu_and_mul": (check_silu_and_mul, ActivationCase),
    "gemv": (check_gemv, GemvCase),
}
