"""The Triton attention kernels on CUDA in bf16 against the fp32 torch references: the interpreter
cases compiled for real, larger realistic shapes with the default configs, and decode attention
replayed inside a CUDA graph with lengths that change between replays."""

from __future__ import annotations

import pytest
import torch

from tests.unit.engine.kernels.kernel_cases import (
    ACTIVATION_CASES,
    DECODE_CASES,
    EXTEND_CASES,
    GEMV_CASES,
    NORM_CASES,
    NUM_KV_HEADS,
    ROTARY_STORE_CASES,
    ActivationCase,
    DecodeCase,
    ExtendCase,
    GemvCase,
    NormCase,
    RotaryStoreCase,
    assert_matches,
    case_id,
    check_decode,
    check_extend,
    check_gemv,
    check_rms_norm,
    check_rotary_store_kv,
    check_silu_and_mul,
    make_paged_kv,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

LARGE_DECODE_CASES = [
    DecodeCase(16, 4, 128, (1, 17, 513, 4096, 1000, 2047), seed=21),
    DecodeCase(1, 8, 128, (3000, 1, 64), seed=22),
    DecodeCase(64, 1, 64, (129, 4000), seed=23),
    DecodeCase(256, 4, 128, (1, 300, 5000), seed=24),
]

LARGE_EXTEND_CASES = [
    ExtendCase(16, 4, 128, ((0, 512), (1024, 300), (0, 1), (17, 129)), seed=21),
    ExtendCase(1, 8, 128, ((0, 1000),), seed=22),
    ExtendCase(64, 1, 64, ((2048, 256), (0, 64)), seed=23),
    ExtendCase(256, 4, 128, ((300, 700),), seed=24),
]

LARGE_ROTARY_STORE_CASES = [  # Llama-3-8B's heads, long positions
    RotaryStoreCase(16, 4, 128, 1000, row_pad=64, max_positions=8192, num_kv_heads=8, seed=21),
    RotaryStoreCase(1, 8, 64, 3, max_positions=131072, seed=22),
]


LARGE_NORM_CASES = [
    NormCase(64, 4096, residual=True, dtype="bfloat16", weight_dtype="bfloat16", seed=21),
    NormCase(7, 8192, residual=False, dtype="bfloat16", weight_dtype="bfloat16", seed=22),
]

LARGE_ACTIVATION_CASES = [ActivationCase(64, 14336, dtype="bfloat16", seed=21)]

LLAMA3_8B_LINEARS = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096),
                     "down": (4096, 14336), "lm_head": (128256, 4096)}
LARGE_GEMV_CASES = [
    GemvCase(rows, n, k, bias=False, all_configs=True, seed=21 + i)
    for i, (n, k) in enumerate(LLAMA3_8B_LINEARS.values())
    for rows in (1, 4, 16)
] + [GemvCase(3, 4608, 3584, bias=True, all_configs=True, row_pad=64, seed=31)]  # Qwen2-7B's qkv


def gpu_id(case: object) -> str:
    """The dtype fields of the interpreter cases do not apply: everything runs in bf16 here."""
    return case_id(case, skip=("seed", "dtype"))


@pytest.mark.parametrize("case", DECODE_CASES + LARGE_DECODE_CASES, ids=gpu_id)
def test_decode_attention_bf16(case: DecodeCase) -> None:
    check_decode(case, device="cuda", dtype="bfloat16")


@pytest.mark.parametrize("case", EXTEND_CASES + LARGE_EXTEND_CASES, ids=gpu_id)
def test_extend_attention_bf16(case: ExtendCase) -> None:
    check_extend(case, device="cuda", dtype="bfloat16")


@pytest.mark.parametrize("case", ROTARY_STORE_CASES + LARGE_ROTARY_STORE_CASES, ids=gpu_id)
def test_rotary_store_kv_bf16(case: RotaryStoreCase) -> None:
    check_rotary_store_kv(case, device="cuda", dtype="bfloat16")


@pytest.mark.parametrize("case", NORM_CASES + LARGE_NORM_CASES, ids=gpu_id)
def test_rms_norm_bf16(case: NormCase) -> None:
    check_rms_norm(case, device="cuda", dtype="bfloat16")


@pytest.mark.parametrize("case", ACTIVATION_CASES + LARGE_ACTIVATION_CASES, ids=gpu_id)
def test_silu_and_mul_bf16(case: ActivationCase) -> None:
    check_silu_and_mul(case, device="cuda", dtype="bfloat16")


@pytest.mark.parametrize("case", GEMV_CASES + LARGE_GEMV_CASES, ids=gpu_id)
def test_gemv_bf16(case: GemvCase) -> None:
    check_gemv(case, device="cuda", dtype="bfloat16")


def test_gemv_replays_in_cuda_graph() -> None:
    """Captured once at M = 4, replayed with new inputs."""
    from engine.kernels.gemv import gemv

    x = torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(6144, 4096, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(6144, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        gemv(x, weight, bias)  # compile
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gemv(x, weight, bias)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        graph.replay()
        ref = torch.nn.functional.linear(x.float(), weight.float(), bias.float())
        assert_matches(out, ref, torch.bfloat16)


def test_decode_attention_replays_in_cuda_graph() -> None:
    """Captured once, replayed with other lengths (1 token, ragged, full, and 0 for padding
    rows): the grid and workspace must not depend on the values of ``seq_lens``."""
    from engine.kernels.decode_attention import decode_attention
    from engine.kernels.reference import decode_attention_ref

    batch, page_size, group, head_dim, longest = 8, 16, 4, 128, 700
    gen = torch.Generator().manual_seed(31)
    kv = make_paged_kv([longest] * batch, page_size, head_dim, torch.bfloat16, "cuda", gen)
    q = torch.randn(batch, NUM_KV_HEADS * group, head_dim, device="cuda", dtype=torch.bfloat16)
    seq_lens = torch.full((batch,), longest, dtype=torch.int32, device="cuda")
    scale = head_dim**-0.5

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        decode_attention(q, kv.k_cache, kv.v_cache, kv.page_table, seq_lens, scale)  # compile
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, kv.k_cache, kv.v_cache, kv.page_table, seq_lens, scale)

    ragged = torch.randint(1, longest + 1, (batch,), generator=gen).tolist()
    for lens in ([1] * batch, ragged, [longest] * batch, [0, 5] + ragged[2:]):
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        q.copy_(torch.randn(q.shape, generator=gen).to(torch.bfloat16))
        graph.replay()
        ref = decode_attention_ref(
            q.float(), kv.k_cache.float(), kv.v_cache.float(), kv.page_table, seq_lens, scale
        )
        live = seq_lens > 0
        assert_matches(out[live], ref[live], torch.bfloat16)
        assert torch.count_nonzero(out[~live]) == 0, "a padding row (length 0) must come out as zeros"
