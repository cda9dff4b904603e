"""The msgpack codec of every pdserve message.

Each message is a dataclass deriving from ``Message``. On the wire it is one msgpack map with a
``type`` tag (the class's ``TYPE``) and, for internal messages, the protocol version ``v``.
Nested dataclasses (lists of them, or optional ones) are encoded as maps and rebuilt on decode
from the type hints, so a receiver always gets typed objects. No pickle anywhere.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar

import msgpack

PROTOCOL_VERSION = 1


class ProtocolError(ValueError):
    """A frame that is not a well-formed message of this protocol."""


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
        d = _encode_value(self)
        d["type"] = self.TYPE
        if self.INTERNAL:
            d["v"] = PROTOCOL_VERSION
        return d


def encode(msg: Message) -> bytes:
    return msgpack.packb(msg.to_dict(), use_bin_type=True)


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
    cls = _REGISTRY.get(obj.get("type"))  # type: ignore[arg-type]
    if cls is None:
        raise ProtocolError(f"unknown message type {obj.get('type')!r}")
    if cls.INTERNAL and obj.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(
            f"protocol version {obj.get('v')!r} of {cls.TYPE!r} does not match ours ({PROTOCOL_VERSION})"
        )
    return _decode_dataclass(cls, obj)


_SCALARS = (str, int, float, bool, bytes, type(None))


def _encode_value(value: Any) -> Any:
    if isinstance(value, _SCALARS):
        return value
    if dataclasses.is_dataclass(value):
        return {name: _encode_value(getattr(value, name)) for name in _field_names(type(value))}
    if isinstance(value, (list, tuple)):
        # Lists in messages are homogeneous: token ids, page ids, or nested messages. A list of
        # scalars goes to msgpack as it is, without a Python call per element (the hot path).
        if not value or isinstance(value[0], _SCALARS):
            return value
        return [_encode_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode_value(v) for k, v in value.items()}
    return value


@cache
def _field_names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


@cache
def _nested_fields(cls: type) -> dict[str, Any]:
    """The fields of ``cls`` whose values may hold nested dataclasses, with their type hints;
    every other field is taken from the wire as it is."""
    hints = typing.get_type_hints(cls)
    return {name: hints[name] for name in _field_names(cls) if _mentions_dataclass(hints[name])}


def _mentions_dataclass(hint: Any) -> bool:
    return dataclasses.is_dataclass(hint) or any(_mentions_dataclass(a) for a in typing.get_args(hint))


def _decode_dataclass(cls: type, obj: dict[str, Any]) -> Any:
    kwargs = {name: obj[name] for name in _field_names(cls) if name in obj}
    for name, hint in _nested_fields(cls).items():
        if name in kwargs:
            kwargs[name] = _decode_value(hint, kwargs[name])
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ProtocolError(f"{cls.__name__}: {e}") from None


def _decode_value(hint: Any, value: Any) -> Any:
    if isinstance(value, _SCALARS):
        return value
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return _decode_dataclass(hint, value)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return _decode_dataclass(arg, value)
        return value
    if origin is list and isinstance(value, list):
        (arg,) = typing.get_args(hint) or (Any,)
        if dataclasses.is_dataclass(arg):
            return [_decode_dataclass(arg, v) for v in value]
        return value
    return value
