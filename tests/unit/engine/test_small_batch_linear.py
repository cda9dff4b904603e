"""The start-up choice between cuBLAS and our GEMV, and the dispatch it leaves (CPU: the GEMV
is a stand-in that records its calls; timings are a table the fake timer reads)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.kernels import small_batch_linear as sbl
from engine.kernels.gemv import GEMV_CONFIGS, MAX_GEMV_ROWS


@pytest.fixture
def gemv_calls(monkeypatch) -> list:
    calls: list = []

    def fake_gemv(x, weight, bias, config):
        calls.append((x.shape[0], tuple(weight.shape), config))
        return F.linear(x, weight, bias)

    monkeypatch.setattr(sbl, "gemv", fake_gemv)
    return calls


def table_timer(gemv_calls: list, cublas_ms: float, gemv_ms: dict) -> sbl.Timer:
    """Milliseconds from a table: ``gemv_ms[config]`` for a GEMV call, else ``cublas_ms``."""

    def timer(fn):
        before = len(gemv_calls)
        fn()
        return gemv_ms[gemv_calls[-1][2]] if len(gemv_calls) > before else cublas_ms

    return timer


def test_row_buckets_round_up():
    assert [sbl.row_bucket(r) for r in (1, 2, 3, 5, 8, 9, 16)] == [1, 2, 4, 8, 8, 16, 16]
    assert sbl.ROW_BUCKETS[-1] == MAX_GEMV_ROWS


def test_the_gemv_is_kept_only_where_it_wins_by_the_margin(gemv_calls):
    fast, *others = GEMV_CONFIGS
    gemv_ms = {fast: 0.90, **{c: 1.5 for c in others}}
    big, small = torch.randn(48, 32), torch.randn(24, 32)
    linear = sbl.SmallBatchLinear()
    weights = [(big, None), (small, torch.randn(24)), (big, None)]
    measured = linear.choose(weights, table_timer(gemv_calls, 1.0, gemv_ms))
    assert len(measured) == 2 * len(sbl.ROW_BUCKETS)  # one per distinct shape and bucket
    assert all(m.config == fast and m.use_gemv for m in measured)
    assert set(linear.choices) == {(r, n, 32) for r in sbl.ROW_BUCKETS for n in (48, 24)}

    marginal = sbl.SmallBatchLinear()
    gemv_ms[fast] = 0.99  # faster, but within the timing noise
    marginal.choose([(big, None)], table_timer(gemv_calls, 1.0, gemv_ms))
    assert marginal.choices == {} and not any(m.use_gemv for m in marginal.measured)


def test_dispatch_follows_the_choices(gemv_calls):
    config = GEMV_CONFIGS[0]
    weight, bias = torch.randn(48, 32), torch.randn(48)
    linear = sbl.SmallBatchLinear({(4, 48, 32): config})
    for rows, via_gemv in ((3, True), (4, True), (2, False), (5, False), (MAX_GEMV_ROWS + 1, False)):
        gemv_calls.clear()
        x = torch.randn(rows, 32)
        torch.testing.assert_close(linear(x, weight, bias), F.linear(x, weight, bias))
        assert gemv_calls == ([(rows, (48, 32), config)] if via_gemv else []), rows
    gemv_calls.clear()
    linear(torch.randn(4, 32), torch.randn(40, 32))  # another shape: cuBLAS
    assert gemv_calls == []


def test_description_names_the_winner():
    config = GEMV_CONFIGS[0]
    won = sbl.LinearChoice(1, 4096, 4096, cublas_ms=0.0125, gemv_ms=0.0110, config=config)
    lost = sbl.LinearChoice(8, 4096, 4096, cublas_ms=0.0125, gemv_ms=0.0124, config=config)
    first, second = sbl.describe([won, lost]).splitlines()
    assert first.startswith("rows=1 4096x4096: gemv") and "cublas 12.5 us" in first
    assert second.startswith("rows=8 4096x4096: cublas")
