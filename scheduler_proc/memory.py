"""Id pools for the two resources the scheduler hands out: KV pages and worker slots.

The scheduler only does the bookkeeping; the worker owns the memory behind the ids. A double
free means two owners believed they held the same page, which would corrupt another request's
KV cache, so it raises instead of being ignored.
"""

from __future__ import annotations


class DoubleFreeError(RuntimeError):
    """An id was freed that is not currently allocated."""


class IdPool:
    """A free list over a fixed range of integer ids; the lowest free ids are handed out first."""

    def __init__(self, ids: range, what: str) -> None:
        self._ids = ids
        self._what = what
        self._free = list(reversed(ids))  # pop() from the end yields the lowest id
        self._is_free = bytearray(b"\x01") * len(ids)

    @property
    def capacity(self) -> int:
        return len(self._ids)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int] | None:
        """``n`` ids, or None (and nothing taken) when fewer than ``n`` are free."""
        if n > len(self._free):
            return None
        if n == 0:
            return []
        taken = self._free[-n:]
        del self._free[-n:]
        start = self._ids.start
        for i in taken:
            self._is_free[i - start] = 0
        taken.reverse()
        return taken

    def free(self, ids: list[int]) -> None:
        """Return ``ids``; raises DoubleFreeError (freeing nothing) if any is not allocated."""
        start = self._ids.start
        seen: set[int] = set()
        for i in ids:
            if i not in self._ids or self._is_free[i - start] or i in seen:
                raise DoubleFreeError(f"{self._what} {i} freed but not allocated")
            seen.add(i)
        for i in ids:
            self._is_free[i - start] = 1
        self._free.extend(reversed(ids))


class PageAllocator(IdPool):
    """KV pages 1..num_pages-1; page 0 is the worker's padding page and is never handed out."""

    def __init__(self, num_pages: int) -> None:
        super().__init__(range(1, num_pages), "page")


class SlotPool(IdPool):
    """Worker slots (rows of the worker's page table) 0..max_slots-1."""

    def __init__(self, max_slots: int) -> None:
        super().__init__(range(max_slots), "slot")
