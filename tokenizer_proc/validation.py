"""Field-by-field validation of client frames (DESIGN.md "Wire protocol").

Every problem raises ``InvalidRequest`` with a message that names it; the front end answers
with an ``invalid_request`` error and keeps serving. Optional fields may be absent or null.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import msgpack

SEED_LIMIT = 1 << 63
DEFAULT_MAX_NEW_TOKENS = 128

_GENERATE_KEYS = frozenset(
    {"type", "rid", "text", "input_ids", "stream", "sampling_params", "return_logprob", "priority"}
)
_SAMPLING_KEYS = frozenset(
    {"max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos"}
)


class InvalidRequest(ValueError):
    def __init__(self, message: str, rid: str | None = None) -> None:
        super().__init__(message)
        self.rid = rid


@dataclass
class ClientSampling:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False


@dataclass
class GenerateCommand:
    rid: str
    text: str | None
    input_ids: list[int] | None
    stream: bool
    sampling: ClientSampling
    return_logprob: bool
    priority: int


@dataclass
class AbortCommand:
    rid: str


@dataclass
class StatusCommand:
    rid: str


Command = GenerateCommand | AbortCommand | StatusCommand


@dataclass(frozen=True)
class ModelLimits:
    vocab_size: int
    context_len: int | None  # None: not known, not checked


def unpack_frame(frame: bytes, max_bytes: int) -> dict[str, Any]:
    """The map in one client frame (the size is checked first, before unpacking)."""
    if len(frame) > max_bytes:
        raise InvalidRequest(f"message of {len(frame)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        obj = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types
        raise InvalidRequest(f"frame is not msgpack: {e}") from None
    if not isinstance(obj, dict):
        raise InvalidRequest(f"message must be a map, got {type(obj).__name__}")
    return obj


def parse_command(obj: dict[str, Any]) -> Command:
    rid = obj.get("rid")
    error_rid = rid if isinstance(rid, str) else None
    try:
        return _parse(obj)
    except InvalidRequest as e:
        e.rid = error_rid
        raise


def _parse(obj: dict[str, Any]) -> Command:
    kind = obj.get("type")
    if kind not in ("generate", "abort", "status"):
        raise InvalidRequest(f"unknown message type {kind!r}: expected generate, abort or status")
    rid = _required(obj, "rid", _is_str, "a string")
    if not rid:
        raise InvalidRequest("rid must not be empty")
    if kind == "abort":
        _reject_unknown("abort", obj, {"type", "rid"})
        return AbortCommand(rid)
    if kind == "status":
        _reject_unknown("status", obj, {"type", "rid"})
        return StatusCommand(rid)
    return _parse_generate(obj, rid)


def _parse_generate(obj: dict[str, Any], rid: str) -> GenerateCommand:
    _reject_unknown("generate", obj, _GENERATE_KEYS)
    text = _optional(obj, "text", _is_str, "a string", None)
    input_ids = _optional(obj, "input_ids", _is_int_list, "a list of integers", None)
    if (text is None) == (input_ids is None):
        raise InvalidRequest("give exactly one of text and input_ids")
    if text == "" or input_ids == []:
        raise InvalidRequest("prompt is empty")
    sampling_obj = _optional(obj, "sampling_params", _is_map, "a map", {})
    return GenerateCommand(
        rid=rid,
        text=text,
        input_ids=input_ids,
        stream=_optional(obj, "stream", _is_bool, "a boolean", False),
        sampling=_parse_sampling(sampling_obj),
        return_logprob=_optional(obj, "return_logprob", _is_bool, "a boolean", False),
        priority=_optional(obj, "priority", _is_int, "an integer", 0),
    )


def _parse_sampling(obj: dict[str, Any]) -> ClientSampling:
    _reject_unknown("sampling_params", obj, _SAMPLING_KEYS)
    where = "sampling_params."
    s = ClientSampling(
        max_new_tokens=_optional(obj, "max_new_tokens", _is_int, "an integer", DEFAULT_MAX_NEW_TOKENS, where),
        temperature=float(_optional(obj, "temperature", _is_number, "a number", 1.0, where)),
        top_p=float(_optional(obj, "top_p", _is_number, "a number", 1.0, where)),
        top_k=_optional(obj, "top_k", _is_int, "an integer", -1, where),
        seed=_optional(obj, "seed", _is_int, "an integer", None, where),
        stop=_optional(obj, "stop", _is_str_list, "a list of strings", [], where),
        stop_token_ids=_optional(obj, "stop_token_ids", _is_int_list, "a list of integers", [], where),
        ignore_eos=_optional(obj, "ignore_eos", _is_bool, "a boolean", False, where),
    )
    if s.max_new_tokens < 1:
        raise InvalidRequest(f"sampling_params.max_new_tokens must be at least 1, got {s.max_new_tokens}")
    if not math.isfinite(s.temperature) or s.temperature < 0:
        raise InvalidRequest(f"sampling_params.temperature must be finite and >= 0, got {s.temperature}")
    if not 0.0 < s.top_p <= 1.0:
        raise InvalidRequest(f"sampling_params.top_p must be in (0, 1], got {s.top_p}")
    if s.top_k < -1:
        raise InvalidRequest(f"sampling_params.top_k must be -1, 0 (no limit) or positive, got {s.top_k}")
    if s.seed is not None and not 0 <= s.seed < SEED_LIMIT:
        raise InvalidRequest(f"sampling_params.seed must be in [0, 2**63), got {s.seed}")
    if any(not stop for stop in s.stop):
        raise InvalidRequest("sampling_params.stop must not contain an empty string")
    return s


def check_prompt(input_ids: list[int], sampling: ClientSampling, limits: ModelLimits) -> None:
    """Checks that need the tokenized prompt and the model's limits."""
    if not input_ids:
        raise InvalidRequest("prompt is empty")
    _check_vocab("input_ids", input_ids, limits.vocab_size)
    _check_vocab("sampling_params.stop_token_ids", sampling.stop_token_ids, limits.vocab_size)
    total = len(input_ids) + sampling.max_new_tokens
    if limits.context_len is not None and total > limits.context_len:
        raise InvalidRequest(
            f"prompt ({len(input_ids)} tokens) + max_new_tokens ({sampling.max_new_tokens}) = {total} "
            f"exceeds the context length ({limits.context_len})"
        )


