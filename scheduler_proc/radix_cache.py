"""Prefix cache over KV pages: a radix tree whose keys are token ids and whose values are page ids.

Only full pages are cached, so every edge holds a multiple of ``page_size`` tokens and node
splits happen on page boundaries. A request that uses a cached prefix locks the path to its
node (a reference count on every node up to the root); only unlocked leaves are evicted, least
recently used first. ``NoPrefixCache`` is the ``--disable-radix-cache`` variant: it caches
nothing, so finished requests free their pages.
"""

from __future__ import annotations

import heapq
import itertools
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from scheduler_proc.memory import PageAllocator

TOKEN_TYPECODE = "i"  # token ids as 32-bit ints: a vocabulary id always fits


def token_array(tokens: Sequence[int]) -> array:
    """``tokens`` as a compact array: one buffer the garbage collector never walks (a list of
    ids costs each full collection 20-40 ns per id), compared and sliced at C speed."""
    if type(tokens) is array and tokens.typecode == TOKEN_TYPECODE:  # type: ignore[union-attr]
        return tokens  # type: ignore[return-value]
    return array(TOKEN_TYPECODE, tokens)


@dataclass(eq=False)
class TreeNode:
    key: array  # token ids (token_array), a multiple of page_size
    pages: list[int]  # one page per page_size tokens of key
    parent: TreeNode | None
    children: dict[tuple[int, ...], TreeNode] = field(default_factory=dict)
    lock_ref: int = 0
    last_access: int = 0


@dataclass
class PrefixMatch:
    pages: list[int]  # the cached pages of the longest page-aligned prefix
    node: TreeNode | None  # the node ending that prefix (lock it while the pages are in use)


@dataclass
class InsertResult:
    cached_before: int  # leading pages that were already cached: the tree did not take those
    node: TreeNode | None  # the node ending the inserted key


class PrefixCache(Protocol):
    @property
    def cached_pages(self) -> int: ...

    @property
    def evictable_pages(self) -> int: ...

    @property
    def version(self) -> int:
        """Changes whenever a ``match_prefix`` result could change (nodes added, split or evicted)."""
        ...

    def match_prefix(self, tokens: list[int]) -> PrefixMatch: ...

    def touch(self, node: TreeNode | None) -> None: ...

    def insert(self, tokens: list[int], pages: list[int]) -> InsertResult: ...

    def lock(self, node: TreeNode | None) -> None: ...

    def unlock(self, node: TreeNode | None) -> None: ...

    def evict(self, num_pages: int) -> int: ...


