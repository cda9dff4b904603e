"""Batch formation of the unified scheduler, driven in-process against the fake worker."""

from tests.fakes.scheduler import (
    FakeWorker,
    assert_no_leak,
    drive,
    make_core,
    make_request,
    reference_generate,
    step_once,
)


def prompt(n, base=1):
    return [(base + i) % 30 + 1 for i in range(n)]


def test_long_prompt_is_prefilled_in_page_aligned_chunks():
    worker = FakeWorker(page_size=4)
    core = make_core(worker, chunked_prefill_size=10)  # not a page multiple: chunks of 8
    req = make_request("a", prompt(21), max_new=3, stop=False)
    core.on_request(req)
    collected = drive(core, worker)
    extends = [(e.start_pos, len(e.token_ids), e.sample) for s in worker.steps for e in s.extends]
    assert extends == [(0, 8, False), (8, 8, False), (16, 5, True)]
    appended = [p for s in worker.steps for a in s.page_appends for p in a.pages]
    assert len(appended) == len(set(appended)) == 6  # 21 + 2 decoded positions = 23 tokens
    assert collected.tokens["a"] == reference_generate(req.input_ids, req.sampling)
    assert_no_leak(core)


def test_prefill_token_budget_limits_a_step():
    worker = FakeWorker(page_size=4)
    core = make_core(worker, max_prefill_tokens=24, chunked_prefill_size=64)
    for rid in "abc":
        core.on_request(make_request(rid, prompt(10), max_new=2))
    first = core.form_step()
    assert [len(e.token_ids) for e in first.extends] == [10, 10]  # the third would exceed 24 (12 paged)


def test_chunk_budget_is_shared_by_the_step():
    worker = FakeWorker(page_size=4)
    core = make_core(worker, chunked_prefill_size=16)
    core.on_request(make_request("a", prompt(6), max_new=2))
    core.on_request(make_request("b", prompt(30, base=7), max_new=2))
    step = core.form_step()
    # a takes 6, b gets the rest of the chunk budget rounded down to whole pages
    assert [(e.start_pos, len(e.token_ids), e.sample) for e in step.extends] == [(0, 6, True), (0, 8, False)]


def test_kv_budget_keeps_a_request_waiting_instead_of_overcommitting():
    worker = FakeWorker(num_pages=9, page_size=4)  # 8 usable pages
    core = make_core(worker, init_new_token_ratio=1.0, min_new_token_ratio=1.0)
    a = make_request("a", prompt(10), max_new=12, stop=False)  # 22 tokens: 6 pages
    b = make_request("b", prompt(10, base=3), max_new=4, stop=False)  # 4 pages: does not fit beside a
    core.on_request(a)
    core.on_request(b)
    step = core.form_step()
    assert len(step.new_reqs) == 1 and core.status().pending == 1
    core.on_result(worker.step(step))
    collected = drive(core, worker)
    assert collected.tokens["a"] == reference_generate(a.input_ids, a.sampling)
    assert collected.tokens["b"] == reference_generate(b.input_ids, b.sampling)
    assert_no_leak(core)


def test_max_running_requests_is_respected():
    worker = FakeWorker(page_size=4, max_slots=8)
    core = make_core(worker, max_running_requests=2)
    for i in range(5):
        core.on_request(make_request(f"r{i}", prompt(5, base=i), max_new=4, stop=False))
    most = 0
    original = worker.step

    def step(batch):
        nonlocal most
        result = original(batch)
        most = max(most, len(worker.rows))
        return result

    worker.step = step
    drive(core, worker)
    assert most == 2
    assert_no_leak(core)


def test_prefill_is_mixed_with_running_decodes():
    worker = FakeWorker(page_size=4)
    core = make_core(worker)
    core.on_request(make_request("a", prompt(5), max_new=6, stop=False))
    step_once(core, worker)
    core.on_request(make_request("b", prompt(7, base=4), max_new=6, stop=False))
    mixed = step_once(core, worker)
    assert len(mixed.extends) == 1 and mixed.decode_slots == [0] and mixed.decode_positions == [5]
    assert len(core.take_outbox()[-1].rows()) == 2  # one token each for a (decode) and b (prefill)


def test_finished_request_slot_is_refilled_in_the_same_step():
    worker = FakeWorker(page_size=4, max_slots=1)
    core = make_core(worker)
    core.on_request(make_request("a", prompt(4), max_new=2, stop=False))
    core.on_request(make_request("b", prompt(4, base=9), max_new=2, stop=False))
    drive(core, worker)
    # a: prefill, decode; then the step that admits b also releases a's slot
    assert [(s.released, [n.slot for n in s.new_reqs]) for s in worker.steps] == [
        ([], [0]),
        ([], []),
        ([0], [0]),
        ([], []),
    ]
    assert_no_leak(core)
