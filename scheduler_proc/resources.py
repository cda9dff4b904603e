"""The instance's KV bookkeeping (``PagePool``: page allocator, worker slots and prefix cache, the
metadata of the engine's ``KVPool`` tensors) and the one object that owns a request's share of it
(``ReqResources``: slot, page-table row, owned pages, prefix-cache lock).

Every terminal path (finish, abort, failure, retraction) goes through ``ReqResources.release``,
which is idempotent, so no path can leak or double-free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from scheduler_proc.memory import PageAllocator, SlotPool
from scheduler_proc.radix_cache import NoPrefixCache, PrefixCache, PrefixMatch, RadixCache, TreeNode


@dataclass
class _MatchMemo:
    owner: object
    key: tuple[int, int]  # (length of the matched tokens, the cache's version) when matched
    match: PrefixMatch


class PagePool:
    def __init__(self, num_pages: int, page_size: int, max_slots: int, disable_radix_cache: bool) -> None:
        self.page_size = page_size
        self.pages = PageAllocator(num_pages)
        self.slots = SlotPool(max_slots)
        self.cache: PrefixCache = (
            NoPrefixCache() if disable_radix_cache else RadixCache(page_size, self.pages)
        )
        self._last_match: _MatchMemo | None = None

    @property
    def total_pages(self) -> int:
        return self.pages.capacity

    @property
    def free_pages(self) -> int:
        return self.pages.num_free

    def available_pages(self) -> int:
        """Pages that an allocation can get: free ones plus unlocked cached ones (evicted on demand)."""
        return self.pages.num_free + self.cache.evictable_pages

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def match_prefix_of(self, owner: object, length: int, tokens: Callable[[], list[int]]) -> PrefixMatch:
        """``cache.match_prefix(tokens())`` for ``owner``'s ``length`` tokens. A request that cannot
        be admitted is matched again every step: while neither its tokens nor the tree changed
        since its last match, that match still holds and only counts as a use of the prefix."""
        memo = self._last_match
        if memo is not None and memo.owner is owner and memo.key == (length, self.cache.version):
            self.cache.touch(memo.match.node)
            return memo.match
        match = self.cache.match_prefix(tokens())
        self._last_match = _MatchMemo(owner, (length, self.cache.version), match)
        return match

    def alloc_pages(self, n: int) -> list[int] | None:
        """``n`` pages, evicting cached prefixes as needed; None when even that is not enough."""
        short = n - self.pages.num_free
        if short > 0:
            self.cache.evict(short)
        return self.pages.alloc(n)


@dataclass(slots=True)  # one per request: no __dict__ to look attributes up in or for the GC to walk
class ReqResources:
    slot: int | None = None
    row: list[int] = field(default_factory=list)  # the worker's page-table row of ``slot``
    owned: list[int] = field(default_factory=list)  # pages of ``row`` that the cache does not own
    node: TreeNode | None = None  # locked prefix-cache node covering the cached part of ``row``
    in_cache: int = 0  # leading pages of ``row`` that ``node`` covers

    @property
    def held(self) -> bool:
        return self.slot is not None or bool(self.row) or self.node is not None

    def take_prefix(self, pool: PagePool, match: PrefixMatch) -> None:
        """Start the row with a cached prefix, locked so it cannot be evicted while in use."""
        assert not self.row, "a prefix starts an empty row"
        pool.cache.lock(match.node)
        self.node = match.node
        self.row = list(match.pages)
        self.in_cache = len(match.pages)

    def append_pages(self, pages: list[int]) -> None:
        self.row.extend(pages)
        self.owned.extend(pages)

    def cache_prefix(self, pool: PagePool, tokens: list[int]) -> None:
        """Hand the full pages of ``tokens`` (whose KV is computed or scheduled) to the prefix
        cache and move the lock to the node that ends them. Pages whose tokens another request
        cached first stay owned here: the worker's row still points at them."""
        n = min(len(tokens) // pool.page_size, len(self.row))
        if n == self.in_cache and self.node is not None:  # nothing new (e.g. a chunk that waited)
            pool.cache.touch(self.node)
            return
        result = pool.cache.insert(tokens[: n * pool.page_size], self.row[:n])
        taken = set(self.row[result.cached_before : n])
        if taken:
            self.owned = [p for p in self.owned if p not in taken]
        pool.cache.lock(result.node)
        pool.cache.unlock(self.node)
        self.node, self.in_cache = result.node, n

    def release(self, pool: PagePool, cache_tokens: list[int] | None = None) -> int | None:
        """Give everything back (first caching ``cache_tokens`` if given); returns the slot
        that was released (the worker must be told), or None if nothing was held."""
        if not self.held:
            return None
        if cache_tokens is not None:
            self.cache_prefix(pool, cache_tokens)
        pool.pages.free(self.owned)
        pool.cache.unlock(self.node)
        slot = self.slot
        if slot is not None:
            pool.slots.free([slot])
        self.slot, self.row, self.owned, self.node, self.in_cache = None, [], [], None, 0
        return slot
