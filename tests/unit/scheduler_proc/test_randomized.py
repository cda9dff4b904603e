"""Randomized workloads over random configurations: every request ends exactly once with the
outputs of an unconstrained run (or a prefix of them when aborted), nothing leaks, nothing hangs."""

import random
from collections import deque

import pytest

from protocol.messages import INVALID_REQUEST, AbortRequest
from tests.fakes.scheduler import (
    VOCAB,
    Collected,
    FakeWorker,
    assert_no_leak,
    make_core,
    make_request,
    reference_generate,
)


def random_setup(rng: random.Random):
    page_size = rng.choice([1, 2, 4, 8])
    num_pages = (
        rng.randrange(3, 40) if rng.random() < 0.3 else rng.randrange(40 // page_size + 2, 200 // page_size)
    )
    overlap = rng.random() < 0.5
    worker = FakeWorker(num_pages=num_pages, page_size=page_size, max_slots=rng.randrange(1, 10))
    core = make_core(
        worker,
        disable_overlap_schedule=not overlap,
        chunked_prefill_size=page_size * rng.randrange(1, 5),
        max_prefill_tokens=page_size * rng.randrange(1, 10),
        schedule_policy=rng.choice(["fcfs", "lpm", "priority"]),
        disable_radix_cache=rng.random() < 0.2,
        max_running_requests=rng.randrange(1, 10),
        init_new_token_ratio=rng.choice([0.0, 0.1, 0.7]),
        min_new_token_ratio=0.0,
    )
    shared = [rng.randrange(1, VOCAB) for _ in range(rng.randrange(0, 12))]
    requests = [
        make_request(
            f"r{i}",
            shared[: rng.randrange(0, len(shared) + 1)]
            + [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 20))],
            max_new=rng.randrange(1, 30),
            seed=i,
            stop=rng.random() < 0.7,
            priority=rng.randrange(3),
        )
        for i in range(rng.randrange(1, 25))
    ]
    return worker, core, requests, overlap


@pytest.mark.parametrize("trial", range(40))
def test_random_workload(trial):
    rng = random.Random(trial)
    worker, core, requests, overlap = random_setup(rng)
    capacity = (worker.num_pages - 1) * worker.page_size
    for req in requests:
        core.on_request(req)
    collected, aborted = Collected(), set()
    collected.add(core.take_outbox())
    inflight: deque = deque()
    depth = 2 if overlap else 1
    for _ in range(5000):
        if not core.has_live_requests and not inflight:
            break
        if rng.random() < 0.03 and core.requests:
            rid = rng.choice(sorted(core.requests))
            core.on_abort(AbortRequest(rid))
            aborted.add(rid)
        batch = core.form_step() if len(inflight) < depth else None
        if batch is not None:
            inflight.append(worker.step(batch))
        if inflight and (len(inflight) >= depth or batch is None):
            core.on_result(inflight.popleft())
        collected.add(core.take_outbox())
    else:
        raise AssertionError(f"hung: {core.status()}")
    for req in requests:
        ref = reference_generate(req.input_ids, req.sampling)
        if req.rid in collected.failed:
            assert collected.failed[req.rid].code == INVALID_REQUEST
            assert len(req.input_ids) + req.sampling.max_new_tokens > capacity
        elif req.rid in aborted and collected.finish[req.rid] == "abort":
            assert collected.tokens[req.rid] == ref[: len(collected.tokens[req.rid])]
        else:
            assert collected.tokens[req.rid] == ref
            assert collected.finish[req.rid] == (
                "stop" if ref[-1] in req.sampling.stop_token_ids else "length"
            )
    assert_no_leak(core)
