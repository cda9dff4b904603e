"""Prefill admission: the prefill part of a step (the chunked request's next chunk, then waiting
requests admitted while the budgets, pages and slots allow), page-aligned chunks, and the
prefix-cache match of each admitted request. Functions of the ``SchedulerCore`` whose queues
they work on (split out of core.py to keep it one idea: requests in and out), and the running
total of the pages the running batch still needs (``RunningBudget``).
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

from scheduler_proc.batch import PrefillBudget, StepBuilder, finish_pages, pages_to_finish
from scheduler_proc.request import ReqState, Request
from scheduler_proc.resources import PagePool

if TYPE_CHECKING:
    from scheduler_proc.core import SchedulerCore

logger = logging.getLogger(__name__)


def schedule_prefills(core: SchedulerCore, step: StepBuilder) -> None:
    budget = PrefillBudget(
        reserved_pages=0,
        input_tokens=core.args.max_prefill_tokens,
        chunk_tokens=core.args.chunked_prefill_size,
    )
    if core.chunked_req is not None:
        _continue_chunked(core, core.chunked_req, step, budget)
    if core.waiting and core.has_room():
        budget.reserved_pages = core.reserved_pages()
        _admit_waiting(core, step, budget)


class RunningBudget:
    """``Σ pages_to_finish`` over the running batch, kept as requests join, grow and leave instead
    of summed over every running request whenever admission runs.

    A running (decoding) request's pages to finish change only when it joins, when a page is
    appended to its row, and when it leaves: a decode step moves ``kv_len`` and
    ``scheduled_outputs`` up by one together, which leaves its decode end where it was, and its
    row always covers ``kv_len``. The new-token ratio changes every step, and is applied per
    request (rounded up), so the decode pages are kept as a count per value: the total is exact
    at the cost of one term per distinct value (at most a request's pages). A request whose
    inputs changed is marked and recomputed when the total is next read (``join`` may come before
    the request's ``kv_len`` is set).
    """

    def __init__(self, pool: PagePool) -> None:
        self._pool = pool
        self._input_pages = 0
        self._decode_pages: dict[int, int] = {}  # remaining decode pages → running requests with that many
        self._stale: list[Request] = []

    def join(self, req: Request) -> None:
        req.budget_member = True
        self._stale.append(req)

    def grew(self, req: Request) -> None:
        """Pages were appended to ``req``'s row (or its progress was set)."""
        self._stale.append(req)

    def leave(self, req: Request) -> None:
        self._uncount(req)
        req.budget_member = False

    def total(self, new_token_ratio: float) -> int:
        if self._stale:
            for req in self._stale:
                if req.budget_member:
                    self._uncount(req)
                    self._count(req)
            self._stale.clear()
        return self._input_pages + sum(
            n * math.ceil(new_token_ratio * pages) for pages, n in self._decode_pages.items()
        )

    def _count(self, req: Request) -> None:
        share = finish_pages(req, len(req.res.row), self._pool)
        req.budget_share = share
        self._input_pages += share[0]
        if share[1]:
            self._decode_pages[share[1]] = self._decode_pages.get(share[1], 0) + 1

    def _uncount(self, req: Request) -> None:
        input_pages, decode_pages = req.budget_share
        req.budget_share = (0, 0)
        self._input_pages -= input_pages
        if decode_pages:
            left = self._decode_pages[decode_pages] - 1
            if left:
                self._decode_pages[decode_pages] = left
            else:
                del self._decode_pages[decode_pages]


def _continue_chunked(core: SchedulerCore, req: Request, step: StepBuilder, budget: PrefillBudget) -> None:
    req.res.cache_prefix(core.pool, req.kv_tokens())
    chunk = budget.chunk_for(req.num_tokens - req.kv_len, core.page_size)
    pages = core.pool.alloc_pages(core.pool.pages_for(req.kv_len + chunk) - len(req.res.row))
    if pages is None:
        logger.debug("rid=%s next chunk waits for KV pages", req.rid)
        return
    req.res.append_pages(pages)
    step.add_pages(req, pages)
    budget.spend(chunk)
    _schedule_chunk(core, req, chunk, step)


def _admit_waiting(core: SchedulerCore, step: StepBuilder, budget: PrefillBudget) -> None:
    admitted: list[Request] = []
    tried = 0
    for req in core.waiting.admission_order(core.pool.cache):
        if not core.has_room():
            break
        tried += 1
        if req.inflight:  # retracted with a step still in flight: resume after its result
            continue
        if not _try_admit(core, req, step, budget):
            break
        admitted.append(req)
    core.waiting.remove_admitted(admitted, tried)


def _try_admit(core: SchedulerCore, req: Request, step: StepBuilder, budget: PrefillBudget) -> bool:
    # ≥ 1 token to compute; a blocked head request is tried every step, so its match is memoized
    match = core.pool.match_prefix_of(req, req.num_tokens - 1, lambda: req.tokens[: req.num_tokens - 1])
    prefix_len = len(match.pages) * core.page_size
    extend_len = req.num_tokens - prefix_len
    if step.has_prefill and core.pool.pages_for(extend_len) * core.page_size > budget.input_tokens:
        return False
    chunk = budget.chunk_for(extend_len, core.page_size)
    if chunk == 0 or (chunk < extend_len and core.chunked_req is not None):  # one chunked at a time
        return False
    req.res.take_prefix(core.pool, match)  # locked first: no eviction below can take it
    need = pages_to_finish(req, len(match.pages), core.pool, core.new_token_ratio)
    if need > core.pool.available_pages() - budget.reserved_pages:
        req.res.release(core.pool)
        return False
    pages = core.pool.alloc_pages(core.pool.pages_for(prefix_len + chunk) - len(match.pages))
    (slot,) = core.pool.slots.alloc(1) or (None,)
    assert pages is not None and slot is not None, "admission checked pages and slots"
    req.res.slot = slot
    req.res.append_pages(pages)
    req.transition(ReqState.PREFILLING)
    req.kv_len = prefix_len
    req.scheduled_outputs = len(req.output_ids)
    if req.cached_tokens is None:
        req.cached_tokens = prefix_len
        req.first_scheduled_time = time.time()
    logger.debug("rid=%s admitted to slot %d with %d cached tokens", req.rid, slot, prefix_len)
    step.add_new(req)
    budget.reserved_pages += need - len(pages)
    budget.spend(chunk)
    _schedule_chunk(core, req, chunk, step)
    return True


def _schedule_chunk(core: SchedulerCore, req: Request, chunk: int, step: StepBuilder) -> None:
    start = req.kv_len
    req.kv_len += chunk
    last = req.kv_len == req.num_tokens
    step.add_extend(req, start, req.tokens[start : req.kv_len].tolist(), sample=last)
    if not last:
        core.chunked_req = req
    else:
        if req is core.chunked_req:
            core.chunked_req = None
        req.scheduled_outputs += 1
    core.role.on_chunk(req, step, last)
