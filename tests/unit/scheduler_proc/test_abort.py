"""Aborts in every live state free everything and end with one final output."""

from collections import deque

from protocol.messages import AbortRequest, BatchOutput
from scheduler_proc.request import ReqState
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


def final_output(core, rid):
    (msg,) = core.take_outbox()
    assert isinstance(msg, BatchOutput)
    (out,) = msg.rows()
    assert out.rid == rid and out.finished and out.token_ids == []
    return out


def test_abort_of_a_waiting_request():
    worker = FakeWorker(max_slots=1)
    core = make_core(worker)
    keep = make_request("keep", [1, 2, 3], max_new=4, stop=False)
    core.on_request(keep)
    core.on_request(make_request("gone", [4, 5, 6]))
    step_once(core, worker)
    core.take_outbox()
    assert core.requests["gone"].state is ReqState.PENDING
    core.on_abort(AbortRequest("gone"))
    assert final_output(core, "gone").finish_reason == "abort"
    collected = drive(core, worker)
    assert "gone" not in collected.tokens
    assert collected.tokens["keep"] == reference_generate(keep.input_ids, keep.sampling)[1:]
    assert_no_leak(core)


def test_abort_of_a_chunked_prefill_releases_its_slot_and_pages():
    worker = FakeWorker(page_size=4)
    core = make_core(worker, chunked_prefill_size=8)
    core.on_request(make_request("long", list(range(1, 30)), max_new=4))
    step_once(core, worker)
    step_once(core, worker)
    assert core.status().prefilling == 1
    core.on_abort(AbortRequest("long", reason="stop"))
    assert final_output(core, "long").finish_reason == "stop"  # the front end's reason is echoed
    status = core.status()
    assert status.prefilling == 0
    assert status.free_pages + status.cached_pages == status.total_pages
    assert core.pool.slots.num_free == worker.max_slots
    core.on_request(make_request("next", [1, 2], max_new=1))
    assert core.form_step().released == [0]  # the worker hears of it with the next step


def test_abort_of_a_decoding_request_with_steps_in_flight():
    worker = FakeWorker(page_size=2)
    core = make_core(worker, disable_overlap_schedule=False)
    other = make_request("other", [7, 8, 9], max_new=10, stop=False)
    core.on_request(make_request("gone", [1, 2, 3], max_new=10, stop=False))
    core.on_request(other)
    collected = Collected()
    inflight = deque([worker.step(core.form_step()), worker.step(core.form_step())])
    core.on_result(inflight.popleft())
    inflight.append(worker.step(core.form_step()))
    core.on_abort(AbortRequest("gone"))  # two of its decodes are in flight
    while inflight:
        core.on_result(inflight.popleft())
    collected.add(core.take_outbox())
    assert collected.finish["gone"] == "abort" and len(collected.tokens["gone"]) == 1  # from the prefill
    drive(core, worker, collected, overlap=True)
    assert collected.tokens["other"] == reference_generate(other.input_ids, other.sampling)
    assert_no_leak(core)


def test_abort_of_an_unknown_request_is_ignored():
    worker = FakeWorker()
    core = make_core(worker)
    core.on_abort(AbortRequest("nobody"))
    assert core.take_outbox() == []
    core.on_request(make_request("done", [1, 2], max_new=1))
    drive(core, worker)
    core.on_abort(AbortRequest("done"))  # already finished
    assert core.take_outbox() == []
    assert_no_leak(core)


def test_fail_all_answers_every_live_request_and_frees_everything():
    worker = FakeWorker(max_slots=2)
    core = make_core(worker)
    for i in range(4):
        core.on_request(make_request(f"r{i}", [1, 2, 3, 4, 5], max_new=6))
    step_once(core, worker)
    core.take_outbox()
    core.fail_all("shutting_down", "bye")
    failed = core.take_outbox()
    assert sorted(m.rid for m in failed) == ["r0", "r1", "r2", "r3"]
    assert all(m.code == "shutting_down" for m in failed)
    assert not core.has_live_requests
    assert core.pool.free_pages == core.pool.total_pages  # nothing cached from a failure
