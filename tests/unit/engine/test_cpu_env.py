"""A CPU worker's process settings (engine.cpu_env): thread count, allocator, KV pool budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine import cpu_env
from engine.kv_pool import KVPool, PoolSizing


def test_default_threads_take_every_core_below_8_and_leave_two_from_8() -> None:
    assert cpu_env.default_threads(1) == 1
    assert cpu_env.default_threads(2) == 2
    assert cpu_env.default_threads(4) == 4
    assert cpu_env.default_threads(8) == 6
    assert cpu_env.default_threads(16) == 14


def test_workers_wait_asleep_unless_the_user_chose_a_policy() -> None:
    assert cpu_env.worker_environment({}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert cpu_env.worker_environment({"OMP_WAIT_POLICY": "ACTIVE"}) == {}


def test_thread_count_comes_from_the_flag_then_the_environment_then_the_default() -> None:
    env = {cpu_env.THREADS_ENV: "3", cpu_env.LEGACY_THREADS_ENV: "5"}
    assert cpu_env.choose_threads(2, env) == (2, "--cpu-omp-threads")
    assert cpu_env.choose_threads(None, env) == (3, cpu_env.THREADS_ENV)
    assert cpu_env.choose_threads(None, {cpu_env.LEGACY_THREADS_ENV: "5"}) == (5, cpu_env.LEGACY_THREADS_ENV)
    threads, source = cpu_env.choose_threads(None, {})
    cores = cpu_env.physical_cores(cpu_env.usable_cpus())
    assert source == "default" and threads == cpu_env.default_threads(cores)
    with pytest.raises(ValueError, match="must be ≥ 1"):
        cpu_env.choose_threads(None, {cpu_env.THREADS_ENV: "0"})


def test_physical_cores_are_within_the_usable_cpus() -> None:
    cpus = cpu_env.usable_cpus()
    assert 1 <= cpu_env.physical_cores(cpus) <= len(cpus)


def test_available_memory_is_read_from_meminfo(tmp_path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   2000000 kB\n")
    assert cpu_env.available_memory_bytes(meminfo) == 2000000 * 1024
    assert cpu_env.available_memory_bytes(tmp_path / "missing") == cpu_env.FALLBACK_AVAILABLE_BYTES
    budget = cpu_env.cpu_pool_budget_bytes(0.5, available=8 << 30)
    assert budget == int((8 << 30) * 0.5 * cpu_env.CPU_MEMORY_SHARE)


def test_cpu_pool_follows_available_memory_and_the_fraction(monkeypatch) -> None:
    monkeypatch.setattr(cpu_env, "available_memory_bytes", lambda: 16 << 30)
    sizing = PoolSizing(page_size=16, bytes_per_token=46080, max_total_tokens=None, mem_fraction_static=0.85,
                        max_useful_tokens=10**9)
    pages = sizing.num_pages(torch.device("cpu"))
    assert pages - 1 == int((16 << 30) * 0.85 * cpu_env.CPU_MEMORY_SHARE) // 46080 // 16
    half = PoolSizing(16, 46080, None, 0.425, 10**9).num_pages(torch.device("cpu"))
    assert abs((half - 1) * 2 - (pages - 1)) <= 1
    capped = PoolSizing(16, 46080, None, 0.85, max_useful_tokens=1600).num_pages(torch.device("cpu"))
    assert capped == 101


def test_tune_malloc_applies_on_glibc() -> None:
    import platform

    applied = cpu_env.tune_malloc()
    if platform.libc_ver()[0] == "glibc":
        assert applied


def _vm_flags(array: torch.Tensor) -> set[str]:
    """The VmFlags of this process's mappings over ``array`` (/proc/self/smaps)."""
    start, stop = array.data_ptr(), array.data_ptr() + array.nbytes
    flags, inside = set(), False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo < stop and start < hi
        elif inside and head == "VmFlags:":
            flags.update(line.split()[1:])
    return flags


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux only")
def test_cpu_kv_pool_memory_is_kept_off_transparent_huge_pages() -> None:
    """numpy advises huge pages for large arrays ("hg"); the pool asks for small ones ("nh")."""
    pool = KVPool.allocate(num_layers=1, num_pages=1024, page_size=16, num_kv_heads=2, head_dim=256,
                           dtype=torch.float32, device=torch.device("cpu"))  # 64 MiB per array
    for array in pool.k + pool.v:
        flags = _vm_flags(array)
        assert "nh" in flags and "hg" not in flags, flags
        assert not array.any()
