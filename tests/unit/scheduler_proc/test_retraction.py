"""Out of KV memory during decode: retract, re-queue, resume by re-prefill, identical outputs."""

import logging
import random

import pytest

from scheduler_proc.core import NEW_TOKEN_RATIO_DECAY_STEPS
from scheduler_proc.request import ReqState
from tests.fakes.scheduler import (
    VOCAB,
    Collected,
    FakeWorker,
    assert_no_leak,
    drive,
    make_core,
    make_request,
    reference_generate,
    step_once,
)


def workload(seed: int, count: int):
    rng = random.Random(seed)
    shared = [rng.randrange(1, VOCAB) for _ in range(6)]
    return [
        make_request(
            f"r{i}",
            shared[: rng.randrange(0, 7)] + [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 9))],
            max_new=rng.randrange(4, 15),
            seed=i,
            stop=rng.random() < 0.5,
        )
        for i in range(count)
    ]


def retractions(caplog) -> int:
    return sum("retracted" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("disable_radix_cache", [False, True])
def test_tiny_pool_every_request_finishes_with_unconstrained_outputs(caplog, overlap, disable_radix_cache):
    caplog.set_level(logging.INFO, logger="scheduler_proc")
    worker = FakeWorker(num_pages=15, page_size=2, max_slots=6)  # 14 pages: 28 tokens for 12 requests
    core = make_core(
        worker,
        disable_overlap_schedule=not overlap,
        disable_radix_cache=disable_radix_cache,
        init_new_token_ratio=0.0,  # admit optimistically, so decode runs out of pages
        min_new_token_ratio=0.0,
    )
    requests = workload(seed=3, count=12)
    admitted_while_in_flight = []
    form_step = core.form_step

    def checked_form_step():
        batch = form_step()
        for new in batch.new_reqs if batch else []:
            req = next(r for r in core.requests.values() if r.res.slot == new.slot)
            if req.inflight != 1:  # only the step just formed may hold it
                admitted_while_in_flight.append(req.rid)
        return batch

    core.form_step = checked_form_step
    for req in requests:
        core.on_request(req)
    collected = drive(core, worker, overlap=overlap)
    assert retractions(caplog) >= 3
    assert not admitted_while_in_flight
    for req in requests:
        ref = reference_generate(req.input_ids, req.sampling)
        assert collected.tokens[req.rid] == ref, req.rid
        assert collected.finish[req.rid] == ("stop" if ref[-1] in req.sampling.stop_token_ids else "length")
    assert_no_leak(core)


def test_the_request_with_fewest_outputs_is_retracted_and_resumes(caplog):
    caplog.set_level(logging.INFO, logger="scheduler_proc")
    worker = FakeWorker(num_pages=32, page_size=2)
    core = make_core(worker)
    a = make_request("a", [5, 6, 7], max_new=12, stop=False)
    b = make_request("b", [8, 9, 10, 11], max_new=12, stop=False)
    collected = Collected()
    core.on_request(a)
    step_once(core, worker)
    step_once(core, worker)
    core.on_request(b)
    step_once(core, worker)
    collected.add(core.take_outbox())
    assert (len(collected.tokens["a"]), len(collected.tokens["b"])) == (3, 1)
    hog = core.pool.pages.alloc(core.pool.free_pages)  # memory pressure from elsewhere
    assert core.pool.available_pages() == 0
    while core.requests["b"].state is not ReqState.PENDING:
        step_once(core, worker)
    assert core.requests["a"].state is ReqState.DECODING
    assert "rid=b retracted" in caplog.text
    core.pool.pages.free(hog)
    drive(core, worker, collected)
    assert collected.tokens["a"] == reference_generate(a.input_ids, a.sampling)
    assert collected.tokens["b"] == reference_generate(b.input_ids, b.sampling)
    assert_no_leak(core)


def test_chunked_request_can_be_retracted_and_resumes():
    worker = FakeWorker(num_pages=12, page_size=2, max_slots=4)
    core = make_core(worker, chunked_prefill_size=4, init_new_token_ratio=0.0, min_new_token_ratio=0.0)
    d = make_request("d", [1, 2, 3], max_new=16, stop=False)
    core.on_request(d)
    step_once(core, worker)
    c = make_request("c", list(range(1, 17)), max_new=2, stop=False)  # 4 chunks
    core.on_request(c)
    collected = drive(core, worker)
    assert collected.tokens["c"] == reference_generate(c.input_ids, c.sampling)
    assert collected.tokens["d"] == reference_generate(d.input_ids, d.sampling)
    assert_no_leak(core)


def test_retraction_resets_the_new_token_ratio_to_its_initial_value():
    """After a retraction admission is conservative again: the ratio restarts at its initial value
    (and decays from there, one step per decode step)."""
    worker = FakeWorker(num_pages=32, page_size=2)
    core = make_core(worker, init_new_token_ratio=0.7, min_new_token_ratio=0.1)
    decay = (0.7 - 0.1) / NEW_TOKEN_RATIO_DECAY_STEPS
    for rid, prompt in (("a", [5, 6, 7]), ("b", [8, 9, 10, 11])):
        core.on_request(make_request(rid, prompt, max_new=12, stop=False))
    for _ in range(4):
        step_once(core, worker)
    assert core.new_token_ratio < 0.7 - decay  # decayed over the decode steps so far
    hog = core.pool.pages.alloc(core.pool.free_pages)  # memory pressure from elsewhere
    while all(r.state is ReqState.DECODING for r in core.requests.values()):
        step_once(core, worker)
    assert core.new_token_ratio == pytest.approx(0.7 - decay)  # reset, then this step's decay
    core.pool.pages.free(hog)
    drive(core, worker)
    assert_no_leak(core)
