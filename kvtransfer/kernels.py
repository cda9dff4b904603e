"""Page gather / scatter / copy for KV transfer: one kernel launch per request, all layers at once.

A KV pool is ``L`` layers of ``k`` and ``v`` caches ``[num_pages, page_size, num_kv_heads, head_dim]``
(see ``engine/kernels/reference.py``). ``PagedCaches`` sees it as ``2 * L`` page arrays ordered
``k0, v0, k1, v1, ...``; a *staging buffer* holds ``n`` pages of every array contiguously,
``[2 * L, n, page_size, num_kv_heads, head_dim]``, which is what travels between hosts.

One Triton kernel moves pages between any two of these places: program ``(i, c, b)`` copies
block ``b`` of page ``i`` of array ``c``. The arrays of a pool are separate allocations, so the
kernel addresses them by element offsets from one base pointer (a table computed once per pool);
pages are copied as same-width integers, so every dtype (bf16 and fp8 included) moves bit-exactly.
The ``*_ref`` functions beside each entry point are the plain-torch oracles and the CPU path.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import triton
import triton.language as tl

_BITS_DTYPE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_BLOCK = 2048


@triton.jit
def _copy_pages_kernel(
    base_ptr,  # integer view of the anchor tensor; every address is an element offset from it
    src_table_ptr,  # [C] int64 offsets of the source arrays (used when SRC_POOL)
    src_pages_ptr,  # [n] page ids in the source arrays (used when SRC_POOL)
    src_shift,  # added to source offsets; with not SRC_POOL, the staging buffer's offset
    dst_table_ptr,
    dst_pages_ptr,
    dst_shift,
    num_pages,
    page_elems,
    SRC_POOL: tl.constexpr,
    DST_POOL: tl.constexpr,
    ALIGN: tl.constexpr,  # every source and destination offset is a multiple of it (vector loads)
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0)
    c = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < page_elems
    if SRC_POOL:
        src_page = tl.load(src_pages_ptr + i).to(tl.int64)
        src = tl.load(src_table_ptr + c) + src_shift + src_page * page_elems
    else:
        src = src_shift + (c * num_pages + i) * page_elems
    if DST_POOL:
        dst_page = tl.load(dst_pages_ptr + i).to(tl.int64)
        dst = tl.load(dst_table_ptr + c) + dst_shift + dst_page * page_elems
    else:
        dst = dst_shift + (c * num_pages + i) * page_elems
    src = tl.multiple_of(src, ALIGN)
    dst = tl.multiple_of(dst, ALIGN)
    tl.store(base_ptr + dst + offs, tl.load(base_ptr + src + offs, mask=mask), mask=mask)


class PagedCaches:
    """The K and V caches of one KV pool, checked once, with the offset table the kernel needs.

    ``k_caches`` and ``v_caches`` are per-layer ``[num_pages, page_size, num_kv_heads, head_dim]``
    tensors of one dtype and device, each contiguous (they may share one allocation or not).
    """

    def __init__(self, k_caches: Sequence[torch.Tensor], v_caches: Sequence[torch.Tensor]) -> None:
        if not k_caches or len(k_caches) != len(v_caches):
            raise ValueError(f"need as many k as v caches (>= 1); got {len(k_caches)} and {len(v_caches)}")
        self.arrays: list[torch.Tensor] = [t for kv in zip(k_caches, v_caches, strict=True) for t in kv]
        first = self.arrays[0]
        for t in self.arrays:
            if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
                raise ValueError(
                    f"every cache must be {tuple(first.shape)} {first.dtype} on {first.device}; "
                    f"got {tuple(t.shape)} {t.dtype} on {t.device}"
                )
            if t.dim() != 4 or not t.is_contiguous():
                raise ValueError(f"caches must be contiguous [pages, page_size, heads, dim]; got {t.shape}")
        self.num_pages, self.page_size, self.num_kv_heads, self.head_dim = first.shape
        self.dtype = first.dtype
        self.device = first.device
        self.page_shape = tuple(first.shape[1:])
        self.page_elems = first[0].numel()
        self.elem_bytes = first.element_size()
        self._bits = _BITS_DTYPE[self.elem_bytes]
        self.base = first.view(self._bits)
        offsets = [self.offset_of(t) for t in self.arrays]
        self.table = torch.tensor(offsets, dtype=torch.int64, device=self.device)
        self.alignment = _alignment(self.page_elems, *offsets)
        self._tables = {self.device: self.table}

    @property
    def num_arrays(self) -> int:
        return len(self.arrays)

    def staging_shape(self, num_pages: int) -> tuple[int, ...]:
        return (self.num_arrays, num_pages, *self.page_shape)

    def staging_bytes(self, num_pages: int) -> int:
        return self.num_arrays * num_pages * self.page_elems * self.elem_bytes

    def table_on(self, device: torch.device) -> torch.Tensor:
        """The offset table on ``device`` (for a kernel launched there), copied once."""
        if device not in self._tables:
            self._tables[device] = self.table.to(device)
        return self._tables[device]

    def offset_of(self, t: torch.Tensor) -> int:
        """Element offset of ``t``'s first element from this pool's base pointer."""
        delta = t.data_ptr() - self.base.data_ptr()
        if delta % self.elem_bytes:
            raise ValueError("tensor is not aligned to the pool's element size")
        return delta // self.elem_bytes


def _alignment(*offsets: int) -> int:
    """The largest power of two (at most 16) dividing every offset, in elements."""
    common = math.gcd(*offsets)
    return math.gcd(common & -common, 16) if common else 16


def _launch(
    anchor: PagedCaches,
    num_pages: int,
    src: tuple[torch.Tensor, torch.Tensor, int],
    dst: tuple[torch.Tensor, torch.Tensor, int],
    src_pool: bool,
    dst_pool: bool,
    align: int,
) -> None:
    """``src`` / ``dst``: (offset table, page ids, shift); ``align`` divides every offset."""
    grid = (num_pages, anchor.num_arrays, triton.cdiv(anchor.page_elems, _BLOCK))
    _copy_pages_kernel[grid](
        anchor.base, *src, *dst, num_pages, anchor.page_elems,
        SRC_POOL=src_pool, DST_POOL=dst_pool, ALIGN=align, BLOCK=_BLOCK, num_warps=4,
    )


def _page_ids(pages: torch.Tensor | Sequence[int], device: torch.device) -> torch.Tensor:
    if isinstance(pages, torch.Tensor):
        return pages.to(device=device, dtype=torch.int64)
    return torch.tensor(list(pages), dtype=torch.int64, device=device)


def _check_staging(pool: PagedCaches, staging: torch.Tensor, num_pages: int) -> None:
    shape = pool.staging_shape(num_pages)
    if tuple(staging.shape) != shape or staging.dtype != pool.dtype or not staging.is_contiguous():
        raise ValueError(f"staging must be contiguous {shape} {pool.dtype}; got {tuple(staging.shape)}")
    if staging.device != pool.device:
        raise ValueError(f"staging is on {staging.device}, the pool on {pool.device}")


def gather_pages(
    pool: PagedCaches, pages: torch.Tensor | Sequence[int], out: torch.Tensor | None = None
) -> torch.Tensor:
    """Copy ``pages`` of every array of ``pool`` into a staging buffer (one launch)."""
    ids = _page_ids(pages, pool.device)
    n = ids.numel()
    if out is None:
        out = torch.empty(pool.staging_shape(n), dtype=pool.dtype, device=pool.device)
    _check_staging(pool, out, n)
    if n:
        shift = pool.offset_of(out)
        align = _alignment(pool.alignment, shift)
        _launch(pool, n, (pool.table, ids, 0), (pool.table, ids, shift), True, False, align)
    return out


def scatter_pages(pool: PagedCaches, pages: torch.Tensor | Sequence[int], staging: torch.Tensor) -> None:
    """Copy a staging buffer into ``pages`` of every array of ``pool`` (one launch)."""
    ids = _page_ids(pages, pool.device)
    n = ids.numel()
    _check_staging(pool, staging, n)
    if n:
        shift = pool.offset_of(staging)
        align = _alignment(pool.alignment, shift)
        _launch(pool, n, (pool.table, ids, shift), (pool.table, ids, 0), False, True, align)


def copy_pages(
    src: PagedCaches,
    src_pages: torch.Tensor | Sequence[int],
    dst: PagedCaches,
    dst_pages: torch.Tensor | Sequence[int],
) -> None:
    """Copy ``src_pages`` of ``src`` to ``dst_pages`` of ``dst`` directly (one launch). ``dst`` may
    be another process's pool opened through CUDA IPC: it lives in this process's address space."""
    _check_same_layout(src, dst)
    src_ids, dst_ids = _page_ids(src_pages, src.device), _page_ids(dst_pages, src.device)
    if src_ids.numel() != dst_ids.numel():
        raise ValueError(f"{src_ids.numel()} source pages but {dst_ids.numel()} destination pages")
    if src_ids.numel():
        shift = src.offset_of(dst.base)
        align = _alignment(src.alignment, dst.alignment, shift)
        dst_side = (dst.table_on(src.device), dst_ids, shift)
        _launch(src, src_ids.numel(), (src.table, src_ids, 0), dst_side, True, True, align)


def _check_same_layout(a: PagedCaches, b: PagedCaches) -> None:
    """Same page arrays; the devices may differ (another GPU reached through peer access)."""
    def key(p: PagedCaches) -> tuple:
        return p.num_arrays, p.page_shape, p.dtype, p.device.type

    if key(a) != key(b):
        raise ValueError(
            f"pools differ: {a.num_arrays} x {a.page_shape} {a.dtype} on {a.device} vs "
            f"{b.num_arrays} x {b.page_shape} {b.dtype} on {b.device}"
        )


# --------------------------------------------------------------------------------------------
# Plain-torch references (the oracle in tests, and the CPU path)
# --------------------------------------------------------------------------------------------


def gather_pages_ref(
    pool: PagedCaches, pages: torch.Tensor | Sequence[int], out: torch.Tensor | None = None
) -> torch.Tensor:
    ids = _page_ids(pages, pool.device)
    if out is None:
        out = torch.empty(pool.staging_shape(ids.numel()), dtype=pool.dtype, device=pool.device)
    _check_staging(pool, out, ids.numel())
    torch.stack([a[ids] for a in pool.arrays], out=out)
    return out


def scatter_pages_ref(pool: PagedCaches, pages: torch.Tensor | Sequence[int], staging: torch.Tensor) -> None:
    ids = _page_ids(pages, pool.device)
    _check_staging(pool, staging, ids.numel())
    for array, block in zip(pool.arrays, staging, strict=True):
        array[ids] = block


def copy_pages_ref(
    src: PagedCaches,
    src_pages: torch.Tensor | Sequence[int],
    dst: PagedCaches,
    dst_pages: torch.Tensor | Sequence[int],
) -> None:
    _check_same_layout(src, dst)
    src_ids, dst_ids = _page_ids(src_pages, src.device), _page_ids(dst_pages, dst.device)
    for a, b in zip(src.arrays, dst.arrays, strict=True):
        b[dst_ids] = a[src_ids].to(b.device)


@dataclass(frozen=True)
class PageOps:
    """The gather / scatter / copy implementation for one device, chosen once at start-up."""

    gather: Callable[..., torch.Tensor]
    scatter: Callable[..., None]
    copy: Callable[..., None]


TRITON_OPS = PageOps(gather_pages, scatter_pages, copy_pages)
TORCH_OPS = PageOps(gather_pages_ref, scatter_pages_ref, copy_pages_ref)


def page_ops_for(device: torch.device) -> PageOps:
    """Triton on CUDA; the torch reference elsewhere (CPU has no Triton backend)."""
    return TRITON_OPS if device.type == "cuda" else TORCH_OPS


class DeviceLane:
    """Where a backend's device work on ``pool`` runs: its own CUDA stream, or inline on CPU."""

    def __init__(self, pool: PagedCaches) -> None:
        self.pool = pool
        self.ops = page_ops_for(pool.device)
        self.stream = torch.cuda.Stream(pool.device) if pool.device.type == "cuda" else None

    @contextlib.contextmanager
    def running(self, after: torch.cuda.Event | None = None) -> Iterator[None]:
        """Run the body's device work on this lane (after ``after``) and wait for it."""
        if self.stream is None:
            yield
            return
        with torch.cuda.device(self.pool.device), torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            yield
        self.stream.synchronize()

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """A host byte buffer; pinned (from torch's caching host allocator) next to a GPU."""
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.stream is not None)


class Lander(Protocol):
    """Where a decode side puts the pages it received: a staging buffer of ``staging_shape``
    (every layer's K and V of the pages, the heads the layout advertises) into ``dst_pages``."""

    dtype: torch.dtype

    def staging_shape(self, num_pages: int) -> tuple[int, ...]: ...

    def land(self, dst_pages: list[int], staging: torch.Tensor) -> None:
        """Write ``staging`` (on the host or the pool's device); when it returns, the pages are written."""


class PoolLander:
    """The plain lander: every head of a page goes into this worker's own pool."""

    def __init__(self, pool: PagedCaches) -> None:
        self.pool = pool
        self.dtype = pool.dtype
        self._lane = DeviceLane(pool)

    def staging_shape(self, num_pages: int) -> tuple[int, ...]:
        return self.pool.staging_shape(num_pages)

    def land(self, dst_pages: list[int], staging: torch.Tensor) -> None:
        lane = self._lane
        with lane.running():
            lane.ops.scatter(lane.pool, dst_pages, staging.to(lane.pool.device, non_blocking=True))
