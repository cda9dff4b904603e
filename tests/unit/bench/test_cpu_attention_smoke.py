"""bench/cpu_attention.py at tiny shapes (its numbers mean nothing; this keeps it running): every
decode and extend candidate runs and agrees with the reference."""

from __future__ import annotations

import json

import torch

from bench import cpu_attention


def test_tiny_run_measures_every_candidate_against_the_reference(tmp_path) -> None:
    threads = torch.get_num_threads()
    out = tmp_path / "cpu_attention.json"
    try:
        assert cpu_attention.main(["--tiny", "--extend", "--dtype", "float32", "--output", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    rows = json.loads(out.read_text())["rows"]
    decode = {r["candidate"] for r in rows if "extend" not in r}
    extend = {(r["candidate"], tuple(r["extend"])) for r in rows if "extend" in r}
    assert decode == set(cpu_attention.candidates(1))
    assert extend == {(name, shape) for name in cpu_attention.EXTEND_CANDIDATES
                      for shape in cpu_attention.TINY_EXTEND_SHAPES}
    assert all(r["max_abs_diff"] < 1e-5 and r["cpu_ms_per_layer"] > 0 for r in rows)
