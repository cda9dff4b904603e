"""Field-by-field validation of client frames (the client protocol is in docs/design.md,
"Wire protocol").

Every problem raises ``InvalidRequest`` with a message that names the field; the front end
answers with an ``invalid_request`` error and keeps serving. Optional fields may be absent or
null. Types are checked by the codec (``protocol.codec``) and value ranges by
``protocol.validation``, the same checks every instance applies again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import msgpack

from protocol.codec import ProtocolError, check_value
from protocol.validation import EMPTY_PROMPT, prompt_problem, sampling_problem, token_ids_problem

DEFAULT_MAX_NEW_TOKENS = 128

_GENERATE_KEYS = frozenset(
    {"type", "rid", "text", "input_ids", "stream", "sampling_params", "return_logprob", "priority"}
)


class InvalidRequest(ValueError):
    def __init__(self, message: str, rid: str | None = None) -> None:
        super().__init__(message)
        self.rid = rid


@dataclass
class ClientSampling:
    """A generate request's ``sampling_params``, as the client gave them (checked)."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False


_SAMPLING_KEYS = frozenset(f.name for f in dataclasses.fields(ClientSampling))


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
    rid = _required(obj, "rid", str)
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
    text = _optional(obj, "text", str | None, None)
    input_ids = _optional(obj, "input_ids", list[int] | None, None)
    if (text is None) == (input_ids is None):
        raise InvalidRequest("give exactly one of text and input_ids")
    if text == "" or input_ids == []:
        raise InvalidRequest(EMPTY_PROMPT)
    return GenerateCommand(
        rid=rid,
        text=text,
        input_ids=input_ids,
        stream=_optional(obj, "stream", bool, False),
        sampling=_parse_sampling(_optional(obj, "sampling_params", dict[Any, Any], {})),
        return_logprob=_optional(obj, "return_logprob", bool, False),
        priority=_optional(obj, "priority", int, 0),
    )


def _parse_sampling(obj: dict[str, Any]) -> ClientSampling:
    """The client's sampling parameters: absent or null ones take ``ClientSampling``'s defaults."""
    _reject_unknown("sampling_params", obj, _SAMPLING_KEYS)
    given = {key: value for key, value in obj.items() if value is not None}
    s: ClientSampling = _typed(ClientSampling, given, "sampling_params")
    problem = sampling_problem(s, "sampling_params.")
    if problem is not None:
        raise InvalidRequest(problem)
    if any(not stop for stop in s.stop):
        raise InvalidRequest("sampling_params.stop must not contain an empty string")
    return s


def check_prompt(input_ids: list[int], sampling: ClientSampling, limits: ModelLimits) -> None:
    """Checks that need the tokenized prompt and the model's limits."""
    problem = prompt_problem(input_ids, limits.vocab_size) or token_ids_problem(
        "sampling_params.stop_token_ids", sampling.stop_token_ids, limits.vocab_size
    )
    if problem is not None:
        raise InvalidRequest(problem)
    total = len(input_ids) + sampling.max_new_tokens
    if limits.context_len is not None and total > limits.context_len:
        raise InvalidRequest(
            f"prompt ({len(input_ids)} tokens) + max_new_tokens ({sampling.max_new_tokens}) = {total} "
            f"exceeds the context length ({limits.context_len})"
        )


# --------------------------------------------------------------------------------------------
# Field helpers
# --------------------------------------------------------------------------------------------


def _required(obj: dict[str, Any], key: str, hint: Any) -> Any:
    if obj.get(key) is None:
        raise InvalidRequest(f"missing field {key!r}")
    return _optional(obj, key, hint, None)


def _optional(obj: dict[str, Any], key: str, hint: Any, default: Any) -> Any:
    """``obj[key]`` checked against the type ``hint`` by the codec; ``default`` when absent or null."""
    value = obj.get(key)
    return default if value is None else _typed(hint, value, key)


def _typed(hint: Any, value: Any, name: str) -> Any:
    try:
        return check_value(hint, value, name)
    except ProtocolError as e:
        raise InvalidRequest(str(e)) from None


def _reject_unknown(what: str, obj: dict[str, Any], allowed: set[str] | frozenset[str]) -> None:
    unknown = sorted(str(k) for k in obj if k not in allowed)
    if unknown:
        raise InvalidRequest(f"unknown field(s) in {what}: {', '.join(unknown)}")
