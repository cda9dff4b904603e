"""The scheduler's logic, free of sockets: admission, batch formation, retraction and results.

``SchedulerCore`` is driven by five calls: ``on_request``, ``on_abort``, ``form_step``,
``on_result`` and ``status``; the messages it produces for the front end collect in an outbox
(``take_outbox``). ``scheduler.run_scheduler`` wires it to sockets; tests drive it directly.

The unified role lives in ``form_step`` (decodes of the running batch mixed with prefill
chunks) and ``_prefill_done`` (a fully prefilled request joins the running batch). The
disaggregated roles reuse everything else and replace those two.
"""

from __future__ import annotations

import logging
import time
from collections import deque

from protocol.config import SchedulerConfig, ServerArgs
from protocol.messages import (
    AbortRequest,
    BatchOutput,
    InstanceStatus,
    Message,
    ReqOutput,
    RequestFailed,
    StepBatch,
    StepResult,
    TokenizedRequest,
    WorkerReady,
)
from scheduler_proc.batch import PrefillBudget, SentStep, StepBuilder, pages_to_finish
from scheduler_proc.policy import get_policy
from scheduler_proc.request import ReqState, Request
from scheduler_proc.resources import KVPool
from scheduler_proc.validation import check_request

logger = logging.getLogger(__name__)

NEW_TOKEN_RATIO_DECAY_STEPS = 600  # decode steps for the ratio to fall from init to min (SGLang's default)


