"""Frames the codec accepts but the scheduler cannot serve are refused before anything is queued."""

import msgpack
import pytest

from protocol.messages import INVALID_REQUEST, PROTOCOL_VERSION, QUEUE_FULL, RequestFailed, decode
from scheduler_proc.core import SchedulerCore
from tests.fakes.scheduler import VOCAB, FakeWorker, make_args, make_core, make_request

GOOD_SAMPLING = {"max_new_tokens": 4, "seed": 1, "temperature": 0.0}


def decoded(**fields: object):
    return decode(msgpack.packb({"type": "tokenized_request", "v": PROTOCOL_VERSION, **fields}))


@pytest.mark.parametrize(
    "fields, problem",
    [
        (dict(input_ids=[1, 2], sampling=5), "sampling must be a map"),
        (dict(input_ids="hello", sampling=GOOD_SAMPLING), "input_ids must be a list"),
        (dict(input_ids=[1, "2"], sampling=GOOD_SAMPLING), "input_ids must be a list of integers"),
        (dict(input_ids=[1, 2.0], sampling=GOOD_SAMPLING), "input_ids must be a list of integers"),
        (dict(input_ids=[1, True], sampling=GOOD_SAMPLING), "input_ids must be a list of integers"),
        (dict(input_ids=[1, 10**9], sampling=GOOD_SAMPLING), f"token id {10**9}, outside"),
        (dict(input_ids=[1, VOCAB], sampling=GOOD_SAMPLING), f"[0, {VOCAB})"),
        (dict(input_ids=[-1, 2], sampling=GOOD_SAMPLING), "token id -1"),
        (dict(input_ids=[], sampling=GOOD_SAMPLING), "the prompt is empty"),
        (
            dict(input_ids=[1], sampling={**GOOD_SAMPLING, "max_new_tokens": "9"}),
            "max_new_tokens must be int",
        ),
        (dict(input_ids=[1], sampling={**GOOD_SAMPLING, "max_new_tokens": 0}), "at least 1"),
        (dict(input_ids=[1], sampling={**GOOD_SAMPLING, "temperature": "hot"}), "temperature must be"),
        (dict(input_ids=[1], sampling={**GOOD_SAMPLING, "temperature": float("nan")}), "finite"),
        (dict(input_ids=[1], sampling={**GOOD_SAMPLING, "top_p": 0.0}), "top_p must be in"),
        (dict(input_ids=[1], sampling={**GOOD_SAMPLING, "top_k": 1.5}), "top_k must be int"),
        (dict(input_ids=[1], sampling={**GOOD_SAMPLING, "seed": -1}), "seed must be in"),
        (dict(input_ids=[1], sampling={**GOOD_SAMPLING, "ignore_eos": 1}), "ignore_eos must be bool"),
        (dict(input_ids=[1], sampling={**GOOD_SAMPLING, "stop_token_ids": ["a"]}), "stop_token_ids"),
        (dict(input_ids=[1], sampling=GOOD_SAMPLING, priority="high"), "priority must be"),
        (dict(input_ids=[1], sampling=GOOD_SAMPLING, room="7"), "room must be"),
    ],
)
def test_malformed_fields_are_refused_with_the_reason(fields, problem):
    core = make_core(FakeWorker())
    core.on_request(decoded(rid="r", **fields))
    (failure,) = core.take_outbox()
    assert isinstance(failure, RequestFailed) and failure.rid == "r" and failure.code == INVALID_REQUEST
    assert problem in failure.message
    assert not core.has_live_requests and core.form_step() is None


def test_an_unreadable_rid_is_dropped_without_an_answer():
    core = make_core(FakeWorker())
    core.on_request(decoded(rid=[1], input_ids=[1, 2], sampling=GOOD_SAMPLING))
    assert core.take_outbox() == [] and not core.has_live_requests


def test_the_largest_token_id_of_the_vocabulary_is_served():
    core = make_core(FakeWorker())
    core.on_request(decoded(rid="r", input_ids=[0, VOCAB - 1], sampling=GOOD_SAMPLING))
    assert core.take_outbox() == [] and core.form_step() is not None


def test_the_queue_bound_counts_what_the_role_reports_as_queued():
    """``--max-queued-requests`` bounds ``queued_requests()``, which a role may widen beyond
    ``waiting`` (the disaggregated roles hold queued requests elsewhere too)."""

    class HoldingCore(SchedulerCore):
        held = 2

        def queued_requests(self) -> int:
            return super().queued_requests() + self.held

    worker = FakeWorker()
    core = HoldingCore(make_args(max_queued_requests=3), "i", "unified", worker.ready())
    core.on_request(make_request("a", [1, 2]))
    assert core.take_outbox() == [] and core.queued_requests() == 3
    core.on_request(make_request("b", [1, 2]))
    (failure,) = core.take_outbox()
    assert failure.rid == "b" and failure.code == QUEUE_FULL
