"""The msgpack codec of every pdserve message (the frame layout is in docs/design.md, "Wire protocol").

Each message is a dataclass deriving from ``Message``. Decoding rebuilds it from its type hints
and checks every field on the way, so a receiver gets well-typed objects (nested messages, enums
and ``float`` fields included) or a ``ProtocolError`` naming the message type and the field. The
checks are compiled once per class. No pickle anywhere.
"""

from __future__ import annotations

import dataclasses
import enum
import threading
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar, NamedTuple

import msgpack

PROTOCOL_VERSION = 1


class ProtocolError(ValueError):
    """A frame that is not a well-formed message of this protocol. When the frame is a map of a
    known type whose fields do not fit, ``message_type`` is that type and ``rid`` its request id
    (if readable), so that a receiver can answer the sender of a malformed request."""

    def __init__(self, message: str, message_type: str | None = None, rid: str | None = None) -> None:
        super().__init__(message)
        self.message_type, self.rid = message_type, rid


_REGISTRY: dict[str, type[Message]] = {}


@dataclass
class Message:
    TYPE: ClassVar[str] = ""
    INTERNAL: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.TYPE:
            assert cls.TYPE not in _REGISTRY, f"duplicate message type {cls.TYPE}"
            _REGISTRY[cls.TYPE] = cls

    def to_dict(self) -> dict[str, Any]:
        d = _encoder(type(self))(self)
        d["type"] = self.TYPE
        if self.INTERNAL:
            d["v"] = PROTOCOL_VERSION
        return d


_packers = threading.local()  # a Packer kept per thread: msgpack.packb builds one per call (+0.3 µs)


def encode(msg: Message) -> bytes:
    try:
        packer = _packers.packer
    except AttributeError:
        packer = _packers.packer = msgpack.Packer(use_bin_type=True)
    return packer.pack(msg.to_dict())  # a failed pack leaves the packer empty


def decode(frame: bytes) -> Message:
    """Decode one internal frame into its typed message; raises ProtocolError."""
    try:
        obj = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises several unrelated types
        raise ProtocolError(f"frame is not msgpack: {e}") from None
    return from_dict(obj)


def from_dict(obj: Any) -> Message:
    if not isinstance(obj, dict):
        raise ProtocolError("message must be a map")
    tag = obj.get("type")
    cls = _REGISTRY.get(tag) if isinstance(tag, str) else None  # a list or map tag is unhashable
    if cls is None:
        raise ProtocolError(f"unknown message type {obj.get('type')!r}")
    if cls.INTERNAL and obj.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {obj.get('v')!r} of {cls.TYPE!r} does not match ours ({PROTOCOL_VERSION})"
        )
    try:
        return _build(cls, obj)
    except _Mismatch as e:
        rid = obj.get("rid") if isinstance(obj.get("rid"), str) else None
        raise ProtocolError(f"{cls.TYPE}: {e.describe()}", cls.TYPE, rid) from None


def check_value(hint: Any, value: Any, name: str) -> Any:
    """``value`` as a field of type ``hint`` takes it (an int for a float becomes a float, a map
    for a dataclass becomes one); raises ProtocolError naming ``name`` when it does not fit."""
    check = _check_for(hint)
    if type(value) in check.accepted:
        return value
    try:
        return _field_value(check.convert, value, name)
    except _Mismatch as e:
        raise ProtocolError(e.describe()) from None


def build(cls: type[Any], obj: dict[str, Any]) -> Any:
    """The dataclass ``cls`` from the map ``obj`` (keys it does not know are ignored), every field
    checked against its type hint; raises ProtocolError naming the class and the field."""
    try:
        return _build(cls, obj)
    except _Mismatch as e:
        raise ProtocolError(f"{cls.__name__}: {e.describe()}") from None


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------

# Enum members of a StrEnum (or IntEnum) are str (int) instances: they go to msgpack as their
# plain value, with no Python call.
_SCALARS = (str, int, float, bool, bytes, type(None))
_SCALAR_TYPES = frozenset(_SCALARS)


def _encode_value(value: Any) -> Any:
    kind = type(value)
    if kind is list and (not value or type(value[0]) in _SCALAR_TYPES):
        return value  # token ids, page ids: the hot path
    if kind in _SCALAR_TYPES or isinstance(value, _SCALARS):
        return value
    if dataclasses.is_dataclass(value):
        return _encoder(type(value))(value)
    if isinstance(value, (list, tuple)):
        # Lists in messages are homogeneous: token ids, page ids, or nested messages. A list of
        # scalars goes to msgpack as it is, without a Python call per element (the hot path).
        if not value or isinstance(value[0], _SCALARS):
            return value
        return [_encode_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode_value(v) for k, v in value.items()}
    if isinstance(value, enum.Enum):
        return value.value
    return value