class SchedulerCore:
    @classmethod
    def from_config(cls, cfg: SchedulerConfig, worker: WorkerReady) -> SchedulerCore:
        return cls(cfg.args, cfg.name, cfg.role, worker)

    def __init__(self, args: ServerArgs, name: str, role: str, worker: WorkerReady) -> None:
        self.args = args
        self.name = name
        self.role = role
        self.model = worker.model
        self.max_context_len = worker.max_context_len
        self.pool = KVPool(worker.num_pages, worker.page_size, worker.max_slots, args.disable_radix_cache)
        self.page_size = worker.page_size
        self.max_running = min(args.max_running_requests, worker.max_slots)
        self._sort_waiting = get_policy(args.schedule_policy)
        self.requests: dict[str, Request] = {}  # every live request
        self.waiting: list[Request] = []
        self.running: list[Request] = []  # decoding, holding a slot
        self.chunked_req: Request | None = None
        self.sent: deque[SentStep] = deque()
        self.new_token_ratio = args.init_new_token_ratio
        self._ratio_decay = (
            args.init_new_token_ratio - args.min_new_token_ratio
        ) / NEW_TOKEN_RATIO_DECAY_STEPS
        self._released: list[int] = []  # slots to release at the start of the next step
        self._next_step_id = 0
        self._next_seq = 0
        self._outbox: list[Message] = []
        self._peer_outbox: list[tuple[str, Message]] = []  # (input address of a peer instance, message)
        self._worker_outbox: list[Message] = []  # to the worker, outside the step pipeline

    # ---------------------------------------------------------------------------- inputs

    def on_request(self, msg: TokenizedRequest) -> None:
        error = check_request(msg, self)
        if error is not None:
            code, text = error
            logger.info("rid=%r rejected (%s): %s", msg.rid, code, text)
            if isinstance(msg.rid, str):  # else no front end could match the answer to a request
                self._outbox.append(RequestFailed(rid=msg.rid, code=code, message=text))
            return
        req = Request.from_message(msg, self._next_seq)
        self._next_seq += 1
        self.requests[req.rid] = req
        self.waiting.append(req)
        logger.debug("rid=%s queued: %d prompt tokens", req.rid, len(req.prompt))

    def on_abort(self, msg: AbortRequest) -> None:
        req = self.requests.get(msg.rid)
        if req is None:
            logger.debug("rid=%s abort ignored: not live here", msg.rid)
            return
        logger.info("rid=%s aborted (%s) while %s", req.rid, msg.reason, req.state.value)
        self._end(req, ReqState.ABORTED)
        out = ReqOutput(rid=req.rid, token_ids=[], finished=True, finish_reason=msg.reason)
        self._outbox.append(BatchOutput(outputs=[self._annotate(req, out)]))

    def fail_all(self, code: str, message: str) -> None:
        """End every live request with ``RequestFailed`` (worker lost, shutting down)."""
        for req in list(self.requests.values()):
            self._end(req, ReqState.FAILED)
            self._outbox.append(RequestFailed(rid=req.rid, code=code, message=message))

    def on_result(self, result: StepResult) -> None:
        sent = self.sent.popleft()
        expected_slots = [row.slot for row in sent.rows]
        if result.step_id != sent.step_id or result.slots != expected_slots:
            raise RuntimeError(
                f"worker answered step {result.step_id} with rows for slots {result.slots}; "
                f"expected step {sent.step_id} with slots {expected_slots}"
            )
        for req in sent.members:
            req.inflight -= 1
        outputs = []
        for i, row in enumerate(sent.rows):
            if row.req.epoch != row.epoch or row.req.state is not ReqState.DECODING:
                logger.debug("rid=%s token of step %d discarded", row.req.rid, sent.step_id)
                continue
            logprob = result.logprobs[i] if result.logprobs is not None else None
            outputs.append(self._emit_token(row.req, result.token_ids[i], logprob))
        if outputs:
            self._outbox.append(BatchOutput(outputs=outputs))

    def take_outbox(self) -> list[Message]:
        out, self._outbox = self._outbox, []
        return out

    def take_peer_outbox(self) -> list[tuple[str, Message]]:
        out, self._peer_outbox = self._peer_outbox, []
        return out

    def take_worker_outbox(self) -> list[Message]:
        out, self._worker_outbox = self._worker_outbox, []
        return out

    # Hooks of the disaggregated roles; the unified role has no peers and no data plane.

    def on_peer_message(self, msg: Message) -> bool:
        """Handle a message from a peer instance (or a front end's ``ConnectPrefill``); False
        when this role does not take it."""
        return False

    def on_worker_message(self, msg: Message) -> bool:
        """Handle a worker message other than a step result; False when this role does not take it."""
        return False

    def tick(self, now: float) -> None:
        """Periodic work (peer heartbeats, timeouts); ``now`` is ``time.monotonic()``."""

    def peer_states(self) -> dict[str, str]:
        """Registration state per peer instance, for the heartbeat to the front end."""
        return {}

    # ---------------------------------------------------------------------------- state

    @property
    def has_live_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running) + (self.chunked_req is not None)

    def queued_requests(self) -> int:
        """Requests queued here and not yet admitted (what ``--max-queued-requests`` bounds)."""
        return len(self.waiting)

    @property
    def queued_tokens(self) -> int:
        return sum(r.num_tokens for r in self.waiting)

    def status(self) -> InstanceStatus:
        counts = dict.fromkeys(ReqState, 0)
        for req in self.requests.values():
            counts[req.state] += 1
        return InstanceStatus(
            name=self.name,
            role=self.role,
            alive=True,
            ready=True,
            pending=counts[ReqState.PENDING],
            prefilling=counts[ReqState.PREFILLING],
            transferring=counts[ReqState.TRANSFERRING],
            decoding=counts[ReqState.DECODING],
            free_pages=self.pool.free_pages,
            cached_pages=self.pool.cache.cached_pages,
            total_pages=self.pool.total_pages,
        )

    # ---------------------------------------------------------------------------- step formation

    def form_step(self) -> StepBatch | None:
        """The next step: every running decode plus as much prefill as the budgets allow.
        None when there is nothing to run."""
        step = StepBuilder(self._next_step_id)
        self._fill_step(step)
        return self._finish_step(step)

    def _fill_step(self, step: StepBuilder) -> None:
        self._schedule_decodes(step)
        self._schedule_prefills(step)

    def _finish_step(self, step: StepBuilder) -> StepBatch | None:
        """The batch to send for ``step`` (recorded until its result arrives); None if empty."""
        if step.empty:
            return None
        batch, sent = step.build(self._released)
        self._released = []
        self.sent.append(sent)
        self._next_step_id += 1
        return batch

    def _schedule_decodes(self, step: StepBuilder) -> None:
        decoders = [r for r in self.running if r.remaining_new_tokens > 0]
        if not decoders:
            return
        self._retract_until_decodes_fit(decoders)
        needy = [r for r in decoders if self._needs_page(r)]
        pages = self.pool.alloc_pages(len(needy))  # one allocation (and eviction) for the step
        assert pages is not None, "retraction left room for every decode"
        for req, page in zip(needy, pages, strict=True):
            req.res.append_pages([page])
            step.add_pages(req, [page])
        for req in decoders:
            step.add_decode(req, req.kv_len)
            req.kv_len += 1
            req.scheduled_outputs += 1
        self.new_token_ratio = max(self.new_token_ratio - self._ratio_decay, self.args.min_new_token_ratio)

    def _needs_page(self, req: Request) -> bool:
        return req.kv_len >= len(req.res.row) * self.page_size

    def _retract_until_decodes_fit(self, decoders: list[Request]) -> None:
        """Out of KV memory: retract the request with the fewest output tokens (ties: the longest
        prompt) until every remaining decode gets its page. A lone request always fits, because
        ``on_request`` refuses any request that the whole pool cannot hold."""
        need = sum(self._needs_page(r) for r in decoders)
        while need > self.pool.available_pages():
            victim = min(self._admitted(), key=lambda r: (len(r.output_ids), -len(r.prompt)))
            if victim in decoders:
                need -= self._needs_page(victim)
                decoders.remove(victim)
            self._retract(victim)

    def _retract(self, req: Request) -> None:
        logger.info(
            "rid=%s retracted (out of KV pages) after %d output tokens; it will resume",
            req.rid,
            len(req.output_ids),
        )
        if req is self.chunked_req:
            self.chunked_req = None
        else:
            self.running.remove(req)
        self._release(req, cache=True)
        req.transition(ReqState.PENDING)
        req.epoch += 1
        req.kv_len = 0
        req.scheduled_outputs = len(req.output_ids)
        self.waiting.append(req)
        self.new_token_ratio = self.args.init_new_token_ratio

    def _schedule_prefills(self, step: StepBuilder) -> None:
        budget = PrefillBudget(
            reserved_pages=0,
            input_tokens=self.args.max_prefill_tokens,
            chunk_tokens=self.args.chunked_prefill_size,
        )
        if self.chunked_req is not None:
            self._continue_chunked(self.chunked_req, step, budget)
        if self.waiting and self._has_room():
            budget.reserved_pages = sum(
                pages_to_finish(r, len(r.res.row), self.pool, self.new_token_ratio) for r in self._admitted()
            )
            self._admit_waiting(step, budget)

    def _admitted(self) -> list[Request]:
        """Requests holding a slot: the running batch and the chunked request."""
        return self.running + ([self.chunked_req] if self.chunked_req else [])

    def _continue_chunked(self, req: Request, step: StepBuilder, budget: PrefillBudget) -> None:
        req.res.cache_prefix(self.pool, req.kv_tokens())
        chunk = budget.chunk_for(req.num_tokens - req.kv_len, self.page_size)
        pages = self.pool.alloc_pages(self.pool.pages_for(req.kv_len + chunk) - len(req.res.row))
        if pages is None:
            logger.debug("rid=%s next chunk waits for KV pages", req.rid)
            return
        req.res.append_pages(pages)
        step.add_pages(req, pages)
        budget.spend(chunk)
        self._schedule_chunk(req, chunk, step)

    def _admit_waiting(self, step: StepBuilder, budget: PrefillBudget) -> None:
        self._sort_waiting(self.waiting, self.pool.cache)
        admitted = set()
        for req in self.waiting:
            if not self._has_room():
                break
            if req.inflight:  # retracted with a step still in flight: resume after its result
                continue
            if not self._try_admit(req, step, budget):
                break
            admitted.add(req.seq)
        if admitted:
            self.waiting = [r for r in self.waiting if r.seq not in admitted]

    def _has_room(self) -> bool:
        return self.num_running < self.max_running and self.pool.slots.num_free > 0

    def _try_admit(self, req: Request, step: StepBuilder, budget: PrefillBudget) -> bool:
        # ≥ 1 token to compute; a blocked head request is tried every step, so its match is memoized
        match = self.pool.match_prefix_of(req, req.num_tokens - 1, lambda: req.tokens[: req.num_tokens - 1])
        prefix_len = len(match.pages) * self.page_size
        extend_len = req.num_tokens - prefix_len
        if step.has_prefill and self.pool.pages_for(extend_len) * self.page_size > budget.input_tokens:
            return False
        chunk = budget.chunk_for(extend_len, self.page_size)
        if chunk == 0 or (chunk < extend_len and self.chunked_req is not None):  # one chunked at a time
            return False
        req.res.take_prefix(self.pool, match)  # locked first: no eviction below can take it
        need = pages_to_finish(req, len(match.pages), self.pool, self.new_token_ratio)
        if need > self.pool.available_pages() - budget.reserved_pages:
            req.res.release(self.pool)
            return False
        pages = self.pool.alloc_pages(self.pool.pages_for(prefix_len + chunk) - len(match.pages))
        (slot,) = self.pool.slots.alloc(1) or (None,)
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
        self._schedule_chunk(req, chunk, step)
        return True

    def _schedule_chunk(self, req: Request, chunk: int, step: StepBuilder) -> None:
        start = req.kv_len
        req.kv_len += chunk
        last = req.kv_len == req.num_tokens
        step.add_extend(req, start, req.tokens[start : req.kv_len], sample=last)
        if not last:
            self.chunked_req = req
            return
        if req is self.chunked_req:
            self.chunked_req = None
        req.scheduled_outputs += 1
        self._prefill_done(req)

    def _prefill_done(self, req: Request) -> None:
        """Unified role: the request decodes here from the next step on."""
        req.transition(ReqState.DECODING)
        self.running.append(req)

    # ---------------------------------------------------------------------------- results

    def _emit_token(self, req: Request, token: int, logprob: float | None) -> ReqOutput:
        req.output_ids.append(token)
        out = ReqOutput(rid=req.rid, token_ids=[token])
        if req.sampling.return_logprob and logprob is not None:
            out.logprobs = [logprob]
        if not req.sent_first_output:
            assert req.first_scheduled_time is not None
            out.queue_ms = max(req.first_scheduled_time - req.arrival_time, 0.0) * 1000.0
            req.sent_first_output = True
        reason = req.finish_reason(token)
        if reason is not None:
            out.finished, out.finish_reason = True, reason
            logger.debug("rid=%s finished (%s) after %d tokens", req.rid, reason, len(req.output_ids))
            self._end(req, ReqState.FINISHED)
        return self._annotate(req, out)

    def _annotate(self, req: Request, out: ReqOutput) -> ReqOutput:
        out.prompt_tokens = len(req.prompt)
        out.cached_tokens = req.cached_tokens or 0
        return out

    # ---------------------------------------------------------------------------- endings

    def _end(self, req: Request, state: ReqState) -> None:
        """Move ``req`` to a terminal state and give back everything it holds."""
        self._detach(req)
        req.transition(state)
        del self.requests[req.rid]
        self._release_ended(req, cache=state is not ReqState.FAILED)

    def _detach(self, req: Request) -> None:
        """Take a live ``req`` out of the queue or batch that holds it."""
        if req.state is ReqState.PENDING:
            self.waiting.remove(req)
        elif req is self.chunked_req:
            self.chunked_req = None
        elif req.state is ReqState.DECODING:
            self.running.remove(req)

    def _release_ended(self, req: Request, cache: bool) -> None:
        """Give back an ended request's resources (the disaggregated roles may defer this while
        the data plane still uses its pages)."""
        self._release(req, cache)

    def _release(self, req: Request, cache: bool) -> None:
        slot = req.res.release(self.pool, req.kv_tokens() if cache else None)
        if slot is not None:
            self._released.append(slot)
