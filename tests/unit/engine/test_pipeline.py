"""engine/pipeline.py on the CPU, with a fake device: a thread that runs launched steps one after
the other, each for ``DEVICE_S``, and fires its event. The loop launches step N+1 while the device
computes step N (its host work overlaps), reports a step as soon as the device finished it even
with nothing else queued, keeps the results in order, reports the step in flight before any
other message and before it stops, and a failing launch sends ``WorkerFailed``."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import torch
import zmq

from bench.overhead_fakes import HostEvent
from engine.parallel.group import RankLost
from engine.parallel.steps import NO_RELAY
from engine.pipeline import LaunchedStep, Pipeline
from protocol import transport
from protocol.messages import Heartbeat, Message, Role, Shutdown, StepBatch, StepResult, WorkerFailed

DEVICE_S = 0.05  # one step on the fake device
HOST_S = 0.005  # the host work of launching one (inputs, launches)
TIMEOUT_MS = 5000


@dataclass
class FakeDevice:
    """Runs what was launched in order; records when each step started and ended."""

    started: dict[int, float] = field(default_factory=dict)
    ended: dict[int, float] = field(default_factory=dict)
    launched: dict[int, float] = field(default_factory=dict)
    fail_at: int | None = None
    _queue: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)

    def __post_init__(self) -> None:
        threading.Thread(target=self._run, daemon=True).start()

    def launch(self, batch: StepBatch) -> LaunchedStep:
        if batch.step_id == self.fail_at:
            raise RuntimeError("the forward failed")
        end = time.perf_counter() + HOST_S
        while time.perf_counter() < end:  # the host's part of launching it
            pass
        self.launched[batch.step_id] = time.perf_counter()
        event = HostEvent(timeout_s=10)
        self._queue.put((batch.step_id, event))
        return LaunchedStep(batch.step_id, [0], torch.tensor([batch.step_id]), ready=event)

    def _run(self) -> None:
        while True:
            step_id, event = self._queue.get()
            self.started[step_id] = time.perf_counter()
            time.sleep(DEVICE_S)
            self.ended[step_id] = time.perf_counter()
            event.fire()


@dataclass
class Loop:
    device: FakeDevice
    to_worker: zmq.Socket
    results: zmq.Socket
    handled: list[Message]
    thread: threading.Thread
    error: list[BaseException]

    def send(self, msg: Message) -> None:
        transport.send(self.to_worker, msg)

    def recv(self) -> Message:
        assert self.results.poll(TIMEOUT_MS), "no result"
        return transport.recv(self.results)


@pytest.fixture
def loop(tmp_path) -> Iterator[Loop]:
    ctx = zmq.Context()
    step_addr, result_addr = f"ipc://{tmp_path}/steps", f"ipc://{tmp_path}/results"
    step_sock = transport.bind(ctx, zmq.PULL, step_addr)
    results = transport.bind(ctx, zmq.PULL, result_addr)
    result_push = transport.connect(ctx, zmq.PUSH, result_addr)
    to_worker = transport.connect(ctx, zmq.PUSH, step_addr)
    device, handled, error = FakeDevice(), [], []

    def send_result(result: StepResult) -> None:
        transport.send(result_push, result)

    def report_failure(failure: WorkerFailed) -> None:
        failed = Heartbeat(name=failure.message, role=Role.UNIFIED, ready=False, input_addr="")
        transport.send(result_push, failed)

    pipeline = Pipeline(step_sock, lambda b: device.launch(b), send_result, report_failure,
                        {Heartbeat: handled.append})

    def run() -> None:
        try:
            pipeline.serve(ctx, NO_RELAY)
        except BaseException as e:  # noqa: BLE001 - checked by the test
            error.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield Loop(device, to_worker, results, handled, thread, error)
    if thread.is_alive():
        transport.send(to_worker, Shutdown())
        thread.join(5)
    for sock in (step_sock, results, result_push, to_worker):
        sock.close(linger=0)
    ctx.term()


def test_the_next_step_is_launched_while_the_device_runs_the_last_one(loop: Loop) -> None:
    """Two steps in flight, as the scheduler's overlap schedule keeps them."""
    steps = 12
    loop.send(StepBatch(step_id=0))
    loop.send(StepBatch(step_id=1))
    order = []
    for _ in range(steps):
        result = loop.recv()
        assert isinstance(result, StepResult) and result.token_ids == [result.step_id]
        order.append(result.step_id)
        if result.step_id + 2 < steps:
            loop.send(StepBatch(step_id=result.step_id + 2))
    assert order == list(range(steps))
    d = loop.device
    ahead = [n for n in range(1, steps) if d.launched[n] < d.ended[n - 1]]
    assert len(ahead) >= 0.8 * (steps - 1), f"steps launched before the last one ended: {ahead}"


def test_a_step_is_reported_when_the_device_finished_it_with_nothing_else_queued(loop: Loop) -> None:
    loop.send(StepBatch(step_id=7))
    result = loop.recv()
    assert isinstance(result, StepResult) and result.step_id == 7
    assert time.perf_counter() - loop.device.ended[7] < 1.0  # not held for a next step


def test_other_messages_and_shutdown_wait_for_the_step_in_flight(loop: Loop) -> None:
    loop.send(StepBatch(step_id=1))
    loop.send(Heartbeat(name="x", role=Role.UNIFIED, ready=True, input_addr=""))
    loop.send(StepBatch(step_id=2))
    loop.send(Shutdown())
    loop.thread.join(5)
    assert not loop.thread.is_alive() and not loop.error
    assert [loop.recv().step_id, loop.recv().step_id] == [1, 2]  # type: ignore[attr-defined]
    assert len(loop.handled) == 1


def test_a_failing_launch_is_reported_and_ends_the_loop(loop: Loop) -> None:
    loop.device.fail_at = 3
    loop.send(StepBatch(step_id=3))
    failure = loop.recv()
    assert isinstance(failure, Heartbeat)
    assert "step 3 failed: RuntimeError: the forward failed" in failure.name
    loop.thread.join(5)
    assert isinstance(loop.error[0], RuntimeError)


def test_results_of_a_step_on_the_host_and_of_one_that_sampled_nothing() -> None:
    assert LaunchedStep.empty(4).result() == StepResult(step_id=4, slots=[], token_ids=[])
    top = (torch.tensor([[1, 2], [3, 4]]), torch.tensor([[0.5, 0.25], [0.1, 0.2]]), [2, 0])
    result = LaunchedStep.copying(5, [2, 9], torch.tensor([11, 12]), None, top, 0.0).result()
    assert result.token_ids == [11, 12] and result.slots == [2, 9]
    assert (result.top_token_ids, result.top_logprobs) == ([[1, 2], []], [[0.5, 0.25], []])


def test_a_bounded_wait_gives_up_on_a_step_the_device_never_finishes() -> None:
    """A tensor-parallel rank's wait (``Worker.step_wait_limit_s``): a graph replay whose peer
    died never finishes, and nothing else would end the wait."""
    stuck = LaunchedStep(7, [0], torch.tensor([1]), ready=HostEvent())
    start = time.monotonic()
    with pytest.raises(RankLost, match="step 7 did not finish within 0.2 s: another rank"):
        stuck.result(limit_s=0.2)
    assert 0.2 <= time.monotonic() - start < 5.0
    finished = HostEvent()
    threading.Timer(0.05, finished.fire).start()
    step = LaunchedStep(8, [3], torch.tensor([42]), ready=finished)
    assert step.result(limit_s=5.0).token_ids == [42]  # a step that finishes in time is unaffected
