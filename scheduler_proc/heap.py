"""Garbage-collector policy of the scheduler process: no full collection in the serving loop.

A full collection walks every tracked object, so one of a heap built at start-up (modules,
config, the worker's description) plus hundreds of live requests pauses a step for tens of
milliseconds. Two things keep that out of the loop: token ids live in arrays the collector
does not walk (``radix_cache.token_array``), and the heap as it is at start-up, and again
whenever the instance goes idle, is moved out of the collector's sight (``gc.freeze``, as
SGLang does): only objects made since the last idle moment are ever walked. Cyclic garbage
among frozen objects is collected at the next idle moment, which unfreezes first.

A busy instance may not go idle for long while requests keep arriving, and each waiting
request is a handful of tracked objects (thousands of them with a long queue), so arrivals are
frozen too, every ``FREEZE_EVERY_ARRIVALS`` of them (``gc.freeze`` itself is a constant-time
list splice; a request's objects are still freed by reference counting when it ends). So that
cyclic garbage cannot pile up among them on an instance that is never idle, a full collection
runs when the process's peak resident memory has doubled since the last one (read with one
``getrusage`` call: counting the frozen objects would walk them all).
"""

from __future__ import annotations

import gc
import resource

FREEZE_EVERY_ARRIVALS = 64

_peak_rss_after_collect = [0]


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def freeze() -> None:
    """Collect what is garbage now, then freeze the survivors (start-up and idle moments only:
    the collection itself is the pause this avoids in the loop)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    _peak_rss_after_collect[0] = _peak_rss()


class ArrivalFreezer:
    """Freezes the heap every ``every`` arrivals (``arrived`` counts every request so far)."""

    def __init__(self, every: int | None = None) -> None:
        self._every = FREEZE_EVERY_ARRIVALS if every is None else every
        self._last = 0

    def note(self, arrived: int) -> None:
        if arrived - self._last < self._every:
            return
        self._last = arrived
        if _peak_rss() > 2 * _peak_rss_after_collect[0]:
            freeze()
        else:
            gc.freeze()


class IdleFreezer:
    """Freezes the heap once per idle period (no live request, no step in flight)."""

    def __init__(self) -> None:
        self._frozen_while_idle = False

    def note(self, idle: bool) -> None:
        if not idle:
            self._frozen_while_idle = False
        elif not self._frozen_while_idle:
            freeze()
            self._frozen_while_idle = True
