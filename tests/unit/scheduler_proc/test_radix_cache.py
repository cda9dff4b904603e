import random

import pytest

from scheduler_proc.memory import PageAllocator
from scheduler_proc.radix_cache import NoPrefixCache, RadixCache

PS = 4


@pytest.fixture
def alloc():
    return PageAllocator(num_pages=64)


@pytest.fixture
def cache(alloc):
    return RadixCache(PS, alloc)


def cached(cache, alloc, tokens):
    """Insert ``tokens`` (whole pages) with fresh pages, as a finishing request would."""
    pages = alloc.alloc(len(tokens) // PS)
    result = cache.insert(tokens, pages)
    alloc.free(pages[: result.cached_before])  # the caller's duplicates
    return pages, result


def test_match_is_page_aligned(cache, alloc):
    pages, _ = cached(cache, alloc, list(range(12)))
    assert cache.match_prefix(list(range(12))).pages == pages
    assert cache.match_prefix(list(range(11))).pages == pages[:2]  # the partial last page is not used
    assert cache.match_prefix(list(range(20))).pages == pages
    assert cache.match_prefix([0, 1, 2, 9, 4, 5, 6, 7]).pages == []  # mismatch inside the first page
    assert cache.match_prefix([]).pages == []


def test_insert_reports_already_cached_pages(cache, alloc):
    first, result = cached(cache, alloc, list(range(8)))
    assert result.cached_before == 0 and cache.cached_pages == 2
    _, result = cached(cache, alloc, list(range(16)))
    assert result.cached_before == 2  # the first two pages were cached already: the tree kept its own
    assert cache.cached_pages == 4
    assert cache.match_prefix(list(range(16))).pages[:2] == first
    _, result = cached(cache, alloc, list(range(16)))
    assert result.cached_before == 4 and cache.cached_pages == 4


def test_diverging_insert_splits_the_node(cache, alloc):
    a = list(range(12))
    b = list(range(4)) + [99] * 8
    pages_a, _ = cached(cache, alloc, a)
    pages_b, result = cached(cache, alloc, b)
    assert result.cached_before == 1
    assert cache.match_prefix(a).pages == pages_a
    assert cache.match_prefix(b).pages == pages_a[:1] + pages_b[1:]
    (shared,) = cache.root.children.values()
    assert shared.key.tolist() == list(range(4)) and len(shared.children) == 2
    assert cache.cached_pages == 5


def test_match_partway_splits_so_a_lock_covers_only_the_match(cache, alloc):
    tokens = list(range(12))
    cached(cache, alloc, tokens)
    match = cache.match_prefix(tokens[:8])
    assert len(match.pages) == 2 and match.node.key.tolist() == tokens[:8]
    cache.lock(match.node)
    assert cache.evictable_pages == 1  # the unmatched tail page stays evictable
    assert cache.evict(10) == 1
    assert cache.match_prefix(tokens).pages == match.pages


def test_lock_protects_from_eviction_until_unlocked(cache, alloc):
    pages, result = cached(cache, alloc, list(range(8)))
    cache.lock(result.node)
    cache.lock(result.node)
    assert cache.evictable_pages == 0 and cache.evict(8) == 0
    cache.unlock(result.node)
    assert cache.evict(8) == 0  # still locked once
    cache.unlock(result.node)
    assert cache.evictable_pages == 2
    free_before = alloc.num_free
    assert cache.evict(1) == 2  # a whole leaf goes
    assert alloc.num_free == free_before + 2 and cache.cached_pages == 0
    with pytest.raises(RuntimeError):
        cache.unlock(result.node)


def test_lock_on_a_child_protects_its_ancestors(cache, alloc):
    cached(cache, alloc, list(range(4)) + [7] * 4)
    _, result = cached(cache, alloc, list(range(4)) + [8] * 4)
    cache.lock(result.node)  # locks the [8] leaf and the shared first page
    assert cache.evict(100) == 1  # only the unlocked [7] leaf
    assert cache.match_prefix(list(range(4)) + [8] * 4).pages != []


def test_eviction_is_lru_and_cascades_to_parents(cache, alloc):
    old, _ = cached(cache, alloc, [1] * 8)
    new, _ = cached(cache, alloc, [2] * 8)
    cache.match_prefix([1] * 8)  # touch: [2] is now the least recently used
    assert cache.evict(1) == 2
    assert cache.match_prefix([2] * 8).pages == []
    assert cache.match_prefix([1] * 8).pages == old
    # a split leaves a parent with one child; evicting the child makes the parent a leaf
    cached(cache, alloc, [1] * 4 + [3] * 4)
    assert cache.evict(100) == 3 and cache.cached_pages == 0
    assert alloc.num_free == alloc.capacity


def test_disabled_cache_takes_nothing():
    cache = NoPrefixCache()
    assert cache.match_prefix([1] * 8).pages == []
    assert cache.insert([1] * 8, [5, 6]).cached_before == 2
    assert cache.cached_pages == 0 and cache.evict(4) == 0


def test_eviction_does_not_walk_the_tree(cache, alloc, monkeypatch):
    """Eviction pops candidates from a maintained heap: its cost must not grow with the tree."""
    for i in range(10):
        cached(cache, alloc, [i] * 4)
    cache.match_prefix([0] * 4)  # touched: now the most recently used

    def walk(self):
        raise AssertionError("evict walked the whole tree")

    monkeypatch.setattr(RadixCache, "_nodes", walk)
    assert cache.evict(9) == 9
    assert [leaf.key.tolist() for leaf in cache.root.children.values()] == [[0] * 4]


def _candidates(cache):
    """Brute force: the unlocked leaves, the only nodes eviction may take."""
    out, stack = [], list(cache.root.children.values())
    while stack:
        node = stack.pop()
        stack.extend(node.children.values())
        if not node.children and node.lock_ref == 0:
            out.append(node)
    return out


def test_randomized_eviction_takes_the_least_recently_used_unlocked_leaf():
    rng = random.Random(0)
    alloc = PageAllocator(num_pages=400)
    cache = RadixCache(PS, alloc)
    locked = []
    for _ in range(600):
        op = rng.random()
        tokens = [rng.randrange(3) for _ in range(PS * rng.randrange(1, 5))]
        if op < 0.45 and alloc.num_free >= 8:
            cached(cache, alloc, tokens)
        elif op < 0.6:
            cache.match_prefix(tokens)
        elif op < 0.7:
            node = cache.match_prefix(tokens).node
            if node is not cache.root:
                cache.lock(node)
                locked.append(node)
        elif op < 0.8 and locked:
            cache.unlock(locked.pop(rng.randrange(len(locked))))
        else:
            candidates = _candidates(cache)
            if not candidates:
                assert cache.evict(1) == 0
                continue
            victim = min(candidates, key=lambda n: n.last_access)
            assert cache.evict(1) == len(victim.pages)
            assert victim not in cache._nodes()
        assert cache.cached_pages + alloc.num_free == alloc.capacity
        assert cache.evictable_pages == sum(
            len(n.pages) for n in cache._nodes() if n is not cache.root and n.lock_ref == 0
        )
