"""Overlap: the scheduler forms step N+1 before step N's result, so finishes are seen late."""

import pytest

from protocol.messages import SamplingParams
from tests.fakes.scheduler import (
    FakeWorker,
    assert_no_leak,
    drive,
    make_core,
    make_request,
    reference_generate,
)


def early_stopping_seed(prompt, max_new):
    for seed in range(1000):
        ref = reference_generate(
            prompt, SamplingParams(max_new_tokens=max_new, seed=seed, stop_token_ids=[0])
        )
        if 2 <= len(ref) < max_new - 2:
            return seed
    raise AssertionError("no early-stopping seed")


def decode_rows(worker, slot=0):
    return sum(s.decode_slots.count(slot) for s in worker.steps)


@pytest.mark.parametrize("overlap", [False, True])
def test_late_finish_discards_the_extra_token(overlap):
    prompt = [3, 1, 4, 1, 5]
    seed = early_stopping_seed(prompt, max_new=20)
    req = make_request("a", prompt, max_new=20, seed=seed)
    ref = reference_generate(prompt, req.sampling)
    worker = FakeWorker(page_size=2)
    core = make_core(worker, disable_overlap_schedule=not overlap)
    core.on_request(req)
    collected = drive(core, worker, overlap=overlap)
    assert collected.tokens["a"] == ref and ref[-1] == 0
    assert collected.finish["a"] == "stop"
    # the prefill samples the first token; the decodes the rest, plus one past the stop with overlap
    assert decode_rows(worker) == len(ref) - 1 + overlap
    assert_no_leak(core)


def test_never_scheduled_past_max_new_tokens():
    worker = FakeWorker(page_size=2)
    core = make_core(worker, disable_overlap_schedule=False)
    core.on_request(make_request("a", [1, 2, 3], max_new=5, stop=False))
    collected = drive(core, worker, overlap=True)
    assert len(collected.tokens["a"]) == 5 and collected.finish["a"] == "length"
    assert decode_rows(worker) == 4
    assert_no_leak(core)


def test_logprobs_and_first_output_fields():
    worker = FakeWorker(page_size=2)
    core = make_core(worker, disable_overlap_schedule=False)
    req = make_request("a", [1, 2, 3], max_new=4, stop=False)
    req.sampling.return_logprob = True
    core.on_request(req)
    core.on_request(make_request("b", [1, 2, 3], max_new=4, stop=False))
    collected = drive(core, worker, overlap=True)
    assert collected.logprobs["a"] == [-t / 10.0 for t in collected.tokens["a"]]
    assert collected.logprobs["b"] == []
    outputs = [o for batch in collected.batches for o in batch.rows() if o.rid == "a"]
    assert outputs[0].queue_ms is not None and outputs[0].queue_ms >= 0
    assert all(o.queue_ms is None for o in outputs[1:])
    # the first and the last output carry the counts; the ones between travel as columns
    assert outputs[0].prompt_tokens == 3 and outputs[-1].prompt_tokens == 3 and outputs[-1].finished
    assert all(len(b.rids) == len(b.token_ids) for b in collected.batches)
