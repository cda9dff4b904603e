"""The scheduler's Prometheus counters (scheduler_proc/metrics.py): queue time and prefix-cache
hits per ended request, retractions, gauges read from the core, KV-transfer bytes, time and
failures on both sides of a pair, and the ``StatusQuery(metrics=True)`` answer of the loop."""

from __future__ import annotations

import pytest
import torch

from protocol.dataplane import KVLayout, dtype_bytes
from protocol.messages import (
    AbortRequest,
    InstanceMetrics,
    Shutdown,
    StatusQuery,
    StatusReport,
    decode,
    encode,
)
from scheduler_proc.metrics import QUEUE_TIME_BUCKETS, SchedulerMetrics
from scheduler_proc.request import ReqState
from tests.fakes.disagg import Cluster, fake_layout
from tests.fakes.scheduler import (
    Collected,
    FakeWorker,
    assert_no_leak,
    drive,
    make_core,
    make_request,
    step_once,
)
from tests.fakes.scheduler_loop import FrontEnd, Scheduler, config

PROMPT = list(range(1, 22))  # 21 tokens: 6 pages of 4


def metrics_of(core) -> InstanceMetrics:
    """What the StatusReport carries, through the codec."""
    report = StatusReport(qid=1, status=core.status(), metrics=core.metrics.snapshot(core))
    return decode(encode(report)).metrics


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_page_bytes_without_torch_match_the_data_plane(dtype):
    layout = KVLayout("m", num_layers=3, page_size=16, num_kv_heads=2, head_dim=8, dtype=dtype, backend="x")
    elem = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    assert layout.page_bytes == 2 * 3 * 16 * 2 * 8 * elem  # what the data plane's torch tensors hold
    assert dtype_bytes(dtype) == torch.empty((), dtype=getattr(torch, dtype)).element_size()


def test_a_dtype_without_a_width_is_refused():
    with pytest.raises(ValueError, match="bool"):
        dtype_bytes("bool")


def test_unified_queue_time_prefix_hits_and_gauges():
    worker = FakeWorker(num_pages=64, page_size=4)
    core = make_core(worker)
    empty = metrics_of(core)
    assert (empty.running, empty.waiting, empty.used_pages, empty.total_pages) == (0, 0, 0, 63)
    assert empty.queue_time.count == 0 and empty.queue_time.bounds == list(QUEUE_TIME_BUCKETS)
    assert empty.kv_transfer_time is None  # a unified instance transfers nothing

    shared = list(range(1, 13))  # 3 full pages, cached once the first request ends
    core.on_request(make_request("a", shared + [20, 21], max_new=4, stop=False))
    core.on_request(make_request("b", [29, 30, 31], max_new=4, stop=False))
    assert metrics_of(core).waiting == 2
    step_once(core, worker)  # a's prefill fills the step's chunk budget
    assert (metrics_of(core).running, metrics_of(core).waiting) == (1, 1)
    step_once(core, worker)
    busy = metrics_of(core)
    assert (busy.running, busy.waiting) == (2, 0)
    assert busy.used_pages == sum(len(r.res.row) for r in core.requests.values()) > 0  # nothing cached yet
    collected = drive(core, worker)
    assert core.pool.cache.cached_pages > 0 and metrics_of(core).used_pages == 0  # evictable: not used
    core.on_request(make_request("c", shared + [28], max_new=2, stop=False))
    drive(core, worker, collected)
    assert collected.cached["c"] == 12

    done = metrics_of(core)
    assert done.queue_time.count == 3 and done.queue_time.total >= 0
    assert done.prefix_cache_queries == 14 + 3 + 13
    assert done.prefix_cache_hits == 12
    assert (done.running, done.waiting, done.used_pages, done.preemptions) == (0, 0, 0, 0)
    assert_no_leak(core)


def test_a_request_aborted_before_admission_has_no_queue_time():
    worker = FakeWorker(num_pages=64, page_size=4)
    core = make_core(worker)
    core.on_request(make_request("a", [1, 2, 3]))
    core.on_abort(AbortRequest("a"))
    m = metrics_of(core)
    assert m.queue_time.count == 0 and m.prefix_cache_queries == 0


