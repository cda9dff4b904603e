"""The client ``metrics`` request (tokenizer_proc/metrics.py): the front end's own histograms and
counters, the instances' values with their labels, parsed by prometheus_client's text parser."""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from protocol import transport
from protocol.config import EMBEDDED
from protocol.messages import BucketHistogram, InstanceMetrics, Message, Role, StatusQuery, StatusReport
from tests.fakes.frontend import (
    FakeInstance,
    frontend_config,
    start_deployment,
    stop_deployment,
)
from tokenizer_proc.client import ServerError
from tokenizer_proc.metrics import (
    ITL_BUCKETS,
    TTFT_BUCKETS,
    FrontendMetrics,
    InstanceSample,
    MetricsExposition,
    histogram_problem,
)
from tokenizer_proc.validation import MetricsCommand, parse_command

QUEUE_BOUNDS = [0.01, 0.1, 1.0]


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a Prometheus text exposition, by (name, labels)."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(parsed: dict, name: str, **labels: str) -> float:
    return parsed[(name, frozenset(labels.items()))]


def instance_metrics(running: int = 2, queue_seconds: tuple[float, ...] = (0.05, 0.5)) -> InstanceMetrics:
    queue = BucketHistogram.empty(QUEUE_BOUNDS)
    for seconds in queue_seconds:
        queue.observe(seconds)
    return InstanceMetrics(
        running=running, waiting=3, used_pages=16, total_pages=64, prefix_cache_queries=40,
        prefix_cache_hits=10, preemptions=1, queue_time=queue,
    )


# ------------------------------------------------------------------------------- in-process


def test_outputs_give_ttft_then_inter_token_gaps():
    m = FrontendMetrics()
    req = SimpleNamespace(arrival=10.0, last_token_at=None, prompt_tokens=7)
    m.on_output(req, 0, 10.001)  # an output without tokens counts nothing
    m.on_output(req, 1, 10.03)
    req.last_token_at = 10.03
    m.on_output(req, 2, 10.07)  # two tokens in one output: two gaps of 0.02 s
    assert m.ttft.counts[TTFT_BUCKETS.index(0.04)] == 1 and m.ttft.count == 1
    assert m.itl.counts[ITL_BUCKETS.index(0.025)] == 2 and m.itl.count == 2
    assert m.itl.total == pytest.approx(0.04)
    assert (m.prompt_tokens, m.generation_tokens) == (7, 3)
    req.finish_reason = "length"
    m.on_finished(req, 11.0)
    assert m.e2e.count == 1 and m.e2e.total == pytest.approx(1.0) and m.finished["length"] == 1


def test_exposition_labels_each_instance_and_parses():
    m = FrontendMetrics()
    m.ttft.observe(0.2)
    transfers = instance_metrics(running=1)
    transfers.kv_transfer_time = BucketHistogram.empty([0.01, 0.1])
    transfers.kv_transfer_time.observe(0.05)
    transfers.kv_transfer_bytes, transfers.kv_transfer_failures = 4096, 2
    text = MetricsExposition().render(m, [
        InstanceSample("unified0", Role.UNIFIED, instance_metrics()),
        InstanceSample("prefill0", Role.PREFILL, transfers),
        InstanceSample("decode0", Role.DECODE, None),  # did not answer
    ])
    parsed = samples(text)
    u = {"instance_name": "unified0", "role": "unified"}
    p = {"instance_name": "prefill0", "role": "prefill"}
    d = {"instance_name": "decode0", "role": "decode"}
    assert value(parsed, "pdserve:time_to_first_token_seconds_count") == 1
    assert value(parsed, "pdserve:time_to_first_token_seconds_bucket", le="0.1") == 0
    assert value(parsed, "pdserve:time_to_first_token_seconds_bucket", le="0.25") == 1
    assert value(parsed, "pdserve:request_success_total", finished_reason="stop") == 0
    assert value(parsed, "pdserve:num_requests_running", **u) == 2
    assert value(parsed, "pdserve:num_requests_waiting", **p) == 3
    assert value(parsed, "pdserve:kv_cache_usage_perc", **u) == 0.25
    assert value(parsed, "pdserve:prefix_cache_hit_rate", **u) == 0.25
    assert value(parsed, "pdserve:prefix_cache_hits_total", **u) == 10
    assert value(parsed, "pdserve:num_preemptions_total", **u) == 1
    assert value(parsed, "pdserve:request_queue_time_seconds_bucket", le="0.1", **u) == 1  # cumulative
    assert value(parsed, "pdserve:request_queue_time_seconds_bucket", le="+Inf", **u) == 2
    assert value(parsed, "pdserve:request_queue_time_seconds_sum", **u) == pytest.approx(0.55)
    assert value(parsed, "pdserve:kv_transfer_bytes_total", **p) == 4096
    assert value(parsed, "pdserve:kv_transfer_failures_total", **p) == 2
    assert value(parsed, "pdserve:kv_transfer_seconds_count", **p) == 1
    assert ("pdserve:kv_transfer_bytes_total", frozenset(u.items())) not in parsed  # unified: none
    assert value(parsed, "pdserve:instance_up", **d) == 0 and value(parsed, "pdserve:instance_up", **u) == 1
    decode_series = {name for name, labels in parsed if ("instance_name", "decode0") in labels}
    assert decode_series == {"pdserve:instance_up"}


