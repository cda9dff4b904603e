"""What only the instance can check about a tokenized request before queueing it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocol.messages import INVALID_REQUEST, QUEUE_FULL, TokenizedRequest

if TYPE_CHECKING:
    from scheduler_proc.core import SchedulerCore


def check_request(msg: TokenizedRequest, core: SchedulerCore) -> tuple[str, str] | None:
    """(error code, message) when ``core`` cannot take ``msg``; None when it can.

    A request that the whole KV pool cannot hold is refused here, which is what guarantees
    that retraction always makes progress: any admitted request fits when it runs alone.
    """
    if msg.rid in core.requests:
        return INVALID_REQUEST, f"request id {msg.rid!r} is already in use"
    if not msg.input_ids:
        return INVALID_REQUEST, "the prompt is empty"
    max_new = msg.sampling.max_new_tokens
    if max_new < 1:
        return INVALID_REQUEST, f"max_new_tokens must be at least 1; got {max_new}"
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
    if len(core.waiting) >= core.args.max_queued_requests:
        return (
            QUEUE_FULL,
            f"the waiting queue is full ({core.args.max_queued_requests} requests); try again later",
        )
    return None
