import pytest

from protocol.messages import SamplingParams, TokenizedRequest
from scheduler_proc.memory import PageAllocator
from scheduler_proc.policy import LPM_MAX_QUEUE, WaitingQueue, get_policy
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


def test_lpm_matches_only_the_first_lpm_max_queue_by_arrival(cache):
    """A long queue: its head (by arrival) is reordered by match, the rest follow in arrival
    order and are never matched against the tree."""
    queue = WaitingQueue("lpm")
    for seq in range(LPM_MAX_QUEUE + 10):
        hit = seq in (5, LPM_MAX_QUEUE + 3)
        queue.add(req(seq, [9, 9, 8, 8, 7, 7, 1] if hit else [1]))
    matched = []
    match = cache.match_prefix

    def counting(tokens):
        matched.append(tokens)
        return match(tokens)

    cache.match_prefix = counting
    order = [r.seq for r in queue.admission_order(cache)]
    assert len(matched) == LPM_MAX_QUEUE
    assert order[0] == 5 and order[1:LPM_MAX_QUEUE] == [s for s in range(LPM_MAX_QUEUE) if s != 5]
    assert order[LPM_MAX_QUEUE:] == list(range(LPM_MAX_QUEUE, LPM_MAX_QUEUE + 10))


@pytest.mark.parametrize("policy", ["fcfs", "lpm", "priority"])
def test_waiting_queue_stays_in_policy_order(policy, cache):
    import random

    rng = random.Random(policy)
    queue, live = WaitingQueue(policy), []
    for seq in range(300):
        r = req(seq, [rng.randrange(1, 9) for _ in range(rng.randrange(1, 6))], priority=rng.randrange(3))
        if rng.random() < 0.2 and live:  # a retracted request comes back with its old seq
            back = live.pop(rng.randrange(len(live)))
            queue.add(back)
        queue.add(r)
        if rng.random() < 0.3:
            taken = list(queue)[: rng.randrange(0, 4)]
            queue.remove_admitted(taken, len(taken))
            live += taken
        if rng.random() < 0.1 and len(queue):
            gone = queue[rng.randrange(len(queue))]
            queue.remove(gone)
        items = list(queue)
        key = (lambda r: r.priority_order) if policy == "priority" else (lambda r: r.seq)
        expected = sorted(items, key=key)
        assert items == expected
        assert queue.num_tokens == sum(r.num_tokens for r in items)


def test_waiting_queue_refuses_an_unknown_policy():
    with pytest.raises(ValueError, match="unknown schedule policy"):
        WaitingQueue("random")
