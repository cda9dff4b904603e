"""The paged KV cache: per layer, ``k`` and ``v`` of shape ``[num_pages, page_size,
num_kv_heads, head_dim]`` (the layout of ``engine.kernels.reference``). Page 0 is the padding
page: the scheduler never hands it out, padded rows of a batch write there."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from engine.cpu_env import advise_small_pages

logger = logging.getLogger("pdserve.worker")


@dataclass
class KVPool:
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    page_size: int

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
        return cls(k, v, page_size)

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
