"""Steps launched before the previous one's result is read (CUDA workers), so that the host work
of step N+1 (receiving and decoding it, its deltas, its inputs, its kernel launches) runs while
the device computes step N instead of in the gap between the two.

``Worker.launch`` enqueues a step's forward and sampling and starts copying what was sampled to
pinned host memory, marked by a CUDA event (``LaunchedStep.copying``); ``LaunchedStep.result``
waits for that event only, not for the steps enqueued after it, and builds the ``StepResult``.
``Pipeline.serve`` holds at most one step in flight besides the one it launches: a new
``StepBatch`` is launched, then the step in flight is reported. With nothing queued it waits for
whichever comes first, the next step or the device finishing the step in flight (a thread
waits on the event, which releases the GIL, and wakes the loop through an inproc socket:
``CompletionWatch``), so a result leaves as soon as it exists and a step is launched as soon as
it arrives. The scheduler keeps two steps in flight (its overlap schedule), so step N+1 is
usually queued before step N ends.

On the CPU a step computes inside ``launch``: this loop would only hold each result back by a
step, so CPU workers keep the plain loop; the choice is made once at start-up (``run_worker``).
Of a tensor-parallel instance only rank 0 runs this loop; the other ranks run each relayed step
to its end (``engine.parallel.ranks.follow_steps``).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import zmq

from engine.parallel.group import RankLost
from engine.parallel.steps import Relay
from protocol.messages import (
    INTERNAL,
    PEER_UNAVAILABLE,
    Message,
    Shutdown,
    StepBatch,
    StepResult,
    WorkerFailed,
    decode,
)

logger = logging.getLogger("pdserve.worker")

WAKE_CHECK_MS = 200  # longest wait before pending signal handlers get to run


class DeviceEvent(Protocol):
    """What ``LaunchedStep`` needs of a ``torch.cuda.Event`` (tests give their own)."""

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


@dataclass
class LaunchedStep:
    """A step whose forward and sampling are enqueued; its sampled values reach ``tokens`` etc.
    (host tensors) once ``ready`` has fired (None: they are there already)."""

    step_id: int
    slots: list[int]
    tokens: torch.Tensor | None  # None: the step sampled nothing
    logprobs: torch.Tensor | None = None
    top: tuple[torch.Tensor, torch.Tensor, list[int]] | None = None  # top-logprob ids, values, k per row
    started: float = 0.0
    ready: DeviceEvent | None = None
    device: torch.device | None = None  # the CUDA device of ``ready``: waited on from any thread

    @classmethod
    def empty(cls, step_id: int) -> LaunchedStep:
        return cls(step_id, [], None)

    @classmethod
    def copying(
        cls,
        step_id: int,
        slots: list[int],
        tokens: torch.Tensor,
        logprobs: torch.Tensor | None,
        top: tuple[torch.Tensor, torch.Tensor, list[int]] | None,
        started: float,
    ) -> LaunchedStep:
        """The step, with its sampled values on their way to the host: on CUDA, copies into
        pinned memory enqueued behind the sampling and an event after them."""
        if not tokens.is_cuda:
            return cls(step_id, slots, tokens, logprobs, top, started)
        host_tokens = _to_host(tokens)
        host_logprobs = None if logprobs is None else _to_host(logprobs)
        host_top = None if top is None else (_to_host(top[0]), _to_host(top[1]), top[2])
        ready = torch.cuda.Event()
        ready.record()  # after the copies
        return cls(step_id, slots, host_tokens, host_logprobs, host_top, started, ready, tokens.device)

    def done(self) -> bool:
        """Whether ``result`` would return without waiting for the device (never blocks)."""
        return self.ready is None or self.ready.query()

    def wait(self, limit_s: float | None = None) -> None:
        """Until the sampled values are on the host; at most ``limit_s`` (None: unbounded), then
        ``RankLost``. A tensor-parallel rank bounds its wait: the collectives inside a CUDA
        graph are watched by no process-group timeout, so a replay whose peer died would spin
        on the device forever."""
        if self.ready is None:
            return
        if limit_s is not None:
            self._wait_until(time.monotonic() + limit_s, limit_s)
            return
        with torch.cuda.device(self.device) if self.device is not None else contextlib.nullcontext():
            self.ready.synchronize()

    def _wait_until(self, deadline: float, limit_s: float) -> None:
        assert self.ready is not None
        while not self.ready.query():
            if time.monotonic() > deadline:
                raise RankLost(f"step {self.step_id} did not finish within {limit_s:g} s: another rank "
                               "of this instance is gone or stuck")
            time.sleep(0)  # let the other threads (the KV transfer's) run between polls

    def result(self, limit_s: float | None = None) -> StepResult:
        """The step's ``StepResult``, once it is on the host (``wait``)."""
        self.wait(limit_s)
        if self.tokens is None:
            return StepResult(step_id=self.step_id, slots=[], token_ids=[])
        result = StepResult(
            step_id=self.step_id,
            slots=self.slots,
            token_ids=self.tokens.tolist(),
            logprobs=None if self.logprobs is None else self.logprobs.tolist(),
            forward_ms=(time.perf_counter() - self.started) * 1000.0,
        )
        if self.top is not None:
            ids, values, ks = self.top
            result.top_token_ids = [row[:k] for row, k in zip(ids.tolist(), ks, strict=True)]
            result.top_logprobs = [row[:k] for row, k in zip(values.tolist(), ks, strict=True)]
        return result