def test_retractions_are_counted():
    worker = FakeWorker(num_pages=32, page_size=2)
    core = make_core(worker)
    core.on_request(make_request("a", [5, 6, 7], max_new=12, stop=False))
    step_once(core, worker)
    core.on_request(make_request("b", [8, 9, 10, 11], max_new=12, stop=False))
    step_once(core, worker)
    hog = core.pool.pages.alloc(core.pool.free_pages)  # memory pressure from elsewhere
    while core.requests["b"].state is not ReqState.PENDING:
        step_once(core, worker)
    assert metrics_of(core).preemptions == 1
    core.pool.pages.free(hog)
    drive(core, worker, Collected())
    m = metrics_of(core)
    assert m.preemptions == 1 and m.queue_time.count == 2  # a retraction is not a second admission
    assert m.prefix_cache_queries == 3 + 4


def cluster(**kw) -> Cluster:
    c = Cluster(chunked_prefill_size=8, **kw)
    c.connect()
    return c


def test_a_transfer_counts_its_bytes_and_time_on_both_sides():
    c = cluster()
    p, d = c.prefills[0].core, c.decodes[0].core
    per_page = fake_layout(c.prefills[0].worker.ready()).page_bytes
    assert per_page == 2 * 1 * 4 * 1 * 4 * 4  # K and V, 1 layer, page of 4, 1 head of 4, float32
    c.submit("a", PROMPT, max_new=4)
    c.run()
    for core in (p, d):
        m = metrics_of(core)
        assert m.kv_transfer_time is not None and m.kv_transfer_time.count == 1
        assert m.kv_transfer_bytes == 6 * per_page and m.kv_transfer_failures == 0
        assert m.queue_time.count == 1 and m.prefix_cache_queries == len(PROMPT)
    # the same prompt again: the decode side has 5 full pages cached and receives only the last
    c.submit("b", PROMPT, max_new=4)
    c.run()
    assert metrics_of(d).kv_transfer_bytes == (6 + 1) * per_page
    assert metrics_of(p).kv_transfer_bytes == (6 + 1) * per_page
    assert metrics_of(d).prefix_cache_hits == 20
    c.assert_no_leak()


def test_a_failed_transfer_is_counted_an_aborted_one_is_not():
    c = cluster()
    p, d = c.prefills[0].core, c.decodes[0].core
    room = c.submit("a", PROMPT)
    c.link.hold(room)
    c.run()
    c.link.abort(room, "injected failure")
    c.run()
    # Each side counts a failure its worker reports for a live room. Here the prefill side's
    # RoomAbort reaches the decode side before its own worker's result: its request had already
    # ended (the room draining), so the one failed transfer is counted once, on the prefill side.
    counted = [(m.kv_transfer_failures, m.kv_transfer_bytes, m.kv_transfer_time.count)
               for m in (metrics_of(p), metrics_of(d))]
    assert counted == [(1, 0, 0), (0, 0, 0)]
    room = c.submit("b", PROMPT)
    c.link.hold(room)
    c.run()
    c.abort("b")  # both sides drain the room; the worker's failed result is no transfer failure
    c.run()
    assert c.log.finish["b"] == "abort"
    assert [metrics_of(core).kv_transfer_failures for core in (p, d)] == [1, 0]
    c.assert_no_leak()


def test_queue_time_observes_each_admission_delay():
    metrics = SchedulerMetrics()

    class Ended:
        prompt = [1, 2, 3, 4]
        cached_tokens = 4
        arrival_time = 100.0
        first_scheduled_time = 100.2

    metrics.request_ended(Ended())  # type: ignore[arg-type]
    bucket = QUEUE_TIME_BUCKETS.index(0.3)
    assert metrics.queue_time.counts[bucket] == 1 and sum(metrics.queue_time.counts) == 1
    assert metrics.queue_time.total == pytest.approx(0.2)
    assert (metrics.prefix_cache_queries, metrics.prefix_cache_hits) == (4, 4)


def test_the_loop_answers_a_metrics_query(ctx, addrs, start_worker):
    start_worker()
    scheduler = Scheduler(config(addrs))
    front = FrontEnd(ctx, addrs)
    try:
        front.attach()
        front.send(StatusQuery(qid=5))
        assert front.recv(StatusReport).metrics is None  # a plain status query carries none
        front.send(make_request("r", [1, 2, 3, 4, 5], max_new=3, stop=False))
        front.send(StatusQuery(qid=6, metrics=True))
        report = front.recv(StatusReport)
        assert report.qid == 6 and report.metrics is not None
        assert report.metrics.total_pages == report.status.total_pages
        front.send(Shutdown())
        scheduler.join()
        assert scheduler.error is None
    finally:
        front.close()
