"""Gather / scatter / copy kernel checks, run under the Triton interpreter in a child process.

``TRITON_INTERPRET=1`` must be set before triton is imported, and setting it in the shared pytest
process would turn every later kernel there into an interpreted one (see
``tests/unit/engine/kernels/interpreter_worker.py``), so ``test_kernels.py`` runs this module once as
``python -m tests.unit.kvtransfer.kernel_checks`` with the variable set; it prints one JSON map
``{case id: null | traceback}``. Every check compares the Triton kernel bit-exactly with the torch
reference on fresh random pools, pages shuffled, untouched pages included.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from dataclasses import dataclass

import torch

Caches = tuple[list[torch.Tensor], list[torch.Tensor]]  # per-layer k caches, v caches


@dataclass(frozen=True)
class KernelCase:
    dtype: str
    num_layers: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    num_pages: int  # in each pool
    move: int  # pages moved
    one_allocation: bool  # all layers are views of one tensor (else one tensor per cache)
    seed: int = 0

    @property
    def id(self) -> str:
        alloc = "one" if self.one_allocation else "many"
        return (
            f"{self.dtype}-L{self.num_layers}-ps{self.page_size}-h{self.num_kv_heads}-d{self.head_dim}"
            f"-move{self.move}of{self.num_pages}-{alloc}"
        )


# Pairwise over dtype × page size × head dim × allocation; page elements below, at and above
# the kernel's block (2048) so masking and several blocks per page are both covered.
CASES = (
    KernelCase("float32", 2, 16, 2, 64, 12, 5, False),
    KernelCase("float16", 3, 4, 2, 128, 10, 7, True),
    KernelCase("float32", 1, 1, 1, 128, 8, 6, True),
    KernelCase("float16", 2, 8, 4, 64, 9, 8, False),
    KernelCase("bfloat16", 2, 16, 2, 128, 6, 3, True),
    KernelCase("float32", 2, 3, 1, 64, 7, 4, False),
    KernelCase("float16", 1, 16, 1, 64, 5, 0, False),
)


def make_pool(case: KernelCase, fill: bool, generator: torch.Generator, device: str = "cpu") -> Caches:
    """Per-layer k and v caches, random (``fill``) or zero."""
    dtype = getattr(torch, case.dtype)
    page = (case.page_size, case.num_kv_heads, case.head_dim)
    shape = (2 * case.num_layers, case.num_pages, *page)
    data = torch.randn(shape, generator=generator).to(dtype) if fill else torch.zeros(shape, dtype=dtype)
    data = data.to(device)
    arrays = list(data.unbind(0)) if case.one_allocation else [a.clone() for a in data.unbind(0)]
    return arrays[0::2], arrays[1::2]


def check(case: KernelCase, device: str = "cpu") -> None:
    """Raise AssertionError unless every kernel matches its reference bit-exactly on ``device``."""
    from kvtransfer import kernels

    g = torch.Generator().manual_seed(case.seed)
    src = kernels.PagedCaches(*make_pool(case, True, g, device))
    src_pages = (torch.randperm(case.num_pages - 1, generator=g)[: case.move] + 1).tolist()
    dst_pages = (torch.randperm(case.num_pages - 1, generator=g)[: case.move] + 1).tolist()

    staging = kernels.gather_pages(src, src_pages)
    expected = kernels.gather_pages_ref(src, src_pages)
    assert torch.equal(staging.view(torch.uint8), expected.view(torch.uint8)), "gather differs"

    got, want = (kernels.PagedCaches(*make_pool(case, False, g, device)) for _ in range(2))
    kernels.scatter_pages(got, dst_pages, staging)
    kernels.scatter_pages_ref(want, dst_pages, expected)
    _assert_pools_equal(got, want, "scatter")

    got, want = (kernels.PagedCaches(*make_pool(case, False, g, device)) for _ in range(2))
    kernels.copy_pages(src, src_pages, got, dst_pages)
    kernels.copy_pages_ref(src, src_pages, want, dst_pages)
    _assert_pools_equal(got, want, "copy")
    if case.move:
        assert any(a.abs().sum() > 0 for a in got.arrays), "copy wrote nothing"


def _assert_pools_equal(got, want, what: str) -> None:
    for i, (a, b) in enumerate(zip(got.arrays, want.arrays, strict=True)):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), f"{what} differs in array {i}"


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("kernel_checks needs TRITON_INTERPRET=1 in its environment")
    torch.set_num_threads(1)
    results = {}
    for case in CASES:
        try:
            check(case)
            results[case.id] = None
        except Exception:  # every failure goes back to the test of that case
            results[case.id] = traceback.format_exc()
    sys.stdout.write(json.dumps(results) + "\n")


if __name__ == "__main__":
    main()
