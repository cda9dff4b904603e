"""Order of the waiting queue (``--schedule-policy``).

- ``fcfs``: arrival order.
- ``lpm``: longest prefix match against the radix cache first, so requests that share a cached
  prefix run while it is still cached. Matching a waiting request against the tree costs time,
  so only the first ``LPM_MAX_QUEUE`` by arrival are matched and reordered per step; the rest
  follow in arrival order (as SGLang bounds it when the queue is long).
- ``priority``: higher ``priority`` first, then arrival order.

``WaitingQueue`` keeps the scheduler's queue in its policy's order as requests arrive, are
retracted back into it and leave it (no sort of the whole queue per step); ``get_policy`` is the
same order as an in-place sort of a list, for queues built on the spot.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator
from itertools import chain, islice
from operator import attrgetter

from scheduler_proc.radix_cache import PrefixCache
from scheduler_proc.request import Request

LPM_MAX_QUEUE = 128

Policy = Callable[[list[Request], PrefixCache], None]

# Keys read at C speed (no Python call per request).
_BY_ARRIVAL = attrgetter("seq")
_BY_PRIORITY = attrgetter("priority_order")


def _fcfs(queue: list[Request], cache: PrefixCache) -> None:
    queue.sort(key=_BY_ARRIVAL)


def _lpm(queue: list[Request], cache: PrefixCache) -> None:
    _fcfs(queue, cache)
    queue[:LPM_MAX_QUEUE] = _longest_match_first(queue[:LPM_MAX_QUEUE], cache)


def _longest_match_first(head: list[Request], cache: PrefixCache) -> list[Request]:
    """``head`` (in arrival order) by cached prefix length, longest first, then arrival."""
    matched = {r.seq: len(cache.match_prefix(r.tokens).pages) for r in head}
    return sorted(head, key=lambda r: (-matched[r.seq], r.seq))


def _priority(queue: list[Request], cache: PrefixCache) -> None:
    queue.sort(key=_BY_PRIORITY)


POLICIES: dict[str, Policy] = {"fcfs": _fcfs, "lpm": _lpm, "priority": _priority}


def get_policy(name: str) -> Policy:
    """The in-place sort of the waiting queue named ``name``."""
    if name not in POLICIES:
        raise ValueError(f"unknown schedule policy {name!r}; expected one of {', '.join(POLICIES)}")
    return POLICIES[name]


class WaitingQueue:
    """The waiting requests, kept sorted by the policy's key as they come and go: ``priority`` by
    (-priority, arrival), ``fcfs`` and ``lpm`` by arrival (``lpm`` reorders its head when asked
    for the admission order). An arrival goes to the end (its key is the largest so far unless
    priorities differ), a retracted request back to its place by binary search."""

    def __init__(self, policy: str) -> None:
        get_policy(policy)  # the unknown-policy error
        self._key = _BY_PRIORITY if policy == "priority" else _BY_ARRIVAL
        self._lpm = policy == "lpm"
        self._items: list[Request] = []
        self.num_tokens = 0  # Σ num_tokens of the queued requests (the load a heartbeat reports)

    def add(self, req: Request) -> None:
        items, key = self._items, self._key
        if not items or key(items[-1]) < key(req):
            items.append(req)
        else:
            bisect.insort_right(items, req, key=key)
        self.num_tokens += req.num_tokens

    append = add  # the list spelling, for callers that treat the queue as a list

    def remove(self, req: Request) -> None:
        self._items.remove(req)
        self.num_tokens -= req.num_tokens

    def admission_order(self, cache: PrefixCache) -> Iterable[Request]:
        """The order to try admitting in this step (the queue itself unless ``lpm``)."""
        if not self._lpm:
            return self._items
        head = _longest_match_first(self._items[:LPM_MAX_QUEUE], cache)
        return chain(head, islice(self._items, LPM_MAX_QUEUE, None))

    def remove_admitted(self, admitted: list[Request], tried: int) -> None:
        """Take out ``admitted``, found among the first ``tried`` of ``admission_order``: they lie
        in the queue's first ``tried`` entries (``lpm``: that plus its reordered head)."""
        if not admitted:
            return
        span = tried + (LPM_MAX_QUEUE if self._lpm else 0)
        taken = {id(r) for r in admitted}
        self._items[:span] = [r for r in self._items[:span] if id(r) not in taken]
        self.num_tokens -= sum(r.num_tokens for r in admitted)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __bool__(self) -> bool:
        return bool(self._items)

    def __contains__(self, req: object) -> bool:
        return any(r is req for r in self._items)

    def __getitem__(self, index: int) -> Request:
        return self._items[index]
