"""Prefill and decode cores hand requests over through the fake data plane: outputs equal an
unconstrained run, with chunking, prefix-cache hits on both sides, overlap, and xPyD."""

from __future__ import annotations

import dataclasses
import random

import pytest

from protocol.messages import KVSend, StepBatch, TransferResult
from scheduler_proc.request import ReqState
from scheduler_proc.rooms import RoomState
from tests.fakes.disagg import Cluster, expected, rooms
from tests.fakes.scheduler import fake_logprob


def prompts(rng: random.Random, lengths: list[int], prefix: list[int] | None = None) -> list[list[int]]:
    head = prefix or []
    return [head + [rng.randrange(1, 32) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (2, 1)])
def test_outputs_match_an_unconstrained_run(shape, overlap):
    cluster = Cluster(*shape, overlap=overlap, chunked_prefill_size=8)
    cluster.connect()
    rng = random.Random(sum(shape) + overlap)
    shared = prompts(rng, [12])[0]
    reqs = prompts(rng, [1, 3, 4, 5, 8, 9, 17, 30]) + prompts(rng, [2, 7, 13], prefix=shared)
    for i, prompt in enumerate(reqs):
        cluster.submit(f"r{i}", prompt, p=i % shape[0], d=i % shape[1], decode_first=i % 3 == 0, seed=i)
    cluster.run()
    for i, prompt in enumerate(reqs):
        assert cluster.log.tokens[f"r{i}"] == expected(prompt, seed=i), f"r{i}"
        assert cluster.log.finish[f"r{i}"] in ("stop", "length")
    assert not cluster.log.failed
    cluster.assert_no_leak()


def recorded_sends(cluster: Cluster) -> list[KVSend]:
    """Every ``KVSend`` the first prefill instance's steps carry from now on."""
    sends: list[KVSend] = []
    p = cluster.prefills[0]
    step = p.worker.step

    def record(batch: StepBatch):
        sends.extend(batch.transfers)
        return step(batch)

    p.worker.step = record  # type: ignore[method-assign]
    return sends


def test_chunks_send_their_completed_pages_and_the_last_carries_the_first_token():
    cluster = Cluster(chunked_prefill_size=8)
    cluster.connect()
    prompt = list(range(1, 22))  # 21 tokens: chunks of 8, 8, 5; pages of 4
    sends = recorded_sends(cluster)
    cluster.submit("a", prompt, max_new=4, stop=False)
    cluster.run()
    assert [len(s.src_pages) for s in sends] == [2, 2, 2]
    assert [(s.first, s.last) for s in sends] == [(True, False), (False, False), (False, True)]
    assert cluster.log.tokens["a"] == expected(prompt, max_new=4, stop=False)
    cluster.assert_no_leak()


def test_prefix_cache_hits_on_both_sides_move_only_the_rest():
    cluster = Cluster(chunked_prefill_size=8)
    cluster.connect()
    prefix = list(range(1, 17))  # 4 full pages
    cluster.submit("warm", prefix + [20, 21, 22], stop=False)
    cluster.run()
    moved_before = cluster.link.pages_moved
    second = prefix + [23, 24, 25, 26, 27]
    cluster.submit("hit", second, stop=False)
    cluster.run()
    assert cluster.log.cached["hit"] == 16  # the decode side held the prefix: 2 of 6 pages move
    assert cluster.link.pages_moved - moved_before == 2
    steps = cluster.prefills[0].worker.steps
    (new,) = [b for b in steps if b.new_reqs][-1].extends
    assert new.start_pos == 16  # the prefill side computed only what its own cache lacked
    assert cluster.log.tokens["hit"] == expected(second, stop=False)
    cluster.assert_no_leak()


def test_prefill_side_frees_its_pages_only_after_the_decode_side_acknowledges():
    cluster = Cluster(chunked_prefill_size=8)
    cluster.connect()
    room = cluster.submit("a", list(range(1, 14)), stop=False)
    cluster.link.hold(room)
    cluster.run()
    p = cluster.prefills[0].core
    assert p.requests["a"].state is ReqState.TRANSFERRING and p.requests["a"].res.owned
    assert cluster.decodes[0].core.requests["a"].state is ReqState.TRANSFERRING
    cluster.link.release(room)
    cluster.run()
    assert "a" not in p.requests and cluster.log.finish["a"] == "length"
    cluster.assert_no_leak()


