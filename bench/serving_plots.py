"""The serving benchmark's runs drawn as PNG files (matplotlib, the ``bench`` extra): TTFT and
TPOT distributions (CDFs, one curve per request rate), and throughput and latency against the
request rate. Reads the runs as ``bench.serving`` reports them (``[{"request_rate", "results"}]``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

try:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("plots need matplotlib: pip install 'pdserve[bench]'") from e

Run = dict[str, Any]


def draw_runs(runs: list[Run], out_dir: Path) -> list[Path]:
    """Draw every plot of ``runs`` into ``out_dir``; return the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        _cdf(runs, "ttft_ms", "TTFT (ms)", out_dir / "ttft_cdf.png"),
        _cdf(runs, "tpot_ms", "TPOT (ms)", out_dir / "tpot_cdf.png"),
        _throughput(runs, out_dir / "throughput_vs_rate.png"),
        _latency(runs, out_dir / "latency_vs_rate.png"),
    ]


def _rate_label(run: Run) -> str:
    return f"{run['request_rate']} req/s"


def _cdf(runs: list[Run], key: str, xlabel: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        values = np.sort(np.asarray(run["results"]["samples"][key], dtype=float))
        if values.size:
            ax.step(values, np.arange(1, values.size + 1) / values.size, where="post", label=_rate_label(run))
    ax.set(xlabel=xlabel, ylabel="fraction of requests", title=f"{xlabel.split()[0]} distribution")
    return _save(fig, ax, path)


def _rate_axis(ax: Any, runs: list[Run]) -> list[int]:
    """Request rates as evenly spaced categories (``inf`` is one of them)."""
    xs = list(range(len(runs)))
    ax.set_xticks(xs, [str(run["request_rate"]) for run in runs])
    ax.set_xlabel("request rate (req/s)")
    return xs


def _throughput(runs: list[Run], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = _rate_axis(ax, runs)
    ax.plot(xs, [r["results"]["output_throughput"] for r in runs], "o-", label="output tokens/s")
    ax.plot(xs, [r["results"]["input_throughput"] for r in runs], "s-", label="input tokens/s")
    ax.set_ylabel("tokens/s")
    twin = ax.twinx()
    twin.plot(xs, [r["results"]["request_throughput"] for r in runs], "^--", color="gray", label="requests/s")
    twin.set_ylabel("requests/s")
    twin.legend(loc="lower right")
    ax.set_title("throughput against request rate")
    return _save(fig, ax, path)


def _latency(runs: list[Run], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = _rate_axis(ax, runs)
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT")):
        for q, style in (("p50", "o-"), ("p99", "o--")):
            values = [r["results"][key][q] for r in runs]
            ax.plot(xs, [np.nan if v is None else v for v in values], style, label=f"{name} {q}")
    ax.set(ylabel="ms", yscale="log", title="latency against request rate")
    return _save(fig, ax, path)


def _save(fig: Any, ax: Any, path: Path) -> Path:
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
