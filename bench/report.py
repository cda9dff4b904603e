"""One table of every benchmark's results: metric, value, target, ratio (value / target), result.

Reads the JSON files that ``bench/kernels.py``, ``bench/one_batch.py``, ``bench/kvtransfer.py``
and ``bench/serving.py`` write (each recognized by its shape; a directory means every ``*.json``
in it) and prints one row per metric. Targets are the ones the benches record (the issue's H100
targets in ``one_batch``) plus "no failed request" for serving; other rows are for reading.

    python -m bench.report bench/results/2026-11-23-h100/
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Line:
    source: str  # the JSON file's stem
    metric: str
    value: float
    target: float | None = None  # value must be <= target (>= with at_least)
    meaningful: bool = True  # False: a CPU smoke run, no verdict
    at_least: bool = False

    @property
    def ratio(self) -> float | None:
        return self.value / self.target if self.target else None  # none for a target of 0

    @property
    def result(self) -> str:
        if self.target is None:
            return ""
        if not self.meaningful:
            return "n/a (CPU)"
        met = self.value >= self.target if self.at_least else self.value <= self.target
        return "pass" if met else "MISS"


Extractor = Callable[[str, dict[str, Any]], Iterator[Line]]


def one_batch_lines(source: str, data: dict[str, Any]) -> Iterator[Line]:
    ok = data.get("meaningful", True)
    for r in data["rows"]:
        if r["phase"] == "prefill":
            name = f"prefill 1x{r['context']}"
        else:
            name = f"decode b={r['batch']} ctx={r['context']}"
        yield Line(source, f"{name} ms", r["ms"], r["target_ms"], ok)
        if r.get("forward_ms") is not None:
            yield Line(source, f"{name} forward alone ms (no sampling)", r["forward_ms"])
        yield Line(source, f"{name} fraction of roofline ({r['roofline_bound']})", r["roofline_fraction"])
        if r["vs_matmuls"] is not None:
            yield Line(source, f"{name} / matmuls alone", r["vs_matmuls"], r["target_vs_matmuls"], ok)
        if r["vs_hf"] is not None:
            yield Line(source, f"{name} speed-up over transformers", r["vs_hf"])
    for name, value in data.get("ceilings", {}).items():
        yield Line(source, f"ceiling {name}", value)
    yield from _profile_lines(source, data.get("profile"))


def _profile_lines(source: str, profile: dict[str, Any] | None) -> Iterator[Line]:
    """A profiled step in three numbers: kernels per layer, the share of its wall time no kernel
    ran, and the share the matmuls ran."""
    for s in (profile or {}).get("steps", []):
        label = f"profile {s['name']} [{s['mode']}]"
        yield Line(source, f"{label} kernels per layer", s["kernels_per_layer"])
        yield Line(source, f"{label} idle share (wall - kernels)", s["idle_share"])
        gemm = sum(c["share"] for c in s["categories"] if c["name"] == "gemm")
        yield Line(source, f"{label} gemm share", gemm)


# Issue targets on an H100: our time over SDPA's on the same inputs (decode attention over
# scattered pages vs SDPA over the same KV laid out contiguously), and effective bandwidth.
DECODE_VS_SDPA = {1: 1.12, 16: 1.10, 64: 1.10}
DECODE_GBPS_AT_LEAST = {"B=64 L=4096": 2800.0}
EXTEND_VS_SDPA = {"L=4096 prefix=0": 1 / 0.85}  # ≥ 0.85x SDPA's speed


def kernels_lines(source: str, data: dict[str, Any]) -> Iterator[Line]:
    ok = data.get("meaningful", True)
    sdpa_ms = {(r["kernel"], r["shape"]): r["ms"] for r in data["rows"] if r["impl"] == "sdpa"}
    for r in data["rows"]:
        if r["impl"] != "triton":
            continue
        label = f"{r['kernel']} {r['shape']}"
        at_least = DECODE_GBPS_AT_LEAST.get(r["shape"]) if r["kernel"] == "decode" else None
        yield Line(source, f"{label} {r['metric']}", r["value"], at_least, ok, at_least=True)
        if r["vs_peer"] is not None:
            yield Line(source, f"{label} speed vs best peer", r["vs_peer"])
        peer = sdpa_ms.get((r["kernel"], r["shape"]))
        if peer:
            yield Line(source, f"{label} time / SDPA's", r["ms"] / peer, _vs_sdpa_target(r), ok)
    for name, value in data.get("ceilings", {}).items():
        yield Line(source, f"ceiling {name}", value)


def _vs_sdpa_target(row: dict[str, Any]) -> float | None:
    if row["kernel"] == "extend":
        return EXTEND_VS_SDPA.get(row["shape"])
    if row["kernel"] == "decode":
        batch = int(row["shape"].split()[0].removeprefix("B="))
        return DECODE_VS_SDPA.get(batch)
    return None


# Issue targets on an H100 for one 4096-token Llama-3-8B request (512 MiB).
TRANSFER_MS_AT_MOST = {"cuda_ipc": 0.6}
TRANSFER_GBPS_AT_LEAST = {"zmq": 2.5}


def kvtransfer_lines(source: str, data: dict[str, Any]) -> Iterator[Line]:
    ok = data.get("device") != "cpu"  # CPU runs are smoke tests
    yield Line(source, "device-to-device copy GB/s", data["d2d_copy_gbps"])
    for r in data["rows"]:
        label = f"{r['backend']}/{r['transport']}"
        gbps_target = TRANSFER_GBPS_AT_LEAST.get(r["backend"])
        yield Line(source, f"{label} GB/s (verified: {r['verified']})", r["gbps"], gbps_target, ok,
                   at_least=True)
        yield Line(source, f"{label} median ms", r["median_ms"], TRANSFER_MS_AT_MOST.get(r["backend"]), ok)
        yield Line(source, f"{label} / device-to-device copy", r["vs_d2d"])


def serving_lines(source: str, data: dict[str, Any]) -> Iterator[Line]:
    res = data["results"]
    yield Line(source, "failed requests", res["failed"], target=0)
    yield Line(source, "request throughput (req/s)", res["request_throughput"])
    yield Line(source, "output tokens/s", res["output_throughput"])
    yield Line(source, "input tokens/s", res["input_throughput"])
    for key, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL")):
        for q in ("p50", "p99"):
            if res[key][q] is not None:
                yield Line(source, f"{label} {q} ms", res[key][q])


def extractor_for(data: Any) -> Extractor | None:
    """Which bench wrote ``data``, by its shape."""
    if not isinstance(data, dict):
        return None
    if "d2d_copy_gbps" in data:
        return kvtransfer_lines
    if "results" in data and "config" in data:
        return serving_lines
    rows = data.get("rows")
    if not isinstance(rows, list):
        return None
    if "model" in data and all("phase" in r for r in rows):
        return one_batch_lines
    if all("kernel" in r for r in rows):
        return kernels_lines
    return None


def collect(paths: list[Path]) -> tuple[list[Line], list[str]]:
    """Lines of every recognized file, and a note for each file that was not."""
    lines: list[Line] = []
    notes: list[str] = []
    for path in _json_files(paths):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            notes.append(f"{path}: unreadable ({exc})")
            continue
        extract = extractor_for(data)
        if extract is None:
            notes.append(f"{path}: not a benchmark result this report knows")
            continue
        try:
            lines.extend(extract(path.stem, data))
        except (KeyError, TypeError) as exc:
            notes.append(f"{path}: malformed ({type(exc).__name__}: {exc})")
    return lines, notes


def _json_files(paths: list[Path]) -> Iterator[Path]:
    for path in paths:
        yield from sorted(path.glob("*.json")) if path.is_dir() else [path]


def format_table(lines: list[Line]) -> str:
    width = max([len(line.metric) for line in lines] + [6])
    src = max([len(line.source) for line in lines] + [5])
    out = [f"{'bench':{src}}  {'metric':{width}}  {'value':>12}  {'target':>8}  {'ratio':>6}  result"]
    for line in lines:
        target = f"{line.target:8.4g}" if line.target is not None else " " * 8
        ratio = f"{line.ratio:6.2f}" if line.ratio is not None else " " * 6
        out.append(f"{line.source:{src}}  {line.metric:{width}}  {line.value:12.4g}  {target}  {ratio}  "
                   f"{line.result}".rstrip())
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, help="JSON files or directories of them")
    args = parser.parse_args(argv)
    lines, notes = collect(args.paths)
    if lines:
        print(format_table(lines))
    for note in notes:
        print("note:", note)
    missed = [line for line in lines if line.result == "MISS"]
    verdicts = sum(line.result in ("pass", "MISS") for line in lines)
    print(f"{verdicts - len(missed)}/{verdicts} targets met" if verdicts else "no targets measured")
    return 0


if __name__ == "__main__":
    sys.exit(main())
