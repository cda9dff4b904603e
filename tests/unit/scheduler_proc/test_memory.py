import pytest

from scheduler_proc.memory import DoubleFreeError, PageAllocator, SlotPool


def test_pages_start_at_one_and_counts_follow_alloc_and_free():
    alloc = PageAllocator(num_pages=6)
    assert alloc.capacity == 5 and alloc.num_free == 5
    pages = alloc.alloc(3)
    assert pages == [1, 2, 3]
    assert alloc.num_free == 2
    alloc.free(pages[:2])
    assert alloc.num_free == 4
    assert sorted(alloc.alloc(4)) == [1, 2, 4, 5]
    assert alloc.num_free == 0


def test_alloc_beyond_free_takes_nothing():
    alloc = PageAllocator(num_pages=4)
    assert alloc.alloc(4) is None
    assert alloc.num_free == 3
    assert alloc.alloc(0) == []


def test_double_free_raises_and_leaves_state_unchanged():
    alloc = PageAllocator(num_pages=5)
    pages = alloc.alloc(2)
    alloc.free([pages[0]])
    with pytest.raises(DoubleFreeError):
        alloc.free([pages[1], pages[0]])  # the second is already free
    assert alloc.num_free == 3  # pages[1] was not freed either
    with pytest.raises(DoubleFreeError):
        alloc.free([pages[1], pages[1]])
    alloc.free([pages[1]])
    assert alloc.num_free == 4


@pytest.mark.parametrize("bad", [0, 5, -1])
def test_freeing_an_id_outside_the_pool_raises(bad):
    alloc = PageAllocator(num_pages=5)
    alloc.alloc(4)
    with pytest.raises(DoubleFreeError):
        alloc.free([bad])


def test_slots_cover_zero_to_max_minus_one():
    slots = SlotPool(max_slots=3)
    assert slots.alloc(3) == [0, 1, 2]
    assert slots.alloc(1) is None
    slots.free([1])
    assert slots.alloc(1) == [1]
    with pytest.raises(DoubleFreeError):
        slots.free([1, 1])
