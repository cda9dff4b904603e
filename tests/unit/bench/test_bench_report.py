"""bench/report.py: each bench's JSON is recognized, targets give pass / MISS, CPU runs no verdict."""

from __future__ import annotations

import json
from dataclasses import asdict

from bench import kernels, kvtransfer, one_batch, profile_step, report


def _write(path, obj) -> None:
    path.write_text(json.dumps(obj))


def _one_batch(meaningful: bool, decode_ms: float) -> dict:
    row = one_batch.Row("decode", 1, 512, decode_ms, 1000 / decode_ms, 4.0, "memory", 4.0 / decode_ms,
                        matmuls_ms=4.5, vs_matmuls=decode_ms / 4.5, hf_ms=20.0, vs_hf=20.0 / decode_ms,
                        target_ms=6.0, target_vs_matmuls=1.05)
    data = one_batch.Report("NVIDIA H100", meaningful, "llama-3-8b", "bfloat16", "2.11")
    data.rows.append(row)
    return asdict(data)


def test_one_table_from_every_bench(tmp_path, capsys):
    _write(tmp_path / "one_batch.json", _one_batch(True, 5.0))
    k = kernels.Report("NVIDIA H100", True, "2.11", "3.6", {"copy_GBps": 3000.0})
    k.rows = [kernels.Row("decode", "B=1 L=512", "triton", 0.01, "GB/s", 800.0, vs_peer=1.5, vs_ceiling=0.3),
              kernels.Row("decode", "B=1 L=512", "sdpa", 0.015, "GB/s", 530.0, vs_ceiling=0.2)]
    _write(tmp_path / "kernels.json", asdict(k))
    t = kvtransfer.Report("cuda", {}, 1 << 29, 2000.0)
    t.rows = [kvtransfer.Row("cuda_ipc", "ipc", 5, 1.0, 0.9, 500.0, 0.25, True)]
    _write(tmp_path / "kvtransfer.json", asdict(t))
    stats = {"mean": 1.0, "p50": 1.0, "p90": 2.0, "p99": 3.0}
    serving = {"config": {}, "results": {"completed": 9, "failed": 1, "request_throughput": 2.0,
                                         "output_throughput": 100.0, "input_throughput": 50.0,
                                         "ttft_ms": stats, "tpot_ms": stats, "itl_ms": stats}}
    _write(tmp_path / "serving.json", serving)
    (tmp_path / "notes.json").write_text("[1, 2]")

    lines, notes = report.collect([tmp_path])
    by_metric = {(line.source, line.metric): line for line in lines}
    decode = by_metric[("one_batch", "decode b=1 ctx=512 ms")]
    assert (decode.target, decode.result) == (6.0, "pass")
    vs_mm = by_metric[("one_batch", "decode b=1 ctx=512 / matmuls alone")]
    assert vs_mm.result == "MISS" and abs(vs_mm.ratio - (5.0 / 4.5) / 1.05) < 1e-9
    assert by_metric[("kernels", "decode B=1 L=512 speed vs best peer")].value == 1.5
    assert not any(line.metric.startswith("decode B=1 L=512") and "sdpa" in line.metric for line in lines)
    vs_sdpa = by_metric[("kernels", "decode B=1 L=512 time / SDPA's")]
    assert (vs_sdpa.target, vs_sdpa.result) == (1.12, "pass") and abs(vs_sdpa.value - 0.01 / 0.015) < 1e-9
    assert by_metric[("kvtransfer", "cuda_ipc/ipc / device-to-device copy")].value == 0.25
    ipc_ms = by_metric[("kvtransfer", "cuda_ipc/ipc median ms")]
    assert (ipc_ms.target, ipc_ms.result) == (0.6, "MISS")
    assert by_metric[("serving", "failed requests")].result == "MISS"
    assert notes == [f"{tmp_path / 'notes.json'}: not a benchmark result this report knows"]

    assert report.main([str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "2/5 targets met" in printed and "MISS" in printed


def test_cpu_runs_get_no_verdict(tmp_path):
    _write(tmp_path / "one_batch.json", _one_batch(False, 50.0))
    lines, _ = report.collect([tmp_path / "one_batch.json"])
    assert {line.result for line in lines if line.target is not None} == {"n/a (CPU)"}


def test_one_batch_profile_gives_three_lines_per_profiled_step():
    data = _one_batch(True, 5.0)
    gemm = profile_step.Category("gemm", 200.0, 4.0, 0.8, 20.0)
    step = profile_step.StepProfile("decode b=1 ctx=512", "graph", 5, 5.0, 4.5, 0.5, 0.1, 4.8, 320.0, 10.0,
                                    [gemm])
    data["profile"] = asdict(profile_step.Profile("cuda", [], [step]))
    lines = {line.metric: line for line in report.one_batch_lines("one_batch", data)}
    label = "profile decode b=1 ctx=512 [graph]"
    assert lines[f"{label} kernels per layer"].value == 10.0
    assert lines[f"{label} idle share (wall - kernels)"].value == 0.1
    assert lines[f"{label} gemm share"].value == 0.8
    assert all(line.target is None for line in lines.values() if line.metric.startswith("profile"))
