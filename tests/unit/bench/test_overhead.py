"""bench/overhead.py in its tiny configuration (its numbers mean little at that size; this keeps
every row running), and the row arithmetic."""

from __future__ import annotations

import json
import math

from bench import overhead
from bench.overhead_core import CoreCase, measure_codec, measure_core


def test_tiny_run_reports_every_row_with_its_target(tmp_path):
    out = tmp_path / "overhead.json"
    lines: list[str] = []
    overhead.main(["--tiny", "--json", str(out)], out=lines.append)
    data = json.loads(out.read_text())
    names = [r["name"] for r in data["rows"]]
    cfg = overhead.TINY
    for running in cfg.running:
        for waiting in cfg.waiting:
            assert f"scheduler step, {running} running, {waiting} waiting" in names
    assert any(n.startswith("encode BatchOutput") for n in names)
    assert any(n.startswith("front end,") for n in names)
    assert any("batch_outputs" in n for n in names)
    batched = data["raw"][0]["frontend_batched"]
    assert batched["batch_outputs"] and batched["connections"] == cfg.fe_batched_connections
    assert batched["tokens"] == cfg.fe_clients * cfg.fe_tokens
    assert any(n.startswith("GPU idle,") for n in names)
    assert len(lines) == len(names) and all(("target" in line) or ("no target" in line) for line in lines)
    for key, dep in data["raw"][0].items():
        if key.startswith("deployment/"):
            assert dep["leak_free"] and dep["token_counts_right"], dep
            assert dep["requests"] == dep["running"] and dep["max_batch"] > 0


def test_core_steps_are_measured_with_finishes_and_arrivals():
    res = measure_core(CoreCase(running=8, waiting=4, context=40, max_new=(2, 6), steps=30))
    assert res.steps == 30 and res.finished > 0
    assert 0 < res.median_step_ms <= res.max_step_ms
    codec = measure_codec(res.batch_output, reps=5)
    assert codec.rows > 0 and codec.encode_ms > 0


def test_median_rows_and_verdicts():
    runs = [[overhead.Row("a", v, "ms", 1.0)] for v in (0.5, 3.0, 0.9)]
    (row,) = overhead.median_rows(runs)
    assert row.value == 0.9 and row.met
    assert not overhead.Row("b", 2.0, "ms", 1.0).met
    assert overhead.Row("c", 2.0, "tokens/s", 1.0, higher_is_better=True).met
    assert not overhead.Row("d", math.nan, "%", 1.0).met
