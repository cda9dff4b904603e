"""What only the instance can validate, the prefix cache as the scheduler uses it, and status."""

import pytest

from protocol.messages import INVALID_REQUEST, QUEUE_FULL, RequestFailed
from scheduler_proc.core import SchedulerCore
from tests.fakes.scheduler import (
    FakeWorker,
    assert_no_leak,
    drive,
    make_args,
    make_core,
    make_request,
    reference_generate,
    step_once,
)


def only_failure(core) -> RequestFailed:
    (msg,) = core.take_outbox()
    assert isinstance(msg, RequestFailed)
    return msg


def test_duplicate_live_rid_is_refused_and_the_first_unaffected():
    worker = FakeWorker()
    core = make_core(worker)
    first = make_request("a", [1, 2, 3], max_new=4)
    core.on_request(first)
    core.on_request(make_request("a", [4, 5, 6]))
    failure = only_failure(core)
    assert failure.code == INVALID_REQUEST and "'a'" in failure.message
    collected = drive(core, worker)
    assert collected.tokens["a"] == reference_generate(first.input_ids, first.sampling)
    core.on_request(make_request("a", [4, 5, 6]))  # no longer live: accepted
    assert core.take_outbox() == [] and core.status().pending == 1


def test_request_larger_than_the_pool_is_refused_with_a_clear_message():
    worker = FakeWorker(num_pages=5, page_size=4)  # 4 usable pages: 16 tokens
    core = make_core(worker)
    core.on_request(make_request("big", list(range(1, 10)), max_new=8))
    failure = only_failure(core)
    assert failure.code == INVALID_REQUEST
    assert "5 KV pages" in failure.message and "holds only 4 pages" in failure.message
    core.on_request(make_request("fits", list(range(1, 10)), max_new=7))
    assert core.take_outbox() == []


def test_context_length_and_empty_prompt_are_refused():
    worker = FakeWorker(num_pages=200)
    core = SchedulerCore(make_args(page_size=worker.page_size), "inst0", "unified", worker.ready(20))
    core.on_request(make_request("long", list(range(1, 16)), max_new=6))
    assert "context length 20" in only_failure(core).message
    core.on_request(make_request("empty", [], max_new=6))
    assert only_failure(core).code == INVALID_REQUEST


def test_full_waiting_queue_answers_queue_full():
    worker = FakeWorker()
    core = make_core(worker, max_queued_requests=2)
    for rid in "ab":
        core.on_request(make_request(rid, [1, 2, 3]))
    core.on_request(make_request("c", [1, 2, 3]))
    failure = only_failure(core)
    assert failure.code == QUEUE_FULL and "2 requests" in failure.message
    step_once(core, worker)  # a and b leave the queue
    core.take_outbox()
    core.on_request(make_request("c", [1, 2, 3]))
    assert core.take_outbox() == []


@pytest.mark.parametrize("disable_radix_cache", [False, True])
def test_shared_prefix_is_reused_from_the_cache(disable_radix_cache):
    worker = FakeWorker(page_size=4)
    core = make_core(worker, disable_radix_cache=disable_radix_cache)
    shared = list(range(1, 14))  # 3 full pages + 1 token
    a = make_request("a", shared + [20], max_new=3, stop=False)
    b = make_request("b", shared + [21, 22], max_new=3, stop=False)
    core.on_request(a)
    collected = drive(core, worker)
    core.on_request(b)
    drive(core, worker, collected)
    hit = 0 if disable_radix_cache else 12
    assert collected.cached == {"a": 0, "b": hit}
    b_step = worker.steps[-3]  # b: prefill, then two decodes
    (extend,) = b_step.extends
    assert extend.start_pos == hit and extend.token_ids == b.input_ids[hit:]
    if not disable_radix_cache:  # b's row starts with a's cached pages
        (append,) = b_step.page_appends
        a_pages = [p for s in worker.steps[:3] for ap in s.page_appends for p in ap.pages]
        assert append.pages[:3] == a_pages[:3]
    assert collected.tokens["b"] == reference_generate(b.input_ids, b.sampling)
    assert_no_leak(core)
    assert (core.status().cached_pages == 0) is disable_radix_cache


def test_fully_cached_prompt_still_computes_its_last_token():
    worker = FakeWorker(page_size=4)
    core = make_core(worker)
    a = make_request("a", list(range(1, 9)), max_new=5, stop=False)
    core.on_request(a)
    collected = drive(core, worker)
    core.on_request(make_request("again", a.input_ids, max_new=5, stop=False))
    drive(core, worker, collected)
    assert collected.cached["again"] == 4  # the second page holds the last prompt token: recomputed
    assert collected.tokens["again"] == collected.tokens["a"]
    assert_no_leak(core)


def test_status_counts_follow_the_lifecycle():
    worker = FakeWorker(page_size=4, max_slots=2)
    core = make_core(worker, chunked_prefill_size=8)
    core.on_request(make_request("long", list(range(1, 21)), max_new=4, stop=False))
    core.on_request(make_request("short", [1, 2], max_new=4, stop=False))
    core.on_request(make_request("third", [3, 4], max_new=4, stop=False))
    status = core.status()
    assert (status.pending, status.prefilling, status.decoding) == (3, 0, 0)
    assert status.free_pages == status.total_pages == worker.num_pages - 1
    step_once(core, worker)  # long: first chunk of 8 takes the whole chunk budget
    status = core.status()
    assert (status.pending, status.prefilling, status.decoding) == (2, 1, 0)
    assert status.free_pages == status.total_pages - 2
    step_once(core, worker)
    step_once(core, worker)  # long's last chunk (4 tokens), then short is admitted beside it
    status = core.status()
    assert (status.pending, status.prefilling, status.decoding) == (1, 0, 2)
    assert status.transferring == 0 and status.name == "inst0" and status.role == "unified"
