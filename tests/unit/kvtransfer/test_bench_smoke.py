"""bench/kvtransfer.py at its tiny shape on CPU, so the script cannot rot."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bench import kvtransfer as bench
from kvtransfer.nixl_agent import nixl_available


def test_tiny_benchmark_moves_and_verifies_the_request(tmp_path: Path) -> None:
    out = tmp_path / "kvtransfer.json"
    argv = ["--tiny", "--reps", "1", "--transports", "tcp", "--output", str(out)]
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    (row,) = [r for r in report["rows"] if r["backend"] == "zmq"]
    assert row["verified"] and row["reps"] == 1 and row["gbps"] > 0
    assert report["request_bytes"] == bench.TINY.pages * bench.TINY.layout("zmq").page_bytes
    nixl_rows = [r for r in report["rows"] if r["backend"] == "nixl"]
    if nixl_available():
        assert [(r["verified"], r["gbps"] > 0) for r in nixl_rows] == [(True, True)] * 2  # pages, slices
        assert "slices, rank 1/TP 2" in nixl_rows[1]["transport"]
    else:
        assert nixl_rows == [] and "nixl: the nixl-cu12 package is not installed" in report["skipped"]
    if not torch.cuda.is_available():
        assert "cuda_ipc: no CUDA device" in report["skipped"]
