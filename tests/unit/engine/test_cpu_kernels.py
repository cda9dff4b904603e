"""The CPU kernels (engine.kernels.cpu, cpu_decode: C and Numba, cpu_rotary) against the torch references
on fresh random inputs: ragged lengths, page sizes 1 and >1, GQA ratios 1, 3 and 4, float32 and
bfloat16; and the per-step plans they share across layers."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import cpu, cpu_native, cpu_rotary
from engine.kernels.cpu_decode import decode_attention_native, decode_attention_numba
from engine.kernels.reference import (
    decode_attention_ref,
    extend_attention_ref,
    rms_norm_ref,
    rotary_store_kv_ref,
    silu_and_mul_ref,
)
from engine.layers.backend import make_kernel_backend
from engine.layers.rotary import RotaryEmbedding
from engine.models.config import RopeScaling

HEAD_DIM = 64
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def _pool(gen: torch.Generator, pages: int, page_size: int, kv_heads: int, dtype: torch.dtype):
    shape = (pages, page_size, kv_heads, HEAD_DIM)
    k = torch.randn(shape, generator=gen).to(dtype)
    v = torch.randn(shape, generator=gen).to(dtype)
    return k, v


def _page_table(gen: torch.Generator, lengths: list[int], page_size: int) -> tuple[torch.Tensor, int]:
    """(rows of scattered distinct pages, never page 0, wide enough for the longest row, with
    garbage but valid page ids past each row's own pages; the pool's page count)."""
    width = max(1, max(-(-n // page_size) for n in lengths)) + 2
    num_pages = len(lengths) * width + 1
    perm = (torch.randperm(num_pages - 1, generator=gen) + 1).int()
    return perm.view(len(lengths), width).clone(), num_pages


@pytest.fixture(params=["native", "numba"])
def decode_attention_cpu(request):
    """Each decode implementation (the C kernel where this machine can build it)."""
    if request.param == "native":
        if (why := cpu_native.available()) is not None:
            pytest.skip(f"the C kernels cannot be built here: {why}")
        return decode_attention_native
    return decode_attention_numba


def _check(ours: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    torch.testing.assert_close(ours.float(), ref.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (9, 3), (8, 2)])
def test_decode_attention_matches_reference(
    decode_attention_cpu, dtype, page_size, num_heads, num_kv_heads
) -> None:
    gen = torch.Generator().manual_seed(page_size * 100 + num_heads)
    lengths = torch.randint(1, 300, (23,), generator=gen).tolist()
    lengths[3] = 1
    lengths[5] = page_size * 7  # exactly full pages
    table, num_pages = _page_table(gen, lengths, page_size)
    k_cache, v_cache = _pool(gen, num_pages, page_size, num_kv_heads, dtype)
    q = torch.randn(len(lengths), num_heads, HEAD_DIM, generator=gen).to(dtype)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    ref = decode_attention_ref(q, k_cache, v_cache, table, seq_lens, 0.125)
    ours = decode_attention_cpu(q, k_cache, v_cache, table, seq_lens, 0.125)
    _check(ours, ref, dtype)
    planned = decode_attention_cpu(q, k_cache, v_cache, table, seq_lens, 0.125, plan=max(lengths) + 5)
    assert torch.equal(planned, ours)  # a wider score buffer than needed changes nothing


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_on_threads_matches_one_thread(decode_attention_cpu, dtype) -> None:
    """Two threads (Numba's parallel build; the C kernel's rows split over a pool) over the same
    inputs, strided q included."""
    gen = torch.Generator().manual_seed(7)
    lengths = torch.randint(0, 200, (17,), generator=gen).tolist()
    table, num_pages = _page_table(gen, lengths, 4)
    k_cache, v_cache = _pool(gen, num_pages, 4, 3, dtype)
    qkv = torch.randn(len(lengths), 2, 9, HEAD_DIM, generator=gen).to(dtype)
    q = qkv[:, 0]  # not contiguous
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    one = decode_attention_cpu(q, k_cache, v_cache, table, seq_lens, 0.125)
    two = decode_attention_cpu(q, k_cache, v_cache, table, seq_lens, 0.125, threads=2)
    assert torch.equal(one, two)
    _check(one, decode_attention_ref(q, k_cache, v_cache, table, seq_lens, 0.125), dtype)


def test_decode_attention_refuses_a_pool_it_cannot_read(decode_attention_cpu) -> None:
    k_cache, v_cache = _pool(torch.Generator().manual_seed(0), 4, 4, 3, torch.float16)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        decode_attention_cpu(torch.zeros(1, 9, HEAD_DIM, dtype=torch.float16), k_cache, v_cache,
                             torch.ones(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), 0.125)


def test_decode_attention_row_of_length_zero_gives_zeros(decode_attention_cpu) -> None:
    gen = torch.Generator().manual_seed(1)
    lengths = [0, 9, 17]
    table, num_pages = _page_table(gen, lengths, 4)
    k_cache, v_cache = _pool(gen, num_pages, 4, 3, torch.float32)
    q = torch.randn(3, 9, HEAD_DIM, generator=gen)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    ours = decode_attention_cpu(q, k_cache, v_cache, table, seq_lens, 0.125)
    assert torch.equal(ours[0], torch.zeros_like(ours[0]))
    _check(ours, decode_attention_ref(q, k_cache, v_cache, table, seq_lens, 0.125), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("head_dim", "num_heads", "num_kv_heads"),
    [(5, 3, 1), (6, 2, 1), (8, 4, 4), (12, 7, 1), (80, 6, 2), (128, 8, 2)],
)
def test_native_decode_attention_of_other_head_dims(dtype, head_dim, num_heads, num_kv_heads) -> None:
    """The C kernel is built per head dim and group: vectors of 16, 8, 4 and 1 lanes, and MQA;
    on one thread and split over two (an odd scratch row per thread at 5 dims x 3 heads)."""
    if (why := cpu_native.available()) is not None:
        pytest.skip(f"the C kernels cannot be built here: {why}")
    gen = torch.Generator().manual_seed(head_dim)
    lengths = torch.randint(0, 90, (9,), generator=gen).tolist()
    table, num_pages = _page_table(gen, lengths, 8)
    shape = (num_pages, 8, num_kv_heads, head_dim)
    k_cache, v_cache = (torch.randn(shape, generator=gen).to(dtype) for _ in range(2))
    q = torch.randn(len(lengths), num_heads, head_dim, generator=gen).to(dtype)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    args = (q, k_cache, v_cache, table, seq_lens, head_dim**-0.5)
    ours = decode_attention_native(*args)
    _check(ours, decode_attention_ref(*args), dtype)
    assert torch.equal(decode_attention_native(*args, threads=2), ours)


def test_decode_attention_of_an_empty_batch(decode_attention_cpu) -> None:
    k_cache, v_cache = _pool(torch.Generator().manual_seed(0), 4, 4, 3, torch.float32)
    q = torch.empty(0, 9, HEAD_DIM)
    out = decode_attention_cpu(q, k_cache, v_cache, torch.zeros(0, 2, dtype=torch.int32),
                               torch.zeros(0, dtype=torch.int32), 0.125)
    assert out.shape == (0, 9, HEAD_DIM)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (9, 3), (8, 2)])
def test_extend_attention_matches_reference(dtype, page_size, num_heads, num_kv_heads) -> None:
    gen = torch.Generator().manual_seed(page_size * 10 + num_heads)
    # ragged; one request with nothing new this step; blocks of rows: one exactly, several
    # with a partial last one, after a prefix and without
    new = [37, 1, 0, cpu.EXTEND_BLOCK, 5, 2 * cpu.EXTEND_BLOCK + 9, cpu.EXTEND_BLOCK + 1]
    prefixes = [0, 20, 3, 33, 0, 0, 70]
    lengths = [p + n for p, n in zip(prefixes, new, strict=True)]
    table, num_pages = _page_table(gen, lengths, page_size)
    k_cache, v_cache = _pool(gen, num_pages, page_size, num_kv_heads, dtype)
    indptr = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(new), num_heads, HEAD_DIM, generator=gen).to(dtype)
    args = (q, k_cache, v_cache, table, indptr, torch.tensor(prefixes, dtype=torch.int32), 0.125)
    ref = extend_attention_ref(*args)
    kept = [t.clone() for t in args[:3]]
    ours = cpu.extend_attention_cpu(*args, max_extend_len=max(new))
    _check(ours, ref, dtype)
    assert all(torch.equal(a, b) for a, b in zip(args[:3], kept, strict=True))  # inputs untouched
    plan = cpu.plan_extend(table, indptr, torch.tensor(prefixes, dtype=torch.int32), page_size)
    assert [s.seq_len for s in plan] == [p + n for p, n in zip(prefixes, new, strict=True) if n]
    assert torch.equal(cpu.extend_attention_cpu(*args, plan=plan), ours)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize(
    ("head_dim", "num_heads", "num_kv_heads"),
    [(64, 9, 3), (64, 4, 4), (8, 4, 4), (12, 7, 1), (6, 2, 1), (128, 8, 2)],
)
def test_native_extend_attention_matches_reference(dtype, page_size, head_dim, num_heads, num_kv_heads):
    """The C kernel (tiles of query vectors that span rows; keys in whole tiles, the causal
    tail masked; head dims of 16-, 8-, 4- and 1-lane vectors; MQA), on one thread and split over
    two; q as the strided view of a fused QKV projection, as the model passes it."""
    if (why := cpu_native.available()) is not None:
        pytest.skip(f"the C kernels cannot be built here: {why}")
    gen = torch.Generator().manual_seed(page_size + head_dim + num_heads)
    new, prefixes = [37, 1, 0, 64, 5, 137, 65], [0, 20, 3, 33, 0, 0, 70]
    table, num_pages = _page_table(gen, [p + n for p, n in zip(prefixes, new, strict=True)], page_size)
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    k_cache, v_cache = (torch.randn(shape, generator=gen).to(dtype) for _ in range(2))
    indptr = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    qkv = torch.randn(sum(new), num_heads + 2 * num_kv_heads, head_dim, generator=gen).to(dtype)
    q = qkv[:, :num_heads]
    args = (q, k_cache, v_cache, table, indptr, torch.tensor(prefixes, dtype=torch.int32), head_dim**-0.5)
    kept = [t.clone() for t in args[:3]]
    ours = cpu.extend_attention_native(*args)
    _check(ours, extend_attention_ref(*args), dtype)
    assert all(torch.equal(a, b) for a, b in zip(args[:3], kept, strict=True))  # inputs untouched
    assert torch.equal(cpu.extend_attention_native(*args, threads=2), ours)


def test_native_kernels_take_int64_and_strided_indices() -> None:
    """Page tables and lengths as int64 or as strided views (the references take both) read the
    same as int32 rows: converted, and kept alive while the kernel reads them."""
    if (why := cpu_native.available()) is not None:
        pytest.skip(f"the C kernels cannot be built here: {why}")
    gen = torch.Generator().manual_seed(11)
    lengths = [9, 40, 1, 23]
    table, num_pages = _page_table(gen, lengths, 4)
    k_cache, v_cache = _pool(gen, num_pages, 4, 3, torch.float32)
    q = torch.randn(len(lengths), 9, HEAD_DIM, generator=gen)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    want = decode_attention_native(q, k_cache, v_cache, table, seq_lens, 0.125)
    strided_lens = torch.stack([seq_lens, seq_lens * 0]).t()[:, 0]
    strided_table = table.t().contiguous().t()  # rows not contiguous
    for t, lens in ((table.long(), seq_lens.long()), (strided_table, strided_lens)):
        assert torch.equal(decode_attention_native(q, k_cache, v_cache, t, lens, 0.125), want)
    indptr, prefixes = torch.tensor([0, 5, 10, 13]), torch.tensor([0, 4, 30])
    qs = torch.randn(13, 9, HEAD_DIM, generator=gen)
    pool = (k_cache, v_cache)
    want = cpu.extend_attention_native(qs, *pool, table[:3], indptr.int(), prefixes.int(), 0.125)
    _check(want, extend_attention_ref(qs, *pool, table[:3], indptr, prefixes, 0.125), torch.float32)
    ours = cpu.extend_attention_native(qs, *pool, strided_table[:3].long(), indptr, prefixes, 0.125)
    assert torch.equal(ours, want)
    empty = cpu.extend_attention_native(qs[:0], k_cache, v_cache, table[:0], indptr[:1], prefixes[:0], 0.125)
    assert empty.shape == (0, 9, HEAD_DIM)


def test_native_extend_attention_leaves_other_pools_to_torch() -> None:
    gen = torch.Generator().manual_seed(0)
    table, num_pages = _page_table(gen, [9], 4)
    k_cache, v_cache = _pool(gen, num_pages, 4, 3, torch.float16)
    q = torch.randn(9, 9, HEAD_DIM, generator=gen).half()
    indptr, prefixes = torch.tensor([0, 9], dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    args = (q, k_cache, v_cache, table, indptr, prefixes, 0.125)
    assert torch.equal(cpu.extend_attention_native(*args), cpu.extend_attention_cpu(*args))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_equals_reference_bit_for_bit(dtype, with_residual) -> None:
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(37, 576, generator=gen) * 3).to(dtype)
    weight = torch.randn(576, generator=gen).to(dtype)
    residual = torch.randn(37, 576, generator=gen).to(dtype) if with_residual else None
    kept = None if residual is None else residual.clone()
    ref, ref_res = rms_norm_ref(x, weight, 1e-5, residual)
    ours, our_res = cpu.rms_norm_cpu(x, weight, 1e-5, residual)
    assert torch.equal(ours, ref)
    assert (our_res is None) == (ref_res is None)
    if ref_res is not None:
        assert torch.equal(our_res, ref_res)
        assert torch.equal(residual, kept)  # the input is not modified


@pytest.mark.parametrize(("rows", "hidden"), [(1, 576), (37, 576), (5, 37)])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_rms_norm_rounds_as_the_reference(rows, hidden, with_residual, dtype) -> None:
    """The C kernel (a strided x; a width with a tail past its last whole vector): the
    reference's values but for the order of the mean's sum, so at most a last-bit difference (in
    bf16 in a rare element); the residual sum exact."""
    if (why := cpu_native.available()) is not None:
        pytest.skip(f"the C kernels cannot be built here: {why}")
    gen = torch.Generator().manual_seed(rows + hidden)
    x = (torch.randn(rows, hidden + 3, generator=gen) * 3).to(dtype)[:, :hidden]
    weight = torch.randn(hidden, generator=gen).to(dtype)
    residual = torch.randn(rows, hidden, generator=gen).to(dtype) if with_residual else None
    ref, ref_res = rms_norm_ref(x, weight, 1e-5, residual)
    ours, our_res = cpu.rms_norm_native(x, weight, 1e-5, residual)
    assert ours.dtype == dtype and ours.shape == ref.shape
    if dtype == torch.bfloat16:
        torch.testing.assert_close(ours.float(), ref.float(), atol=0, rtol=2**-7)  # one bf16 ulp
        assert (ours != ref).sum() <= max(1, ref.numel() // 1000)
    else:
        torch.testing.assert_close(ours, ref, atol=0, rtol=4 * 2**-23)
    if with_residual:
        assert torch.equal(our_res, ref_res)
    else:
        assert our_res is None


def test_native_rms_norm_leaves_other_inputs_to_torch() -> None:
    """Mixed dtypes and float16 go to ``rms_norm_cpu``."""
    x, weight = torch.randn(3, 64), torch.randn(64)
    for x_, w_ in ((x, weight.bfloat16()), (x.half(), weight.half())):
        assert torch.equal(cpu.rms_norm_native(x_, w_, 1e-5)[0], cpu.rms_norm_cpu(x_, w_, 1e-5)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_equals_reference(dtype) -> None:
    gate_up = torch.randn(13, 2 * 96, generator=torch.Generator().manual_seed(4)).to(dtype)
    assert torch.equal(cpu.silu_and_mul_cpu(gate_up), silu_and_mul_ref(gate_up))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("tokens", "page_size", "num_heads", "num_kv_heads"), [
    (0, 4, 4, 2), (1, 1, 3, 1), (37, 4, 9, 3), (70, 16, 4, 4),
])
def test_rotary_store_kv_equals_reference_bit_for_bit(dtype, tokens, page_size, num_heads, num_kv_heads):
    gen = torch.Generator().manual_seed(tokens)
    width = (num_heads + 2 * num_kv_heads) * HEAD_DIM
    qkv = (torch.randn(tokens, width + 8, generator=gen) * 4).to(dtype)[:, :width]  # a strided view
    rotary = RotaryEmbedding(HEAD_DIM, 512, 10000.0, RopeScaling())
    rotary.reset_cache()
    cos_sin = rotary.cos_sin
    positions = torch.randint(0, 512, (tokens,), generator=gen)
    pages = tokens // page_size + 3
    out_loc = torch.randperm((pages - 1) * page_size, generator=gen)[:tokens] + page_size  # never page 0
    ref_k, ref_v = _pool(gen, pages, page_size, num_kv_heads, dtype)
    our_k, our_v = ref_k.clone(), ref_v.clone()
    ref = rotary_store_kv_ref(qkv, positions, cos_sin, ref_k, ref_v, out_loc, num_heads)
    ours = cpu_rotary.rotary_store_kv_cpu(qkv, positions, cos_sin, our_k, our_v, out_loc, num_heads)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    assert torch.equal(ours, ref) and torch.equal(our_k, ref_k) and torch.equal(our_v, ref_v)


def test_rotary_store_kv_keeps_a_nan_a_nan_in_bf16() -> None:
    """(torch's own float32 → bf16 gives 0x7FC0 or 0xFFFF for NaN, depending on its code path:
    the bits are not compared.)"""
    qkv = torch.randn(1, 3 * HEAD_DIM).to(torch.bfloat16)
    qkv[0, 0] = float("nan")
    cos_sin = torch.rand(4, HEAD_DIM)
    args = (torch.ones(1, dtype=torch.int64), cos_sin)
    ref_k, ref_v, our_k, our_v = (torch.zeros(2, 4, 1, HEAD_DIM, dtype=torch.bfloat16) for _ in range(4))
    loc = torch.tensor([5])
    ref = rotary_store_kv_ref(qkv, *args, ref_k, ref_v, loc, 1)
    ours = cpu_rotary.rotary_store_kv_cpu(qkv, *args, our_k, our_v, loc, 1)
    assert torch.equal(ours.isnan(), ref.isnan()) and ours.isnan().any()
    assert torch.equal(ours.nan_to_num(), ref.nan_to_num())


def test_rotary_store_kv_of_another_dtype_is_the_reference_s() -> None:
    """float16 (no Numba kernel for it) is the reference's, and so is a pool of another dtype."""
    gen = torch.Generator().manual_seed(5)
    cos_sin = torch.rand(8, HEAD_DIM, generator=gen)
    positions, loc = torch.tensor([1, 7]), torch.tensor([4, 6])
    for qkv_dtype, pool_dtype in ((torch.float16, torch.float16), (torch.float32, torch.bfloat16)):
        qkv = torch.randn(2, 3 * HEAD_DIM, generator=gen).to(qkv_dtype)
        ref_k, ref_v, our_k, our_v = (torch.zeros(2, 4, 1, HEAD_DIM, dtype=pool_dtype) for _ in range(4))
        ref = rotary_store_kv_ref(qkv, positions, cos_sin, ref_k, ref_v, loc, 1)
        ours = cpu_rotary.rotary_store_kv_cpu(qkv, positions, cos_sin, our_k, our_v, loc, 1)
        assert torch.equal(ours, ref) and torch.equal(our_k, ref_k) and torch.equal(our_v, ref_v)


