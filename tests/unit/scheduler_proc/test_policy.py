import pytest

from protocol.messages import SamplingParams, TokenizedRequest
from scheduler_proc.memory import PageAllocator
from scheduler_proc.policy import LPM_MAX_QUEUE, get_policy
from scheduler_proc.radix_cache import RadixCache
from scheduler_proc.request import Request


def req(seq, prompt=(1, 2, 3, 4, 5), priority=0):
    msg = TokenizedRequest(
        rid=f"r{seq}", input_ids=list(prompt), sampling=SamplingParams(), priority=priority
    )
    return Request.from_message(msg, seq)


@pytest.fixture
def cache():
    alloc = PageAllocator(32)
    cache = RadixCache(2, alloc)
    cache.insert([9, 9, 8, 8, 7, 7], alloc.alloc(3))
    return cache


def test_fcfs_is_arrival_order(cache):
    queue = [req(2), req(0), req(1)]
    get_policy("fcfs")(queue, cache)
    assert [r.seq for r in queue] == [0, 1, 2]


def test_priority_higher_first_then_arrival(cache):
    queue = [req(0, priority=0), req(1, priority=5), req(2, priority=5), req(3, priority=-1)]
    get_policy("priority")(queue, cache)
    assert [r.seq for r in queue] == [1, 2, 0, 3]


def test_lpm_longest_cached_prefix_first(cache):
    queue = [req(0, [1, 2, 3]), req(1, [9, 9, 8, 5]), req(2, [9, 9, 8, 8, 7, 7, 1]), req(3, [9, 9, 1])]
    get_policy("lpm")(queue, cache)
    assert [r.seq for r in queue] == [2, 1, 3, 0]


def test_lpm_falls_back_to_fcfs_on_a_long_queue(cache):
    queue = [req(i, [1]) for i in range(LPM_MAX_QUEUE, 0, -1)] + [req(0, [9, 9, 8, 8, 7, 7, 1])]
    queue.append(req(LPM_MAX_QUEUE + 1, [9, 9, 8, 8, 7, 7, 1]))
    get_policy("lpm")(queue, cache)
    assert [r.seq for r in queue] == list(range(LPM_MAX_QUEUE + 2))


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="schedule policy"):
        get_policy("random")
