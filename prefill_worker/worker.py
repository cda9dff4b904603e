"""The prefill worker: runs its scheduler's steps on the engine's ``Worker`` and, after each
step's forward, sends the pages that step completed to the decode workers (``KVSend``).

The send only queues the pages: the KV sender's I/O thread moves them (on CUDA after the
forward that wrote them, on its own stream) while this thread runs the next step, so a
chunk's transfer overlaps the next chunk's compute. The last send of a room carries the token
this step sampled for it. Room results (the decode side acknowledged every page, or the room
failed) reach the scheduler as ``TransferResult`` from a forwarder thread with its own socket.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
import traceback
from typing import Any

import torch
import zmq

from engine.worker import Worker
from kvtransfer import DuplicateRoom, KVLayout, KVSender, TransferConfig, make_backend
from protocol import transport
from protocol.config import ServerArgs, WorkerConfig
from protocol.messages import (
    Shutdown,
    StepBatch,
    StepResult,
    TransferEndpoint,
    TransferResult,
    WorkerFailed,
)

logger = logging.getLogger("pdserve.prefill_worker")

RESULT_POLL_S = 0.1  # the forwarder's wait per poll (bounds how long stopping it takes)
RESULT_LINGER_MS = 2000
SEND_DELAY_ENV = "PDSERVE_TEST_KV_SEND_DELAY_S"


def transfer_config(args: ServerArgs) -> TransferConfig:
    return TransferConfig.uniform(args.transfer_timeout, args.heartbeat_interval, args.heartbeat_timeout)


def transfer_address(cfg: WorkerConfig) -> str:
    """Where the KV sender binds: reachable wherever the instance's input address is (a free port
    on the same host for tcp, a sibling path for ipc); in-process names for the fake backend."""
    if cfg.args.transfer_backend == "fake":
        return f"fake://{cfg.name}"
    addr = cfg.addrs.input_addr
    if addr.startswith("tcp://"):
        host = addr.removeprefix("tcp://").rsplit(":", 1)[0]
        return f"tcp://{host}:*"
    return f"{addr}-kv"


def kv_layout(worker: Worker, backend: str) -> KVLayout:
    return KVLayout.from_caches(worker.runner.kv_pool.k, model=worker.loaded.name, backend=backend)


class ResultForwarder:
    """Forwards the data plane's room results to the scheduler from a thread of its own."""

    def __init__(self, ctx: zmq.Context, result_addr: str, side: KVSender) -> None:
        self._sock = transport.connect(ctx, zmq.PUSH, result_addr)
        self._side = side
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-results", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for r in self._side.poll(RESULT_POLL_S):
                transport.send(self._sock, TransferResult(r.room, r.ok, r.first_token, r.error or ""))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
        self._sock.close(linger=RESULT_LINGER_MS)


class DelayedSender:
    """Test hook (``PDSERVE_TEST_KV_SEND_DELAY_S``): every send leaves ``delay`` seconds late, in
    order, from a thread of its own, so that tests can abort or kill during a slow transfer."""

    def __init__(self, sender: KVSender, delay: float) -> None:
        self._sender = sender
        self._delay = delay
        self._queue: queue.Queue[tuple[float, tuple[Any, ...]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="kv-delayed-sends", daemon=True)
        self._thread.start()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sender, name)

    def send(self, *args: Any) -> bool:
        self._queue.put((time.monotonic() + self._delay, args))
        return True

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            due, args = item
            time.sleep(max(due - time.monotonic(), 0.0))
            self._sender.send(*args)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5.0)
        self._sender.close()


