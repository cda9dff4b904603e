"""bench/cpu_norm.py at a tiny shape (its numbers mean nothing; this keeps it running)."""

from __future__ import annotations

import pytest
import torch

from bench import cpu_norm
from engine.kernels import cpu_native


def test_tiny_run(capsys) -> None:
    if (why := cpu_native.available()) is not None:
        pytest.skip(f"the C kernels cannot be built here: {why}")
    threads = torch.get_num_threads()
    try:
        assert cpu_norm.main(["--hidden", "40", "--rows", "1", "3", "--min-s", "0.01"]) == 0
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all("C kernel" in line for line in lines)  # 2 dtypes × 2 row counts
