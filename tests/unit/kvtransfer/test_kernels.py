"""Gather / scatter / copy Triton kernels against their torch references (Triton interpreter, in
a child process: see ``kernel_checks.py``), plus the argument checks that run in this process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from kvtransfer import kernels
from tests import REPO_ROOT
from tests.unit.kvtransfer.kernel_checks import CASES, KernelCase


@pytest.fixture(scope="module")
def interpreted_results() -> dict[str, str | None]:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.unit.kvtransfer.kernel_checks"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_triton_matches_reference(interpreted_results: dict[str, str | None], case: KernelCase) -> None:
    assert case.id in interpreted_results
    error = interpreted_results[case.id]
    assert error is None, error


def _pool(num_layers: int = 2, dtype: torch.dtype = torch.float32) -> kernels.PagedCaches:
    k = [torch.randn(6, 4, 2, 8).to(dtype) for _ in range(num_layers)]
    v = [torch.randn(6, 4, 2, 8).to(dtype) for _ in range(num_layers)]
    return kernels.PagedCaches(k, v)


def test_reference_round_trip_moves_exactly_the_listed_pages() -> None:
    src, dst = _pool(), _pool()
    before = [a.clone() for a in dst.arrays]
    staging = kernels.gather_pages_ref(src, [5, 1, 3])
    assert staging.shape == (4, 3, 4, 2, 8)
    kernels.scatter_pages_ref(dst, [2, 4, 1], staging)
    for a, b, old in zip(src.arrays, dst.arrays, before, strict=True):
        assert torch.equal(b[[2, 4, 1]], a[[5, 1, 3]])
        assert torch.equal(b[[0, 3, 5]], old[[0, 3, 5]])


def test_pool_checks_name_the_problem() -> None:
    k = [torch.zeros(6, 4, 2, 8)]
    with pytest.raises(ValueError, match="as many k as v"):
        kernels.PagedCaches(k, [])
    with pytest.raises(ValueError, match="every cache must be"):
        kernels.PagedCaches(k, [torch.zeros(6, 4, 2, 16)])
    with pytest.raises(ValueError, match="contiguous"):
        kernels.PagedCaches(k, [torch.zeros(6, 2, 4, 8).transpose(1, 2)])
    with pytest.raises(ValueError, match="staging must be"):
        kernels.scatter_pages_ref(_pool(), [1, 2], torch.zeros(4, 3, 4, 2, 8))
    with pytest.raises(ValueError, match="pools differ"):
        kernels.copy_pages_ref(_pool(), [1], _pool(dtype=torch.float16), [1])


def test_page_ops_pick_the_torch_reference_on_cpu() -> None:
    assert kernels.page_ops_for(torch.device("cpu")) is kernels.TORCH_OPS
    assert kernels.page_ops_for(torch.device("cuda", 0)) is kernels.TRITON_OPS


def test_vector_alignment_hint_divides_every_offset() -> None:
    pool = _pool()  # separate allocations: offsets are whatever the allocator gave
    assert all(off % pool.alignment == 0 for off in [pool.page_elems, *pool.table.tolist()])
    odd = torch.zeros(2 * 6 * 3 * 1 * 5 + 1)[1:].view(2, 6, 3, 1, 5)  # 15-element pages, odd start
    assert kernels.PagedCaches([odd[0]], [odd[1]]).alignment == 1
