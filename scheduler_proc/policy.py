"""Order of the waiting queue (``--schedule-policy``).

- ``fcfs``: arrival order.
- ``lpm``: longest prefix match against the radix cache first, so requests that share a cached
  prefix run while it is still cached. Matching every waiting request costs time, so with a long
  queue it falls back to fcfs (as SGLang does).
- ``priority``: higher ``priority`` first, then arrival order.
"""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter

from scheduler_proc.radix_cache import PrefixCache
from scheduler_proc.request import Request

LPM_MAX_QUEUE = 128

Policy = Callable[[list[Request], PrefixCache], None]


# The queue is re-sorted every step, but it is nearly always sorted already: with keys read at C
# speed (no Python call per request), timsort makes that one cheap linear pass.
_BY_ARRIVAL = attrgetter("seq")
_BY_PRIORITY = attrgetter("priority_order")


def _fcfs(queue: list[Request], cache: PrefixCache) -> None:
    queue.sort(key=_BY_ARRIVAL)


def _lpm(queue: list[Request], cache: PrefixCache) -> None:
    if len(queue) > LPM_MAX_QUEUE:
        _fcfs(queue, cache)
        return
    matched = {r.seq: len(cache.match_prefix(r.tokens).pages) for r in queue}
    queue.sort(key=lambda r: (-matched[r.seq], r.seq))


def _priority(queue: list[Request], cache: PrefixCache) -> None:
    queue.sort(key=_BY_PRIORITY)


POLICIES: dict[str, Policy] = {"fcfs": _fcfs, "lpm": _lpm, "priority": _priority}


def get_policy(name: str) -> Policy:
    """The in-place sort of the waiting queue named ``name``."""
    if name not in POLICIES:
        raise ValueError(f"unknown schedule policy {name!r}; expected one of {', '.join(POLICIES)}")
    return POLICIES[name]
