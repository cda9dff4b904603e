"""bench/cpu_linear.py at a tiny shape (its numbers mean nothing; this keeps it running)."""

from __future__ import annotations

import json

import torch

from bench import cpu_linear


def test_tiny_run_measures_plain_and_packed(tmp_path) -> None:
    threads = torch.get_num_threads()
    out = tmp_path / "cpu_linear.json"
    try:
        assert cpu_linear.main(["--tiny", "--dtype", "float32", "--output", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = json.loads(out.read_text())["rows"]
    assert [r["rows"] for r in rows] == list(cpu_linear.TINY_ROWS)
    assert all(r["max_abs_diff"] < 1e-5 and r["packed_us"] > 0 and r["f_linear_us"] > 0 for r in rows)
