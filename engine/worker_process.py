"""The worker process around ``Worker`` (engine/worker.py): its end of the scheduler's two
sockets, start-up failures reported, the step loop (plain, or pipelined on CUDA:
``engine.pipeline``) and the roles' hooks into it (``StepHooks``); the prefill and decode
workers build on ``worker_process`` with their own hooks. ``run_worker`` is the plain worker of
a unified instance."""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import zmq

from engine.faults import with_step_faults
from engine.parallel.group import TensorParallel, close_tensor_parallel
from engine.parallel.steps import NO_RELAY, Relay, make_relay
from engine.pipeline import LaunchedStep, Pipeline, failure_reported, handle_other, receive
from engine.weights import resolve_device
from engine.worker import Worker
from protocol import transport
from protocol.config import ServerArgs, WorkerConfig
from protocol.faults import Faults
from protocol.messages import (
    Message,
    StepBatch,
    StepResult,
    WorkerFailed,
    WorkerReady,
)

logger = logging.getLogger("pdserve.worker")

RESULT_LINGER_MS = 2000  # let the last message (WorkerFailed) leave before the socket closes
SIGNAL_CHECK_MS = 200  # longest wait for a step before pending signal handlers get to run

T = TypeVar("T")


class Closable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=Closable)


@dataclass
class StepHooks:
    """What a role adds to the plain step loop: how a ``StepBatch`` is run, the messages sent
    right after each step's result, and handlers for message types beyond the step protocol."""

    step: Callable[[StepBatch], StepResult]
    after_step: Callable[[], Iterable[Message]] = lambda: ()  # e.g. the rooms the KV side refused
    handlers: Mapping[type[Message], Callable[[Any], None]] = field(default_factory=dict)
    launch: Callable[[StepBatch], LaunchedStep] | None = None  # given: steps are pipelined


@dataclass
class WorkerProcess:
    """A worker process's end of its scheduler's two sockets, and what it closes on exit."""

    name: str
    ctx: zmq.Context
    step_sock: zmq.Socket
    result_sock: zmq.Socket
    exit_stack: contextlib.ExitStack

    def start(self, create: Callable[[], T]) -> T:
        """Run the start-up ``create``; if it fails, tell the scheduler (``WorkerFailed``) and re-raise."""
        with failure_reported(f"{self.name}: start-up", self._report_failure):
            return create()

    def join_tensor_parallel(self, cfg: WorkerConfig) -> TensorParallel:
        """Rank 0's place in its instance's group (``SINGLE_RANK`` for one rank), left with the
        others when the process ends."""
        from engine.parallel.ranks import join_tensor_parallel

        tp = self.start(lambda: join_tensor_parallel(cfg))
        self.exit_stack.callback(close_tensor_parallel, tp)
        return tp

    def closing(self, resource: C) -> C:
        """Close ``resource`` when the process ends: the last one registered first, all before the sockets."""
        return self.exit_stack.enter_context(contextlib.closing(resource))

    def announce_ready(self, ready: WorkerReady) -> None:
        """Tell the scheduler the worker is ready, and log what it offers."""
        transport.send(self.result_sock, ready)
        sender = ready.transfer.address if ready.transfer else ""
        kv_sender = f", KV sender at {sender}" if sender else ""
        logger.info("%s ready: %d pages, %d slots%s", self.name, ready.num_pages, ready.max_slots, kv_sender)

    def serve(self, hooks: StepHooks, relay: Relay = NO_RELAY) -> None:
        """Run steps until ``Shutdown``; a failing step sends ``WorkerFailed`` and re-raises.
        ``relay``: where each frame goes first (a tensor-parallel instance's other ranks).

        Waits in bounded polls, not one blocking receive: the kernel may deliver SIGTERM to any
        thread (zmq's I/O threads, torch's pool), and Python runs the handler only when the main
        thread comes back to the interpreter, which a receive blocked in libzmq never does.
        However it ends, the other ranks are told (``Relay.finish``)."""
        freeze_start_up_heap()
        try:
            if hooks.launch is None:
                self._serve(hooks, relay)
            else:
                send = functools.partial(self._send_result, hooks)
                Pipeline(self.step_sock, hooks.launch, send, self._report_failure, hooks.handlers).serve(
                    self.ctx, relay)
        finally:
            relay.finish()

    def _serve(self, hooks: StepHooks, relay: Relay) -> None:
        while True:
            if not self.step_sock.poll(SIGNAL_CHECK_MS):
                relay.idle()
                continue
            msg = receive(self.step_sock, relay)
            if isinstance(msg, StepBatch):
                self._run_step(hooks, msg)
            elif handle_other(msg, hooks.handlers, relay):
                return

    def _run_step(self, hooks: StepHooks, batch: StepBatch) -> None:
        with failure_reported(f"step {batch.step_id}", self._report_failure):
            result = hooks.step(batch)
        self._send_result(hooks, result)

    def _send_result(self, hooks: StepHooks, result: StepResult) -> None:
        transport.send(self.result_sock, result)
        for msg in hooks.after_step():
            transport.send(self.result_sock, msg)

    def _report_failure(self, failure: WorkerFailed) -> None:
        logger.error("%s\n%s", failure.message, traceback.format_exc())
        transport.send(self.result_sock, failure)


