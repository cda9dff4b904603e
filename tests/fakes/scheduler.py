"""A fake worker with a deterministic fake model, and helpers to drive ``SchedulerCore`` with it.

The fake model's next token is a hash of (seed, every token before it), and the fake worker
reads that sequence back from its fake KV cache through the slot's page-table row, so a wrong
page, position, prefix or chunk boundary in the scheduler's deltas changes the outputs. The
worker also checks the protocol: slots and pages exist, page 0 is never used, every position
is written before it is read, and a page shared by two live rows is never written.
"""

from __future__ import annotations

import time
import zlib
from collections import defaultdict, deque
from dataclasses import dataclass, field

from protocol.config import ServerArgs
from protocol.messages import (
    BatchOutput,
    Message,
    ModelInfo,
    RequestFailed,
    SamplingParams,
    StepBatch,
    StepResult,
    TokenizedRequest,
    WorkerReady,
)
from scheduler_proc.core import SchedulerCore

VOCAB = 32
STOP = 0  # the fake model's EOS


def fake_next_token(seed: int, tokens: list[int]) -> int:
    data = seed.to_bytes(8, "little") + b"".join(t.to_bytes(4, "little") for t in tokens)
    return zlib.crc32(data) % VOCAB


def fake_logprob(token: int) -> float:
    return -token / 10.0


def reference_generate(prompt: list[int], sampling: SamplingParams) -> list[int]:
    """What an unconstrained run produces: sample until a stop token or max_new_tokens."""
    tokens, out = list(prompt), []
    for _ in range(sampling.max_new_tokens):
        tok = fake_next_token(sampling.seed, tokens)
        tokens.append(tok)
        out.append(tok)
        if tok in sampling.stop_token_ids:
            break
    return out