def _to_host(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


class CompletionWatch:
    """Wakes a loop polling ``sock`` when the device finished a watched step."""

    def __init__(self, ctx: zmq.Context) -> None:
        """Its sockets are closed again if anything (a SIGTERM's ``SystemExit``) interrupts
        this: one left open would make the process's ``Context.term`` wait forever."""
        addr = f"inproc://pdserve-step-completions-{id(self)}"
        self._steps: queue.SimpleQueue[LaunchedStep | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="step-completions", daemon=True)
        self.sock = ctx.socket(zmq.PAIR)
        self._signal = ctx.socket(zmq.PAIR)
        try:
            self.sock.bind(addr)
            self._signal.connect(addr)
            self._thread.start()
        except BaseException:
            self._close_sockets()
            raise

    def watch(self, step: LaunchedStep) -> None:
        self._steps.put(step)

    def take_wakeups(self) -> None:
        while True:
            try:
                self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return

    def _run(self) -> None:
        while (step := self._steps.get()) is not None:
            with contextlib.suppress(Exception):  # the loop's own wait on the step raises it again
                step.wait()
            self._signal.send(b"")

    def close(self) -> None:
        self._steps.put(None)
        self._thread.join(timeout=5.0)
        self._close_sockets()

    def _close_sockets(self) -> None:
        self._signal.close(linger=0)
        self.sock.close(linger=0)


@dataclass
class Pipeline:
    """What ``serve`` needs of the worker process and its role."""

    step_sock: zmq.Socket
    launch: Callable[[StepBatch], LaunchedStep]
    send_result: Callable[[StepResult], None]  # the result and what follows it (``after_step``)
    report_failure: Callable[[WorkerFailed], None]  # to the scheduler
    handlers: Mapping[type[Message], Callable[[Any], None]]

    def serve(self, ctx: zmq.Context, relay: Relay) -> None:
        """Run steps until ``Shutdown``; every other message is handled in order, after the step
        in flight was reported. A failing launch or result sends ``WorkerFailed`` and re-raises."""
        watch = CompletionWatch(ctx)
        try:
            poller = zmq.Poller()
            poller.register(self.step_sock, zmq.POLLIN)
            poller.register(watch.sock, zmq.POLLIN)
            in_flight: LaunchedStep | None = None
            while True:
                events = dict(poller.poll(WAKE_CHECK_MS))
                if watch.sock in events:
                    watch.take_wakeups()
                if in_flight is not None and in_flight.done():
                    self._report(in_flight)
                    in_flight = None
                if self.step_sock not in events:
                    if not events and in_flight is None:
                        relay.idle()
                    continue
                msg = receive(self.step_sock, relay)
                if isinstance(msg, StepBatch):
                    launched = self._launch(msg)
                    if in_flight is not None:
                        self._report(in_flight)
                    in_flight = launched
                    watch.watch(launched)
                    continue
                if in_flight is not None:
                    self._report(in_flight)
                    in_flight = None
                if handle_other(msg, self.handlers, relay):
                    return
        finally:
            watch.close()

    def _launch(self, batch: StepBatch) -> LaunchedStep:
        with failure_reported(f"step {batch.step_id}", self.report_failure):
            return self.launch(batch)

    def _report(self, step: LaunchedStep) -> None:
        with failure_reported(f"step {step.step_id}", self.report_failure):
            result = step.result()
        self.send_result(result)


def receive(step_sock: zmq.Socket, relay: Relay) -> Message:
    """The next message, its frame relayed to the other ranks first."""
    frame = step_sock.recv()
    relay.forward(frame)
    return decode(frame)


def handle_other(msg: Message, handlers: Mapping[type[Message], Callable[[Any], None]], relay: Relay) -> bool:
    """A message that is not a step: True for ``Shutdown`` (the loop ends there), else its
    role's handler runs (or it is ignored, logged)."""
    if isinstance(msg, Shutdown):
        logger.info("shutdown: %s", msg.reason or "requested")
        relay.finish(shutdown_relayed=True)
        return True
    if (handle := handlers.get(type(msg))) is not None:
        handle(msg)
    else:
        logger.warning("ignoring unexpected message %s", msg.TYPE)
    return False


@contextlib.contextmanager
def failure_reported(what: str, report_failure: Callable[[WorkerFailed], None]) -> Iterator[None]:
    """``what`` (a step, the start-up) raising is told to the scheduler (``WorkerFailed``)
    before the error goes on: ``peer_unavailable`` when another rank of the instance is gone
    (the instance is lost, as a dead one is), else ``internal``."""
    try:
        yield
    except Exception as e:
        code = PEER_UNAVAILABLE if isinstance(e, RankLost) else INTERNAL
        report_failure(WorkerFailed(f"{what} failed: {type(e).__name__}: {e}", code))
        raise
