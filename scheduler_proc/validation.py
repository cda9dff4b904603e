"""What only the instance can check about a tokenized request before queueing it.

The front end validates client requests, but the input socket takes frames from any process, and
the codec rebuilds messages from their type hints without checking scalar types: a frame it
accepts can still carry a string where a list of ints belongs. So the shape of every field that
the scheduler or the worker relies on is checked here, before anything is queued.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

from protocol.messages import INVALID_REQUEST, QUEUE_FULL, SamplingParams, TokenizedRequest

if TYPE_CHECKING:
    from scheduler_proc.core import SchedulerCore

_NUMBER = (int, float)
_SAMPLING_TYPES: dict[str, tuple[type, ...]] = {
    "max_new_tokens": (int,),
    "temperature": _NUMBER,
    "top_p": _NUMBER,
    "top_k": (int,),
    "seed": (int,),
    "ignore_eos": (bool,),
    "return_logprob": (bool,),
}


def check_request(msg: TokenizedRequest, core: SchedulerCore) -> tuple[str, str] | None:
    """(error code, message) when ``core`` cannot take ``msg``; None when it can.

    A request that the whole KV pool cannot hold is refused here, which is what guarantees
    that retraction always makes progress: any admitted request fits when it runs alone.
    """
    problem = check_fields(msg, core.model.vocab_size)
    if problem is not None:
        return INVALID_REQUEST, problem
    if msg.rid in core.requests:
        return INVALID_REQUEST, f"request id {msg.rid!r} is already in use"
    max_new = msg.sampling.max_new_tokens
    prompt = len(msg.input_ids)
    total = prompt + max_new
    if total > core.max_context_len:
        return INVALID_REQUEST, (
            f"prompt ({prompt} tokens) + max_new_tokens ({max_new}) = {total} tokens "
            f"exceeds the context length {core.max_context_len}"
        )
    pages, pool = core.pool.pages_for(total), core.pool
    if pages > pool.total_pages:
        return INVALID_REQUEST, (
            f"prompt ({prompt} tokens) + max_new_tokens ({max_new}) needs {pages} KV pages "
            f"but the KV pool holds only {pool.total_pages} pages of {pool.page_size} tokens"
        )
    if core.queued_requests() >= core.args.max_queued_requests:
        return (
            QUEUE_FULL,
            f"the waiting queue is full ({core.args.max_queued_requests} requests); try again later",
        )
    return None


def check_fields(msg: TokenizedRequest, vocab_size: int) -> str | None:
    """Why ``msg``'s fields cannot be served (wrong types, token ids outside the model's
    vocabulary, sampling values the worker cannot use); None when they are fine."""
    if not isinstance(msg.rid, str):
        return f"rid must be a string; got {type(msg.rid).__name__}"
    if not _is_int(msg.priority) or not _is_number(msg.arrival_time):
        return "priority must be an integer and arrival_time a number"
    if msg.room is not None and not _is_int(msg.room):
        return f"room must be an integer; got {type(msg.room).__name__}"
    if msg.prefill_addr is not None and not isinstance(msg.prefill_addr, str):
        return f"prefill_addr must be a string; got {type(msg.prefill_addr).__name__}"
    if not isinstance(msg.input_ids, list):
        return "input_ids must be a list of token ids"
    if not msg.input_ids:
        return "the prompt is empty"
    problem = _check_token_ids("input_ids", msg.input_ids, vocab_size)
    if problem is not None:
        return problem
    if not isinstance(msg.sampling, SamplingParams):
        return "sampling must be a map of sampling parameters"
    return _check_sampling(msg.sampling)


def _check_sampling(s: SamplingParams) -> str | None:
    for f in dataclasses.fields(s):
        kinds = _SAMPLING_TYPES.get(f.name)
        value = getattr(s, f.name)
        if kinds is not None and type(value) not in kinds:
            return f"sampling.{f.name} must be {' or '.join(k.__name__ for k in kinds)}; got {value!r}"
    if not isinstance(s.stop_token_ids, list) or not all(_is_int(t) for t in s.stop_token_ids):
        return "sampling.stop_token_ids must be a list of integers"
    if s.max_new_tokens < 1:
        return f"max_new_tokens must be at least 1; got {s.max_new_tokens}"
    if not math.isfinite(s.temperature) or s.temperature < 0:
        return f"sampling.temperature must be finite and >= 0; got {s.temperature}"
    if not 0.0 < s.top_p <= 1.0:
        return f"sampling.top_p must be in (0, 1]; got {s.top_p}"
    if s.top_k < -1:
        return f"sampling.top_k must be -1, 0 or positive; got {s.top_k}"
    if not 0 <= s.seed < 2**63:
        return f"sampling.seed must be in [0, 2**63); got {s.seed}"
    return None


def _check_token_ids(name: str, ids: list[object], vocab_size: int) -> str | None:
    if set(map(type, ids)) != {int}:
        return f"{name} must be a list of integers"
    low, high = min(ids), max(ids)  # type: ignore[type-var]
    if low < 0 or high >= vocab_size:  # type: ignore[operator]
        bad = low if low < 0 else high  # type: ignore[operator]
        return f"{name} holds token id {bad}, outside the model's vocabulary [0, {vocab_size})"
    return None


def _is_int(value: object) -> bool:
    return type(value) is int


def _is_number(value: object) -> bool:
    return type(value) in (int, float)
