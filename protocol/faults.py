"""Fault injection: one documented setting, read once when a process starts, that makes a
deployment misbehave on purpose (for end-to-end tests and drills; empty in production).

The setting is the environment variable ``PDSERVE_FAULTS``: a comma-separated list of
``key=value`` pairs, e.g. ``PDSERVE_FAULTS="kv_send_delay_s=0.4"``. Known keys:

  ``kv_send_delay_s`` (float ≥ 0)
      Every KV send of a prefill worker leaves this many seconds late, in order, so that a
      transfer lasts long enough to abort or kill an instance during it.
  ``step_delay_s`` (float ≥ 0) and ``step_delay_at_step`` (int ≥ 0)
      A unified instance's worker sleeps this long, once, before the first step numbered at
      least ``step_delay_at_step``: a hung worker, for the scheduler's ``--watchdog-timeout``.
  ``forward_error_at_step`` (int ≥ 0)
      A unified instance's worker raises in the first step numbered at least this: a
      forward-pass exception.

An unknown key, a repeated key or a value of the wrong type is refused when the process starts
(``FaultsError`` names it). A process that honours a fault reads the setting once at start-up
and wires the fault in then (e.g. the prefill worker wraps its KV sender); nothing checks it
in a hot loop. To add a fault, add a field to ``Faults`` with its default (no fault) and say
here what it does.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass

FAULTS_ENV = "PDSERVE_FAULTS"


class FaultsError(ValueError):
    """The fault setting is malformed: an unknown key, a repeated key or a bad value."""


@dataclass(frozen=True)
class Faults:
    """The faults asked for; every default means "no fault"."""

    kv_send_delay_s: float = 0.0
    step_delay_s: float = 0.0
    step_delay_at_step: int = 0
    forward_error_at_step: int | None = None

    def __post_init__(self) -> None:
        for name in ("kv_send_delay_s", "step_delay_s", "step_delay_at_step", "forward_error_at_step"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise FaultsError(f"{name} must be ≥ 0; got {value}")

    @classmethod
    def parse(cls, text: str) -> Faults:
        """Faults from ``key=value,key=value`` (whitespace around items ignored; empty: none)."""
        hints = typing.get_type_hints(cls)
        values: dict[str, object] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, raw = (s.strip() for s in item.partition("="))
            if not sep:
                raise FaultsError(f"{FAULTS_ENV}: {item!r} is not key=value")
            if key not in hints:
                known = ", ".join(f.name for f in dataclasses.fields(cls))
                raise FaultsError(f"{FAULTS_ENV}: unknown fault {key!r}; known: {known}")
            if key in values:
                raise FaultsError(f"{FAULTS_ENV}: fault {key!r} is given twice")
            values[key] = _convert(key, raw, hints[key])
        return cls(**values)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Faults:
        return cls.parse(environ.get(FAULTS_ENV, ""))

    def to_setting(self) -> str:
        """The ``PDSERVE_FAULTS`` value that asks for these faults (defaults left out)."""
        default = Faults()
        return ",".join(
            f"{f.name}={getattr(self, f.name)}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(default, f.name)
        )


def _convert(key: str, raw: str, hint: object) -> object:
    """``raw`` as the field's type (``int``, ``float``, or one of them or None)."""
    options = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    kind = options[0]
    try:
        return kind(raw)  # type: ignore[operator]
    except (TypeError, ValueError):
        name = getattr(kind, "__name__", kind)
        raise FaultsError(f"{FAULTS_ENV}: fault {key!r} needs a {name}; got {raw!r}") from None
