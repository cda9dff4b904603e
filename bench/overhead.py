"""How much CPU the serving path spends around the GPU, one row per target (docs/design.md,
"Scheduler"; issue "the CPU never makes the GPU wait"), all measured on CPU:

- ``scheduler``: the real ``SchedulerCore`` per step at 1, 64, 256, 512 running requests with
  ~1,000-token contexts, arrivals and finishes, and a waiting queue of 0, 1,024, 4,096
  (median step, worst step, a full GC's pause) — bench/overhead_core.py;
- ``codec``: encoding the largest per-step ``BatchOutput`` at 256 running, against the same
  content as plain msgpack lists;
- ``frontend``: the real front end's CPU per streamed token, a fake instance streaming to 256
  clients, each on its own connection, and again over 4 connections asking for
  ``batch_outputs`` (as API servers connect: one frame per connection and step), and that
  again over 2 front-end processes (``--tokenizer-worker-num 2``: each gets every row and keeps
  its own; per core of theirs, so the deployment's rate is that times the cores they get) —
  bench/overhead_procs.py;
- ``deployment``: real front end + scheduler + a fake GPU worker sleeping a fixed step time:
  the GPU's idle % with the batch full (512 running at 10 ms, 256 at 5 ms).

CPU time only (``time.thread_time``, /proc). ``--runs N`` repeats everything and reports
medians; ``--json PATH`` writes every number; each row prints its target and whether it is met.
``--tiny`` is a seconds-long configuration for tests.

    python -m bench.overhead --runs 3 --json bench/results/overhead.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from bench.overhead_core import CoreCase, measure_codec, measure_core
from bench.overhead_procs import measure_deployment, measure_frontend


@dataclass
class Row:
    name: str
    value: float
    unit: str
    target: float
    higher_is_better: bool = False

    @property
    def met(self) -> bool:
        if math.isnan(self.value):
            return False
        return self.value >= self.target if self.higher_is_better else self.value <= self.target

    def line(self) -> str:
        if math.isinf(self.target):
            return f"{self.name:<52} {self.value:>10.3f} {self.unit:<9} (no target)"
        sign = "≥" if self.higher_is_better else "≤"
        verdict = "met" if self.met else "NOT met"
        return f"{self.name:<52} {self.value:>10.3f} {self.unit:<9} target {sign} {self.target:g}  {verdict}"


@dataclass
class Config:
    running: tuple[int, ...]
    waiting: tuple[int, ...]
    steps: int
    context: int
    fe_clients: int
    fe_tokens: int
    fe_batched_connections: int  # connections of the batched front-end row
    fe_processes: int  # front-end processes of the last front-end row
    deployments: tuple[tuple[int, float, int], ...]  # (running, step ms, tokens per request)


FULL = Config((1, 64, 256, 512), (0, 1024, 4096), 200, 1000, 256, 200, 4, 2,
              ((512, 10.0, 150), (256, 5.0, 150)))
TINY = Config((1, 16), (0, 32), 20, 64, 8, 10, 2, 2, ((16, 5.0, 8),))

SCHED_TARGET_MS = {256: 0.5, 512: 1.0}  # per step; other batch sizes are reported without a target
WORST_STEP_TARGET_MS = 2.0
CODEC_TARGET_MS = 0.05
FRONTEND_TARGET_TOKENS_S = 250_000.0
GPU_IDLE_TARGET_PCT = 1.0


def run_once(cfg: Config, sections: set[str]) -> tuple[list[Row], dict]:
    rows: list[Row] = []
    raw: dict = {}
    frame_256 = b""
    if "scheduler" in sections or "codec" in sections:
        for running in cfg.running:
            for waiting in cfg.waiting:
                res = measure_core(CoreCase(running, waiting, context=cfg.context, steps=cfg.steps))
                numbers = {k: v for k, v in asdict(res).items() if k != "batch_output"}
                raw[f"scheduler/{running}/{waiting}"] = numbers
                target = SCHED_TARGET_MS.get(running, math.inf)
                name = f"scheduler step, {running} running, {waiting} waiting"
                rows.append(Row(name, res.median_step_ms, "ms", target))
                worst = max(res.max_step_ms, res.full_gc_ms)
                name = f"  worst step (or full GC), {running}/{waiting}"
                rows.append(Row(name, worst, "ms", WORST_STEP_TARGET_MS))
                if running == max(r for r in cfg.running if r <= 256) and waiting == 0:
                    frame_256 = res.batch_output
    if "codec" in sections and frame_256:
        codec = measure_codec(frame_256)
        raw["codec"] = asdict(codec)
        rows.append(Row(f"encode BatchOutput ({codec.rows} rows)", codec.encode_ms, "ms", CODEC_TARGET_MS))
        rows.append(Row("  same content as plain msgpack lists (floor)", codec.plain_ms, "ms", math.inf))
    if "frontend" in sections:
        fe = measure_frontend(cfg.fe_clients, cfg.fe_tokens)
        raw["frontend"] = asdict(fe)
        rows.append(Row(f"front end, {fe.clients} streaming clients", fe.tokens_per_s_per_core, "tokens/s",
                        FRONTEND_TARGET_TOKENS_S, higher_is_better=True))
        fe = measure_frontend(cfg.fe_clients, cfg.fe_tokens, cfg.fe_batched_connections, batch_outputs=True)
        raw["frontend_batched"] = asdict(fe)
        rows.append(Row(f"  same over {fe.connections} connections, batch_outputs", fe.tokens_per_s_per_core,
                        "tokens/s", FRONTEND_TARGET_TOKENS_S, higher_is_better=True))
        fe = measure_frontend(cfg.fe_clients, cfg.fe_tokens, cfg.fe_batched_connections, batch_outputs=True,
                              frontends=cfg.fe_processes)
        raw["frontend_processes"] = asdict(fe)
        rows.append(Row(f"  same over {fe.frontends} front-end processes, per core", fe.tokens_per_s_per_core,
                        "tokens/s", FRONTEND_TARGET_TOKENS_S, higher_is_better=True))
    if "deployment" in sections:
        for running, step_ms, tokens in cfg.deployments:
            dep = measure_deployment(running, step_ms, tokens)
            raw[f"deployment/{running}/{step_ms:g}"] = asdict(dep)
            if not (dep.leak_free and dep.token_counts_right):
                raise RuntimeError(f"deployment run went wrong: {dep}")
            rows.append(Row(f"GPU idle, {running} running, {step_ms:g} ms step", dep.gpu_idle_pct, "%",
                            GPU_IDLE_TARGET_PCT))
    return rows, raw


def median_rows(runs: list[list[Row]]) -> list[Row]:
    """Row by row, the median value over runs (every run has the same rows, in order)."""
    out = []
    for same in zip(*runs, strict=True):
        first = same[0]
        out.append(Row(first.name, statistics.median(r.value for r in same), first.unit, first.target,
                       first.higher_is_better))
    return out


def main(argv: list[str] | None = None, out: Callable[[str], None] = print) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--json", help="write every number here")
    parser.add_argument("--sections", default="scheduler,codec,frontend,deployment")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    sections = set(args.sections.split(","))
    unknown = sections - {"scheduler", "codec", "frontend", "deployment"}
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    cfg = TINY if args.tiny else FULL
    runs, raws = [], []
    for _ in range(args.runs):
        rows, raw = run_once(cfg, sections)
        runs.append(rows)
        raws.append(raw)
    rows = median_rows(runs)
    for row in rows:
        out(row.line())
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} {platform.machine()} {platform.python_version()}",
        "runs": args.runs,
        "config": asdict(cfg),
        "rows": [dict(asdict(r), met=r.met) for r in rows],
        "raw": raws,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
