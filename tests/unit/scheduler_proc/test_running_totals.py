"""The scheduler's running totals equal what they replace, after random sequences of events
(arrivals, steps with and without overlap, finishes, aborts, retractions out of KV pages):
``reserved_pages`` is ``Σ pages_to_finish`` over the admitted requests whenever admission reads
it, and the waiting queue is in its policy's order with its token count right."""

import random
from collections import deque

import pytest

from protocol.messages import AbortRequest
from scheduler_proc.admission import RunningBudget
from scheduler_proc.batch import pages_to_finish
from scheduler_proc.core import SchedulerCore
from scheduler_proc.request import ReqState
from tests.fakes.scheduler import VOCAB, FakeWorker, assert_no_leak, make_core, make_request


def recomputed_reserve(core: SchedulerCore) -> int:
    return sum(pages_to_finish(r, len(r.res.row), core.pool, core.new_token_ratio) for r in core.admitted())


def check_waiting(core: SchedulerCore, policy: str) -> None:
    queue = list(core.waiting)
    key = (lambda r: r.priority_order) if policy == "priority" else (lambda r: r.seq)
    assert queue == sorted(queue, key=key)
    assert all(r.state is ReqState.PENDING for r in queue)
    assert core.waiting.num_tokens == sum(r.num_tokens for r in queue)


def random_core(rng: random.Random, policy: str):
    page_size = rng.choice([1, 2, 4])
    worker = FakeWorker(num_pages=rng.randrange(12, 60), page_size=page_size, max_slots=rng.randrange(2, 12))
    core = make_core(
        worker,
        disable_overlap_schedule=rng.random() < 0.5,
        chunked_prefill_size=page_size * rng.randrange(1, 6),
        max_prefill_tokens=page_size * rng.randrange(2, 12),
        schedule_policy=policy,
        disable_radix_cache=rng.random() < 0.2,
        max_running_requests=rng.randrange(1, 12),
        init_new_token_ratio=rng.choice([0.0, 0.3, 0.7, 1.0]),
        min_new_token_ratio=rng.choice([0.0, 0.1]),
    )
    return worker, core


@pytest.mark.parametrize("policy", ["fcfs", "lpm", "priority"])
@pytest.mark.parametrize("trial", range(8))
def test_running_totals_match_recomputed_sums(policy, trial):
    rng = random.Random(f"{policy}/{trial}")
    worker, core = random_core(rng, policy)
    reads = []
    read = core.reserved_pages

    def checked_read():
        value = read()
        assert value == recomputed_reserve(core)
        reads.append(value)
        return value

    core.reserved_pages = checked_read
    capacity = (worker.num_pages - 1) * worker.page_size
    shared = [rng.randrange(1, VOCAB) for _ in range(8)]
    depth = 1 if core.args.disable_overlap_schedule else 2
    inflight: deque = deque()
    made = 0
    for _ in range(3000):
        if made < 60 and rng.random() < 0.3:
            for _ in range(rng.randrange(1, 4)):
                own = [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 12))]
                prompt = shared[: rng.randrange(0, 9)] + own
                max_new = rng.randrange(1, min(24, capacity - len(prompt)))
                core.on_request(make_request(f"r{made}", prompt, max_new=max_new, seed=made,
                                             stop=rng.random() < 0.5, priority=rng.randrange(3)))
                made += 1
        if core.requests and rng.random() < 0.03:
            core.on_abort(AbortRequest(rng.choice(sorted(core.requests))))
        batch = core.form_step() if len(inflight) < depth else None
        if batch is not None:
            inflight.append(worker.step(batch))
        if inflight and (len(inflight) >= depth or batch is None):
            core.on_result(inflight.popleft())
        core.take_outbox()
        assert core.reserved_pages() == recomputed_reserve(core)
        check_waiting(core, policy)
        if made >= 60 and not core.has_live_requests and not inflight:
            break
    else:
        raise AssertionError(f"hung: {core.status()}")
    assert len(reads) > 50
    assert_no_leak(core)


def test_retraction_is_exercised_and_totals_hold():
    """A pool too small for the batch: requests are retracted, and the total stays exact."""
    worker = FakeWorker(num_pages=15, page_size=2, max_slots=6)
    core = make_core(worker, init_new_token_ratio=0.0, min_new_token_ratio=0.0)
    rng = random.Random(7)
    for i in range(12):
        prompt = [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1, 9))]
        core.on_request(make_request(f"r{i}", prompt, max_new=rng.randrange(4, 15), seed=i))
    while core.has_live_requests:
        batch = core.form_step()
        assert batch is not None
        assert core.reserved_pages() == recomputed_reserve(core)
        core.on_result(worker.step(batch))
        core.take_outbox()
        assert core.reserved_pages() == recomputed_reserve(core)
    assert core.metrics.preemptions > 0
    assert core.reserved_pages() == 0
    assert_no_leak(core)


def test_budget_counts_a_request_once_and_forgets_it_on_leave():
    worker = FakeWorker(num_pages=64, page_size=4, max_slots=4)
    core = make_core(worker)
    core.on_request(make_request("a", [1, 2, 3, 4, 5], max_new=20, seed=0))
    batch = core.form_step()
    (req,) = core.running
    budget: RunningBudget = core.budget
    budget.grew(req)
    budget.grew(req)  # marked twice: still counted once
    assert budget.total(1.0) == pages_to_finish(req, len(req.res.row), core.pool, 1.0) > 0
    assert budget.total(0.5) == pages_to_finish(req, len(req.res.row), core.pool, 0.5)
    core.on_result(worker.step(batch))
    core.on_abort(AbortRequest("a"))
    assert budget.total(1.0) == 0 and not req.budget_member