@cache
def _encoder(cls: type) -> Callable[[Any], dict[str, Any]]:
    """A function that makes the map of a ``cls`` instance: a field whose hint is a scalar type
    is read as it is, others go through ``_encode_value``. Generated once per class, as
    ``_builder`` is: a loop over the fields costs several times more per message."""
    hints = typing.get_type_hints(cls)
    items = []
    for name in _field_names(cls):
        check = _check_for(hints[name])
        plain = check.exact or check.accepted in (frozenset({float}), frozenset({float, type(None)}))
        getter = f"v.{name}" if plain else f"enc(v.{name})"
        items.append(f"{name!r}: {getter}")
    source = f"def encode_fields(v):\n    return {{{', '.join(items)}}}"
    namespace: dict[str, Any] = {"enc": _encode_value}
    exec(source, namespace)  # noqa: S102 - source built above from field names only
    return namespace["encode_fields"]


@cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


# --------------------------------------------------------------------------------------------
# Decoding: a checker per type hint and a builder per class, both made once
# --------------------------------------------------------------------------------------------


class _Mismatch(Exception):
    """A value that does not fit its type hint; ``path`` is filled in on the way out."""

    def __init__(self, expected: str, value: Any, problem: str = "") -> None:
        super().__init__(expected)
        self.expected, self.value, self.problem = expected, value, problem
        self.path: list[str] = []

    def describe(self) -> str:
        where = "".join(reversed(self.path)).lstrip(".")
        if self.problem:
            return f"{where}: {self.problem}" if where else self.problem
        return f"{where} must be {self.expected}; got {_describe(self.value)}"


class _Check(NamedTuple):
    """How to take a value for one type hint. Values whose exact type is in ``accepted``, and
    lists whose items' exact types are all in ``items``, are taken as they are (the fast path);
    any other goes through ``convert``, which returns the value to keep or raises ``_Mismatch``."""

    accepted: frozenset[type]
    convert: Callable[[Any], Any]
    expected: str  # "an integer", "a list of integers", ... (for error messages)
    items: frozenset[type] = frozenset()
    exact: bool = False  # ``convert`` only refuses


def _build(cls: type[Any], obj: dict[str, Any]) -> Any:
    return _builder(cls)(obj)


@cache
def _builder(cls: type) -> Callable[[dict[str, Any]], Any]:
    """A function that builds ``cls`` from a map, checking each field on the fast path inline.
    Generated once per class (as ``dataclasses`` generates ``__init__``): a generic loop over the
    fields costs about twice as much per row of a 256-row ``BatchOutput``."""
    hints = typing.get_type_hints(cls)
    namespace: dict[str, Any] = {"cls": cls, "field_value": _field_value, "Mismatch": _Mismatch}
    lines = ["def build(obj):", "    kwargs = {}"]
    for i, name in enumerate(_field_names(cls)):
        check = _check_for(hints[name])
        namespace.update({f"accepted{i}": check.accepted, f"items{i}": check.items,
                          f"convert{i}": check.convert})
        namespace.update({f"type{i}": t for t in check.accepted if len(check.accepted) == 1})
        lines += [
            f"    if {name!r} in obj:",
            f"        v = obj[{name!r}]",
            f"        if {_slow_path_test(check, i)}:",
            f"            v = field_value(convert{i}, v, {name!r})",
            f"        kwargs[{name!r}] = v",
        ]
    lines += [
        "    try:",
        "        return cls(**kwargs)",
        "    except TypeError as e:  # a required field is missing",
        "        raise Mismatch('', None, str(e)) from None",
    ]
    exec("\n".join(lines), namespace)  # noqa: S102 - source built above from field names only
    return namespace["build"]


def _slow_path_test(check: _Check, i: int) -> str:
    """The condition, in generated code, under which field ``i``'s value ``v`` needs ``convert``."""
    tests = []
    if len(check.accepted) == 1:
        tests.append(f"type(v) is not type{i}")
    elif check.accepted:
        tests.append(f"type(v) not in accepted{i}")
    if check.items:
        tests.append(f"(type(v) is not list or not items{i}.issuperset(map(type, v)))")
    return " and ".join(tests) or "True"


def _field_value(convert: Callable[[Any], Any], value: Any, name: str) -> Any:
    try:
        return convert(value)
    except _Mismatch as e:
        e.path.append("." + name)
        raise


_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", bytes: "bytes"}
_NOUNS = {int: "integers", float: "numbers", str: "strings", bool: "booleans", bytes: "byte strings"}
_EXACT = (int, str, bool, bytes)