class PrefillWorker:
    def __init__(self, worker: Worker, sender: KVSender) -> None:
        self.worker = worker
        self.sender = sender
        self.refused: list[TransferResult] = []  # rooms the sender would not open (duplicates)

    def step(self, batch: StepBatch) -> StepResult:
        for room in batch.abort_rooms:
            self.sender.abort(room, "aborted by the prefill scheduler")
        result = self.worker.step(batch)
        if batch.transfers:
            sampled = dict(zip(result.slots, result.token_ids, strict=True))
            for send in batch.transfers:
                if send.first and not self._open(send.room):
                    continue
                first_token = sampled[send.slot] if send.last else None
                self.sender.send(send.room, send.src_pages, send.dst_pages, first_token)
        return result

    def _open(self, room: int) -> bool:
        try:
            self.sender.add_room(room)
        except DuplicateRoom as e:
            self.refused.append(TransferResult(room, ok=False, error=str(e)))
            return False
        return True

    def take_refused(self) -> list[TransferResult]:
        out, self.refused = self.refused, []
        return out


def serve(pw: PrefillWorker, step_sock: zmq.Socket, result_sock: zmq.Socket) -> None:
    """Run steps until ``Shutdown``; a failing step sends ``WorkerFailed`` and re-raises."""
    while True:
        msg = transport.recv(step_sock)
        if isinstance(msg, Shutdown):
            logger.info("shutdown: %s", msg.reason or "requested")
            return
        if not isinstance(msg, StepBatch):
            logger.warning("ignoring unexpected message %s", msg.TYPE)
            continue
        try:
            result = pw.step(msg)
        except Exception as e:
            _report_failure(result_sock, f"step {msg.step_id} failed: {type(e).__name__}: {e}")
            raise
        transport.send(result_sock, result)
        for refused in pw.take_refused():
            transport.send(result_sock, refused)


def run_prefill_worker(cfg: WorkerConfig) -> None:
    """The worker process of a prefill instance: start up (or report ``WorkerFailed``), report
    ready with the KV sender's address, serve until shutdown."""
    threads = os.environ.get("PDSERVE_TORCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    ctx = zmq.Context()
    step_sock = transport.bind(ctx, zmq.PULL, cfg.addrs.step_addr)
    result_sock = transport.connect(ctx, zmq.PUSH, cfg.addrs.result_addr)
    sender: KVSender | None = None
    forwarder: ResultForwarder | None = None
    try:
        try:
            # A prefill instance never decodes: capturing decode graphs would only cost
            # start-up time and memory.
            worker = Worker.create(dataclasses.replace(cfg.args, disable_cuda_graph=True))
            backend = cfg.args.transfer_backend
            sender = make_backend(  # type: ignore[assignment]
                backend,
                "prefill",
                kv_layout(worker, backend),
                worker.runner.kv_pool.k,
                worker.runner.kv_pool.v,
                address=transfer_address(cfg),
                config=transfer_config(cfg.args),
            )
        except Exception as e:
            _report_failure(result_sock, f"{cfg.name}: start-up failed: {type(e).__name__}: {e}")
            raise
        assert sender is not None
        delay = float(os.environ.get(SEND_DELAY_ENV, "0") or 0)
        if delay > 0:
            logger.warning("%s: every KV send is delayed by %g s (%s)", cfg.name, delay, SEND_DELAY_ENV)
            sender = DelayedSender(sender, delay)  # type: ignore[assignment]
        forwarder = ResultForwarder(ctx, cfg.addrs.result_addr, sender)
        ready = worker.ready_message()
        ready.transfer = TransferEndpoint(backend=backend, address=sender.address)
        transport.send(result_sock, ready)
        logger.info("%s ready: %d pages, KV sender at %s", cfg.name, worker.num_pages, sender.address)
        serve(PrefillWorker(worker, sender), step_sock, result_sock)
    finally:
        if forwarder is not None:
            forwarder.close()
        if sender is not None:
            sender.close()
        step_sock.close()
        result_sock.close(linger=RESULT_LINGER_MS)
        ctx.term()


def _report_failure(result_sock: zmq.Socket, message: str) -> None:
    logger.error("%s\n%s", message, traceback.format_exc())
    transport.send(result_sock, WorkerFailed(message=message))
