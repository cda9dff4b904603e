"""ModelRunner: the GPU state of a worker (model, KV pool, page-table mirror, future-token
map) and the turning of one step's host-side description into device inputs.

A step is a list of extends (prompt chunks) followed by decodes (one token per request). The
page table lives on the device, updated by deltas (``append_pages``); a decode's input token
is read on the device from ``next_tokens``, where the previous sampling of that slot put it,
so the host never waits for a sampled token before launching the next step.

The decode forward (``forward``) takes ready tensors and never syncs with the host (provided
the attention functions do not), so a CUDA-graph module can capture it with static buffers.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from engine.kv_pool import KVPool
from engine.layers.attention import AttentionMetadata, ForwardContext
from engine.layers.backend import KernelBackend
from protocol.messages import ExtendReq


@dataclass
class StepInputs:
    """Device inputs of one step, plus the host view of its sampling rows."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # [N] int64, rows of the hidden states that sample
    sample_slots_device: torch.Tensor  # [N] int64
    sample_slots: list[int]  # [N]
    sample_positions: list[int]  # [N], position each sampled token will occupy


@dataclass
class StepLayout:
    """The host-side layout of one step's tokens: extend tokens first, then one per decode."""

    extend_ids: list[int]
    extend_indptr: list[int]  # [R + 1] offsets of each extend's tokens
    token_slots: list[int]  # [T]
    positions: list[int]  # [T]
    sample_rows: list[int]  # [N] rows that sample: each sampling extend's last token, every decode
    sample_slots: list[int]  # [N]
    sample_positions: list[int]  # [N] position of each sampled token
    seq_lens: dict[int, int]  # slot → tokens in its sequence after this step

    @property
    def num_extend_tokens(self) -> int:
        return self.extend_indptr[-1]

    @classmethod
    def of(
        cls, extends: Sequence[ExtendReq], decode_slots: Sequence[int], decode_positions: Sequence[int]
    ) -> StepLayout:
        if len(decode_slots) != len(decode_positions):
            raise ValueError(f"{len(decode_slots)} decode slots but {len(decode_positions)} positions")
        indptr = [0, *itertools.accumulate(len(e.token_ids) for e in extends)]
        num_extend_tokens = indptr[-1]
        extend_lens = {e.slot: e.start_pos + len(e.token_ids) for e in extends}
        decode_lens = {s: p + 1 for s, p in zip(decode_slots, decode_positions, strict=True)}
        sampling = [(end - 1, e) for e, end in zip(extends, indptr[1:], strict=True) if e.sample]
        return cls(
            extend_ids=[t for e in extends for t in e.token_ids],
            extend_indptr=indptr,
            token_slots=[e.slot for e in extends for _ in e.token_ids] + list(decode_slots),
            positions=[p for e in extends for p in range(e.start_pos, e.start_pos + len(e.token_ids))]
            + list(decode_positions),
            sample_rows=[row for row, _ in sampling]
            + list(range(num_extend_tokens, num_extend_tokens + len(decode_slots))),
            sample_slots=[e.slot for _, e in sampling] + list(decode_slots),
            sample_positions=[e.start_pos + len(e.token_ids) for _, e in sampling]
            + [p + 1 for p in decode_positions],
            seq_lens=extend_lens | decode_lens,
        )


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        kv_pool: KVPool,
        kernels: KernelBackend,
        max_slots: int,
        max_pages_per_req: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_pool = kv_pool
        self.kernels = kernels
        self.device = device
        self.page_size = kv_pool.page_size
        self.page_table = torch.zeros(max_slots, max_pages_per_req, dtype=torch.int32, device=device)
        self.next_tokens = torch.zeros(max_slots, dtype=torch.int64, device=device)
        self.num_pages = [0] * max_slots  # pages appended so far, per slot (host mirror)

    @property
    def max_slots(self) -> int:
        return self.page_table.shape[0]

    @property
    def max_pages_per_req(self) -> int:
        return self.page_table.shape[1]

    # ------------------------------------------------------------------ page table, tokens

    def release_slots(self, slots: Sequence[int]) -> None:
        """Forget the pages of ``slots`` (their table rows are overwritten by later appends)."""
        for slot in slots:
            self.num_pages[slot] = 0

    def append_pages(self, appends: Sequence[tuple[int, Sequence[int]]]) -> None:
        """Append pages to the end of each (slot, pages) row, in one device write."""
        rows: list[int] = []
        cols: list[int] = []
        values: list[int] = []
        for slot, pages in appends:
            start = self.num_pages[slot]
            if start + len(pages) > self.max_pages_per_req:
                raise ValueError(f"slot {slot}: {start + len(pages)} pages exceed the context length")
            rows.extend([slot] * len(pages))
            cols.extend(range(start, start + len(pages)))
            values.extend(pages)
            self.num_pages[slot] = start + len(pages)
        if values:
            rows_t, cols_t, values_t = _to_device(self.device, rows, cols, values)
            self.page_table[rows_t, cols_t] = values_t.to(torch.int32)
            self.kv_pool.note_pages(max(values))

    def set_next_tokens(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        """Record the sampled tokens as the next decode inputs of ``slots`` (device only)."""
        self.next_tokens[slots] = tokens

    # ------------------------------------------------------------------ inputs

    def prepare(
        self, extends: Sequence[ExtendReq], decode_slots: Sequence[int], decode_positions: Sequence[int]
    ) -> StepInputs:
        """Device inputs and attention metadata of one step (extends first, then decodes).

        Page-table rows are passed full width, as in the decode CUDA graphs: the kernels'
        launch shapes and compiled variants then depend on the batch alone, never on the
        step's context lengths (which would compile new variants while serving)."""
        layout = self.layout(extends, decode_slots, decode_positions)
        (ext_ids, token_slots, positions, sample_rows, sample_slots, ext_slots, ext_prefix, ext_indptr) = (
            _to_device(
                self.device,
                layout.extend_ids,
                layout.token_slots,
                layout.positions,
                layout.sample_rows,
                layout.sample_slots,
                [e.slot for e in extends],
                [e.start_pos for e in extends],
                layout.extend_indptr,
            )
        )
        page_size = self.page_size
        out_loc = (
            self.page_table[token_slots, positions // page_size].long() * page_size + positions % page_size
        )
        n = layout.num_extend_tokens
        meta = AttentionMetadata(num_extend_tokens=n, out_loc=out_loc)
        input_ids = ext_ids
        if extends:
            meta.extend_page_table = self.page_table[ext_slots]
            meta.extend_qo_indptr = ext_indptr.to(torch.int32)
            meta.extend_prefix_lens = ext_prefix.to(torch.int32)
            meta.extend_max_new_tokens = max(len(e.token_ids) for e in extends)
        if decode_slots:
            meta.decode_page_table = self.page_table[token_slots[n:]]
            meta.decode_seq_lens = (positions[n:] + 1).to(torch.int32)
            input_ids = torch.cat([ext_ids, self.next_tokens[token_slots[n:]]])
        if self.kernels.plan_attention is not None:
            meta.plan = self.kernels.plan_attention(meta, page_size)
        return StepInputs(
            input_ids=input_ids,
            positions=positions,
            meta=meta,
            sample_rows=sample_rows,
            sample_slots_device=sample_slots,
            sample_slots=layout.sample_slots,
            sample_positions=layout.sample_positions,
        )

    def layout(
        self, extends: Sequence[ExtendReq], decode_slots: Sequence[int], decode_positions: Sequence[int]
    ) -> StepLayout:
        """The host-side layout of one step, checked against the pages of its slots."""
        layout = StepLayout.of(extends, decode_slots, decode_positions)
        self._check_pages(layout)
        return layout

    def _check_pages(self, layout: StepLayout) -> None:
        """Refuse a step that would write past a slot's pages (a scheduler bug that would
        otherwise corrupt the padding page silently)."""
        for slot, num_tokens in layout.seq_lens.items():
            if num_tokens > self.num_pages[slot] * self.page_size:
                pages = self.num_pages[slot]
                raise ValueError(
                    f"slot {slot} needs {num_tokens} tokens but has {pages} pages of {self.page_size}"
                )

    # ------------------------------------------------------------------ forward

    def context(self, meta: AttentionMetadata) -> ForwardContext:
        return ForwardContext(self.kernels, self.kv_pool.k, self.kv_pool.v, meta)

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Hidden states [T, hidden]; no host sync of its own."""
        return self.model(input_ids, positions, self.context(meta))

    @torch.inference_mode()
    def logits(self, inputs: StepInputs) -> torch.Tensor:
        """Float32 logits [N, vocab] of the step's sampling rows."""
        hidden = self.forward(inputs.input_ids, inputs.positions, inputs.meta)
        return self.model.compute_logits(hidden[inputs.sample_rows], self.kernels)


def _to_device(device: torch.device, *arrays: Sequence[int]) -> list[torch.Tensor]:
    """int64 device tensors of several host lists, moved in one copy. Each starts 16-byte
    aligned (its segment padded to an even length): Triton compiles one kernel variant per
    pointer alignment, so an odd offset would compile a new variant in the middle of serving."""
    padded = [[*a, 0] if len(a) % 2 else a for a in arrays]
    flat = torch.tensor(list(itertools.chain.from_iterable(padded)), dtype=torch.int64)
    parts = flat.to(device, non_blocking=True).split([len(p) for p in padded])
    return [part[: len(a)] for part, a in zip(parts, arrays, strict=True)]
