"""bench/kernels.py must keep running: its CPU smoke path (tiny shapes, Triton interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.unit.engine.kernels.interpreter_worker import REPO_ROOT, InterpreterWorker, expect_pass


def test_bench_kernels_tiny_runs_and_writes_json(interpreter: InterpreterWorker, tmp_path: Path) -> None:
    expect_pass(interpreter.probe())  # the smoke run uses the interpreter too
    output = tmp_path / "kernels.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "bench.kernels", "--tiny", "--no-flex", "--output", str(output)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "numbers mean nothing" in proc.stdout
    report = json.loads(output.read_text())
    assert report["meaningful"] is False
    kernels = {row["kernel"] for row in report["rows"] if row["impl"] == "triton"}
    assert len(kernels) == 6, kernels
    assert {"decode", "extend", "rotary_store_kv", "gemv"} <= kernels
    for row in report["rows"]:
        if row["max_rel_err"] is not None:
            assert row["max_rel_err"] < 1e-4, row
