"""Building one ``StepBatch`` of deltas, the record kept of it until its result arrives, and
the prefill budgets of the step being formed.

The record lists, in the worker's sampling-row order (sampled extends, then decodes), which
request and which incarnation (``epoch``) each row belongs to, so that a row whose request has
since finished, been aborted or been retracted is recognised and discarded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from protocol.messages import ExtendReq, NewReq, PageAppend, StepBatch
from scheduler_proc.request import ReqState, Request
from scheduler_proc.resources import PagePool


@dataclass
class SampleRows:
    """A step's sampling rows, as columns: row i is request ``reqs[i]`` in incarnation
    ``epochs[i]`` on worker slot ``slots[i]`` (no object per row: a decode step has hundreds)."""

    reqs: list[Request] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)

    def add(self, req: Request, slot: int) -> None:
        self.reqs.append(req)
        self.epochs.append(req.epoch)
        self.slots.append(slot)

    def extend(self, other: SampleRows) -> None:
        self.reqs += other.reqs
        self.epochs += other.epochs
        self.slots += other.slots

    def __len__(self) -> int:
        return len(self.reqs)


@dataclass
class SentStep:
    step_id: int
    rows: SampleRows
    members: list[Request]  # every request the step touches, once


@dataclass
class PrefillBudget:
    """What is left for prefills in the step being formed."""

    reserved_pages: int  # pages promised to admitted requests (their remaining input + decode headroom)
    input_tokens: int  # --max-prefill-tokens
    chunk_tokens: int  # --chunked-prefill-size

    def chunk_for(self, rest: int, page_size: int) -> int:
        """Tokens to prefill now of the ``rest`` still to prefill: all if they fit the chunk
        budget, else the most whole pages that do (0: none), so chunks stay page-aligned."""
        if rest <= self.chunk_tokens:
            return rest
        return self.chunk_tokens // page_size * page_size

    def spend(self, tokens: int) -> None:
        self.input_tokens -= tokens
        self.chunk_tokens -= tokens


def pages_to_finish(req: Request, held: int, pool: PagePool, new_token_ratio: float) -> int:
    """Pages ``req`` still needs beyond the ``held`` ones: its remaining input exactly, its
    remaining decodes scaled by the new-token ratio (most requests stop before max_new_tokens)."""
    input_pages, decode_pages = finish_pages(req, held, pool)
    return input_pages + math.ceil(new_token_ratio * decode_pages)


def finish_pages(req: Request, held: int, pool: PagePool) -> tuple[int, int]:
    """``pages_to_finish`` before the ratio: (remaining input pages, remaining decode pages)."""
    if req.state is ReqState.DECODING:
        input_end = req.kv_len
        decode_end = req.kv_len + req.remaining_new_tokens
    else:  # prefill every known token (the last chunk samples one), then decode the rest
        input_end = req.num_tokens
        decode_end = req.num_tokens + req.remaining_new_tokens - 1
    input_pages = max(pool.pages_for(input_end) - held, 0)
    decode_pages = max(pool.pages_for(decode_end) - max(pool.pages_for(input_end), held), 0)
    return input_pages, decode_pages


@dataclass
class StepBuilder:
    step_id: int
    batch: StepBatch = field(init=False)
    _extend_rows: SampleRows = field(default_factory=SampleRows)
    _decode_rows: SampleRows = field(default_factory=SampleRows)
    _members: list[Request] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.batch = StepBatch(step_id=self.step_id)

    @property
    def empty(self) -> bool:
        """Nothing to run and no data-plane delta (a step may carry only aborts and expects)."""
        batch = self.batch
        return not (batch.extends or batch.decode_slots or batch.abort_rooms or batch.expects)

    @property
    def has_prefill(self) -> bool:
        return bool(self.batch.extends)

    def add_new(self, req: Request) -> None:
        """``req`` takes its slot; its row (cached prefix included) is sent as its first append."""
        assert req.res.slot is not None
        new = NewReq(slot=req.res.slot, sampling=req.sampling)
        if req.sampling.uses_penalty:  # the worker counts its tokens from the whole history
            new.prompt_ids, new.output_ids = req.prompt.tolist(), req.output_ids.tolist()
        self.batch.new_reqs.append(new)
        self.add_pages(req, list(req.res.row))

    def add_pages(self, req: Request, pages: list[int]) -> None:
        if pages:
            assert req.res.slot is not None
            self.batch.page_appends.append(PageAppend(slot=req.res.slot, pages=pages))

    def add_extend(self, req: Request, start_pos: int, token_ids: list[int], sample: bool) -> None:
        assert req.res.slot is not None
        self.batch.extends.append(ExtendReq(req.res.slot, start_pos, token_ids, sample))
        self._members.append(req)
        if sample:
            self._extend_rows.add(req, req.res.slot)

    def add_decode(self, req: Request, position: int) -> None:
        assert req.res.slot is not None
        self.batch.decode_slots.append(req.res.slot)
        self.batch.decode_positions.append(position)
        self._members.append(req)
        self._decode_rows.add(req, req.res.slot)

    def add_decodes(self, reqs: list[Request]) -> None:
        """A decode of each of ``reqs`` at its ``kv_len`` (a list operation per column, not a
        call per request: this is the step's biggest part)."""
        slots = [r.res.slot for r in reqs]
        assert None not in slots
        self.batch.decode_slots += slots
        self.batch.decode_positions += [r.kv_len for r in reqs]
        self._members += reqs
        rows = self._decode_rows
        rows.reqs += reqs
        rows.epochs += [r.epoch for r in reqs]
        rows.slots += slots  # type: ignore[arg-type]

    def build(self, released: list[int]) -> tuple[StepBatch, SentStep]:
        """The batch to send (telling the worker about ``released`` slots first) and its record."""
        self.batch.released = released
        for req in self._members:
            req.inflight += 1
        rows = self._extend_rows
        rows.extend(self._decode_rows)
        sent = SentStep(self.step_id, rows, self._members)
        return self.batch, sent