class RadixCache:
    """Eviction candidates (unlocked leaves) sit in a heap keyed by last access that is kept up
    to date lazily: a node is pushed whenever it may have become a candidate or was accessed,
    and an entry is checked when popped (still in the tree, an unlocked leaf, not accessed
    since). So eviction costs O(log n) per evicted leaf instead of a walk over the whole tree;
    the heap is rebuilt when stale entries outnumber the nodes."""

    def __init__(self, page_size: int, allocator: PageAllocator) -> None:
        self.page_size = page_size
        self._allocator = allocator
        self.root = TreeNode(key=token_array(()), pages=[], parent=None)
        self.root.lock_ref = 1  # the root is never evicted
        self._clock = itertools.count(1)
        self._evictable = 0  # pages in nodes with lock_ref == 0
        self._protected = 0  # pages in locked nodes
        self._version = 0
        self._num_nodes = 0  # nodes below the root
        self._heap: list[tuple[int, int, TreeNode]] = []  # (last_access, push order, node)
        self._pushes = itertools.count()

    @property
    def cached_pages(self) -> int:
        return self._evictable + self._protected

    @property
    def evictable_pages(self) -> int:
        return self._evictable

    @property
    def version(self) -> int:
        return self._version

    def match_prefix(self, tokens: list[int]) -> PrefixMatch:
        """The longest cached page-aligned prefix of ``tokens``; splits a node matched partway."""
        tokens = token_array(tokens)[: len(tokens) // self.page_size * self.page_size]
        node, pos, pages = self.root, 0, []
        now = next(self._clock)
        while pos < len(tokens):
            child = node.children.get(self._edge(tokens, pos))
            if child is None:
                break
            n = self._common_len(child.key, tokens, pos)
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            pages.extend(child.pages)
            node, pos = child, pos + n
        self._push_if_candidate(node)
        return PrefixMatch(pages=pages, node=node)

    def touch(self, node: TreeNode | None) -> None:
        """Mark the path to ``node`` as used now, as a ``match_prefix`` ending there would."""
        now = next(self._clock)
        end = node
        while node is not None and node is not self.root:
            node.last_access = now
            node = node.parent
        self._push_if_candidate(end)

    def insert(self, tokens: list[int], pages: list[int]) -> InsertResult:
        """Cache ``pages`` (full pages) as the KV of ``tokens``. Pages whose tokens were already
        cached stay with the caller (``cached_before`` of them, leading); the tree takes the rest."""
        assert len(tokens) == len(pages) * self.page_size, "insert takes whole pages"
        tokens = token_array(tokens)
        node, pos = self.root, 0
        now = next(self._clock)
        while pos < len(tokens):
            child = node.children.get(self._edge(tokens, pos))
            if child is None:
                new = TreeNode(key=tokens[pos:], pages=pages[pos // self.page_size :], parent=node)
                new.last_access = now
                node.children[self._edge(tokens, pos)] = new
                self._evictable += len(new.pages)
                self._num_nodes += 1
                self._version += 1
                self._push_if_candidate(new)
                return InsertResult(cached_before=pos // self.page_size, node=new)
            n = self._common_len(child.key, tokens, pos)
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            node, pos = child, pos + n
        self._push_if_candidate(node)
        return InsertResult(cached_before=len(pages), node=node)

    def lock(self, node: TreeNode | None) -> None:
        while node is not None and node is not self.root:
            if node.lock_ref == 0:
                self._evictable -= len(node.pages)
                self._protected += len(node.pages)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: TreeNode | None) -> None:
        while node is not None and node is not self.root:
            if node.lock_ref <= 0:
                raise RuntimeError("radix cache: unlock of a node that is not locked")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._protected -= len(node.pages)
                self._evictable += len(node.pages)
                self._push_if_candidate(node)
            node = node.parent

    def evict(self, num_pages: int) -> int:
        """Free at least ``num_pages`` pages from unlocked leaves, least recently used first
        (fewer if not enough are evictable); returns how many were freed."""
        freed = 0
        heap = self._heap
        while freed < num_pages and heap:
            last_access, _, leaf = heapq.heappop(heap)
            if not self._is_candidate(leaf) or leaf.last_access != last_access:
                continue  # stale: evicted, locked, grown children or accessed since it was pushed
            parent = leaf.parent
            assert parent is not None
            del parent.children[self._edge(leaf.key, 0)]
            leaf.parent = None
            self._allocator.free(leaf.pages)
            self._evictable -= len(leaf.pages)
            self._num_nodes -= 1
            self._version += 1
            freed += len(leaf.pages)
            self._push_if_candidate(parent)
        return freed

    def _is_candidate(self, node: TreeNode) -> bool:
        """An unlocked leaf still in the tree (the root is always locked)."""
        return node.lock_ref == 0 and not node.children and node.parent is not None

    def _push_if_candidate(self, node: TreeNode | None) -> None:
        if node is None or not self._is_candidate(node):
            return
        heapq.heappush(self._heap, (node.last_access, next(self._pushes), node))
        if len(self._heap) > 2 * self._num_nodes + 64:
            self._rebuild_heap()

    def _rebuild_heap(self) -> None:
        self._heap = [(n.last_access, next(self._pushes), n) for n in self._nodes() if self._is_candidate(n)]
        heapq.heapify(self._heap)

    def _edge(self, tokens: list[int], pos: int) -> tuple[int, ...]:
        return tuple(tokens[pos : pos + self.page_size])

    def _common_len(self, key: list[int], tokens: list[int], pos: int) -> int:
        """Tokens of ``key`` matching ``tokens[pos:]``, rounded down to whole pages."""
        if tokens[pos : pos + len(key)] == key:  # the common case, compared at C speed
            return len(key)
        ps, n = self.page_size, 0
        limit = min(len(key), len(tokens) - pos)
        while n + ps <= limit and key[n : n + ps] == tokens[pos + n : pos + n + ps]:
            n += ps
        return n

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cut ``child`` after ``n`` tokens; returns the new upper node."""
        parent = child.parent
        assert parent is not None and 0 < n < len(child.key)
        cut = n // self.page_size
        upper = TreeNode(
            key=child.key[:n],
            pages=child.pages[:cut],
            parent=parent,
            lock_ref=child.lock_ref,
            last_access=child.last_access,
        )
        child.key, child.pages, child.parent = child.key[n:], child.pages[cut:], upper
        upper.children[self._edge(child.key, 0)] = child
        parent.children[self._edge(upper.key, 0)] = upper
        self._num_nodes += 1
        self._version += 1
        return upper

    def _nodes(self) -> list[TreeNode]:
        out, stack = [], [self.root]
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out


class NoPrefixCache:
    """``--disable-radix-cache``: matches nothing and takes no pages, so callers free them."""

    cached_pages = 0
    evictable_pages = 0
    version = 0

    def match_prefix(self, tokens: list[int]) -> PrefixMatch:
        return PrefixMatch(pages=[], node=None)

    def touch(self, node: TreeNode | None) -> None:
        pass

    def insert(self, tokens: list[int], pages: list[int]) -> InsertResult:
        return InsertResult(cached_before=len(pages), node=None)

    def lock(self, node: TreeNode | None) -> None:
        pass

    def unlock(self, node: TreeNode | None) -> None:
        pass

    def evict(self, num_pages: int) -> int:
        return 0
