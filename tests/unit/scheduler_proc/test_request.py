import pytest

from protocol.messages import SamplingParams, TokenizedRequest
from scheduler_proc.request import IllegalTransition, ReqState, Request
from scheduler_proc.resources import PagePool

S = ReqState
LIVE = [S.PENDING, S.PREFILLING, S.TRANSFERRING, S.DECODING]


def request(state=S.PENDING):
    msg = TokenizedRequest(rid="r", input_ids=[1, 2, 3], sampling=SamplingParams(stop_token_ids=[0]))
    req = Request.from_message(msg, seq=0)
    req.state = state
    return req


@pytest.mark.parametrize(
    "path",
    [
        [S.PREFILLING, S.DECODING, S.FINISHED],
        [S.PREFILLING, S.TRANSFERRING, S.DECODING, S.FINISHED],
        [S.PREFILLING, S.PENDING, S.PREFILLING, S.DECODING, S.PENDING, S.PREFILLING],  # retractions
    ],
)
def test_legal_paths(path):
    req = request()
    for state in path:
        req.transition(state)
    assert req.state is path[-1]


@pytest.mark.parametrize("state", LIVE)
@pytest.mark.parametrize("end", [S.ABORTED, S.FAILED])
def test_abort_and_failure_reach_every_live_state(state, end):
    req = request(state)
    req.transition(end)
    assert not req.live


@pytest.mark.parametrize(
    "start,to",
    [
        (S.PENDING, S.DECODING),
        (S.PENDING, S.FINISHED),
        (S.PREFILLING, S.FINISHED),
        (S.DECODING, S.PREFILLING),
        (S.TRANSFERRING, S.PENDING),
        (S.FINISHED, S.ABORTED),
        (S.ABORTED, S.FAILED),
        (S.FAILED, S.PENDING),
    ],
)
def test_illegal_transitions_raise(start, to):
    req = request(start)
    with pytest.raises(IllegalTransition):
        req.transition(to)
    assert req.state is start


def test_finish_reason_stop_includes_the_stop_token_and_length_at_max():
    req = request()
    req.sampling.max_new_tokens = 2
    req.output_ids.append(5)
    assert req.finish_reason(5) is None
    req.output_ids.append(0)
    assert req.finish_reason(0) == "stop"
    req.output_ids[-1] = 6
    assert req.finish_reason(6) == "length"


def test_release_is_idempotent_and_returns_everything():
    pool = PagePool(num_pages=10, page_size=2, max_slots=2, disable_radix_cache=False)
    req = request(S.DECODING)
    req.res.take_prefix(pool, pool.cache.match_prefix(req.tokens))
    req.res.slot = pool.slots.alloc(1)[0]
    req.res.append_pages(pool.alloc_pages(2))
    req.kv_len = 3
    assert req.res.release(pool, req.kv_tokens()) == 0
    assert req.res.release(pool, req.kv_tokens()) is None
    assert req.res.release(pool) is None
    assert pool.free_pages == 8 and pool.cache.cached_pages == 1  # one full page of computed KV cached
    assert pool.slots.num_free == 2


def test_release_with_a_cached_prefix_unlocks_it():
    pool = PagePool(num_pages=10, page_size=2, max_slots=2, disable_radix_cache=False)
    pages = pool.alloc_pages(2)
    pool.cache.insert([1, 2, 3, 4], pages)
    req = request()
    req.res.take_prefix(pool, pool.cache.match_prefix([1, 2, 3]))
    assert req.res.row == pages[:1] and pool.cache.evictable_pages == 1
    req.res.release(pool)
    assert pool.cache.evictable_pages == 2 and pool.free_pages == 7
