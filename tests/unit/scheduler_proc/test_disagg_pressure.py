"""The decode side under KV-memory pressure: a transferred request joins the running batch only
when its first decode page fits, so no step retracts a request it just joined (and the worker
never gets a slot that the same step frees); when nothing runs and nothing fits, one ready
request is retracted before it takes a slot, so the others make progress."""

from __future__ import annotations

import random

import pytest

from protocol.messages import StepBatch
from tests.fakes.disagg import Cluster, Instance, expected, open_rooms


def check_joiners_decode_at_once(inst: Instance) -> list[StepBatch]:
    """Wrap ``inst``'s worker: every request that joins (a ``NewReq`` seeded with its first token)
    decodes in that very step (it was neither retracted nor dropped from it). Returns the batches."""
    batches: list[StepBatch] = []
    step = inst.worker.step

    def checked(batch: StepBatch):
        joined = {new.slot for new in batch.new_reqs if new.next_token is not None}
        assert joined <= set(batch.decode_slots), f"step {batch.step_id}: joined {joined}, {batch}"
        batches.append(batch)
        return step(batch)

    inst.worker.step = checked  # type: ignore[method-assign]
    return batches


def test_a_request_is_not_retracted_in_the_step_it_joins():
    rng = random.Random(20)
    c = Cluster(
        worker=dict(page_size=4, num_pages=200, max_slots=8),
        decode_worker=dict(num_pages=17),
        init_new_token_ratio=0.0,
        min_new_token_ratio=0.0,
    )
    c.connect()
    batches = check_joiners_decode_at_once(c.decodes[0])
    prompts = [[rng.randrange(1, 32) for _ in range(12)] for _ in range(8)]
    for i, prompt in enumerate(prompts):
        c.submit(f"r{i}", prompt, max_new=40, seed=i, stop=False)
    c.run()
    for i, prompt in enumerate(prompts):
        assert c.log.tokens[f"r{i}"] == expected(prompt, 40, seed=i, stop=False), f"r{i}"
    assert any(b.extends for b in batches)  # memory was tight: some requests resumed locally
    c.assert_no_leak()


def test_ready_requests_that_fill_the_pool_with_nothing_running_still_progress():
    # 6 usable pages: two 12-token prompts (3 pages each) fill the pool; each needs a 4th page
    # for its first decode, and no headroom was reserved (ratio 0)
    c = Cluster(decode_worker=dict(num_pages=7), init_new_token_ratio=0.0, min_new_token_ratio=0.0)
    c.connect()
    batches = check_joiners_decode_at_once(c.decodes[0])
    prompts = [list(range(1, 13)), list(range(13, 25))]
    rooms = [c.submit(f"r{i}", p, max_new=6, seed=i, stop=False) for i, p in enumerate(prompts)]
    for room in rooms:
        c.link.hold(room)
    c.run()
    d = c.decodes[0].core
    assert d.pool.available_pages() == 0 and len(open_rooms(d)) == 2
    for room in rooms:
        c.link.release(room)
    c.run()
    for i, prompt in enumerate(prompts):
        assert c.log.tokens[f"r{i}"] == expected(prompt, 6, seed=i, stop=False), f"r{i}"
    assert any(b.extends for b in batches)  # one was retracted before joining and resumed locally
    c.assert_no_leak()


@pytest.mark.parametrize("trial", range(30))
def test_random_xpyd_runs_with_tight_decode_memory(trial):
    rng = random.Random(trial)
    ps = rng.choice([1, 2, 4])
    dpages = rng.randrange(40 // ps + 3, 120 // ps)
    c = Cluster(
        num_prefill=rng.choice([1, 2]),
        num_decode=rng.choice([1, 2]),
        overlap=rng.random() < 0.5,
        worker=dict(page_size=ps, num_pages=200, max_slots=rng.randrange(2, 9)),
        decode_worker=dict(num_pages=dpages),
        chunked_prefill_size=ps * rng.randrange(1, 5),
        max_prefill_tokens=ps * rng.randrange(2, 10),
        init_new_token_ratio=rng.choice([0.0, 0.1]),
        min_new_token_ratio=0.0,
    )
    c.connect()
    for d in c.decodes:
        check_joiners_decode_at_once(d)
    cap = (dpages - 1) * ps
    shared = [rng.randrange(1, 32) for _ in range(rng.randrange(0, 12))]
    reqs = {}
    for i in range(rng.randrange(4, 16)):
        prompt = shared[: rng.randrange(0, len(shared) + 1)] + [
            rng.randrange(1, 32) for _ in range(rng.randrange(1, 20))
        ]
        max_new = min(rng.randrange(1, 30), cap - len(prompt))
        stop = rng.random() < 0.5
        c.submit(
            f"r{i}",
            prompt,
            p=rng.randrange(len(c.prefills)),
            d=rng.randrange(len(c.decodes)),
            decode_first=rng.random() < 0.5,
            max_new=max_new,
            seed=i,
            stop=stop,
        )
        reqs[f"r{i}"] = expected(prompt, max_new, seed=i, stop=stop)
        for _ in range(rng.randrange(0, 4)):
            c.round()
    c.run()
    c.advance(2.0)
    assert not c.log.failed
    assert {rid: c.log.tokens[rid] for rid in reqs} == reqs
    c.assert_no_leak()
