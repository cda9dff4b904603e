"""Field-by-field validation of client frames (the client protocol is in docs/design.md,
"Wire protocol").

Every problem raises ``InvalidRequest`` with a message that names the field; the front end
answers with an ``invalid_request`` error and keeps serving. Optional fields may be absent or
null. Types are checked by the codec (``protocol.codec``) and value ranges by
``protocol.validation``, the same checks every instance applies again.

Every request costs a bounded amount of work, checked before the work is done: a frame's
nesting depth and map sizes when it is unpacked, the sizes of ``rid``, ``stop`` and
``stop_token_ids`` when it is parsed, and a prompt's text against the context length before it
is tokenized. Error messages quote bad values through ``protocol.validation.preview``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import msgpack

from protocol.codec import ProtocolError, check_value
from protocol.validation import (
    EMPTY_PROMPT,
    preview,
    priority_problem,
    prompt_problem,
    sampling_problem,
    token_ids_problem,
)

DEFAULT_MAX_NEW_TOKENS = 128
MAX_RID_CHARS = 256
MAX_STOP_STRINGS = 32
MAX_STOP_CHARS = 256  # per stop string
MAX_STOP_TOKEN_IDS = 1024
MAX_NESTING = 8  # a valid client message nests 3 deep (generate > sampling_params > stop)
MAX_MAP_ITEMS = 64
TEXT_BYTES_PER_TOKEN = 32  # generous: text longer than this per token of context cannot fit
UNKNOWN_CONTEXT_TOKENS = 1 << 15  # for the text bound when the context length is not known
_LIST_LIMITS = {"stop": MAX_STOP_STRINGS, "stop_token_ids": MAX_STOP_TOKEN_IDS}

_GENERATE_KEYS = frozenset(
    {"type", "rid", "text", "input_ids", "stream", "sampling_params", "return_logprob", "priority",
     "batch_outputs"}
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
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    top_logprobs: int = 0


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
    batch_outputs: bool = False  # its outputs may share `outputs` frames with others of its connection


@dataclass
class AbortCommand:
    rid: str


@dataclass
class StatusCommand:
    rid: str


@dataclass
class MetricsCommand:
    rid: str


Command = GenerateCommand | AbortCommand | StatusCommand | MetricsCommand


@dataclass(frozen=True)
class ModelLimits:
    vocab_size: int
    context_len: int | None  # None: not known, not checked


def unpack_frame(frame: bytes, max_bytes: int) -> dict[str, Any]:
    """The map in one client frame (the size is checked first, before unpacking; map sizes
    while unpacking; the nesting depth right after, before anything walks it recursively)."""
    if len(frame) > max_bytes:
        raise InvalidRequest(f"message of {len(frame)} bytes exceeds the limit of {max_bytes} bytes")
    try:
        obj = msgpack.unpackb(frame, raw=False, strict_map_key=False, max_map_len=MAX_MAP_ITEMS)
    except Exception as e:  # msgpack raises several unrelated types
        raise InvalidRequest(f"frame is not msgpack: {preview(str(e), 80)}") from None
    if not isinstance(obj, dict):
        raise InvalidRequest(f"message must be a map, got {type(obj).__name__}")
    if _nesting(obj) > MAX_NESTING:
        raise InvalidRequest(f"message nests more than {MAX_NESTING} levels deep")
    return obj


def _nesting(obj: dict[Any, Any]) -> int:
    """How deep ``obj`` nests (a flat map: 1), found level by level without recursion; stops
    one level past MAX_NESTING. Scalars are looked at only by type, in C."""
    level: list[Any] = [obj]
    depth = 0
    while level and depth <= MAX_NESTING:
        depth += 1
        deeper: list[Any] = []
        for container in level:
            items = list(container.values()) + list(container) if type(container) is dict else container
            kinds = set(map(type, items))
            if kinds & _CONTAINERS:
                deeper += [x for x in items if type(x) in _CONTAINERS]
        level = deeper
    return depth + 1 if level else depth


_CONTAINERS = frozenset({list, dict, tuple})


def parse_command(obj: dict[str, Any]) -> Command:
    rid = obj.get("rid")
    error_rid = rid if isinstance(rid, str) and len(rid) <= MAX_RID_CHARS else None
    try:
        return _parse(obj)
    except InvalidRequest as e:
        e.rid = error_rid
        raise


def _parse(obj: dict[str, Any]) -> Command:
    kind = obj.get("type")
    if kind not in ("generate", "abort", "status", "metrics"):
        raise InvalidRequest(
            f"unknown message type {preview(kind)}: expected generate, abort, status or metrics"
        )
    rid = _required(obj, "rid", str)
    if not rid:
        raise InvalidRequest("rid must not be empty")
    if len(rid) > MAX_RID_CHARS:
        raise InvalidRequest(f"rid of {len(rid)} characters exceeds the limit of {MAX_RID_CHARS}")
    if kind == "abort":
        _reject_unknown("abort", obj, {"type", "rid"})
        return AbortCommand(rid)
    if kind == "status":
        _reject_unknown("status", obj, {"type", "rid"})
        return StatusCommand(rid)
    if kind == "metrics":
        _reject_unknown("metrics", obj, {"type", "rid"})
        return MetricsCommand(rid)
    return _parse_generate(obj, rid)


def _parse_generate(obj: dict[str, Any], rid: str) -> GenerateCommand:
    _reject_unknown("generate", obj, _GENERATE_KEYS)
    text = _optional(obj, "text", str | None, None)
    input_ids = _optional(obj, "input_ids", list[int] | None, None)
    if (text is None) == (input_ids is None):
        raise InvalidRequest("give exactly one of text and input_ids")
    if text == "" or input_ids == []:
        raise InvalidRequest(EMPTY_PROMPT)
    priority = _optional(obj, "priority", int, 0)
    problem = priority_problem(priority)
    if problem is not None:
        raise InvalidRequest(problem)
    return GenerateCommand(
        rid=rid,
        text=text,
        input_ids=input_ids,
        stream=_optional(obj, "stream", bool, False),
        sampling=_parse_sampling(_optional(obj, "sampling_params", dict[Any, Any], {})),
        return_logprob=_optional(obj, "return_logprob", bool, False),
        priority=priority,
        batch_outputs=_optional(obj, "batch_outputs", bool, False),
    )


def _parse_sampling(obj: dict[str, Any]) -> ClientSampling:
    """The client's sampling parameters: absent or null ones take ``ClientSampling``'s defaults."""
    _reject_unknown("sampling_params", obj, _SAMPLING_KEYS)
    given = {key: value for key, value in obj.items() if value is not None}
    for key, limit in _LIST_LIMITS.items():  # before the codec looks at each item
        if isinstance(given.get(key), list) and len(given[key]) > limit:
            raise InvalidRequest(f"sampling_params.{key} has {len(given[key])} items; the limit is {limit}")
    s: ClientSampling = _typed(ClientSampling, given, "sampling_params")
    problem = sampling_problem(s, "sampling_params.")
    if problem is not None:
        raise InvalidRequest(problem)
    if any(not stop for stop in s.stop):
        raise InvalidRequest("sampling_params.stop must not contain an empty string")
    if any(len(stop) > MAX_STOP_CHARS for stop in s.stop):
        raise InvalidRequest(f"sampling_params.stop strings must be at most {MAX_STOP_CHARS} characters")
    return s


def check_text_size(text: str, limits: ModelLimits) -> None:
    """Refuse, before tokenizing it, a text too long for the context however it tokenizes."""
    context = limits.context_len or UNKNOWN_CONTEXT_TOKENS
    limit = context * TEXT_BYTES_PER_TOKEN
    size = len(text) if len(text) > limit else len(text.encode())  # characters <= UTF-8 bytes
    if size > limit:
        raise InvalidRequest(
            f"text of at least {size} bytes cannot fit the context length ({context} tokens): "
            f"the limit is {limit} bytes"
        )


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
    unknown = [k for k in obj if k not in allowed]
    if unknown:
        names = sorted(k if isinstance(k, str) and len(k) <= 40 else preview(k) for k in unknown[:8])
        more = f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""
        raise InvalidRequest(f"unknown field(s) in {what}: {', '.join(names)}{more}")