def test_auto_backend_on_cpu_is_the_cpu_kernels_and_plans_once_per_step() -> None:
    backend = make_kernel_backend("auto", torch.device("cpu"))
    assert backend.name == "cpu" and backend.plan_attention is cpu.plan_attention
    assert make_kernel_backend("torch", torch.device("cpu")).plan_attention is None
    with pytest.raises(ValueError, match="runs on the CPU"):
        make_kernel_backend("cpu", torch.device("meta"))


@pytest.mark.parametrize(("checkpoint", "page_size"), [
    ("tiny_llama_dir", 1), ("tiny_llama_dir", 4), ("tiny_qwen2_dir", 4),  # qwen2: tied head, q/k/v bias
])
def test_worker_on_cpu_kernels_generates_what_transformers_does(checkpoint, page_size, request) -> None:
    """The whole step on the CPU backend: chunked prefill (7-token chunks over cached prefixes),
    mixed extend + decode steps, batched decodes of ragged lengths, the overlap schedule."""
    from engine.worker import Worker
    from tests.unit.engine.engine_driver import driver_for, greedy, small_args
    from tests.unit.engine.test_engine_generation import PROMPTS, hf_generate

    path = request.getfixturevalue(checkpoint)
    worker = Worker.create(small_args(model_path=path, attention_backend="cpu", page_size=page_size))
    assert worker.runner.kernels.name == "cpu"
    assert worker.loaded.model.lm_head_weight.is_mkldnn  # the matmuls on packed weights (cpu_linear)
    reqs = driver_for(worker, chunk_size=7).generate(PROMPTS, [greedy(8)] * len(PROMPTS))
    assert [r.outputs for r in reqs] == hf_generate(path, PROMPTS, 8)
