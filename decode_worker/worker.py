"""The decode worker: runs its scheduler's steps on the engine's ``Worker`` and lands KV pages
from prefill workers through a KV receiver.

Per step, before the forward: announce the rooms to expect (``KVExpect``: their destination
pages), abort rooms, and seed the future-token map of each slot that joins with the first token
the prefill side sampled (``NewReq.next_token``), so its first decode step reads it like any
token this worker sampled itself. Registration with a prefill worker's KV sender
(``RegisterKVPeer``) runs on a thread of its own, since it waits for the peer's answer; its
outcome and the room results reach the scheduler through a forwarder with its own socket.
"""

from __future__ import annotations

import logging
import os
import threading
import traceback

import torch
import zmq

from engine.worker import Worker
from kvtransfer import KVLayout, KVReceiver, TransferConfig, TransferError, make_backend
from protocol import transport
from protocol.config import ServerArgs, WorkerConfig
from protocol.messages import (
    KVPeerRegistered,
    Message,
    RegisterKVPeer,
    Shutdown,
    StepBatch,
    StepResult,
    TransferEndpoint,
    TransferResult,
    WorkerFailed,
)

logger = logging.getLogger("pdserve.decode_worker")

RESULT_POLL_S = 0.1  # the forwarder's wait per poll (bounds how long stopping it takes)
RESULT_LINGER_MS = 2000


def transfer_config(args: ServerArgs) -> TransferConfig:
    return TransferConfig.uniform(args.transfer_timeout, args.heartbeat_interval, args.heartbeat_timeout)


class Notifier:
    """Messages to the scheduler from threads other than the step loop: room results (polled
    from the receiver here) and registration outcomes (``notify``), on one locked socket."""

    def __init__(self, ctx: zmq.Context, result_addr: str, receiver: KVReceiver) -> None:
        self._sock = transport.connect(ctx, zmq.PUSH, result_addr)
        self._lock = threading.Lock()
        self._receiver = receiver
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-results", daemon=True)
        self._thread.start()

    def notify(self, msg: Message) -> None:
        with self._lock:
            transport.send(self._sock, msg)

    def _run(self) -> None:
        while not self._stop.is_set():
            for r in self._receiver.poll(RESULT_POLL_S):
                self.notify(TransferResult(r.room, r.ok, r.first_token, r.error or ""))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
        with self._lock:
            self._sock.close(linger=RESULT_LINGER_MS)


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


def serve(dw: DecodeWorker, step_sock: zmq.Socket, result_sock: zmq.Socket) -> None:
    """Run steps until ``Shutdown``; a failing step sends ``WorkerFailed`` and re-raises."""
    while True:
        msg = transport.recv(step_sock)
        if isinstance(msg, Shutdown):
            logger.info("shutdown: %s", msg.reason or "requested")
            return
        if isinstance(msg, RegisterKVPeer):
            dw.register(msg)
            continue
        if not isinstance(msg, StepBatch):
            logger.warning("ignoring unexpected message %s", msg.TYPE)
            continue
        try:
            result = dw.step(msg)
        except Exception as e:
            _report_failure(result_sock, f"step {msg.step_id} failed: {type(e).__name__}: {e}")
            raise
        transport.send(result_sock, result)
        for refused in dw.take_refused():
            transport.send(result_sock, refused)


def run_decode_worker(cfg: WorkerConfig) -> None:
    """The worker process of a decode instance: start up (or report ``WorkerFailed``), report
    ready, serve until shutdown."""
    threads = os.environ.get("PDSERVE_TORCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    ctx = zmq.Context()
    step_sock = transport.bind(ctx, zmq.PULL, cfg.addrs.step_addr)
    result_sock = transport.connect(ctx, zmq.PUSH, cfg.addrs.result_addr)
    receiver: KVReceiver | None = None
    notifier: Notifier | None = None
    try:
        try:
            worker = Worker.create(cfg.args)
            backend = cfg.args.transfer_backend
            layout = KVLayout.from_caches(worker.runner.kv_pool.k, model=worker.loaded.name, backend=backend)
            receiver = make_backend(  # type: ignore[assignment]
                backend,
                "decode",
                layout,
                worker.runner.kv_pool.k,
                worker.runner.kv_pool.v,
                config=transfer_config(cfg.args),
            )
        except Exception as e:
            _report_failure(result_sock, f"{cfg.name}: start-up failed: {type(e).__name__}: {e}")
            raise
        assert receiver is not None
        notifier = Notifier(ctx, cfg.addrs.result_addr, receiver)
        ready = worker.ready_message()
        ready.transfer = TransferEndpoint(backend=backend)
        transport.send(result_sock, ready)
        logger.info("%s ready: %d pages, %d slots", cfg.name, worker.num_pages, worker.runner.max_slots)
        serve(DecodeWorker(worker, receiver, notifier, cfg.args.transfer_timeout), step_sock, result_sock)
    finally:
        if notifier is not None:
            notifier.close()
        if receiver is not None:
            receiver.close()
        step_sock.close()
        result_sock.close(linger=RESULT_LINGER_MS)
        ctx.term()


def _report_failure(result_sock: zmq.Socket, message: str) -> None:
    logger.error("%s\n%s", message, traceback.format_exc())
    transport.send(result_sock, WorkerFailed(message=message))
