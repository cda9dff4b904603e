"""Per-step work that must not grow with what does not change: the scheduler's hot path."""

import scheduler_proc.admission as admission_module
from scheduler_proc.resources import PagePool, ReqResources
from tests.fakes.scheduler import (
    Collected,
    FakeWorker,
    assert_no_leak,
    drive,
    make_core,
    make_request,
    reference_generate,
    step_once,
)


def counting(monkeypatch, owner, name):
    """Wrap ``owner.name`` so that its calls are counted; returns the list of call arguments."""
    calls = []
    real = getattr(owner, name)

    def wrapper(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def test_decode_pages_of_a_step_come_from_one_allocation(monkeypatch):
    worker = FakeWorker(num_pages=64, page_size=4, max_slots=8)
    core = make_core(worker, chunked_prefill_size=64)
    requests = [make_request(f"r{i}", [i + 1, 2, 3, 4], max_new=6, stop=False) for i in range(6)]
    for req in requests:
        core.on_request(req)
    collected = Collected()
    step_once(core, worker)  # every prompt fills its page: each decode now needs a new page
    collected.add(core.take_outbox())
    allocs = counting(monkeypatch, core.pool, "alloc_pages")
    batch = step_once(core, worker)
    assert len(batch.decode_slots) == 6 and len(batch.page_appends) == 6
    assert allocs == [(6,)]
    drive(core, worker, collected)
    for req in requests:
        assert collected.tokens[req.rid] == reference_generate(req.input_ids, req.sampling)
    assert_no_leak(core)


def test_reserved_pages_are_computed_only_when_something_waits(monkeypatch):
    worker = FakeWorker()
    core = make_core(worker)
    core.on_request(make_request("a", [1, 2, 3], max_new=10, stop=False))
    step_once(core, worker)
    calls = counting(monkeypatch, admission_module, "pages_to_finish")
    for _ in range(3):
        step_once(core, worker)
    assert calls == []  # nothing waits: no admission, so no reservation to compute
    core.on_request(make_request("b", [4, 5, 6], max_new=2, stop=False))
    step_once(core, worker)
    assert calls  # a waiting request is admitted against the reservation


def test_a_blocked_head_request_is_not_matched_again_while_the_tree_is_unchanged(monkeypatch):
    worker = FakeWorker(num_pages=13, page_size=4, max_slots=4)  # 12 usable pages
    core = make_core(worker, chunked_prefill_size=64)
    core.on_request(make_request("big", list(range(1, 21)), max_new=20, stop=False))  # 10 pages
    step_once(core, worker)
    blocked = make_request("blocked", list(range(2, 22)), max_new=12, stop=False)
    core.on_request(blocked)
    matches = counting(monkeypatch, core.pool.cache, "match_prefix")
    for _ in range(4):  # "big" decodes; nothing enters or leaves the tree
        batch = step_once(core, worker)
        assert not batch.extends
    assert len(matches) == 1
    collected = drive(core, worker)  # "big" finishes and is cached: "blocked" is matched again
    assert len(matches) > 1 and collected.finish["blocked"] == "length"
    assert collected.tokens["blocked"] == reference_generate(blocked.input_ids, blocked.sampling)
    assert_no_leak(core)


def test_caching_a_prefix_that_did_not_grow_does_not_walk_the_tree(monkeypatch):
    pool = PagePool(num_pages=16, page_size=2, max_slots=2, disable_radix_cache=False)
    res = ReqResources()
    res.take_prefix(pool, pool.cache.match_prefix([]))
    res.append_pages(pool.alloc_pages(3))
    inserts = counting(monkeypatch, pool.cache, "insert")
    res.cache_prefix(pool, [1, 2, 3, 4])
    assert len(inserts) == 1 and pool.cache.cached_pages == 2
    res.cache_prefix(pool, [1, 2, 3, 4, 5])  # a chunk that got no pages: the same full pages
    assert len(inserts) == 1
    res.cache_prefix(pool, [1, 2, 3, 4, 5, 6])
    assert len(inserts) == 2 and pool.cache.cached_pages == 3
    res.release(pool)
    assert pool.free_pages + pool.cache.cached_pages == pool.total_pages