def _check_vocab(name: str, ids: list[int], vocab_size: int) -> None:
    for i, token_id in enumerate(ids):
        if not 0 <= token_id < vocab_size:
            raise InvalidRequest(f"{name}[{i}] = {token_id} is outside the vocabulary [0, {vocab_size})")


# --------------------------------------------------------------------------------------------
# Field helpers
# --------------------------------------------------------------------------------------------


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_map(v: Any) -> bool:
    return isinstance(v, dict)


def _is_int_list(v: Any) -> bool:
    return isinstance(v, list) and all(_is_int(x) for x in v)


def _is_str_list(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _required(obj: dict[str, Any], key: str, check: Any, what: str) -> Any:
    if obj.get(key) is None:
        raise InvalidRequest(f"missing field {key!r}")
    return _optional(obj, key, check, what, None)


def _optional(obj: dict[str, Any], key: str, check: Any, what: str, default: Any, where: str = "") -> Any:
    value = obj.get(key)
    if value is None:
        return default
    if not check(value):
        raise InvalidRequest(f"{where}{key} must be {what}, got {_describe(value)}")
    return value


def _describe(value: Any) -> str:
    if isinstance(value, list):
        return f"a list of {', '.join(sorted({type(x).__name__ for x in value}))}"
    return type(value).__name__


def _reject_unknown(what: str, obj: dict[str, Any], allowed: set[str] | frozenset[str]) -> None:
    unknown = sorted(str(k) for k in obj if k not in allowed)
    if unknown:
        raise InvalidRequest(f"unknown field(s) in {what}: {', '.join(unknown)}")
