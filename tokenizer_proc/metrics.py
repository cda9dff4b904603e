"""Prometheus metrics of a deployment, as the front end answers a client ``metrics`` request
(docs/design.md, "Metrics").

The front end sees every request arrive, its first token, each later output and its end: it
keeps the per-request latencies and token counts (``FrontendMetrics``) as plain counters and
bucket arrays, since ``on_output`` runs for every output of every request: the whole call, a
bisect and a few additions, costs about 0.3 µs of CPU, ``prometheus_client``'s
``Histogram.observe`` alone about 0.7 µs (its locks). What only an instance knows (queues, KV
pages, prefix cache, queue time, KV transfers) arrives in its ``StatusReport`` as
``InstanceMetrics``. ``MetricsExposition`` renders both through custom collectors of one
``prometheus_client`` registry of its own: the instances' series carry the labels
``instance_name`` and ``role`` (not ``instance``, which Prometheus sets to the scraped target).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from protocol.messages import BucketHistogram, FinishReason, InstanceMetrics, Role
from tokenizer_proc.request_state import LiveRequest

log = logging.getLogger("pdserve.frontend")

PREFIX = "pdserve:"
INSTANCE_LABELS = ("instance_name", "role")

# vLLM's buckets (s); inter-token latency with two finer ones for fast decode steps.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)
ITL_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
    7.5, 10.0, 20.0, 40.0, 80.0,
)
E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)


@dataclass
class FrontendMetrics:
    """Counted by the front end since it started."""

    ttft: BucketHistogram = field(default_factory=lambda: BucketHistogram.empty(TTFT_BUCKETS))
    itl: BucketHistogram = field(default_factory=lambda: BucketHistogram.empty(ITL_BUCKETS))
    e2e: BucketHistogram = field(default_factory=lambda: BucketHistogram.empty(E2E_BUCKETS))
    prompt_tokens: int = 0  # of requests that produced a first token
    generation_tokens: int = 0
    finished: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FinishReason, 0))

    def on_output(self, req: LiveRequest, tokens: int, now: float) -> None:
        """An instance output of ``tokens`` new tokens for ``req``, before ``req`` takes it: the
        first gives the time to first token, each later one an inter-token gap (shared by its
        tokens: an output carries one token per step)."""
        if not tokens:
            return
        last = req.last_token_at
        if last is None:
            self.ttft.observe(now - req.arrival)
            self.prompt_tokens += req.prompt_tokens
        else:
            self.itl.observe((now - last) / tokens, tokens)
        self.generation_tokens += tokens

    def on_finished(self, req: LiveRequest, now: float) -> None:
        """``req`` ended with a final output (not an error)."""
        self.e2e.observe(now - req.arrival)
        reason = req.finish_reason or FinishReason.STOP
        self.finished[reason] = self.finished.get(reason, 0) + 1

    def to_vector(self) -> list[float]:
        """Every value, flat, in a fixed order (``from_vector`` reads it back): how a front end
        shows its metrics to the other front ends of its deployment (``metrics_share.py``)."""
        values: list[float] = []
        for hist in (self.ttft, self.itl, self.e2e):
            values += hist.counts
            values.append(hist.total)
        values += [self.prompt_tokens, self.generation_tokens]
        values += [self.finished.get(reason, 0) for reason in FinishReason]
        return values

    @classmethod
    def from_vector(cls, values: Sequence[float]) -> FrontendMetrics:
        m, at = cls(), 0
        for hist in (m.ttft, m.itl, m.e2e):
            n = len(hist.counts)
            hist.counts = [int(c) for c in values[at:at + n]]
            hist.total = float(values[at + n])
            at += n + 1
        m.prompt_tokens, m.generation_tokens = int(values[at]), int(values[at + 1])
        m.finished = {reason: int(c) for reason, c in zip(FinishReason, values[at + 2:], strict=True)}
        return m


@dataclass
class InstanceSample:
    """One instance as a metrics request found it: ``metrics`` is None when it did not answer."""

    name: str
    role: Role
    metrics: InstanceMetrics | None


class MetricsExposition:
    """The Prometheus text of the front end's metrics and of the instances' latest answers."""

    def __init__(self) -> None:
        self._frontend = _FrontendCollector()
        self._instances = _InstanceCollector()
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(self._frontend)
        self._registry.register(self._instances)

    def render(self, frontend: FrontendMetrics, instances: list[InstanceSample]) -> str:
        self._frontend.metrics, self._instances.samples = frontend, instances
        try:
            return generate_latest(self._registry).decode()
        finally:
            self._frontend.metrics, self._instances.samples = FrontendMetrics(), []


class _FrontendCollector:
    def __init__(self) -> None:
        self.metrics = FrontendMetrics()

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        for name, doc, hist in (
            ("time_to_first_token_seconds", "Time from arrival to the first token.", m.ttft),
            ("inter_token_latency_seconds", "Time between two output tokens of a request.", m.itl),
            ("e2e_request_latency_seconds", "Time from arrival to the final output of a request.", m.e2e),
        ):
            family = HistogramMetricFamily(PREFIX + name, doc)
            _add_histogram(family, hist, [])
            yield family
        prompt_doc = "Prompt tokens of the requests that produced a first token."
        yield CounterMetricFamily(PREFIX + "prompt_tokens", prompt_doc, value=m.prompt_tokens)
        generation_doc = "Generated tokens."
        yield CounterMetricFamily(PREFIX + "generation_tokens", generation_doc, value=m.generation_tokens)
        success = CounterMetricFamily(
            PREFIX + "request_success", "Requests that ended with a final output, by finish reason.",
            labels=["finished_reason"],
        )
        for reason, count in m.finished.items():
            success.add_metric([str(reason)], count)
        yield success


def _add_histogram(family: HistogramMetricFamily, hist: BucketHistogram, values: list[str]) -> None:
    buckets, cumulative = [], 0
    for bound, count in zip([*hist.bounds, math.inf], hist.counts, strict=True):
        cumulative += count
        buckets.append((floatToGoString(bound), cumulative))
    family.add_metric(values, buckets, hist.total)


def histogram_problem(hist: BucketHistogram) -> str | None:
    """Why an instance's histogram cannot be exposed (bucket counts that do not match the bounds,
    bounds not increasing and finite, negative counts), or None."""
    if len(hist.counts) != len(hist.bounds) + 1:
        return f"{len(hist.counts)} bucket counts for {len(hist.bounds)} bounds (expected one more)"
    if not all(math.isfinite(b) for b in hist.bounds) or any(
        a >= b for a, b in zip(hist.bounds, hist.bounds[1:], strict=False)
    ):
        return "bucket bounds are not finite and increasing"
    if any(c < 0 for c in hist.counts):
        return "a negative bucket count"
    return None


@dataclass(frozen=True)
class _Series:
    """One metric of the instances: its name (after ``pdserve:``), help, and value."""

    name: str
    doc: str
    value: Callable[[InstanceMetrics], Any]
    transfers_only: bool = False  # only instances that transfer KV (prefill, decode) have it


def _usage(m: InstanceMetrics) -> float:
    return m.used_pages / m.total_pages if m.total_pages > 0 else 0.0


def _hit_rate(m: InstanceMetrics) -> float:
    return m.prefix_cache_hits / m.prefix_cache_queries if m.prefix_cache_queries > 0 else 0.0


INSTANCE_GAUGES = (
    _Series("num_requests_running", "Requests admitted, holding (or owed) a slot.", lambda m: m.running),
    _Series("num_requests_waiting", "Requests queued and not yet admitted.", lambda m: m.waiting),
    _Series("kv_cache_usage_perc", "KV pages in use (neither free nor evictable prefix cache) / all "
            "pages, from 0 to 1.", _usage),
    _Series("prefix_cache_hit_rate", "Prompt tokens found in the prefix cache / prompt tokens looked "
            "up, since the instance started.", _hit_rate),
)
INSTANCE_COUNTERS = (
    _Series("prefix_cache_queries", "Prompt tokens looked up in the prefix cache (of requests that "
            "ended after admission).", lambda m: m.prefix_cache_queries),
    _Series("prefix_cache_hits", "Prompt tokens found in the prefix cache.", lambda m: m.prefix_cache_hits),
    _Series("num_preemptions", "Requests retracted for KV pages (they resume later).",
            lambda m: m.preemptions),
    _Series("kv_transfer_bytes", "KV-cache bytes of successful room transfers.",
            lambda m: m.kv_transfer_bytes, transfers_only=True),
    _Series("kv_transfer_failures", "Room transfers that failed (not those ended by an abort).",
            lambda m: m.kv_transfer_failures, transfers_only=True),
)
INSTANCE_HISTOGRAMS = (
    _Series("request_queue_time_seconds", "Time from arrival to first admission at the instance.",
            lambda m: m.queue_time),
    _Series("kv_transfer_seconds", "Time of a successful room transfer, from the room's transferring "
            "state to the worker's result.", lambda m: m.kv_transfer_time, transfers_only=True),
)


class _InstanceCollector:
    """Renders the instances' ``InstanceMetrics``: one family per metric, one series per instance."""

    def __init__(self) -> None:
        self.samples: list[InstanceSample] = []

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(PREFIX + "instance_up", "1 if the instance answered this scrape, else 0.",
                               labels=INSTANCE_LABELS)
        for s in self.samples:
            up.add_metric([s.name, str(s.role)], float(s.metrics is not None))
        yield up
        for series in INSTANCE_GAUGES:
            gauge = GaugeMetricFamily(PREFIX + series.name, series.doc, labels=INSTANCE_LABELS)
            for labels, m in self._having(series):
                gauge.add_metric(labels, series.value(m))
            yield gauge
        for series in INSTANCE_COUNTERS:
            counter = CounterMetricFamily(PREFIX + series.name, series.doc, labels=INSTANCE_LABELS)
            for labels, m in self._having(series):
                counter.add_metric(labels, series.value(m))
            yield counter
        for series in INSTANCE_HISTOGRAMS:
            histogram = HistogramMetricFamily(PREFIX + series.name, series.doc, labels=INSTANCE_LABELS)
            for labels, m in self._having(series):
                hist = series.value(m)
                problem = histogram_problem(hist)
                if problem is None:
                    _add_histogram(histogram, hist, labels)
                else:
                    log.warning("instance %s: %s not exposed: %s", labels[0], series.name, problem)
            yield histogram

    def _having(self, series: _Series) -> Iterator[tuple[list[str], InstanceMetrics]]:
        """The instances that answered and have ``series``, with their label values."""
        for s in self.samples:
            m = s.metrics
            if m is not None and not (series.transfers_only and m.kv_transfer_time is None):
                yield [s.name, str(s.role)], m