class FakeWorker:
    def __init__(self, num_pages: int = 64, page_size: int = 4, max_slots: int = 8) -> None:
        self.num_pages, self.page_size, self.max_slots = num_pages, page_size, max_slots
        self.kv: dict[int, list[int | None]] = {}  # page -> tokens stored at its offsets
        self.rows: dict[int, list[int]] = {}
        self.seeds: dict[int, int] = {}
        self.last_token: dict[int, int] = {}  # the future-token map
        self.page_refs: dict[int, int] = defaultdict(int)  # live rows holding each page
        self.steps: list[StepBatch] = []

    def ready(self, max_context_len: int = 4096) -> WorkerReady:
        model = ModelInfo("fake", "FakeForCausalLM", VOCAB, max_context_len, 1, 1, 4, "float32", [STOP])
        return WorkerReady(model, self.num_pages, self.page_size, self.max_slots, max_context_len, "cpu")

    def step(self, batch: StepBatch) -> StepResult:
        self.steps.append(batch)
        for slot in batch.released:
            for page in self.rows.pop(slot):
                self.page_refs[page] -= 1
            del self.seeds[slot]
            self.last_token.pop(slot, None)
        for new in batch.new_reqs:
            assert 0 <= new.slot < self.max_slots and new.slot not in self.rows, f"slot {new.slot} busy"
            self.rows[new.slot] = []
            self.seeds[new.slot] = new.sampling.seed
        for append in batch.page_appends:
            assert all(0 < p < self.num_pages for p in append.pages), append.pages
            assert not set(append.pages) & set(self.rows[append.slot]), "page appended twice to a row"
            self.rows[append.slot].extend(append.pages)
            for page in append.pages:
                self.page_refs[page] += 1
        slots, tokens = [], []
        for ext in batch.extends:
            for i, tok in enumerate(ext.token_ids):
                self._write(ext.slot, ext.start_pos + i, tok)
            if ext.sample:
                slots.append(ext.slot)
                tokens.append(self._sample(ext.slot, ext.start_pos + len(ext.token_ids)))
        for slot, pos in zip(batch.decode_slots, batch.decode_positions, strict=True):
            self._write(slot, pos, self.last_token[slot])
            slots.append(slot)
            tokens.append(self._sample(slot, pos + 1))
        return StepResult(batch.step_id, slots, tokens, [fake_logprob(t) for t in tokens])

    def _loc(self, slot: int, pos: int) -> tuple[int, int]:
        row = self.rows[slot]
        assert pos // self.page_size < len(row), f"slot {slot}: position {pos} beyond its {len(row)} pages"
        return row[pos // self.page_size], pos % self.page_size

    def _write(self, slot: int, pos: int, token: int) -> None:
        page, offset = self._loc(slot, pos)
        assert self.page_refs[page] == 1, f"slot {slot} writes page {page} shared with another live row"
        self.kv.setdefault(page, [None] * self.page_size)[offset] = token

    def _sample(self, slot: int, length: int) -> int:
        seq = []
        for pos in range(length):
            page, offset = self._loc(slot, pos)
            tok = self.kv.get(page, [None] * self.page_size)[offset]
            assert tok is not None, f"slot {slot}: position {pos} read before written"
            seq.append(tok)
        token = fake_next_token(self.seeds[slot], seq)
        self.last_token[slot] = token
        return token


def make_args(**overrides: object) -> ServerArgs:
    defaults: dict[str, object] = dict(
        page_size=4, chunked_prefill_size=16, max_prefill_tokens=64, disable_overlap_schedule=True
    )
    defaults.update(overrides)
    return ServerArgs(**defaults)  # type: ignore[arg-type]


def make_core(worker: FakeWorker, **overrides: object) -> SchedulerCore:
    return SchedulerCore(
        make_args(page_size=worker.page_size, **overrides), "inst0", "unified", worker.ready()
    )


def make_request(
    rid: str, prompt: list[int], max_new: int = 8, seed: int = 1, stop: bool = True, **kw: object
) -> TokenizedRequest:
    sampling = SamplingParams(
        max_new_tokens=max_new, seed=seed, temperature=0.0, stop_token_ids=[STOP] if stop else []
    )
    return TokenizedRequest(rid=rid, input_ids=prompt, sampling=sampling, arrival_time=time.time(), **kw)  # type: ignore[arg-type]


@dataclass
class Collected:
    """What the front end would have received."""

    tokens: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    logprobs: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    finish: dict[str, str] = field(default_factory=dict)
    cached: dict[str, int] = field(default_factory=dict)
    failed: dict[str, RequestFailed] = field(default_factory=dict)
    batches: list[BatchOutput] = field(default_factory=list)

    def add(self, messages: list[Message]) -> None:
        for msg in messages:
            if isinstance(msg, RequestFailed):
                assert msg.rid not in self.finish and msg.rid not in self.failed
                self.failed[msg.rid] = msg
                continue
            assert isinstance(msg, BatchOutput), msg
            self.batches.append(msg)
            for out in msg.rows():
                assert out.rid not in self.finish, f"rid={out.rid}: output after its final one"
                self.tokens[out.rid].extend(out.token_ids)
                self.logprobs[out.rid].extend(out.logprobs or [])
                if out.queue_ms is not None or out.finished:
                    self.cached[out.rid] = out.cached_tokens
                if out.finished:
                    assert out.finish_reason is not None
                    self.finish[out.rid] = out.finish_reason


def step_once(core: SchedulerCore, worker: FakeWorker) -> StepBatch:
    """Form one step, run it and hand its result back (no overlap)."""
    batch = core.form_step()
    assert batch is not None
    core.on_result(worker.step(batch))
    return batch


def drive(
    core: SchedulerCore,
    worker: FakeWorker,
    collected: Collected | None = None,
    overlap: bool = False,
    max_steps: int = 2000,
) -> Collected:
    """Run until no request is live and no step is in flight. With ``overlap`` two steps are in
    flight, as in the real loop: the worker runs steps in order, results are processed late."""
    collected = collected if collected is not None else Collected()
    collected.add(core.take_outbox())
    inflight: deque[StepResult] = deque()
    depth = 2 if overlap else 1
    for _ in range(max_steps):
        if not core.has_live_requests and not inflight:
            return collected
        batch = core.form_step() if len(inflight) < depth else None
        if batch is not None:
            inflight.append(worker.step(batch))
        if inflight and (len(inflight) >= depth or batch is None):
            core.on_result(inflight.popleft())
        collected.add(core.take_outbox())
    raise AssertionError(f"not done after {max_steps} steps: {core.status()}")


def assert_no_leak(core: SchedulerCore) -> None:
    status = core.status()
    assert not core.has_live_requests and not core.sent
    assert status.free_pages + status.cached_pages == status.total_pages, status
    assert core.pool.slots.num_free == core.pool.slots.capacity