@pytest.mark.parametrize(
    ("hist", "problem"),
    [
        (BucketHistogram([0.1, 1.0], [1, 2]), "2 bucket counts for 2 bounds"),
        (BucketHistogram([1.0, 0.1], [0, 0, 0]), "not finite and increasing"),
        (BucketHistogram([0.1, math.inf], [0, 0, 0]), "not finite and increasing"),
        (BucketHistogram([0.1], [-1, 0]), "negative"),
    ],
)
def test_a_malformed_instance_histogram_is_left_out(hist, problem, caplog):
    assert problem in (histogram_problem(hist) or "")
    bad = instance_metrics()
    bad.queue_time = hist
    text = MetricsExposition().render(FrontendMetrics(), [
        InstanceSample("bad", Role.UNIFIED, bad), InstanceSample("good", Role.UNIFIED, instance_metrics()),
    ])
    parsed = samples(text)
    good = {"instance_name": "good", "role": "unified"}
    bad_labels = {"instance_name": "bad", "role": "unified"}
    assert value(parsed, "pdserve:request_queue_time_seconds_count", **good) == 2
    assert ("pdserve:request_queue_time_seconds_count", frozenset(bad_labels.items())) not in parsed
    assert value(parsed, "pdserve:num_requests_running", **bad_labels) == 2  # the rest is still there
    assert "not exposed" in caplog.text


def test_the_metrics_command_parses():
    assert parse_command({"type": "metrics", "rid": "m"}) == MetricsCommand("m")


# ------------------------------------------------------------------ a front end, fake instances


@dataclass
class MetricsFake(FakeInstance):
    """Answers a metrics query with ``instance_metrics(running=its live requests)``."""

    def _handle(self, push: zmq.Socket, msg: Message) -> None:
        if isinstance(msg, StatusQuery) and msg.metrics and self.answers_status:
            report = StatusReport(msg.qid, self._status(), instance_metrics(running=len(self._live)))
            transport.send(push, report)
            return
        super()._handle(push, msg)


@pytest.fixture
def deployment(ipc_dir):
    cfg = frontend_config(ipc_dir, num_instances=2, model_path=EMBEDDED.name)  # the fakes' model
    fakes = [MetricsFake(cfg.unified[0], name="fake-0"), MetricsFake(cfg.unified[1], name="silent",
                                                                     answers_status=False)]
    dep = start_deployment(cfg, fakes)
    try:
        with dep.client() as client:
            client.wait_ready(timeout=60)  # the first front end of a test process imports torch
        yield dep
    finally:
        stop_deployment(dep)


def test_counters_and_histograms_move_as_requests_are_served(deployment):
    fake = {"instance_name": "fake-0", "role": "unified"}
    silent = {"instance_name": "silent", "role": "unified"}
    with deployment.client() as client:
        before = samples(client.metrics())
        assert value(before, "pdserve:generation_tokens_total") == 0
        assert value(before, "pdserve:time_to_first_token_seconds_count") == 0
        assert value(before, "pdserve:num_requests_running", **fake) == 0
        assert value(before, "pdserve:instance_up", **fake) == 1
        assert value(before, "pdserve:instance_up", **silent) == 0  # answered after the timeout
        assert ("pdserve:num_requests_running", frozenset(silent.items())) not in before

        sampling = {"max_new_tokens": 5, "temperature": 0}
        plain = client.generate("Hi", **sampling)
        streamed = list(client.stream("Hey", max_new_tokens=3, temperature=0))
        rid = client.submit("long", max_new_tokens=200, ignore_eos=True, stream=True)
        first = client.next_message(timeout=5)
        assert first is not None and first["rid"] == rid and first.get("token_ids"), first
        deployment.fake.generating.clear()  # paused: the abort comes before its last token
        client.abort(rid)
        aborted = client.result(rid)
        deployment.fake.generating.set()
        assert aborted["finish_reason"] == "abort"

        after = samples(client.metrics())
    usages = [plain["usage"], streamed[-1]["usage"], aborted["usage"]]
    generated = sum(u["completion_tokens"] for u in usages)
    assert generated == 5 + 3 + aborted["usage"]["completion_tokens"]
    assert value(after, "pdserve:generation_tokens_total") == generated
    assert value(after, "pdserve:prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert value(after, "pdserve:time_to_first_token_seconds_count") == 3
    assert value(after, "pdserve:inter_token_latency_seconds_count") == generated - 3
    assert value(after, "pdserve:e2e_request_latency_seconds_count") == 3
    assert value(after, "pdserve:request_success_total", finished_reason="length") == 2
    assert value(after, "pdserve:request_success_total", finished_reason="abort") == 1
    assert value(after, "pdserve:request_success_total", finished_reason="stop") == 0
    assert value(after, "pdserve:prefix_cache_queries_total", **fake) == 40  # the fake's values


def test_a_bad_metrics_request_is_refused_and_serving_goes_on(deployment):
    with deployment.client() as client:
        client._send({"type": "metrics", "rid": "m", "format": "json"})
        with pytest.raises(ServerError, match="unknown field"):
            client._next_for("m", 5)
        assert "pdserve:instance_up" in client.metrics()
