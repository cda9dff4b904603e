"""The process settings of a worker that computes on the CPU, applied once at start-up.

- **Threads.** By default a thread per physical core, two cores left to the scheduler and front
  end from 8 cores (``default_threads``); ``--cpu-omp-threads N`` (or the environment's
  ``PDSERVE_CPU_OMP_THREADS``, or the older ``PDSERVE_TORCH_THREADS``) sets the count. OpenMP
  threads that wait at the end of an op **sleep** (``OMP_WAIT_POLICY=PASSIVE``, put in every
  worker's environment by the launcher: ``worker_environment``) instead of spinning: with the
  default spin, a thread per core beside one busy process cost 10× the CPU per token (318
  against 30 CPU-ms, tests/e2e/test_cpu_busy_machine.py), with sleeping threads 0.9× (24 against
  26); on a quiet 2-core machine two sleeping threads gave 1.45× the tokens/s of one thread and
  4% less than two spinning ones (bench/results/).
- **The allocator.** A step allocates and frees the same large activations layer after layer;
  glibc hands blocks above its mmap threshold back to the kernel at once, and every new one is
  paid again in page faults (on this VM a 14 MB gather took 10× longer than the copy itself).
  ``tune_malloc`` raises the mmap threshold to its maximum and keeps freed memory in the heap.
- **The KV pool.** ``cpu_pool_budget_bytes``: ``--mem-fraction-static`` of the memory the
  kernel reports available (``MemAvailable``), times ``CPU_MEMORY_SHARE``: host memory is
  shared with the OS and every other process, unlike a GPU's. Its memory is mapped as it comes
  into use (by ``engine.kv_pool.PageMapper``, with ``populate``, ahead of the steps' first
  writes), in 4 KiB pages (``advise_small_pages``): with the transparent huge pages that
  numpy asks for, the served SmolLM2 float32 workload of ``bench.vs_vllm`` ran 6 % slower on the
  2-core Firecracker VM of CI (55.1 against 58.8 tokens/s, medians of three rounds alternated
  with vLLM; bf16 unchanged), where every page the guest maps first is paid again in the host.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
from pathlib import Path

logger = logging.getLogger("pdserve.worker")

THREADS_ENV = "PDSERVE_CPU_OMP_THREADS"
WAIT_POLICY_ENV = "OMP_WAIT_POLICY"  # read by libgomp as torch loads it: set before the process starts
LEGACY_THREADS_ENV = "PDSERVE_TORCH_THREADS"  # what tests and older scripts set
CPU_MEMORY_SHARE = 0.25  # of MemAvailable × mem_fraction_static: the default CPU pool budget
FALLBACK_AVAILABLE_BYTES = 4 << 30  # where /proc/meminfo cannot be read

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit
_TRIM_THRESHOLD = 1 << 30
_MADV_NOHUGEPAGE = 15  # Linux's <sys/mman.h>
_MADV_POPULATE_WRITE = 23  # Linux 5.14+


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name, use_errno=True) if name else None
    except OSError:
        return None


_LIBC = _libc()


def usable_cpus() -> set[int]:
    """The CPUs this process may run on."""
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def physical_cores(cpus: set[int]) -> int:
    """Distinct (package, core) pairs among ``cpus`` (hyperthreads counted once); ``len(cpus)``
    where the topology cannot be read."""
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = topo.joinpath("physical_package_id").read_text()
            cores.add((package, topo.joinpath("core_id").read_text()))
        except OSError:
            return len(cpus)
    return len(cores) or len(cpus)


def default_threads(cores: int) -> int:
    """Threads for the worker: every physical core below 8 (the scheduler and front end wake
    rarely, and the worker's threads sleep while they do), two cores left to them from 8."""
    reserved = 0 if cores < 8 else 2
    return max(1, cores - reserved)


def worker_environment(environ: dict[str, str] | os._Environ = os.environ) -> dict[str, str]:
    """What the launcher adds to a worker process's environment: sleeping OpenMP waits, unless
    the user chose a policy."""
    return {} if environ.get(WAIT_POLICY_ENV) else {WAIT_POLICY_ENV: "PASSIVE"}


def choose_threads(flag: int | None, environ: dict[str, str] | os._Environ = os.environ) -> tuple[int, str]:
    """(threads, where the number came from): the flag, then the environment, then the default."""
    if flag is not None:
        return flag, "--cpu-omp-threads"
    for name in (THREADS_ENV, LEGACY_THREADS_ENV):
        value = environ.get(name)
        if value:
            threads = int(value)
            if threads < 1:
                raise ValueError(f"{name}={value}: must be ≥ 1")
            return threads, name
    return default_threads(physical_cores(usable_cpus())), "default"


def apply_threads(flag: int | None) -> int:
    """Set torch's intra-op threads (and one inter-op thread); returns the count."""
    import torch

    threads, source = choose_threads(flag)
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # already set, or the pool already started
        torch.set_num_interop_threads(1)
    logger.info("CPU: %d torch threads (%s), OpenMP wait policy %s", threads, source,
                os.environ.get(WAIT_POLICY_ENV, "libgomp's default (spin)"))
    return threads


def tune_malloc() -> bool:
    """Keep freed activations in the heap (glibc only; elsewhere a no-op): True if applied."""
    mallopt = getattr(_LIBC, "mallopt", None)
    if mallopt is None:
        return False
    applied = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX) == 1
    applied = mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1 and applied
    return applied


def advise_small_pages(address: int, nbytes: int) -> bool:
    """Ask the kernel not to back ``[address, address + nbytes)`` with transparent huge pages
    (``madvise(MADV_NOHUGEPAGE)``; numpy advises huge pages for its large arrays): True if it
    took the advice (Linux)."""
    return _madvise(address, nbytes, _MADV_NOHUGEPAGE) == 0


def populate(address: int, nbytes: int) -> int:
    """Map ``[address, address + nbytes)`` now, writable, as its first writes would, without
    changing what it holds (``madvise(MADV_POPULATE_WRITE)``): 0 if the kernel did, else the
    errno (``EINVAL``: a kernel before Linux 5.14, or no ``madvise`` here; ``ENOMEM``: memory
    short, or not mapped)."""
    return _madvise(address, nbytes, _MADV_POPULATE_WRITE)


def _madvise(address: int, nbytes: int, advice: int) -> int:
    """``madvise`` over the memory pages that hold ``[address, address + nbytes)``: 0, or the
    errno."""
    madvise = getattr(_LIBC, "madvise", None)
    if madvise is None:
        return errno.EINVAL
    start = address // mmap.PAGESIZE * mmap.PAGESIZE
    if madvise(ctypes.c_void_p(start), ctypes.c_size_t(address + nbytes - start), advice) == 0:
        return 0
    return ctypes.get_errno()


def available_memory_bytes(meminfo: Path = Path("/proc/meminfo")) -> int:
    """``MemAvailable`` (bytes): what can be allocated without swapping."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return FALLBACK_AVAILABLE_BYTES


def cpu_pool_budget_bytes(mem_fraction_static: float, available: int | None = None) -> int:
    """The KV pool budget of a CPU worker (see the module docstring)."""
    if available is None:
        available = available_memory_bytes()
    return int(available * mem_fraction_static * CPU_MEMORY_SHARE)
