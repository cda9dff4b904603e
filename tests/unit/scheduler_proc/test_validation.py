"""Frames of the wrong types are refused by the codec; frames it accepts but the scheduler cannot
serve are refused before anything is queued."""

import msgpack
import pytest

from protocol.messages import (
    INVALID_REQUEST,
    PROTOCOL_VERSION,
    QUEUE_FULL,
    ProtocolError,
    RequestFailed,
    decode,
)
from scheduler_proc.core import SchedulerCore
from scheduler_proc.role import UnifiedRole
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
        (
            dict(input_ids=[1], sampling={**GOOD_SAMPLING, "max_new_tokens": "9"}),
            "sampling.max_new_tokens must be an integer",
        ),
        (dict(input_ids=[1], sampling={**GOOD_SAMPLING, "temperature": "hot"}), "temperature must be"),
        (dict(input_ids=[1], sampling={**GOOD_SAMPLING, "top_k": 1.5}), "top_k must be an integer"),
        (dict(input_ids=[1], sampling={**GOOD_SAMPLING, "ignore_eos": 1}), "ignore_eos must be a boolean"),
        (dict(input_ids=[1], sampling={**GOOD_SAMPLING, "stop_token_ids": ["a"]}), "stop_token_ids"),
        (dict(input_ids=[1], sampling=GOOD_SAMPLING, priority="high"), "priority must be"),
        (dict(input_ids=[1], sampling=GOOD_SAMPLING, room="7"), "room must be"),
    ],
)
def test_fields_of_the_wrong_type_are_refused_by_the_codec(fields, problem):
    """The scheduler's input loop drops (and logs) a frame that does not decode."""
    with pytest.raises(ProtocolError, match="^tokenized_request: ") as err:
        decoded(rid="r", **fields)
    assert problem in str(err.value)


@pytest.mark.parametrize(
    "fields, problem",
    [
        (dict(input_ids=[1, 10**9], sampling=GOOD_SAMPLING), f"input_ids[1] = {10**9} is outside"),
        (dict(input_ids=[1, VOCAB], sampling=GOOD_SAMPLING), f"[0, {VOCAB})"),
        (dict(input_ids=[-1, 2], sampling=GOOD_SAMPLING), "input_ids[0] = -1 is outside"),
        (dict(input_ids=[], sampling=GOOD_SAMPLING), "the prompt is empty"),
        (dict(input_ids=[1], sampling={**GOOD_SAMPLING, "max_new_tokens": 0}), "at least 1"),
        (dict(input_ids=[1], sampling={**GOOD_SAMPLING, "temperature": float("nan")}), "finite"),
        (dict(input_ids=[1], sampling={**GOOD_SAMPLING, "top_p": 0.0}), "top_p must be in"),
        (dict(input_ids=[1], sampling={**GOOD_SAMPLING, "seed": -1}), "seed must be in"),
    ],
)
def test_malformed_fields_are_refused_with_the_reason(fields, problem):
    core = make_core(FakeWorker())
    core.on_request(decoded(rid="r", **fields))
    (failure,) = core.take_outbox()
    assert isinstance(failure, RequestFailed) and failure.rid == "r" and failure.code == INVALID_REQUEST
    assert problem in failure.message
    assert not core.has_live_requests and core.form_step() is None


def test_an_unreadable_rid_is_refused_by_the_codec():
    with pytest.raises(ProtocolError, match="rid must be a string"):
        decoded(rid=[1], input_ids=[1, 2], sampling=GOOD_SAMPLING)


def test_the_largest_token_id_of_the_vocabulary_is_served():
    core = make_core(FakeWorker())
    core.on_request(decoded(rid="r", input_ids=[0, VOCAB - 1], sampling=GOOD_SAMPLING))
    assert core.take_outbox() == [] and core.form_step() is not None


def test_the_queue_bound_counts_what_the_role_reports_as_queued():
    """``--max-queued-requests`` bounds ``queued_requests()``, which a role may widen beyond
    ``waiting`` (the disaggregated roles hold queued requests elsewhere too)."""

    class HoldingRole(UnifiedRole):
        def queued(self) -> int:
            return 2

    worker = FakeWorker()
    core = SchedulerCore(make_args(max_queued_requests=3), "i", "unified", worker.ready())
    core.role = HoldingRole(core)
    core.on_request(make_request("a", [1, 2]))
    assert core.take_outbox() == [] and core.queued_requests() == 3
    core.on_request(make_request("b", [1, 2]))
    (failure,) = core.take_outbox()
    assert failure.rid == "b" and failure.code == QUEUE_FULL
