"""The front ends of one deployment show each other their metrics (tokenizer_proc/metrics_share.py):
a scrape answered by any of them covers all of them."""

from __future__ import annotations

import logging
import random
from types import SimpleNamespace

import numpy as np
import pytest

from protocol.config import FrontendSiblings
from protocol.messages import FinishReason
from tokenizer_proc import metrics_share
from tokenizer_proc.metrics import FrontendMetrics
from tokenizer_proc.metrics_share import MetricsShare, metrics_path


def served(m: FrontendMetrics, rng: random.Random, requests: int) -> None:
    """``requests`` requests through ``m``: a first token, a few more, an end."""
    for _ in range(requests):
        req = SimpleNamespace(arrival=0.0, prompt_tokens=rng.randrange(1, 50), last_token_at=None,
                              finish_reason=rng.choice(list(FinishReason)))
        for step in range(rng.randrange(1, 6)):
            m.on_output(req, 1, now=0.01 * (step + 1) + rng.random())
            req.last_token_at = 0.01 * (step + 1)
        m.on_finished(req, now=rng.random() * 3)


def same(a: FrontendMetrics, b: FrontendMetrics) -> bool:
    return np.allclose(a.to_vector(), b.to_vector())


def test_the_flat_vector_reads_back_as_the_same_metrics() -> None:
    m = FrontendMetrics()
    served(m, random.Random(1), 20)
    back = FrontendMetrics.from_vector(m.to_vector())
    assert back.ttft.counts == m.ttft.counts and back.itl.total == pytest.approx(m.itl.total)
    assert (back.prompt_tokens, back.generation_tokens, back.finished) == (
        m.prompt_tokens, m.generation_tokens, m.finished)


def test_every_front_end_answers_with_the_sum_of_all(tmp_path) -> None:
    rng, count = random.Random(2), 3
    metrics = [FrontendMetrics() for _ in range(count)]
    shares = [MetricsShare(FrontendSiblings(i, count, str(tmp_path)), m) for i, m in enumerate(metrics)]
    for m, share in zip(metrics, shares, strict=True):
        served(m, rng, rng.randrange(1, 30))
        share.publish_changes()
    expected = FrontendMetrics.from_vector(np.sum([m.to_vector() for m in metrics], axis=0).tolist())
    for share in shares:
        assert same(share.deployment_metrics(), expected)
    served(metrics[1], rng, 5)  # counted, not yet published: the others do not see it yet
    assert not same(shares[0].deployment_metrics(), shares[1].deployment_metrics())
    shares[1].publish_changes()
    assert same(shares[0].deployment_metrics(), shares[1].deployment_metrics())


def test_publishing_writes_only_what_changed(tmp_path) -> None:
    m = FrontendMetrics()
    share = MetricsShare(FrontendSiblings(0, 2, str(tmp_path)), m)
    vector = np.memmap(metrics_path(str(tmp_path), 0), dtype=np.float64, mode="r")
    seq = vector[0]
    share.publish_changes()
    assert vector[0] == seq  # nothing new
    served(m, random.Random(3), 1)
    share.publish_changes()
    assert vector[0] == seq + 2 and np.array_equal(vector[1:], m.to_vector())


def test_a_sibling_not_started_counts_zero_and_a_write_in_progress_is_left_out(
    tmp_path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = FrontendMetrics(), FrontendMetrics()
    served(first, random.Random(4), 3)
    share = MetricsShare(FrontendSiblings(0, 2, str(tmp_path)), first)
    assert same(share.deployment_metrics(), first)  # front end 1 has not published yet
    other = MetricsShare(FrontendSiblings(1, 2, str(tmp_path)), second)
    served(second, random.Random(5), 2)
    other.publish_changes()
    writing = np.memmap(metrics_path(str(tmp_path), 1), dtype=np.float64, mode="r+")
    writing[0] += 1  # as if front end 1 were between the two halves of a write
    monkeypatch.setattr(metrics_share, "READ_TRIES", 3)
    with caplog.at_level(logging.WARNING, logger="pdserve.frontend"):
        assert same(share.deployment_metrics(), first)
    assert "being written" in caplog.text
    writing[0] += 1
    expected = FrontendMetrics.from_vector((np.add(first.to_vector(), second.to_vector())).tolist())
    assert same(share.deployment_metrics(), expected)