@cache
def _check_for(hint: Any) -> _Check:
    if hint is Any or hint is object:
        return _Check(frozenset(), _identity, "anything")
    if hint is type(None) or hint is None:
        return _exact_check(frozenset({type(None)}), "None")
    if hint is float:
        return _Check(frozenset({float}), _to_float, _NAMES[float])
    if hint in _EXACT:
        return _exact_check(frozenset({hint}), _NAMES[hint])
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return _enum_check(hint)
    if dataclasses.is_dataclass(hint):
        return _Check(frozenset(), _dataclass_converter(hint), "a map")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return _union_check(args)
    if origin is list:
        return _list_check(args[0] if args else Any)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        items = _list_check(args[0])
        return _Check(frozenset(), lambda v: tuple(items.convert(v)), f"{items.expected} (a tuple)")
    if origin is dict:
        return _dict_check(*(args or (Any, Any)))
    raise TypeError(f"the codec cannot check fields of type {hint!r}")


def _identity(value: Any) -> Any:
    return value


def _exact_check(accepted: frozenset[type], expected: str) -> _Check:
    def refuse(value: Any) -> Any:
        raise _Mismatch(expected, value)

    return _Check(accepted, refuse, expected, exact=True)


def _to_float(value: Any) -> float:
    if type(value) is int:  # msgpack keeps 1.0 a float, but a sender may have put an int there
        return float(value)
    raise _Mismatch(_NAMES[float], value)


def _enum_check(kind: type[enum.Enum]) -> _Check:
    members = {m.value: m for m in kind}
    expected = "one of " + ", ".join(repr(v) for v in members)

    def convert(value: Any) -> Any:
        try:
            return members[value]
        except (KeyError, TypeError):  # TypeError: an unhashable value
            raise _Mismatch(expected, value) from None

    return _Check(frozenset({kind}), convert, expected)


def _dataclass_converter(cls: type) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        if type(value) is not dict:
            raise _Mismatch("a map", value)
        return _builder(cls)(value)

    return convert


def _union_check(members: tuple[Any, ...]) -> _Check:
    checks = [_check_for(m) for m in members]
    accepted = frozenset().union(*(c.accepted for c in checks))
    expected = " or ".join(c.expected for c in checks)
    if all(c.exact for c in checks):  # int | None, ...
        return _exact_check(accepted, expected)
    convertible = [c for c in checks if not c.exact]
    items = convertible[0].items if len(convertible) == 1 else frozenset()
    if len(convertible) == 1 and len(checks) == 2 and type(None) in accepted:
        # T | None: T's own errors name the nested field that is wrong
        return _Check(accepted, convertible[0].convert, expected, items)

    def convert(value: Any) -> Any:
        for check in convertible:
            try:
                return check.convert(value)
            except _Mismatch:
                continue
        raise _Mismatch(expected, value)

    return _Check(accepted, convert, expected, items)


def _list_check(item_hint: Any) -> _Check:
    item = _check_for(item_hint)
    expected = f"a list of {_noun(item_hint, item)}"

    def convert(value: Any) -> Any:
        if type(value) is not list:
            raise _Mismatch(expected, value)
        if item.accepted.issuperset(map(type, value)):
            return value
        out = []
        for i, x in enumerate(value):
            try:
                out.append(x if type(x) in item.accepted else item.convert(x))
            except _Mismatch as e:
                if not e.path and not e.problem:  # the item itself is wrong: name the list
                    raise _Mismatch(expected, value) from None
                e.path.append(f"[{i}]")
                raise
        return out

    return _Check(frozenset(), convert, expected, item.accepted)


def _dict_check(key_hint: Any, value_hint: Any) -> _Check:
    keys, values = _check_for(key_hint), _check_for(value_hint)
    if key_hint is Any and value_hint is Any:
        return _exact_check(frozenset({dict}), "a map")
    expected = f"a map of {_noun(key_hint, keys)} to {_noun(value_hint, values)}"

    def convert(value: Any) -> Any:
        if type(value) is not dict:
            raise _Mismatch(expected, value)
        out = {}
        for k, v in value.items():
            try:
                k = k if type(k) in keys.accepted else keys.convert(k)
            except _Mismatch:
                raise _Mismatch(expected, value) from None
            try:
                out[k] = v if type(v) in values.accepted else values.convert(v)
            except _Mismatch as e:
                e.path.append(f"[{k!r}]")
                raise
        return out

    return _Check(frozenset(), convert, expected)


def _noun(hint: Any, check: _Check) -> str:
    """How a list or a map names its items: "integers", "maps", ..."""
    if hint in _NOUNS:
        return _NOUNS[hint]
    return "maps" if check.expected == "a map" else check.expected


def _describe(value: Any) -> str:
    if isinstance(value, list):
        kinds = sorted({type(x).__name__ for x in value})
        return f"a list of {', '.join(kinds)}" if kinds else "an empty list"
    if isinstance(value, dict):
        return "a map"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"
