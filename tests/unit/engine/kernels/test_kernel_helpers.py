"""Host-side pieces of the kernels that need no interpreter: the static split choice and the
test comparator itself (so a wrong kernel output cannot slip through it).

``engine.kernels.decode_attention`` is imported inside the tests, not at collection: importing
triton while pytest collects would fix its interpreter mode for the whole process before other
packages' test setups run."""

from __future__ import annotations

import inspect

import pytest
import torch

from tests.unit.engine.kernels.kernel_cases import assert_matches


def test_splits_fill_the_gpu_for_small_batches_and_vanish_for_large_ones() -> None:
    from engine.kernels.decode_attention import choose_num_splits

    assert choose_num_splits(1, 8, 4096, num_sms=132) == 32
    assert choose_num_splits(256, 8, 4096, num_sms=132) == 1


def test_splits_are_bounded_by_the_longest_context_and_the_cap() -> None:
    from engine.kernels.decode_attention import MAX_SPLITS, MIN_TOKENS_PER_SPLIT, choose_num_splits

    assert choose_num_splits(1, 1, 2 * MIN_TOKENS_PER_SPLIT, num_sms=132) == 2
    assert choose_num_splits(1, 1, 1 << 20, num_sms=1024) == MAX_SPLITS
    assert choose_num_splits(1, 1, 1, num_sms=132) == 1


def test_splits_are_powers_of_two() -> None:
    from engine.kernels.decode_attention import choose_num_splits

    for batch in range(1, 200, 7):
        splits = choose_num_splits(batch, 8, 8192, num_sms=132)
        assert splits & (splits - 1) == 0, (batch, splits)


def test_backend_order_and_signatures_follow_the_references() -> None:
    from engine.kernels import reference
    from engine.kernels.triton_backend import TRITON_FUNCTIONS

    refs = (reference.rotary_store_kv_ref, reference.extend_attention_ref, reference.decode_attention_ref)
    def names(fn, kind):
        return [name for name, p in inspect.signature(fn).parameters.items() if p.kind is kind]

    for kernel, ref in zip(TRITON_FUNCTIONS, refs, strict=True):
        positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
        assert names(kernel, positional) == names(ref, positional), kernel.__name__
        keyword_only = set(names(ref, inspect.Parameter.KEYWORD_ONLY))
        assert keyword_only <= set(names(kernel, inspect.Parameter.KEYWORD_ONLY)), kernel.__name__


def test_rotary_store_kv_checks_shapes_without_launching() -> None:
    from engine.kernels.kv_store import rotary_store_kv

    heads, kv_heads, dim = 4, 2, 8
    cache = torch.zeros(3, 2, kv_heads, dim)
    cos_sin = torch.zeros(16, dim)
    no_tokens = torch.zeros(0, dtype=torch.int64)
    qkv = torch.zeros(0, (heads + 2 * kv_heads) * dim)
    q = rotary_store_kv(qkv, no_tokens, cos_sin, cache, cache.clone(), no_tokens, heads)
    assert q.shape == (0, heads, dim)
    with pytest.raises(ValueError, match="qkv must be"):
        rotary_store_kv(qkv[:, :-dim], no_tokens, cos_sin, cache, cache.clone(), no_tokens, heads)
    with pytest.raises(ValueError, match="cos_sin must be"):
        rotary_store_kv(qkv, no_tokens, cos_sin[:, :-2], cache, cache.clone(), no_tokens, heads)
    one_slot = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="out_loc must be"):
        rotary_store_kv(qkv, no_tokens, cos_sin, cache, cache.clone(), one_slot, heads)
    two = torch.zeros(2, (heads + 2 * kv_heads) * dim)
    strided = torch.zeros(4, dtype=torch.int64)[::2]  # the kernel indexes them with unit stride
    with pytest.raises(ValueError, match="positions must be a contiguous"):
        rotary_store_kv(two, strided, cos_sin, cache, cache.clone(), strided.contiguous(), heads)


def test_comparator_rejects_one_wrong_row_in_low_precision() -> None:
    ref = torch.randn(64, 4, 128)
    out = ref.clone()
    out[3, 1] += 0.1 * ref[3, 1].norm() / 128**0.5  # ~10% error on one row of 256
    assert_matches(ref.clone().bfloat16(), ref, torch.bfloat16)
    with pytest.raises(AssertionError, match="row relative error"):
        assert_matches(out.bfloat16(), ref, torch.bfloat16)


def test_comparator_is_tight_in_fp32() -> None:
    ref = torch.randn(8, 2, 64)
    with pytest.raises(AssertionError):
        assert_matches(ref + 1e-3, ref, torch.float32)


def test_gemv_checks_shapes_without_launching() -> None:
    from engine.kernels.gemv import MAX_GEMV_ROWS, gemv

    weight = torch.zeros(8, 32)
    assert gemv(torch.zeros(0, 32), weight).shape == (0, 8)  # nothing to launch
    with pytest.raises(ValueError, match="at most"):
        gemv(torch.zeros(MAX_GEMV_ROWS + 1, 32), weight)
    with pytest.raises(ValueError, match="K=31"):
        gemv(torch.zeros(1, 31), weight)
    with pytest.raises(ValueError, match="contiguous weight"):
        gemv(torch.zeros(1, 8), weight.t())
    with pytest.raises(ValueError, match="contiguous last dimension"):
        gemv(torch.zeros(32, 2).t(), weight)
    with pytest.raises(ValueError, match="bias must be"):
        gemv(torch.zeros(1, 32), weight, bias=torch.zeros(7))
    with pytest.raises(ValueError, match="is torch.float16"):
        gemv(torch.zeros(1, 32, dtype=torch.float16), weight)
