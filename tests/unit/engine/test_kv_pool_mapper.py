"""The CPU pool's PageMapper: pages mapped ahead of the highest page handed out, in a thread,
without changing what they hold; none mapped beyond that; it stops with its pool."""

from __future__ import annotations

import errno
import gc
import logging
import mmap
import resource
import sys
import threading

import numpy as np
import pytest
import torch

from engine import kv_pool
from engine.cpu_env import advise_small_pages, populate
from engine.kv_pool import KVPool, PageMapper
from engine.layers.backend import make_kernel_backend
from engine.runner import ModelRunner

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="madvise(MADV_POPULATE_WRITE) is Linux's")


def _kernel_populates() -> bool:
    memory = mmap.mmap(-1, 4096)
    view = np.frombuffer(memory, dtype=np.uint8)
    done = populate(view.ctypes.data, view.nbytes) == 0
    del view
    memory.close()
    return done


needs_populate = pytest.mark.skipif(sys.platform != "linux" or not _kernel_populates(),
                                    reason="this kernel has no MADV_POPULATE_WRITE (Linux 5.14+)")

PAGE = 16 * 2 * 64  # floats per tensor page: 8 KiB, two 4 KiB pages of memory


def _pool(num_pages: int = 512) -> KVPool:
    return KVPool.allocate(num_layers=2, num_pages=num_pages, page_size=16, num_kv_heads=2, head_dim=64,
                           dtype=torch.float32, device=torch.device("cpu"))


def _write_faults(memory: np.ndarray) -> int:
    """Minor page faults of this thread while it writes every 4 KiB page of ``memory``."""
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    memory[::4096] = 1
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before


@needs_populate
def test_pages_ahead_of_the_highest_handed_out_are_mapped(monkeypatch) -> None:
    monkeypatch.setattr(kv_pool, "MAP_AHEAD_BYTES", 4 * 128 * PAGE * 4)  # 128 pages of 4 tensors
    pool = _pool()
    assert pool.mapper is not None and pool.mapper.ahead == 128
    pool.mapper.flush()
    assert pool.mapper.mapped == 129  # at start-up: past page 0, the padding page
    pool.note_pages(300)
    pool.mapper.flush()
    assert pool.mapper.mapped == 429


@needs_populate
def test_mapped_pages_take_no_fault_at_their_first_write() -> None:
    """Fresh anonymous memory (not the heap's, which earlier tests may have touched), in 4 KiB
    pages whatever the host's transparent huge page setting."""
    page_bytes, num_pages = 8192, 512
    memory = mmap.mmap(-1, page_bytes * num_pages)
    try:
        view = np.frombuffer(memory, dtype=np.uint8)
        advise_small_pages(view.ctypes.data, view.nbytes)
        mapper = PageMapper([view.ctypes.data], page_bytes, num_pages, ahead=128)
        mapper.note(100)
        mapper.flush()
        assert mapper.mapped == 229
        mapped = _write_faults(view[: 228 * page_bytes])
        unmapped = _write_faults(view[230 * page_bytes :])  # 282 pages: 2 faults each
        assert unmapped >= 2 * 282 and mapped < unmapped // 10, (mapped, unmapped)
        mapper.close()
    finally:
        del view
        memory.close()


@needs_populate
def test_mapping_keeps_what_the_steps_wrote_and_stops_at_the_pool_end(monkeypatch) -> None:
    monkeypatch.setattr(kv_pool, "MAP_AHEAD_BYTES", 4 * 64 * PAGE * 4)
    pool = _pool(num_pages=200)
    pool.mapper.flush()
    for i, t in enumerate(pool.k + pool.v):
        t[100:110] = i + 1.0  # written before the mapper gets there
    pool.note_pages(150)
    pool.mapper.flush()
    assert pool.mapper.mapped == 200
    for i, t in enumerate(pool.k + pool.v):
        assert torch.all(t[100:110] == i + 1.0) and not t[110:].any()


