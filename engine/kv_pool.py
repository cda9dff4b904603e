"""The paged KV cache: per layer, ``k`` and ``v`` of shape ``[num_pages, page_size,
num_kv_heads, head_dim]`` (the layout of ``engine.kernels.reference``). Page 0 is the padding
page: the scheduler never hands it out, padded rows of a batch write there."""

from __future__ import annotations

import errno
import logging
import os
import queue
import threading
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from engine.cpu_env import advise_small_pages, populate

logger = logging.getLogger("pdserve.worker")

MAP_AHEAD_BYTES = 256 << 20  # of a CPU pool (every layer's K and V) mapped past its highest page


@dataclass
class KVPool:
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    page_size: int
    mapper: PageMapper | None = None  # CPU pools: maps pages ahead of their first writes

    @classmethod
    def allocate(
        cls,
        num_layers: int,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> KVPool:
        # Zeros, not empty: padded rows read the padding page, and the torch / CPU attention read
        # whole pages, slots not yet written included (masked scores, but 0 × NaN is NaN); a
        # reused heap block (the weights a tensor-parallel rank just freed) may hold NaN
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        k = [_zeros(shape, dtype, device) for _ in range(num_layers)]
        v = [_zeros(shape, dtype, device) for _ in range(num_layers)]
        pool = cls(k, v, page_size)
        if device.type == "cpu":
            pool.mapper = PageMapper.start(pool, MAP_AHEAD_BYTES)
        return pool

    def note_pages(self, highest: int) -> None:
        """The scheduler has handed out pages up to ``highest``: the pages after it are the next
        to be written (CPU pools map them ahead)."""
        if self.mapper is not None:
            self.mapper.note(highest)

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[0]

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor; on the CPU from ``calloc`` (numpy's zeros, viewed as ``dtype``: the zero
    bit pattern is 0.0 in every float type), whose large blocks the kernel maps as zero pages
    when first touched, so a pool sized from free memory costs memory and start-up time only as
    it fills (``torch.zeros`` writes every byte: 0.33 s and resident memory per GiB), in small
    pages (``engine.cpu_env.advise_small_pages`` says why)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    carrier = _UNSIGNED[torch.empty((), dtype=dtype).element_size()]
    array = np.zeros(shape, dtype=carrier)
    advise_small_pages(array.ctypes.data, array.nbytes)
    return torch.from_numpy(array).view(dtype)


class PageMapper:
    """Maps a CPU pool's pages in a thread, ahead of the steps that first write them.

    A CPU pool's zero pages are mapped by the kernel as they are first written (``_zeros``), a
    page fault per 4 KiB: on the CI VM about 0.45 CPU-s per GiB, inside the step that writes
    them, 1–2 % of a served workload's time (``bench.vs_vllm``). The scheduler hands out the
    lowest free pages first, so the next pages written lie just above the highest handed out
    so far: the runner says which that is after each step's page appends (``note``), and this
    thread maps every layer's K and V up to ``ahead`` pages past it (``populate``, which maps
    without writing: whatever the steps wrote stays) on a core the step is not using. What is
    mapped stays within ``ahead`` pages of what the scheduler has handed out, not the whole pool
    (``torch.zeros`` would map it all at start-up: 0.33 s and resident memory per GiB). Pages
    written out of that order are mapped by their first write, as without the mapper."""

    def __init__(self, addresses: list[int], page_bytes: int, num_pages: int, ahead: int) -> None:
        self.addresses = addresses  # of each K and V tensor; no reference to the tensors
        self.page_bytes = page_bytes  # of one tensor's page
        self.num_pages = num_pages
        self.ahead = ahead
        self.mapped = 0  # pages [0, mapped) of every tensor (the thread's)
        self.refused = False  # the kernel cannot (before Linux 5.14): nothing more is asked of it
        self.closed = False  # its pool is gone: what is still queued is dropped
        self._asked = 0  # the highest target queued (the runner's)
        self._jobs: queue.Queue[int | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="kv-pool-mapper", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, pool: KVPool, ahead_bytes: int) -> PageMapper:
        """A mapper of ``pool``'s tensors, mapping its first pages now; it stops when the pool
        is collected."""
        tensors = pool.k + pool.v
        page_bytes = tensors[0][0].numel() * tensors[0].element_size()
        ahead = max(1, ahead_bytes // (page_bytes * len(tensors)))
        mapper = cls([t.data_ptr() for t in tensors], page_bytes, pool.num_pages, ahead)
        weakref.finalize(pool, mapper.close)
        mapper.note(0)
        return mapper

    def note(self, highest: int) -> None:
        """Pages up to ``highest`` are handed out: map up to ``ahead`` past it, a quarter of
        ``ahead`` at a time (the step's thread queues a job at most that often)."""
        target = min(highest + 1 + self.ahead, self.num_pages)
        enough = target - self._asked >= max(self.ahead // 4, 1) or target == self.num_pages
        if enough and target > self._asked and not self.refused:
            self._asked = target
            self._jobs.put(target)

    def flush(self) -> None:
        """Wait until every queued job is done."""
        self._jobs.join()

    def close(self) -> None:
        self.closed = True
        self._jobs.put(None)

    def _run(self) -> None:
        while True:
            target = self._jobs.get()
            try:
                if target is None:
                    return
                self._advance(target)
            except Exception:  # a mapper's failure costs page faults, never the worker
                logger.exception("KV pool: mapping pages ahead failed")
            finally:
                self._jobs.task_done()

    def _advance(self, target: int) -> None:
        """Map pages [mapped, target) of every tensor; on a passing failure (``ENOMEM``) they
        stay unmapped until the next job asks again."""
        if self.closed or self.refused or target <= self.mapped:
            return
        first, nbytes = self.mapped * self.page_bytes, (target - self.mapped) * self.page_bytes
        for address in self.addresses:
            error = populate(address + first, nbytes)
            if error == errno.EINVAL:
                self.refused = True
                logger.info("KV pool: pages mapped as first written (no MADV_POPULATE_WRITE: Linux < 5.14)")
                return
            if error:
                logger.debug("KV pool: mapping pages %d..%d: %s", self.mapped, target, os.strerror(error))
                return
        self.mapped = target


@dataclass(frozen=True)
class PoolSizing:
    """What decides the pool size; ``num_pages`` applies the rule."""

    page_size: int
    bytes_per_token: int  # K and V of every layer
    max_total_tokens: int | None  # --max-total-tokens: overrides everything else
    mem_fraction_static: float
    max_useful_tokens: int  # every slot at full context: more pages could never be used

    def num_pages(self, device: torch.device) -> int:
        """Usable pages plus the padding page.

        ``--max-total-tokens`` if given; else on CUDA ``mem_fraction_static`` of the memory
        free after the weights were loaded; on CPU ``mem_fraction_static`` of a share of the
        memory available after the weights were loaded (``engine.cpu_env.cpu_pool_budget_bytes``).
        Both capped at ``max_useful_tokens``."""
        if self.max_total_tokens is not None:
            tokens = self.max_total_tokens
        else:
            tokens = min(self._budget_bytes(device) // self.bytes_per_token, self.max_useful_tokens)
        usable = max(tokens // self.page_size, 1)
        return usable + 1

    def _budget_bytes(self, device: torch.device) -> int:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return int(free * self.mem_fraction_static)
        from engine.cpu_env import cpu_pool_budget_bytes

        return cpu_pool_budget_bytes(self.mem_fraction_static)


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * num_kv_heads * head_dim * dtype.itemsize
