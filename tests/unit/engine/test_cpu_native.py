"""Building the C kernels (engine.kernels.cpu_native): a build per shape, cached on disk and
reused, a clear error without a compiler or on a failed build, and then the CPU backend's
kernels without C (Numba's decode, torch's extend and RMSNorm)."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import cpu, cpu_decode, cpu_native
from engine.kernels.reference import decode_attention_ref, extend_attention_ref
from engine.layers.backend import make_kernel_backend


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty kernel cache, and the module's memos cleared before and after."""
    monkeypatch.setenv(cpu_native.CACHE_ENV, str(tmp_path))
    memos = (cpu_native.compiler, cpu_native.available, cpu_native.decode_kernels, cpu_native.extend_kernels,
             cpu_native.rms_norm_kernels)
    for memo in memos:
        memo.cache_clear()
    yield tmp_path
    for memo in memos:
        memo.cache_clear()


def _need_compiler() -> None:
    try:
        cpu_native.compiler()
    except cpu_native.NativeUnavailable as e:
        pytest.skip(str(e))


def test_a_build_per_shape_cached_and_reused(fresh) -> None:
    _need_compiler()
    first = cpu_native.build("cpu_decode.c", {"HEAD_DIM": 64, "GROUP": 3})
    assert first.parent == fresh and first.exists()
    built_at = first.stat().st_mtime_ns
    assert cpu_native.build("cpu_decode.c", {"HEAD_DIM": 64, "GROUP": 3}) == first
    assert first.stat().st_mtime_ns == built_at  # loaded, not built again
    other = cpu_native.build("cpu_decode.c", {"HEAD_DIM": 64, "GROUP": 4})
    assert other != first
    assert sorted(p.name for p in fresh.iterdir()) == sorted([first.name, other.name])  # no temporaries


def test_a_failed_build_says_why_and_leaves_nothing(fresh) -> None:
    _need_compiler()
    with pytest.raises(cpu_native.NativeUnavailable, match="HEAD_DIM"):
        cpu_native.build("cpu_decode.c", {})  # the source's #error
    assert list(fresh.iterdir()) == []


def _assert_fallbacks() -> None:
    assert cpu_decode.choose(1).func is cpu_decode.decode_attention_numba
    kernels = make_kernel_backend("cpu", torch.device("cpu"))
    assert kernels.rms_norm is cpu.rms_norm_cpu and kernels.extend_attention is cpu.extend_attention_cpu
    assert kernels.decode_attention.func is cpu_decode.decode_attention_numba


def test_without_a_compiler_the_fallbacks_serve(fresh, monkeypatch) -> None:
    monkeypatch.setenv("CC", "no-such-compiler")
    with pytest.raises(cpu_native.NativeUnavailable, match="no C compiler"):
        cpu_native.compiler()
    assert "no-such-compiler" in cpu_native.available()
    _assert_fallbacks()


def test_a_compiler_that_cannot_build_them_means_the_fallbacks(fresh, monkeypatch, tmp_path_factory) -> None:
    """A compiler on PATH whose builds fail (no libc headers; clang, without __builtin_shuffle):
    the probe in available() says so; the worker starts on the fallbacks."""
    broken = tmp_path_factory.mktemp("bin") / "broken-cc"
    broken.write_text('#!/bin/sh\n[ "$1" = --version ] && echo "broken-cc 1.0" && exit 0\n'
                      'echo "fatal error: math.h: No such file or directory" >&2; exit 1\n')
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    assert "math.h" in cpu_native.available()
    _assert_fallbacks()
    assert [p.name for p in fresh.iterdir()] == []


def test_with_a_compiler_the_c_kernels_serve(fresh) -> None:
    _need_compiler()
    assert cpu_native.available() is None
    kernels = make_kernel_backend("cpu", torch.device("cpu"))
    assert kernels.rms_norm is cpu.rms_norm_native
    assert kernels.extend_attention.func is cpu.extend_attention_native
    chosen = cpu_decode.choose(2)
    assert chosen.func is cpu_decode.decode_attention_native and chosen.keywords == {"threads": 2}
    shapes = [(9, 3, 64), (4, 4, 8), (9, 3, 64)]  # built at start-up, not in the first step
    built = [{"HEAD_DIM": 64, "GROUP": 3}, {"HEAD_DIM": 8, "GROUP": 1}]
    extend = [cpu_native.library_path("cpu_extend.c", defines) for defines in built]
    decode = [cpu_native.library_path("cpu_decode.c", defines) for defines in built]
    assert not any(p.exists() for p in extend + decode)
    cpu.warm_up(torch.bfloat16, shapes, False, threads=1)  # a prefill worker: extend's alone
    assert all(p.exists() for p in extend) and not any(p.exists() for p in decode)
    cpu.warm_up(torch.bfloat16, shapes, True, threads=1)
    assert all(p.exists() for p in decode)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_built_for_another_target_match_the_references(fresh, monkeypatch, dtype) -> None:
    """$PDSERVE_CPU_MARCH: AVX2 code (no AVX-512: 16-lane vectors split in two; bf16 widened and
    multiply-added, not AVX512-BF16 dot products) gives the references' results too."""
    _need_compiler()
    if "avx2" not in cpu_native._cpu_identity():
        pytest.skip("the CPU cannot run x86-64-v3 code")
    monkeypatch.setenv(cpu_native.MARCH_ENV, "x86-64-v3")
    assert cpu_native.available() is None
    assert "-march=x86-64-v3" in cpu_native._args({})
    gen = torch.Generator().manual_seed(5)
    table = torch.randperm(40, generator=gen)[:36].int().view(3, 12) + 1
    k_cache, v_cache = (torch.randn(41, 4, 3, 64, generator=gen).to(dtype) for _ in range(2))
    q = torch.randn(3, 9, 64, generator=gen).to(dtype)
    lens = torch.tensor([5, 40, 17], dtype=torch.int32)
    args = (q, k_cache, v_cache, table, lens, 0.125)
    close = dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(cpu_decode.decode_attention_native(*args).float(),
                               decode_attention_ref(*args).float(), **close)
    indptr = torch.tensor([0, 3, 30, 31], dtype=torch.int32)
    prefixes = torch.tensor([2, 10, 16], dtype=torch.int32)
    qs = torch.randn(31, 9, 64, generator=gen).to(dtype)
    args = (qs, k_cache, v_cache, table, indptr, prefixes, 0.125)
    torch.testing.assert_close(cpu.extend_attention_native(*args).float(),
                               extend_attention_ref(*args).float(), **close)
