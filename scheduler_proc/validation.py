"""What an instance checks about a tokenized request before queueing it.

The front end validates client requests, but the input socket takes frames from any process:
the codec has checked every field's type on decoding, so what is left are the value checks of
``protocol.validation`` (the ones the front end applies too) and what only the instance knows
(its context length, its KV pool, its queue, the ids already in use).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocol.messages import INVALID_REQUEST, QUEUE_FULL, TokenizedRequest
from protocol.validation import prompt_problem, sampling_problem

if TYPE_CHECKING:
    from scheduler_proc.core import SchedulerCore


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
    """Why ``msg``'s field values cannot be served (an empty prompt, token ids outside the
    model's vocabulary, sampling values the worker cannot use); None when they are fine."""
    return prompt_problem(msg.input_ids, vocab_size) or sampling_problem(msg.sampling, "sampling.")
