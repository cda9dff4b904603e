"""GET /metrics on real deployments (unified and pd, launched with the HTTP API): the Prometheus
text parses with prometheus_client's parser, and the front end's counters and histograms and
every instance's (labelled by instance name and role; KV transfers in pd) move by what was served."""

from __future__ import annotations

import contextlib
import time
import urllib.request
from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.server import running_server, started_together, wait_no_leak

PROMPT = "The capital of France is"
MAX_NEW = 8
Samples = dict[tuple[str, frozenset], float]


def scrape(http_url: str) -> Samples:
    """One scrape of /metrics (no API key: it is open), every sample by (name, labels)."""
    with urllib.request.urlopen(f"{http_url}/metrics", timeout=30) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape_until(http_url: str, done: Callable[[Samples], bool], timeout: float = 30.0) -> Samples:
    """Scrape until ``done`` holds: an instance counts a request when it ends there, which on a
    prefill instance may be a moment after the client has its answer."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(http_url)
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return get(after, name, **labels) - get(before, name, **labels)


INSTANCES = {
    "unified": [{"instance_name": "unified0", "role": "unified"}],
    "pd": [{"instance_name": "prefill0", "role": "prefill"}, {"instance_name": "decode0", "role": "decode"}],
}


@pytest.mark.parametrize("mode", ["unified", "pd"])
def test_metrics_move_as_requests_are_served(mode: str) -> None:
    flags = ["--api-key", "sesame", "--heartbeat-interval", "0.2"]
    with running_server(*flags, mode=mode) as server, server.client() as client:
        assert server.http_url is not None
        instances = INSTANCES[mode]
        before = scrape(server.http_url)
        for labels in instances:
            assert get(before, "pdserve:instance_up", **labels) == 1
            assert get(before, "pdserve:num_requests_running", **labels) == 0
            assert 0 <= get(before, "pdserve:kv_cache_usage_perc", **labels) <= 1

        replies = [client.generate(PROMPT, max_new_tokens=MAX_NEW, temperature=0) for _ in range(2)]
        prompt_tokens = sum(r["usage"]["prompt_tokens"] for r in replies)
        assert all(r["usage"]["completion_tokens"] == MAX_NEW for r in replies)

        def all_counted(samples: Samples) -> bool:
            return all(
                delta(before, samples, "pdserve:request_queue_time_seconds_count", **labels) == 2
                for labels in instances
            )

        after = scrape_until(server.http_url, all_counted)
        assert delta(before, after, "pdserve:generation_tokens_total") == 2 * MAX_NEW
        assert delta(before, after, "pdserve:prompt_tokens_total") == prompt_tokens
        assert delta(before, after, "pdserve:time_to_first_token_seconds_count") == 2
        assert delta(before, after, "pdserve:inter_token_latency_seconds_count") == 2 * (MAX_NEW - 1)
        assert delta(before, after, "pdserve:e2e_request_latency_seconds_count") == 2
        assert delta(before, after, "pdserve:e2e_request_latency_seconds_sum") > 0
        assert delta(before, after, "pdserve:request_success_total", finished_reason="length") == 2
        for labels in instances:
            assert delta(before, after, "pdserve:request_queue_time_seconds_count", **labels) == 2
            assert delta(before, after, "pdserve:prefix_cache_queries_total", **labels) == prompt_tokens
            hits = delta(before, after, "pdserve:prefix_cache_hits_total", **labels)
            assert 0 <= hits < prompt_tokens
        if mode == "pd":
            moved = [delta(before, after, "pdserve:kv_transfer_bytes_total", **ls) for ls in instances]
            assert moved[0] > 0 and moved[0] == moved[1]  # both sides count the same pages
            for labels in instances:
                assert delta(before, after, "pdserve:kv_transfer_seconds_count", **labels) == 2
                assert delta(before, after, "pdserve:kv_transfer_failures_total", **labels) == 0
        else:
            assert ("pdserve:kv_transfer_bytes_total", frozenset(instances[0].items())) not in after
        wait_no_leak(client)


def test_a_standalone_front_end_gathers_its_remote_instances_metrics() -> None:
    """``--mode frontend`` in front of ``--mode prefill`` and ``--mode decode`` instances reached
    over tcp: the same metrics, through the ZMQ client's ``metrics`` request."""
    flags = ["--heartbeat-interval", "0.2"]
    with contextlib.ExitStack() as stack:
        prefill, decode = stack.enter_context(started_together(
            running_server(*flags, mode="prefill"), running_server(*flags, mode="decode")
        ))
        links = ("--prefill", prefill.addr, "--decode", decode.addr)
        frontend = stack.enter_context(running_server(*flags, *links, mode="frontend"))
        client = stack.enter_context(frontend.client())
        reply = client.generate(PROMPT, max_new_tokens=MAX_NEW, temperature=0)
        assert reply["usage"]["completion_tokens"] == MAX_NEW

        def parsed() -> Samples:
            return {
                (s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(client.metrics())
                for s in family.samples
            }

        deadline = time.monotonic() + 30
        while True:
            samples = parsed()
            queued = {dict(labels)["role"]: value for (name, labels), value in samples.items()
                      if name == "pdserve:request_queue_time_seconds_count"}
            if queued == {"prefill": 1, "decode": 1} or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert queued == {"prefill": 1, "decode": 1}
        moved = {dict(labels)["role"]: value for (name, labels), value in samples.items()
                 if name == "pdserve:kv_transfer_bytes_total"}
        assert moved["prefill"] == moved["decode"] > 0
        assert samples[("pdserve:generation_tokens_total", frozenset())] == MAX_NEW
        up = [value for (name, _), value in samples.items() if name == "pdserve:instance_up"]
        assert up == [1, 1]
