"""What an instance's scheduler counts for Prometheus: what only it knows (docs/design.md, "Metrics").

Plain counters and bucket arrays (``BucketHistogram``), updated where the core already acts
(a request's end, a retraction, a room's transfer result): no loop of their own and no work
per step. Gauges (running, waiting, KV pages in use) are read from the core when asked. The
front end asks with ``StatusQuery(metrics=True)``; ``snapshot`` is what the ``StatusReport``
carries, and the front end renders it with the instance's name as a label.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from protocol.messages import BucketHistogram, InstanceMetrics, WorkerReady
from scheduler_proc.request import Request

if TYPE_CHECKING:
    from scheduler_proc.core import SchedulerCore

# vLLM's request-latency buckets (s), with finer ones below 0.3 s for small models and CPUs.
QUEUE_TIME_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0,
    30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)
KV_TRANSFER_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)


@dataclass
class SchedulerMetrics:
    transfers: bool = False  # a disaggregated instance: its KV moves on the data plane
    page_bytes: int = 0  # of one KV page, when ``transfers``
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    preemptions: int = 0
    kv_transfer_bytes: int = 0
    kv_transfer_failures: int = 0
    queue_time: BucketHistogram = field(default_factory=lambda: BucketHistogram.empty(QUEUE_TIME_BUCKETS))
    kv_transfer_time: BucketHistogram = field(
        default_factory=lambda: BucketHistogram.empty(KV_TRANSFER_BUCKETS)
    )

    @classmethod
    def for_worker(cls, worker: WorkerReady) -> SchedulerMetrics:
        """A disaggregated worker reports its KV layout, from which a page's bytes follow."""
        if worker.transfer is None:
            return cls()
        return cls(transfers=True, page_bytes=worker.transfer.layout.page_bytes)

    def request_ended(self, req: Request) -> None:
        """``req`` ended: its queue time and prefix-cache hit, if it was ever admitted (a request
        keeps its first admission's values through retractions)."""
        if req.first_scheduled_time is None:
            return
        self.queue_time.observe(max(req.first_scheduled_time - req.arrival_time, 0.0))
        self.prefix_cache_queries += len(req.prompt)
        self.prefix_cache_hits += req.cached_tokens or 0

    def transfer_done(self, pages: int, seconds: float) -> None:
        self.kv_transfer_bytes += pages * self.page_bytes
        self.kv_transfer_time.observe(max(seconds, 0.0))

    def transfer_failed(self) -> None:
        self.kv_transfer_failures += 1

    def snapshot(self, core: SchedulerCore) -> InstanceMetrics:
        """The values as the ``StatusReport`` carries them (histograms copied)."""
        pool = core.pool
        return InstanceMetrics(
            running=core.num_running,
            waiting=core.queued_requests(),
            used_pages=pool.total_pages - pool.available_pages(),
            total_pages=pool.total_pages,
            prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits,
            preemptions=self.preemptions,
            queue_time=_copy(self.queue_time),
            kv_transfer_bytes=self.kv_transfer_bytes,
            kv_transfer_failures=self.kv_transfer_failures,
            kv_transfer_time=_copy(self.kv_transfer_time) if self.transfers else None,
        )


def _copy(hist: BucketHistogram) -> BucketHistogram:
    return dataclasses.replace(hist, bounds=list(hist.bounds), counts=list(hist.counts))
