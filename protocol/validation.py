"""The value checks of a generate request, written once: the front end applies them to client
requests (``tokenizer_proc.validation``) and every instance again to the tokenized requests it
receives (``scheduler_proc.validation``), since its input socket takes frames from any process.
Types are not checked here: the codec checks them (``protocol.codec.check_value``).

Each check returns the problem, worded for the client and naming the field, or None.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

SEED_LIMIT = 1 << 63
TOP_K_LIMIT = 1 << 31  # top_k must be below it (a larger one means "no limit" anyway)
PRIORITY_LIMIT = 1 << 31  # priority is in [-PRIORITY_LIMIT, PRIORITY_LIMIT)
PENALTY_LIMIT = 2.0  # frequency and presence penalties are in [-2, 2] (OpenAI's range)
REPETITION_PENALTY_LIMIT = 2.0  # repetition_penalty is in (0, 2]
TOP_LOGPROBS_LIMIT = 20  # top_logprobs is in [0, 20] (OpenAI's limit)
EMPTY_PROMPT = "the prompt is empty"
PREVIEW_CHARS = 40


def preview(value: object, limit: int = PREVIEW_CHARS) -> str:
    """A short quote of a value a sender got wrong, for error messages and logs: at most about
    ``limit`` characters whatever its size or nesting (only a prefix of it is ever formatted)."""
    if isinstance(value, (str, bytes)):
        text = repr(value[: limit + 1])
    elif isinstance(value, (list, tuple, dict, set)):
        return f"a {type(value).__name__} of {len(value)} item(s)"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class SamplingValues(Protocol):
    """The sampling fields with a valid range: the client's ``sampling_params`` and
    ``protocol.messages.SamplingParams`` both have them."""

    @property
    def max_new_tokens(self) -> int: ...
    @property
    def temperature(self) -> float: ...
    @property
    def top_p(self) -> float: ...
    @property
    def top_k(self) -> int: ...
    @property
    def seed(self) -> int | None: ...
    @property
    def frequency_penalty(self) -> float: ...
    @property
    def presence_penalty(self) -> float: ...
    @property
    def repetition_penalty(self) -> float: ...
    @property
    def min_p(self) -> float: ...
    @property
    def top_logprobs(self) -> int: ...


def sampling_problem(s: SamplingValues, where: str) -> str | None:
    """What is out of range in ``s``; ``where`` prefixes the field names (``sampling_params.``)."""
    if s.max_new_tokens < 1:
        return f"{where}max_new_tokens must be at least 1, got {s.max_new_tokens}"
    if not math.isfinite(s.temperature) or s.temperature < 0:
        return f"{where}temperature must be finite and >= 0, got {s.temperature}"
    if not 0.0 < s.top_p <= 1.0:
        return f"{where}top_p must be in (0, 1], got {s.top_p}"
    if not -1 <= s.top_k < TOP_K_LIMIT:
        return f"{where}top_k must be -1, 0 (no limit) or positive and below 2**31, got {s.top_k}"
    if s.seed is not None and not 0 <= s.seed < SEED_LIMIT:
        return f"{where}seed must be in [0, 2**63), got {s.seed}"
    return _penalty_problem(s, where) or _filter_problem(s, where)


def _penalty_problem(s: SamplingValues, where: str) -> str | None:
    for name in ("frequency_penalty", "presence_penalty"):
        value = getattr(s, name)
        if not -PENALTY_LIMIT <= value <= PENALTY_LIMIT:  # NaN fails too
            return f"{where}{name} must be in [-2, 2], got {value}"
    if not 0.0 < s.repetition_penalty <= REPETITION_PENALTY_LIMIT:
        return f"{where}repetition_penalty must be in (0, 2], got {s.repetition_penalty}"
    return None


def _filter_problem(s: SamplingValues, where: str) -> str | None:
    if not 0.0 <= s.min_p <= 1.0:
        return f"{where}min_p must be in [0, 1], got {s.min_p}"
    if not 0 <= s.top_logprobs <= TOP_LOGPROBS_LIMIT:
        return f"{where}top_logprobs must be in [0, 20], got {s.top_logprobs}"
    return None


def priority_problem(priority: int) -> str | None:
    if not -PRIORITY_LIMIT <= priority < PRIORITY_LIMIT:
        return f"priority must be in [-2**31, 2**31), got {preview(priority)}"
    return None


def token_ids_problem(name: str, ids: Sequence[int], vocab_size: int) -> str | None:
    """The first id of ``ids`` outside the vocabulary (one pass in C when there is none)."""
    if not ids or (min(ids) >= 0 and max(ids) < vocab_size):
        return None
    i = next(i for i, token_id in enumerate(ids) if not 0 <= token_id < vocab_size)
    return f"{name}[{i}] = {ids[i]} is outside the vocabulary [0, {vocab_size})"


def prompt_problem(input_ids: Sequence[int], vocab_size: int) -> str | None:
    if not input_ids:
        return EMPTY_PROMPT
    return token_ids_problem("input_ids", input_ids, vocab_size)
