"""C kernels for the CPU backend (``engine/kernels/csrc/``), compiled on first use by the system's
C compiler for this CPU (``-march=native``) and loaded with ``ctypes``: what Numba cannot express
(a shuffle tree, software prefetch, AVX512-BF16 dot products) in GCC's portable vector extensions,
with no Python or torch headers involved, so a build takes about a second. Each kernel is built
per model shape (head dim, query heads per KV head: constants to the compiler) and cached on disk
under a name that hashes the sources (``csrc/*.c``, ``*.h``), the flags, the compiler and the CPU
(``$PDSERVE_KERNEL_CACHE``, else ``~/.cache/pdserve/kernels``); concurrent builders race
harmlessly (each renames its own file into place). ``$CC`` names the compiler (else ``cc``),
``$PDSERVE_CPU_MARCH`` the target (else ``native``; e.g. ``x86-64-v3`` for code without AVX-512).
Without a compiler that builds them, ``available()`` says why and the callers keep their
fallbacks (Numba's decode, torch's extend and RMSNorm)."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).parent / "csrc"
FLAGS = ("-O3", "-shared", "-fPIC", "-fno-math-errno", "-Wall", "-Wno-psabi")
CACHE_ENV = "PDSERVE_KERNEL_CACHE"
MARCH_ENV = "PDSERVE_CPU_MARCH"  # the -march= of the builds: native unless set (x86-64-v3, ...)
PROBE_SHAPE = (64, 1)  # (head dim, group) built by available()
_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
# decode_f32 / decode_bf16 (engine/kernels/csrc/cpu_decode.c)
DECODE_ARGTYPES = [_P, _P, _P, _P, _I, _P, _I, _I, _I, _I, _F, _P, _I, _P]
# extend_f32 / extend_bf16 (engine/kernels/csrc/cpu_extend.c)
EXTEND_ARGTYPES = [_P, _P, _P, _P, _I, _P, _P, _I, _I, _I, _I, _F, _P, _I, _P]


class NativeUnavailable(RuntimeError):
    """No C compiler, or the build failed: the message says which."""


@functools.cache
def compiler() -> tuple[str, str]:
    """(the compiler's path, its version line); NativeUnavailable without one."""
    name = os.environ.get("CC", "cc")
    path = shutil.which(name)
    if path is None:
        raise NativeUnavailable(f"no C compiler ({name!r} is not on PATH; set $CC)")
    version = subprocess.run([path, "--version"], capture_output=True, text=True, check=False)
    return path, version.stdout.partition("\n")[0]


@functools.cache
def _cpu_identity() -> str:
    """What ``-march=native`` reads: the CPU's feature flags (a cached build is per CPU)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {platform.node()}"  # no /proc: per host


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pdserve" / "kernels")


def _args(defines: dict[str, int]) -> list[str]:
    march = os.environ.get(MARCH_ENV) or "native"
    return [*FLAGS, f"-march={march}", *(f"-D{k}={v}" for k, v in sorted(defines.items()))]


def library_path(source: str, defines: dict[str, int]) -> Path:
    """Where the build of ``csrc/<source>`` with ``defines`` is cached (built or not)."""
    _, version = compiler()
    text = b"".join(p.read_bytes() for p in sorted(SOURCE_DIR.iterdir()) if p.suffix in (".c", ".h"))
    key = hashlib.sha1(b"\0".join([text, " ".join(_args(defines)).encode(), version.encode(),
                                   _cpu_identity().encode()]))
    return cache_dir() / f"{Path(source).stem}-{key.hexdigest()[:16]}.so"


def build(source: str, defines: dict[str, int]) -> Path:
    """The shared library of ``csrc/<source>`` with ``defines``, built unless cached."""
    cc, version = compiler()
    args = _args(defines)
    target = library_path(source, defines)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *args, str(SOURCE_DIR / source), "-o", tmp, "-lm"],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise NativeUnavailable(f"building {source} failed: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("built %s (%s) with %s", target.name, " ".join(args[len(FLAGS):]), version)
    return target


@functools.cache
def decode_kernels(head_dim: int, group: int) -> tuple[ctypes._CFuncPtr, ctypes._CFuncPtr]:
    """(float32, bf16) paged decode attention for ``head_dim`` and ``group`` query heads per KV
    head (``csrc/cpu_decode.c``)."""
    lib = ctypes.CDLL(str(build("cpu_decode.c", {"HEAD_DIM": head_dim, "GROUP": group})))
    for fn in (lib.decode_f32, lib.decode_bf16):
        fn.argtypes, fn.restype = DECODE_ARGTYPES, None
    return lib.decode_f32, lib.decode_bf16


@functools.cache
def extend_kernels(head_dim: int, group: int) -> tuple[ctypes._CFuncPtr, ctypes._CFuncPtr]:
    """(float32, bf16) paged causal extend attention (``csrc/cpu_extend.c``)."""
    lib = ctypes.CDLL(str(build("cpu_extend.c", {"HEAD_DIM": head_dim, "GROUP": group})))
    for fn in (lib.extend_f32, lib.extend_bf16):
        fn.argtypes, fn.restype = EXTEND_ARGTYPES, None
    return lib.extend_f32, lib.extend_bf16


@functools.cache
def rms_norm_kernels() -> dict[torch.dtype, ctypes._CFuncPtr]:
    """``rms_norm_f32`` and ``rms_norm_bf16`` of ``csrc/cpu_elementwise.c``, by dtype."""
    lib = ctypes.CDLL(str(build("cpu_elementwise.c", {})))
    for fn in (lib.rms_norm_f32, lib.rms_norm_bf16):
        fn.argtypes, fn.restype = [_P, _I, _P, _I, _P, _F, _I, _I, _P, _P], None
    return {torch.float32: lib.rms_norm_f32, torch.bfloat16: lib.rms_norm_bf16}


@functools.cache
def available() -> str | None:
    """None when the C kernels build here, else why not (said once in the log): every source is
    built once at a common shape (cached), so that a compiler that cannot build them (no libc
    headers; clang, which lacks ``__builtin_shuffle``) means the fallbacks, not a failed start."""
    try:
        rms_norm_kernels()
        decode_kernels(*PROBE_SHAPE)
        extend_kernels(*PROBE_SHAPE)
    except NativeUnavailable as e:
        logger.warning("CPU C kernels unavailable, their fallbacks instead: %s", e)
        return str(e)
    return None


def takes_pool(k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether the attention kernels read this pool: dense float32 or bf16 (others go to the
    callers' fallbacks)."""
    return (k_cache.dtype in (torch.float32, torch.bfloat16) and v_cache.dtype == k_cache.dtype
            and k_cache.is_contiguous() and v_cache.is_contiguous())


def int32_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as int32 with contiguous rows, what the kernels index with (keep the result alive
    while a kernel reads its ``data_ptr()``)."""
    t = t.to(torch.int32)
    return t if t.stride(-1) == 1 else t.contiguous()


def split_by_cost(costs: np.ndarray, parts: int) -> list[tuple[int, int]]:
    """[begin, end) ranges of ``costs``' items of about equal total cost, at most ``parts``."""
    items = costs.shape[0]
    if parts <= 1 or items <= 1:
        return [(0, items)]
    cumulative = np.cumsum(costs, dtype=np.int64)
    targets = cumulative[-1] * np.arange(1, parts) / parts
    bounds = [0, *np.searchsorted(cumulative, targets, side="right").tolist(), items]
    return [(a, b) for a, b in itertools.pairwise(bounds) if b > a]


def run_parts(parts: list[tuple[int, int]], call: Callable[[int, int, int], None], threads: int) -> None:
    """``call(i, begin, end)`` for each part, on a pool of ``threads`` when there are several (a
    ctypes call releases the GIL): a part per thread, each with its own scratch ``i``."""
    if len(parts) == 1:
        call(0, *parts[0])
        return
    list(_executor(threads).map(lambda i: call(i, *parts[i]), range(len(parts))))


@functools.cache
def _executor(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="cpu-kernel")
