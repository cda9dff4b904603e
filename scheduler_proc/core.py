"""The scheduler's logic, free of sockets: admission, batch formation, retraction and results.

``SchedulerCore`` is driven by five calls: ``on_request``, ``on_abort``, ``form_step``,
``on_result`` and ``status``; the messages it produces collect in outboxes (``take_outbox``, and
for peers and the worker ``take_peer_outbox``, ``take_worker_outbox``). ``scheduler.run_scheduler``
wires it to sockets; tests drive it directly.

One core serves every role: what a role does differently is an ``InstanceRole`` object (role.py,
prefill_mode.py, decode_mode.py) that it calls at fixed extension points (docs/design.md,
"Scheduler roles").
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from itertools import repeat

from protocol.config import SchedulerConfig, ServerArgs
from protocol.messages import (
    AbortRequest,
    BatchOutput,
    InstanceStatus,
    Message,
    ReqOutput,
    RequestFailed,
    Role,
    StepBatch,
    StepResult,
    TokenizedRequest,
    WorkerReady,
)
from scheduler_proc import admission
from scheduler_proc.admission import RunningBudget
from scheduler_proc.batch import SentStep, StepBuilder, pages_to_finish
from scheduler_proc.decode_mode import DecodeRole
from scheduler_proc.disagg import Pairing
from scheduler_proc.metrics import SchedulerMetrics
from scheduler_proc.policy import WaitingQueue, get_policy
from scheduler_proc.prefill_mode import PrefillRole
from scheduler_proc.request import ReqState, Request
from scheduler_proc.resources import PagePool
from scheduler_proc.role import InstanceRole, Refusal, UnifiedRole
from scheduler_proc.validation import check_request

logger = logging.getLogger(__name__)

NEW_TOKEN_RATIO_DECAY_STEPS = 600  # decode steps for the ratio to fall from init to min (SGLang's default)


ROLES = tuple(Role)
_NOT_ASKED = float("nan")  # the logprobs column's entry for a request that did not ask for them


class SchedulerCore:
    @classmethod
    def from_config(cls, cfg: SchedulerConfig, worker: WorkerReady) -> SchedulerCore:
        return cls(cfg.args, cfg.name, cfg.role, worker, input_addr=cfg.addrs.input_addr)

    def __init__(
        self,
        args: ServerArgs,
        name: str,
        role: Role | str,
        worker: WorkerReady,
        input_addr: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.args = args
        self.name = name
        self.clock = clock  # for peer heartbeats and room timeouts
        self.model = worker.model
        self.max_context_len = worker.max_context_len
        self.pool = PagePool(worker.num_pages, worker.page_size, worker.max_slots, args.disable_radix_cache)
        self.page_size = worker.page_size
        self.max_running = min(args.max_running_requests, worker.max_slots)
        self.sort_queue = get_policy(args.schedule_policy)
        self.requests: dict[str, Request] = {}  # every live request
        self.waiting = WaitingQueue(args.schedule_policy)  # kept in the policy's order
        self.running: list[Request] = []  # decoding, holding a slot
        self.budget = RunningBudget(self.pool)  # Σ pages the running batch still needs
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
        self.metrics = SchedulerMetrics.for_worker(worker)  # Prometheus counters (metrics.py)
        self.role: InstanceRole = self._make_role(role, worker, input_addr)

    def _make_role(self, role: Role | str, worker: WorkerReady, input_addr: str) -> InstanceRole:
        if role not in ROLES:
            raise ValueError(f"scheduler role {role!r} is not supported; expected one of {', '.join(ROLES)}")
        if role == Role.UNIFIED:
            return UnifiedRole(self)
        pairing = Pairing(self, Role(role), worker, input_addr or f"inproc://{self.name}")
        return PrefillRole(self, pairing) if role == Role.PREFILL else DecodeRole(self, pairing)

    # ---------------------------------------------------------------------------- inputs

    def on_request(self, msg: TokenizedRequest) -> None:
        refusal = self.role.screen(msg) or self._check(msg)
        if refusal is not None:
            logger.info("rid=%r refused (%s): %s", msg.rid, refusal.code, refusal.message)
            if isinstance(msg.rid, str):  # else no front end could match the answer to a request
                failed = RequestFailed(msg.rid, refusal.code, refusal.message, role=self.role.name)
                self._outbox.append(failed)
            self.role.refused(msg, refusal)
            return
        req = Request.from_message(msg, self._next_seq)
        self._next_seq += 1
        self.requests[req.rid] = req
        if not self.role.hold(req, msg):
            self.waiting.append(req)
        logger.debug("rid=%s queued: %d prompt tokens", req.rid, len(req.prompt))

    def _check(self, msg: TokenizedRequest) -> Refusal | None:
        error = check_request(msg, self)
        return None if error is None else Refusal(*error)

    def on_abort(self, msg: AbortRequest) -> None:
        req = self.requests.get(msg.rid)
        if req is None:
            logger.debug("rid=%s abort ignored: not live here", msg.rid)
            return
        logger.info("rid=%s room=%s aborted (%s) while %s", req.rid, req.room, msg.reason, req.state.value)
        self.end(req, ReqState.ABORTED)
        if self.role.streams_outputs:
            out = ReqOutput(rid=req.rid, token_ids=[], finished=True, finish_reason=msg.reason)
            self._outbox.append(BatchOutput(outputs=[self._annotate(req, out)]))

    def fail_all(self, code: str, message: str) -> None:
        """End every live request with ``RequestFailed`` (worker lost, shutting down)."""
        for req in list(self.requests.values()):
            self.end(req, ReqState.FAILED)
            self._outbox.append(RequestFailed(rid=req.rid, code=code, message=message))

    def on_result(self, result: StepResult) -> None:
        sent = self.sent.popleft()
        expected_slots = sent.rows.slots
        if result.step_id != sent.step_id or result.slots != expected_slots:
            raise RuntimeError(
                f"worker answered step {result.step_id} with rows for slots {result.slots}; "
                f"expected step {sent.step_id} with slots {expected_slots}"
            )
        for req in sent.members:
            req.inflight -= 1
        batch = self._step_outputs(sent, result)
        if len(batch):
            self._outbox.append(batch)
        self.role.on_step_done(sent)

    def to_frontend(self, msg: Message) -> None:
        self._outbox.append(msg)

    def to_peer(self, addr: str, msg: Message) -> None:
        self._peer_outbox.append((addr, msg))

    def to_worker(self, msg: Message) -> None:
        self._worker_outbox.append(msg)

    def take_outbox(self) -> list[Message]:
        out, self._outbox = self._outbox, []
        return out

    def take_peer_outbox(self) -> list[tuple[str, Message]]:
        out, self._peer_outbox = self._peer_outbox, []
        return out

    def take_worker_outbox(self) -> list[Message]:
        out, self._worker_outbox = self._worker_outbox, []
        return out

    def on_peer_message(self, msg: Message) -> bool:
        """Handle a message from a peer instance (or a front end's ``ConnectPrefill``); False
        when this role does not take it."""
        return self.role.on_peer_message(msg)

    def on_worker_message(self, msg: Message) -> bool:
        """Handle a worker message other than a step result; False when this role does not take it."""
        return self.role.on_worker_message(msg)

    def tick(self, now: float) -> None:
        """Periodic work (peer heartbeats, timeouts); ``now`` is ``clock()``."""
        self.role.tick(now)

    def peer_states(self) -> dict[str, str]:
        """Registration state per peer instance, for the heartbeat to the front end."""
        return self.role.peer_states()

    # ---------------------------------------------------------------------------- state

    @property
    def arrivals(self) -> int:
        """Requests taken in so far (the source of ``seq``)."""
        return self._next_seq

    @property
    def has_live_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running) + (self.chunked_req is not None) + self.role.owed_slots()

    def queued_requests(self) -> int:
        """Requests queued here and not yet admitted (what ``--max-queued-requests`` bounds)."""
        return len(self.waiting) + self.role.queued()

    @property
    def queued_tokens(self) -> int:
        return self.waiting.num_tokens + self.role.queued_tokens()

    def status(self) -> InstanceStatus:
        counts = dict.fromkeys(ReqState, 0)
        for req in self.requests.values():
            counts[req.state] += 1
        return InstanceStatus(
            name=self.name,
            role=self.role.name,
            alive=True,
            ready=True,
            pending=counts[ReqState.PENDING],
            prefilling=counts[ReqState.PREFILLING],
            transferring=counts[ReqState.TRANSFERRING],
            decoding=counts[ReqState.DECODING],
            free_pages=self.pool.free_pages,
            cached_pages=self.pool.cache.cached_pages,
            total_pages=self.pool.total_pages,
            peers=self.peer_states(),
            links=self.role.link_states(),
        )

    # ---------------------------------------------------------------------------- step formation

    def form_step(self) -> StepBatch | None:
        """The next step: every running decode plus as much prefill as the budgets allow.
        None when there is nothing to run."""
        step = StepBuilder(self._next_step_id)
        self.role.fill_step(step)
        if step.empty:
            return None
        batch, sent = step.build(self._released)
        self._released = []
        self.sent.append(sent)
        self._next_step_id += 1
        return batch

    def schedule_decodes(self, step: StepBuilder) -> list[int]:
        """Every running decode (retracting requests until their pages fit); returns the slots
        that retraction released."""
        decoders = [r for r in self.running if r.scheduled_outputs < r.sampling.max_new_tokens]
        if not decoders:
            return []
        page_size = self.page_size
        needy = [r for r in decoders if r.kv_len >= len(r.res.row) * page_size]  # as needs_page
        retracted = self._retract_until_decodes_fit(decoders, len(needy))
        if retracted:
            needy = [r for r in decoders if self.needs_page(r)]
        pages = self.pool.alloc_pages(len(needy))  # one allocation (and eviction) for the step
        assert pages is not None, "retraction left room for every decode"
        budget = self.budget
        for req, page in zip(needy, pages, strict=True):
            req.res.append_pages([page])
            step.add_pages(req, [page])
            budget.grew(req)
        step.add_decodes(decoders)
        for req in decoders:
            req.kv_len += 1
            req.scheduled_outputs += 1
        self.new_token_ratio = max(self.new_token_ratio - self._ratio_decay, self.args.min_new_token_ratio)
        return retracted

    def needs_page(self, req: Request) -> bool:
        return req.kv_len >= len(req.res.row) * self.page_size

    def _retract_until_decodes_fit(self, decoders: list[Request], need: int) -> list[int]:
        """Out of KV memory: retract the request with the fewest output tokens (ties: the longest
        prompt) until every remaining decode gets its page (``need`` pages in all). A lone
        request always fits, because ``on_request`` refuses any request that the whole pool
        cannot hold."""
        released: list[int | None] = []
        while need > self.pool.available_pages():
            victim = min(self.admitted(), key=lambda r: (len(r.output_ids), -len(r.prompt)))
            if victim in decoders:
                need -= self.needs_page(victim)
                decoders.remove(victim)
            released.append(self.retract(victim))
        return [slot for slot in released if slot is not None]

    def retract(self, req: Request) -> int | None:
        """Send an admitted ``req`` back to the waiting queue (out of KV pages): it resumes with
        a prefill of its tokens. Returns the slot it released."""
        logger.info(
            "rid=%s retracted (out of KV pages) after %d output tokens; it will resume",
            req.rid,
            len(req.output_ids),
        )
        if req is self.chunked_req:
            self.chunked_req = None
        else:
            self.running.remove(req)
            self.budget.leave(req)
        slot = self.release(req, cache=True)
        req.transition(ReqState.PENDING)
        req.epoch += 1
        req.kv_len = 0
        req.scheduled_outputs = len(req.output_ids)
        self.waiting.append(req)
        self.new_token_ratio = self.args.init_new_token_ratio
        self.metrics.preemptions += 1
        return slot

    def schedule_prefills(self, step: StepBuilder) -> None:
        """Continue the chunked request, then admit waiting requests as the budgets allow."""
        admission.schedule_prefills(self, step)

    def reserved_pages(self) -> int:
        """Pages the admitted requests still need to finish: ``Σ pages_to_finish`` over
        ``admitted()``, the running batch's part kept as a running total."""
        reserved = self.budget.total(self.new_token_ratio)
        if self.chunked_req is not None:
            req = self.chunked_req
            reserved += pages_to_finish(req, len(req.res.row), self.pool, self.new_token_ratio)
        return reserved

    def admitted(self) -> list[Request]:
        """Requests holding a slot: the running batch and the chunked request."""
        return self.running + ([self.chunked_req] if self.chunked_req else [])

    def has_room(self) -> bool:
        """A slot for one more admitted request (beyond those the role owes a slot)."""
        return self.num_running < self.max_running and self.pool.slots.num_free > self.role.owed_slots()

    def start_running(self, req: Request) -> None:
        """``req`` decodes here from the next step on."""
        req.transition(ReqState.DECODING)
        self.running.append(req)
        self.budget.join(req)  # counted when next read: the role may still set its progress

    # ---------------------------------------------------------------------------- results

    def _step_outputs(self, sent: SentStep, result: StepResult) -> BatchOutput:
        """The outputs of a step's result. A request's plain next token goes into the columns
        (no object per request); its first and last output, and top logprobs, are full rows."""
        batch = BatchOutput()
        rids, tokens, logprobs, outputs = batch.rids, batch.token_ids, [], batch.outputs
        result_lps, any_lp = result.logprobs, False
        decoding = ReqState.DECODING
        rows = sent.rows
        if len(result.token_ids) != len(rows) or (result_lps is not None and len(result_lps) != len(rows)):
            raise RuntimeError(f"worker answered step {sent.step_id} with a column of the wrong length")
        lps = repeat(None) if result_lps is None else result_lps  # lengths checked above
        columns = zip(rows.reqs, rows.epochs, result.token_ids, lps, strict=False)
        for i, (req, epoch, token, logprob) in enumerate(columns):
            if req.epoch != epoch or req.state is not decoding:
                logger.debug("rid=%s token of step %d discarded", req.rid, sent.step_id)
                continue
            output_ids = req.output_ids
            if len(output_ids) < req.plain_until and token not in req.stop_ids:  # the common case
                output_ids.append(token)
                rids.append(req.rid)
                tokens.append(token)
                if logprob is not None and req.sampling.return_logprob:
                    logprobs.append(logprob)
                    any_lp = True
                else:
                    logprobs.append(_NOT_ASKED)
                continue
            sampling = req.sampling
            out = self.emit_token(req, token, logprob)
            if sampling.top_logprobs and result.top_token_ids and result.top_logprobs:
                out.top_token_ids, out.top_logprobs = [result.top_token_ids[i]], [result.top_logprobs[i]]
            outputs.append(out)
        if any_lp:
            batch.logprobs = logprobs
        return batch

    def emit_token(self, req: Request, token: int, logprob: float | None) -> ReqOutput:
        req.output_ids.append(token)
        out = ReqOutput(rid=req.rid, token_ids=[token])
        if req.sampling.return_logprob and logprob is not None:
            out.logprobs = [logprob]
        if not req.sent_first_output:
            assert req.first_scheduled_time is not None
            out.queue_ms = max(req.first_scheduled_time - req.arrival_time, 0.0) * 1000.0
            req.sent_first_output = True
            if not req.sampling.top_logprobs:  # its next tokens are plain ones, as columns
                req.plain_until = req.sampling.max_new_tokens - 1
        reason = req.finish_reason(token)
        if reason is not None:
            out.finished, out.finish_reason = True, reason
            logger.debug("rid=%s finished (%s) after %d tokens", req.rid, reason, len(req.output_ids))
            self.end(req, ReqState.FINISHED)
        return self._annotate(req, out)

    def _annotate(self, req: Request, out: ReqOutput) -> ReqOutput:
        out.prompt_tokens = len(req.prompt)
        out.cached_tokens = req.cached_tokens or 0
        return out

    # ---------------------------------------------------------------------------- endings

    def end(self, req: Request, state: ReqState) -> None:
        """Move ``req`` to a terminal state and give back everything it holds (unless the role
        keeps its pages until the data plane lets go of them)."""
        if not self.role.detach(req):
            self._detach(req)
        req.transition(state)
        del self.requests[req.rid]
        self.metrics.request_ended(req)
        cache = state is not ReqState.FAILED
        if not self.role.on_end(req, cache):
            self.release(req, cache)

    def _detach(self, req: Request) -> None:
        """Take a live ``req`` out of the queue or batch that holds it."""
        if req.state is ReqState.PENDING:
            self.waiting.remove(req)
        elif req is self.chunked_req:
            self.chunked_req = None
        elif req.state is ReqState.DECODING:
            self.running.remove(req)
            self.budget.leave(req)

    def release(self, req: Request, cache: bool) -> int | None:
        """Give back ``req``'s slot and pages (caching its KV if ``cache``); returns the slot."""
        slot = req.res.release(self.pool, req.kv_tokens() if cache else None)
        if slot is not None:
            self._released.append(slot)
        return slot