@contextlib.contextmanager
def worker_process(cfg: WorkerConfig) -> Iterator[WorkerProcess]:
    """Apply the process settings (``apply_process_settings``), bind the step socket and connect
    the result socket; on exit close what the role registered, then the sockets (the result
    socket lingers, so that a last ``WorkerFailed`` still leaves)."""
    apply_process_settings(cfg.args)
    ctx = zmq.Context()
    step_sock = transport.bind(ctx, zmq.PULL, cfg.addrs.step_addr)
    result_sock = transport.connect(ctx, zmq.PUSH, cfg.addrs.result_addr)
    try:
        with contextlib.ExitStack() as exit_stack:
            yield WorkerProcess(cfg.name, ctx, step_sock, result_sock, exit_stack)
    finally:
        step_sock.close()
        result_sock.close(linger=RESULT_LINGER_MS)
        ctx.term()


def freeze_start_up_heap() -> None:
    """Move what start-up made (torch's modules, the model, Numba's and oneDNN's state) out of
    the garbage collector's sight (``gc.freeze``, as the scheduler does: scheduler_proc/heap.py),
    or every full collection walks it again: served on the CPU, those walks were 1.3 % of the
    worker's time (py-spy, ``bench.vs_vllm`` float32). A step's objects are freed by reference
    counting as before."""
    gc.collect()
    gc.freeze()


def apply_process_settings(args: ServerArgs) -> None:
    """A worker computing on the CPU: torch threads and the allocator (``engine.cpu_env``). On
    CUDA only an explicit thread count (flag or environment) is applied."""
    from engine import cpu_env

    if resolve_device(args.device).type == "cpu":
        cpu_env.apply_threads(args.cpu_omp_threads)
        cpu_env.tune_malloc()
    elif args.cpu_omp_threads is not None or os.environ.get(cpu_env.LEGACY_THREADS_ENV):
        cpu_env.apply_threads(args.cpu_omp_threads)


def run_worker(cfg: WorkerConfig) -> None:
    """The worker process of a unified instance: start up (or report ``WorkerFailed`` and
    raise), report ready, serve until shutdown. A failing step ends the process (non-zero),
    which frees its memory; its scheduler fails the requests in flight."""
    from engine.parallel.ranks import run_follower

    if cfg.tp_rank > 0:
        run_follower(cfg)
        return
    faults = Faults.from_env()
    with worker_process(cfg) as proc:
        tp = proc.join_tensor_parallel(cfg)
        worker = proc.start(lambda: Worker.create(cfg.args, tp=tp))
        proc.announce_ready(worker.ready_message())
        launch = with_step_faults(worker.launch, faults)  # one wrapper, whichever loop runs
        hooks = StepHooks(lambda batch: launch(batch).result(), launch=launch if worker.pipelined else None)
        proc.serve(hooks, make_relay(tp))
