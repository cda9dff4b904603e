"""The decode worker: runs its scheduler's steps on the engine's ``Worker`` and lands KV pages
from prefill workers through a KV receiver.

Per step, before the forward: announce the rooms to expect (``KVExpect``: their destination
pages), abort rooms, and seed the future-token map of each slot that joins with the first token
the prefill side sampled (``NewReq.next_token``), so its first decode step reads it like any
token this worker sampled itself. Registration with a prefill worker's KV sender
(``RegisterKVPeer``) runs on a thread of its own, since it waits for the peer's answer; its
outcome, the room results (with the first token and its logprob) and the link states reach the
scheduler through ``kvtransfer.notifier.Notifier``. A data-plane link lost later registers again by
itself (``kvtransfer.links``); the scheduler need not ask again.

With ``--tp-size`` > 1 rank 0's receiver takes whole pages (every KV head) and lands its own
heads; the other ranks' heads reach them over the step relay before rank 0's next frame, and a
room's result waits until they have (``kvtransfer.tp_hub``). Every rank seeds the first tokens.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import cast

from engine.parallel.group import SINGLE_RANK, TensorParallel
from engine.parallel.ranks import Handlers, refuse_tensor_parallel, run_follower
from engine.parallel.steps import FlushingRelay, Relay, StepRelay, make_relay
from engine.worker import Worker
from engine.worker_process import RESULT_LINGER_MS, StepHooks, worker_process
from kvtransfer import KVReceiver, TransferConfig, TransferError, layout_from_caches, make_backend
from kvtransfer.kernels import PagedCaches, PoolLander
from kvtransfer.notifier import Notifier
from kvtransfer.tp_hub import HeldResults, HubLander, InstanceHeads, instance_layout, land_shards
from protocol.config import WorkerConfig
from protocol.dataplane import KVShardPages
from protocol.messages import (
    KVPeerRegistered,
    RegisterKVPeer,
    StepBatch,
    StepResult,
    TransferEndpoint,
    TransferResult,
)

logger = logging.getLogger("pdserve.decode_worker")


def seed_first_tokens(worker: Worker, batch: StepBatch) -> None:
    """Each joining slot's first decode reads the token the prefill side sampled."""
    next_tokens = worker.runner.next_tokens
    for new in batch.new_reqs:
        if new.next_token is not None:
            next_tokens[new.slot] = new.next_token


class DecodeWorker:
    def __init__(self, worker: Worker, receiver: KVReceiver, notifier: Notifier, register_timeout: float):
        self.worker = worker
        self.receiver = receiver
        self.notifier = notifier
        self.register_timeout = register_timeout
        self.refused: list[TransferResult] = []  # rooms the receiver would not take

    def step(self, batch: StepBatch) -> StepResult:
        for expect in batch.expects:
            try:
                self.receiver.expect(expect.room, expect.peer, expect.dst_pages)
            except (TransferError, ValueError) as e:
                self.refused.append(TransferResult(expect.room, ok=False, error=str(e)))
        for room in batch.abort_rooms:
            self.receiver.abort(room, "aborted by the decode scheduler")
        seed_first_tokens(self.worker, batch)
        return self.worker.step(batch)

    def take_refused(self) -> list[TransferResult]:
        out, self.refused = self.refused, []
        return out

    def register(self, msg: RegisterKVPeer) -> None:
        threading.Thread(target=self._register, args=(msg,), name="kv-register", daemon=True).start()

    def _register(self, msg: RegisterKVPeer) -> None:
        try:
            self.receiver.register(msg.transfer_addr, timeout=self.register_timeout)
        except TransferError as e:
            logger.warning("KV registration with %s failed: %s", msg.transfer_addr, e)
            self.notifier.notify(KVPeerRegistered(msg.prefill_addr, ok=False, error=str(e)))
            return
        logger.info("KV receiver registered with %s (%s)", msg.transfer_addr, msg.prefill_addr)
        self.notifier.notify(KVPeerRegistered(msg.prefill_addr, ok=True))


def start_decode(
    cfg: WorkerConfig, tp: TensorParallel = SINGLE_RANK
) -> tuple[Worker, KVReceiver, HubLander | None]:
    """The engine's worker (this rank's part, with ``tp``) and the KV receiver over its pool,
    advertising every rank's KV heads; with several ranks, the lander that keeps the others'."""
    worker = Worker.create(cfg.args, tp=tp)
    backend = cfg.args.transfer_backend
    pool = worker.runner.kv_pool
    pool_layout = layout_from_caches(pool.k, model=worker.loaded.name, backend=backend)
    layout, lander = pool_layout, None
    if tp.size > 1:
        heads = InstanceHeads.of_splits(worker.config.num_kv_heads, tp.splits(worker.config))
        layout, lander = instance_layout(pool_layout, heads), HubLander(PagedCaches(pool.k, pool.v), heads)
    receiver = make_backend(
        backend,
        "decode",
        layout,
        pool.k,
        pool.v,
        config=TransferConfig.from_args(cfg.args),
        pool_layout=pool_layout if lander is not None else None,
        lander=lander,
    )
    return worker, cast(KVReceiver, receiver), lander


def follower_hooks(worker: Worker, tp: TensorParallel) -> tuple[Callable[[StepBatch], StepResult], Handlers]:
    """A rank other than 0 of a decode instance: seed the first tokens and step; land its heads
    of the pages rank 0 received (rank 0 alone registers with prefill workers)."""
    pool = worker.runner.kv_pool
    lander = PoolLander(PagedCaches(pool.k, pool.v))

    def step(batch: StepBatch) -> StepResult:
        seed_first_tokens(worker, batch)
        return worker.step(batch)

    return step, {KVShardPages: lambda msg: land_shards(lander, msg, tp.rank), RegisterKVPeer: lambda _: None}


def relay_of(tp: TensorParallel, lander: HubLander | None) -> Relay:
    if lander is None:
        return make_relay(tp)
    return FlushingRelay(StepRelay(tp), lander.flush)


def run_decode_worker(cfg: WorkerConfig) -> None:
    """The worker process of a decode instance: start up (or report ``WorkerFailed``), report
    ready, serve until shutdown."""
    if cfg.tp_rank > 0:
        refuse_tensor_parallel(cfg)
        run_follower(cfg, hooks=follower_hooks)
        return
    with worker_process(cfg) as proc:
        proc.start(lambda: refuse_tensor_parallel(cfg))
        tp = proc.join_tensor_parallel(cfg)
        worker, receiver, lander = proc.start(lambda: start_decode(cfg, tp))
        receiver = proc.closing(receiver)
        results = receiver if lander is None else HeldResults(receiver, lander)
        notifier = proc.closing(Notifier(proc.ctx, cfg.addrs.result_addr, results, RESULT_LINGER_MS))
        proc.announce_ready(worker.ready_message(TransferEndpoint(receiver.layout)))
        dw = DecodeWorker(worker, receiver, notifier, cfg.args.transfer_timeout)
        hooks = StepHooks(dw.step, after_step=dw.take_refused, handlers={RegisterKVPeer: dw.register})
        proc.serve(hooks, relay_of(tp, lander))