def test_first_token_that_ends_the_request_never_takes_a_decode_slot():
    cluster = Cluster()
    cluster.connect()
    cluster.submit("one", [5, 6, 7], max_new=1)
    cluster.run()
    assert cluster.log.tokens["one"] == expected([5, 6, 7], max_new=1)
    assert cluster.log.finish["one"] == "length"
    assert not any(b.new_reqs for b in cluster.decodes[0].worker.steps)
    cluster.assert_no_leak()


def test_decode_admission_waits_for_kv_budget_with_headroom():
    cluster = Cluster(worker={"num_pages": 13}, init_new_token_ratio=1.0)  # 12 usable pages
    cluster.connect()
    for i in range(3):  # each: 2 prompt pages + 2 decode pages reserved
        cluster.submit(f"r{i}", [1 + i, 2, 3, 4, 5, 6, 7], max_new=8, stop=False)
    cluster.round()
    cluster.round()
    d = cluster.decodes[0].core
    assert [r.state for r in d.requests.values()].count(ReqState.TRANSFERRING) <= 3
    cluster.run()
    for i in range(3):
        assert cluster.log.tokens[f"r{i}"] == expected([1 + i, 2, 3, 4, 5, 6, 7], max_new=8, stop=False)
    cluster.assert_no_leak()


def test_retracted_decode_request_resumes_with_a_local_prefill():
    cluster = Cluster(worker={"num_pages": 9}, init_new_token_ratio=0.0, min_new_token_ratio=0.0)
    cluster.connect()
    reqs = {f"r{i}": [1 + i, 2, 3, 4, 5] for i in range(3)}
    for rid, prompt in reqs.items():
        cluster.submit(rid, prompt, max_new=10, stop=False)
    cluster.run()
    for rid, prompt in reqs.items():
        assert cluster.log.tokens[rid] == expected(prompt, max_new=10, stop=False), rid
    assert any(b.extends for b in cluster.decodes[0].worker.steps), "a retracted request was recomputed"
    cluster.assert_no_leak()


@pytest.mark.parametrize("overlap", [False, True])  # with overlap the ack comes before the step result
def test_logprobs_include_the_first_token_sampled_on_the_prefill_side(overlap):
    cluster = Cluster(chunked_prefill_size=8, overlap=overlap)
    cluster.connect()
    prompt = list(range(1, 22))
    cluster.submit("a", prompt, max_new=5, stop=False, return_logprob=True)
    cluster.run()
    tokens = cluster.log.tokens["a"]
    assert tokens == expected(prompt, max_new=5, stop=False)
    assert cluster.log.logprobs["a"] == [fake_logprob(t) for t in tokens]
    assert not rooms(cluster.prefills[0].core).count(RoomState.ACKNOWLEDGED)
    cluster.assert_no_leak()


def test_a_first_token_reported_without_its_logprob_is_streamed_without_one_at_once():
    """The logprob travels with the first token (``TransferResult.first_logprob``): nothing is
    waited for when a worker reports none."""
    cluster = Cluster(chunked_prefill_size=8)
    cluster.connect()
    decode = cluster.decodes[0]
    on_worker_message = decode.core.on_worker_message

    def drop_first_logprob(msg):
        if isinstance(msg, TransferResult):
            msg = dataclasses.replace(msg, first_logprob=None)
        return on_worker_message(msg)

    decode.core.on_worker_message = drop_first_logprob  # type: ignore[method-assign]
    cluster.submit("a", [1, 2, 3], max_new=4, stop=False, return_logprob=True)
    cluster.run()
    assert cluster.log.tokens["a"] == expected([1, 2, 3], max_new=4, stop=False)
    assert cluster.log.logprobs["a"] == [fake_logprob(t) for t in cluster.log.tokens["a"][1:]]
    cluster.assert_no_leak()


def test_each_send_names_its_decode_instance_s_tensor_parallel_size():
    """A prefill rank writes to the decode ranks holding its heads (``kvtransfer.tp_slices``): it
    learns their number from the decode instance's registered layout, through ``KVSend``."""
    cluster = Cluster(1, 2, chunked_prefill_size=8)
    endpoint = cluster.decodes[1].core.role.pairing.info.transfer
    endpoint.layout = dataclasses.replace(endpoint.layout, tp_size=2)
    cluster.connect()
    sends = recorded_sends(cluster)
    rooms_to = {cluster.submit(f"r{d}", list(range(1, 20)), d=d, max_new=2): d for d in (0, 1)}
    cluster.run()
    assert {(rooms_to[s.room], s.decode_tp_size) for s in sends} == {(0, 1), (1, 2)}
    cluster.assert_no_leak()
