"""Repetition, frequency and presence penalties: the worker's per-slot token counts and the
batched logit adjustment (the definitions of vLLM / SGLang).

Only requests that ask for a penalty have counts, kept on the device per slot: built from the
prompt and output ids that ``NewReq`` carries for them (so chunked prefill, retraction and the
disaggregated decode side all start from the request's whole history), then bumped with each
token the worker samples for the slot, right after sampling. The worker runs messages in order,
so with the overlap schedule the token sampled at step N is counted before step N+1 samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from protocol.messages import SamplingParams


@dataclass
class PenaltyRows:
    """One step's penalty inputs, one row per sampling row (neutral rows for other requests)."""

    counts: torch.Tensor  # [N, vocab] float32: occurrences of each token in the output so far
    seen: torch.Tensor  # [N, vocab] bool: the token occurs in the prompt or the output
    frequency: torch.Tensor  # [N] float32
    presence: torch.Tensor  # [N] float32
    repetition: torch.Tensor  # [N] float32


def apply_penalties(logits: torch.Tensor, rows: PenaltyRows) -> torch.Tensor:
    """Repetition (logit / p if positive else logit * p, for seen tokens), then frequency and
    presence (minus freq * count and presence * [count > 0])."""
    rep = rows.repetition.unsqueeze(1)
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(rows.seen, penalized, logits)
    in_output = (rows.counts > 0).to(logits.dtype)
    return logits - rows.frequency.unsqueeze(1) * rows.counts - rows.presence.unsqueeze(1) * in_output


@dataclass
class _SlotCounts:
    counts: torch.Tensor  # [vocab] float32
    seen: torch.Tensor  # [vocab] bool


@dataclass
class SlotPenalties:
    """The token counts of the slots whose request asks for a penalty (owned by the worker)."""

    vocab_size: int
    device: torch.device
    _slots: dict[int, _SlotCounts] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return bool(self._slots)

    def admit(
        self, slot: int, sampling: SamplingParams, prompt_ids: list[int], output_ids: list[int]
    ) -> None:
        """``slot`` now holds a request: counts from its history if it asks for a penalty."""
        self._slots.pop(slot, None)
        if not sampling.uses_penalty:
            return
        outputs = torch.tensor(output_ids, dtype=torch.int64).to(self.device)
        history = torch.tensor(prompt_ids + output_ids, dtype=torch.int64).to(self.device)
        counts = torch.bincount(outputs, minlength=self.vocab_size)[: self.vocab_size].float()
        seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
        seen[history[history < self.vocab_size]] = True
        self._slots[slot] = _SlotCounts(counts, seen)

    def release(self, slots: Sequence[int]) -> None:
        for slot in slots:
            self._slots.pop(slot, None)

    def rows(self, slots: Sequence[int], params: Sequence[SamplingParams]) -> PenaltyRows | None:
        """The step's penalty rows, or None when no sampling row has a penalty (the plain path)."""
        if not any(slot in self._slots for slot in slots):
            return None
        neutral = _SlotCounts(
            torch.zeros(self.vocab_size, device=self.device),
            torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device),
        )
        held = [self._slots.get(slot, neutral) for slot in slots]
        floats = torch.tensor(
            [[p.frequency_penalty for p in params], [p.presence_penalty for p in params],
             [p.repetition_penalty for p in params]],
            dtype=torch.float32,
        )
        frequency, presence, repetition = floats.to(self.device, non_blocking=True)
        return PenaltyRows(
            counts=torch.stack([h.counts for h in held]),
            seen=torch.stack([h.seen for h in held]),
            frequency=frequency,
            presence=presence,
            repetition=repetition,
        )

    def record(self, slots: Sequence[int], tokens: torch.Tensor) -> None:
        """Count the tokens just sampled (``tokens[i]`` for ``slots[i]``), on the device."""
        for i, slot in enumerate(slots):
            held = self._slots.get(slot)
            if held is not None:
                token = tokens[i : i + 1]
                held.counts.index_add_(0, token, torch.ones(1, device=self.device))
                held.seen.index_fill_(0, token, True)
