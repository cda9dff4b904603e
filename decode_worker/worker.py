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
"""

from __future__ import annotations

import logging
import threading
from typing import cast

from engine.parallel.ranks import refuse_tensor_parallel
from engine.worker import RESULT_LINGER_MS, StepHooks, Worker, worker_process
from kvtransfer import KVReceiver, TransferConfig, TransferError, layout_from_caches, make_backend
from kvtransfer.notifier import Notifier
from protocol.config import WorkerConfig
from protocol.messages import (
    KVPeerRegistered,
    RegisterKVPeer,
    StepBatch,
    StepResult,
    TransferEndpoint,
    TransferResult,
)

logger = logging.getLogger("pdserve.decode_worker")



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
        next_tokens = self.worker.runner.next_tokens
        for new in batch.new_reqs:
            if new.next_token is not None:
                next_tokens[new.slot] = new.next_token
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


def start_decode(cfg: WorkerConfig) -> tuple[Worker, KVReceiver]:
    """The engine's worker and the KV receiver over its pool."""
    refuse_tensor_parallel(cfg)
    worker = Worker.create(cfg.args)
    backend = cfg.args.transfer_backend
    layout = layout_from_caches(worker.runner.kv_pool.k, model=worker.loaded.name, backend=backend)
    receiver = make_backend(
        backend,
        "decode",
        layout,
        worker.runner.kv_pool.k,
        worker.runner.kv_pool.v,
        config=TransferConfig.from_args(cfg.args),
    )
    return worker, cast(KVReceiver, receiver)


def run_decode_worker(cfg: WorkerConfig) -> None:
    """The worker process of a decode instance: start up (or report ``WorkerFailed``), report
    ready, serve until shutdown."""
    with worker_process(cfg) as proc:
        worker, receiver = proc.start(lambda: start_decode(cfg))
        receiver = proc.closing(receiver)
        notifier = proc.closing(Notifier(proc.ctx, cfg.addrs.result_addr, receiver, RESULT_LINGER_MS))
        proc.announce_ready(worker.ready_message(TransferEndpoint(receiver.layout)))
        dw = DecodeWorker(worker, receiver, notifier, cfg.args.transfer_timeout)
        proc.serve(StepHooks(dw.step, after_step=dw.take_refused, handlers={RegisterKVPeer: dw.register}))