def test_small_advances_wait_for_a_quarter_of_the_distance(monkeypatch) -> None:
    mapper = PageMapper([], page_bytes=4096, num_pages=10_000, ahead=100)
    queued = []
    monkeypatch.setattr(mapper._jobs, "put", queued.append)
    mapper.note(0)
    for page in range(1, 60):
        mapper.note(page)
    assert queued == [101, 126, 151]  # every 25 pages, not every step
    mapper.note(9_950)
    mapper.note(9_951)
    assert queued[-1] == 10_000 and queued.count(10_000) == 1
    monkeypatch.undo()
    mapper.close()


def test_a_kernel_without_the_advice_leaves_pages_to_their_first_writes(monkeypatch, caplog) -> None:
    caplog.set_level(logging.INFO, logger="pdserve.worker")
    monkeypatch.setattr(kv_pool, "populate", lambda address, nbytes: errno.EINVAL)
    pool = _pool()
    pool.mapper.flush()
    assert pool.mapper.refused and pool.mapper.mapped == 0
    queued: list[int] = []
    monkeypatch.setattr(pool.mapper._jobs, "put", queued.append)
    pool.note_pages(300)
    assert queued == []  # nothing more is asked of it
    assert "mapped as first written" in caplog.text
    pool.k[0][300].fill_(2.0)
    assert torch.all(pool.k[0][300] == 2.0)


def test_a_passing_failure_leaves_the_range_to_the_next_job(monkeypatch) -> None:
    """Memory short (ENOMEM) for a moment: those pages are not counted as mapped, and the next
    advance maps them; the mapper stays on."""
    failures = [errno.ENOMEM]
    monkeypatch.setattr(kv_pool, "populate", lambda address, nbytes: failures.pop() if failures else 0)
    mapper = PageMapper([0], page_bytes=4096, num_pages=10_000, ahead=100)
    mapper.note(0)
    mapper.flush()
    assert mapper.mapped == 0 and not mapper.refused
    mapper.note(100)
    mapper.flush()
    assert mapper.mapped == 201
    mapper.close()


def test_a_closed_mapper_maps_nothing_it_had_queued(monkeypatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(kv_pool, "populate", lambda address, nbytes: calls.append(address) or 0)
    mapper = PageMapper([1 << 20], page_bytes=4096, num_pages=10_000, ahead=100)
    release = threading.Event()
    mapper._jobs.put(-1)  # holds the thread in a job until released
    monkeypatch.setattr(mapper, "_advance", lambda target: release.wait() if target < 0 else
                        PageMapper._advance(mapper, target))
    mapper.note(50)  # queued behind the held job
    mapper.close()
    release.set()
    mapper._thread.join(timeout=10)
    assert calls == [] and mapper.mapped == 0 and not mapper._thread.is_alive()


def test_an_error_in_a_job_does_not_hang_flush(monkeypatch) -> None:
    mapper = PageMapper([1 << 20], page_bytes=4096, num_pages=10_000, ahead=100)

    def boom(target: int) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(mapper, "_advance", boom)
    mapper.note(0)
    mapper.flush()  # returns: the job is marked done however it ended
    mapper.close()


def test_the_thread_ends_with_its_pool() -> None:
    pool = _pool()
    thread = pool.mapper._thread
    del pool
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_device_pools_have_no_mapper() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pool = KVPool.allocate(1, 8, 16, 2, 64, torch.float16, torch.device("cuda"))
    assert pool.mapper is None


def test_the_runner_notes_the_highest_page_of_each_step_s_appends(monkeypatch) -> None:
    pool = _pool()
    noted: list[int] = []
    monkeypatch.setattr(pool, "note_pages", noted.append)
    cpu = torch.device("cpu")
    runner = ModelRunner(torch.nn.Module(), pool, make_kernel_backend("torch", cpu), 4, 8, cpu)
    runner.append_pages([(0, [5, 9]), (1, [7])])
    runner.append_pages([])
    runner.append_pages([(2, [3])])
    assert noted == [9, 3]
