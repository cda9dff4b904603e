"""The prefill and decode workers on the real engine (embedded model, float32, CPU) with the
``fake`` KV transfer backend, in one process: a prompt prefilled in chunks on one worker and
decoded on the other gives the reference's greedy tokens."""

from __future__ import annotations

import shutil

import pytest
import torch
import zmq

from decode_worker.worker import DecodeWorker
from engine.worker import Worker
from kvtransfer import TransferConfig, layout_from_caches, make_backend
from kvtransfer.notifier import Notifier
from prefill_worker.worker import PrefillWorker
from protocol import transport
from protocol.config import EMBEDDED
from protocol.dataplane import TokenLogprob
from protocol.messages import (
    ExtendReq,
    KVExpect,
    KVPeerRegistered,
    KVSend,
    NewReq,
    PageAppend,
    RegisterKVPeer,
    SamplingParams,
    StepBatch,
    TransferResult,
)
from tests.oracles import greedy_reference
from tests.unit.engine.engine_driver import small_args

SENDER = "fake://prefill-under-test"
MAX_NEW = 6


@pytest.fixture(scope="module")
def workers():
    torch.set_num_threads(1)
    args = small_args(transfer_backend="fake", transfer_timeout=10.0, dtype="float32")
    ctx = zmq.Context()
    directory = transport.ipc_dir()
    results_addr = transport.ipc_addr(directory, "results")
    results = transport.bind(ctx, zmq.PULL, results_addr)
    sides = []
    try:
        prefill, decode = Worker.create(args), Worker.create(args)
        for worker, role in ((prefill, "prefill"), (decode, "decode")):
            layout = layout_from_caches(worker.runner.kv_pool.k, model=worker.loaded.name, backend="fake")
            pool = worker.runner.kv_pool
            kw = {"address": SENDER} if role == "prefill" else {}
            config = TransferConfig.from_args(args)
            sides.append(make_backend("fake", role, layout, pool.k, pool.v, config=config, **kw))
        sender, receiver = sides
        notifier = Notifier(ctx, results_addr, receiver, linger_ms=0)
        report = lambda _attempt, outcome: notifier.notify(outcome)  # noqa: E731
        decoding = DecodeWorker(decode, receiver, report, args.transfer_timeout)
        yield PrefillWorker(prefill, sender), decoding, results
        notifier.close()
    finally:
        for side in sides:
            side.close()
        results.close()
        ctx.term()
        shutil.rmtree(directory, ignore_errors=True)


def next_message(sock: zmq.Socket):
    assert sock.poll(10_000), "nothing from the decode worker"
    return transport.recv(sock)


def test_prefill_in_chunks_then_decode_on_the_other_worker(workers):
    pw, dw, results = workers
    prompt = [EMBEDDED.bos_token_id, *range(40, 61)]  # 22 tokens: pages 1..6 on both sides
    sampling = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    dw.register(RegisterKVPeer("tcp://prefill-instance", SENDER))
    assert next_message(results) == KVPeerRegistered("tcp://prefill-instance", ok=True)

    room, src, dst = 7, [1, 2, 3, 4, 5, 6], [11, 12, 13, 14, 15, 16]
    dw.step(StepBatch(step_id=0, expects=[KVExpect(room, SENDER, dst)]))
    pw.step(
        StepBatch(
            step_id=0,
            new_reqs=[NewReq(0, sampling)],
            page_appends=[PageAppend(0, src)],
            extends=[ExtendReq(0, 0, prompt[:16], sample=False)],
            transfers=[KVSend(room, 0, src[:4], dst[:4], first=True)],
        )
    )
    last = pw.step(
        StepBatch(
            step_id=1,
            extends=[ExtendReq(0, 16, prompt[16:])],
            transfers=[KVSend(room, 0, src[4:], dst[4:], last=True)],
        )
    )
    done = next_message(results)
    assert isinstance(done, TransferResult) and done.ok and done.first_token == last.token_ids[0]
    assert [r.ok for r in pw.sender.poll(1.0)] == [True]  # the prefill side may free its pages now
    pw.step(StepBatch(step_id=2, released=[0]))

    tokens = [done.first_token]
    position = len(prompt)
    first = StepBatch(
        step_id=1,
        new_reqs=[NewReq(0, sampling, next_token=done.first_token)],
        page_appends=[PageAppend(0, [*dst, 17, 18])],
    )
    batch = first
    while len(tokens) < MAX_NEW:
        batch.decode_slots, batch.decode_positions = [0], [position]
        tokens += dw.step(batch).token_ids
        position += 1
        batch = StepBatch(step_id=batch.step_id + 1)
    dw.step(StepBatch(step_id=batch.step_id, released=[0]))
    assert tokens == greedy_reference(None, [prompt], MAX_NEW)[0]


def test_an_expect_for_an_unregistered_peer_fails_the_room_not_the_worker(workers):
    _, dw, results = workers
    dw.step(StepBatch(step_id=50, expects=[KVExpect(99, "fake://nobody", [20])]))
    (refused,) = dw.take_refused()
    assert refused.room == 99 and not refused.ok and "register" in refused.error
    assert not results.poll(100)


def test_the_first_token_and_its_logprob_reach_the_decode_scheduler_together(workers):
    pw, dw, results = workers
    dw.register(RegisterKVPeer("tcp://prefill-instance", SENDER))
    assert next_message(results) == KVPeerRegistered("tcp://prefill-instance", ok=True)
    prompt = [EMBEDDED.bos_token_id, *range(70, 79)]  # 10 tokens: pages 1..3
    sampling = SamplingParams(max_new_tokens=2, temperature=0.0, return_logprob=True)
    room, src, dst = 8, [1, 2, 3], [21, 22, 23]
    dw.step(StepBatch(step_id=60, expects=[KVExpect(room, SENDER, dst)]))
    prefilled = pw.step(
        StepBatch(
            step_id=60,
            new_reqs=[NewReq(0, sampling)],
            page_appends=[PageAppend(0, src)],
            extends=[ExtendReq(0, 0, prompt)],
            transfers=[KVSend(room, 0, src, dst, first=True, last=True)],
        )
    )
    done = next_message(results)
    assert isinstance(done, TransferResult) and done.ok
    assert prefilled.logprobs is not None
    assert done.first_token == prefilled.token_ids[0]
    assert done.first_logprob == TokenLogprob(prefilled.logprobs[0])
    assert [r.ok for r in pw.sender.poll(1.0)] == [True]
    pw.step(StepBatch(step_id=61, released=[0]))
