"""The fake processes of ``bench/overhead.py``: a GPU worker that sleeps a fixed time per step, and
an instance that streams tokens to a front end as fast as it takes them.

``python -m bench.overhead_fakes worker --config '<JSON>'`` serves a real scheduler: it reports
ready, then runs a CUDA worker's step loop (``engine.pipeline``: the next step launched while
the GPU runs the last) around a GPU that sleeps ``step_ms`` per step, and records how long the
GPU waited before each step; at ``Shutdown`` it writes that record (JSON) to ``report``.

``python -m bench.overhead_fakes producer --config '<JSON>'`` stands in for a unified instance
behind a real front end: it attaches, sends heartbeats, takes requests, and once ``clients``
requests are live sends one ``BatchOutput`` per step with a token for every live request,
``tokens`` steps in all (the last one finishes them).
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

import torch
import zmq

from engine.parallel.steps import NO_RELAY
from engine.pipeline import LaunchedStep, Pipeline
from protocol import transport
from protocol.config import EMBEDDED
from protocol.messages import (
    AttachFrontend,
    BatchOutput,
    FinishReason,
    Heartbeat,
    Message,
    ModelInfo,
    Role,
    Shutdown,
    StepBatch,
    TokenizedRequest,
    WorkerReady,
    encode,
)

TOKEN = 97  # "a" in the embedded byte-level tokenizer


def embedded_model(context_len: int = 8192) -> ModelInfo:
    return ModelInfo(
        EMBEDDED.name, "LlamaForCausalLM", EMBEDDED.vocab_size, context_len, EMBEDDED.num_layers,
        EMBEDDED.num_kv_heads, EMBEDDED.head_dim, "float32", [EMBEDDED.eos_token_id],
    )


# ------------------------------------------------------------------------------------ worker


@dataclass
class WorkerSpec:
    step_addr: str
    result_addr: str
    report: str  # where the step record goes (JSON)
    step_ms: float
    num_pages: int
    page_size: int
    max_slots: int


@dataclass
class StepRecord:
    """Per step: its decode rows, how long the "GPU" waited for it (s) since the last one ended,
    and how long it ran."""

    rows: list[int] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)
    busy: list[float] = field(default_factory=list)


class HostEvent:
    """A ``DeviceEvent`` (engine/pipeline.py) that the host fires: a stand-in device's.
    ``synchronize`` gives up after ``timeout_s`` (None: never), an AssertionError."""

    def __init__(self, timeout_s: float | None = None) -> None:
        self._done = threading.Event()
        self._timeout_s = timeout_s

    def query(self) -> bool:
        return self._done.is_set()

    def synchronize(self) -> None:
        assert self._done.wait(self._timeout_s), "the stand-in device never finished the step"

    def fire(self) -> None:
        self._done.set()


class FakeGpu:
    """Runs the launched steps one after the other, ``step_ms`` each (a sleep: no CPU), and
    records how long it sat idle before each: from the end of the last step to the launch of
    this one, when that came later."""

    def __init__(self, step_ms: float) -> None:
        self.step_s = step_ms / 1e3
        self.record = StepRecord()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._last_end: float | None = None
        threading.Thread(target=self._run, daemon=True).start()

    def launch(self, batch: StepBatch) -> LaunchedStep:
        rows = [e.slot for e in batch.extends if e.sample] + list(batch.decode_slots)
        event = HostEvent()
        self._queue.put((time.perf_counter(), len(batch.decode_slots), event))
        tokens = torch.full((len(rows),), TOKEN, dtype=torch.int64)
        return LaunchedStep(batch.step_id, rows, tokens, ready=event)

    def _run(self) -> None:
        while True:
            launched, decode_rows, event = self._queue.get()
            start = time.perf_counter()
            time.sleep(self.step_s)
            end = time.perf_counter()
            if self._last_end is not None:
                self.record.waits.append(max(0.0, launched - self._last_end))
                self.record.rows.append(decode_rows)
                self.record.busy.append(end - start)
            self._last_end = end
            event.fire()


def run_worker(spec: WorkerSpec) -> None:
    """A CUDA worker's step loop (``engine.pipeline``: the next step launched while the GPU runs
    the last) around a GPU that sleeps ``step_ms`` per step."""
    ctx = zmq.Context()
    steps = transport.bind(ctx, zmq.PULL, spec.step_addr)
    results = transport.connect(ctx, zmq.PUSH, spec.result_addr)
    gpu = FakeGpu(spec.step_ms)
    try:
        transport.send(results, WorkerReady(embedded_model(), spec.num_pages, spec.page_size,
                                            spec.max_slots, 8192, "fake"))
        pipeline = Pipeline(steps, gpu.launch, lambda result: transport.send(results, result),
                            lambda failure: transport.send(results, failure), {})
        pipeline.serve(ctx, NO_RELAY)
    finally:
        with open(spec.report, "w") as f:
            json.dump(asdict(gpu.record), f)
        steps.close(linger=0)
        results.close(linger=1000)
        ctx.term()


# ------------------------------------------------------------------------------------ producer


@dataclass
class ProducerSpec:
    input_addr: str
    clients: int  # requests to wait for before streaming
    tokens: int  # steps streamed; the last finishes every request
    frontends: int = 1  # front ends to wait for; each gets every step, as from a real instance


def run_producer(spec: ProducerSpec) -> None:
    ctx = zmq.Context()
    pull = transport.bind(ctx, zmq.PULL, spec.input_addr)
    pushes: dict[str, zmq.Socket] = {}  # by front-end output address
    live: list[str] = []

    def send_all(msg: Message) -> None:
        frame = encode(msg)
        for push in pushes.values():
            push.send(frame)

    try:
        while len(pushes) < spec.frontends or len(live) < spec.clients:
            for msg in transport.recv_all(pull) if pull.poll(100) else []:
                if isinstance(msg, AttachFrontend) and msg.output_addr not in pushes:
                    pushes[msg.output_addr] = transport.connect(ctx, zmq.PUSH, msg.output_addr)
                    transport.send(pushes[msg.output_addr], _heartbeat(spec.input_addr))
                elif isinstance(msg, TokenizedRequest):
                    live.append(msg.rid)
                elif isinstance(msg, Shutdown):
                    return
            send_all(_heartbeat(spec.input_addr))
        for i in range(spec.tokens):
            last = i == spec.tokens - 1
            finished = FinishReason.LENGTH if last else None
            send_all(BatchOutput.of_tokens(live, [TOKEN] * len(live), finished=finished))
        while not pull.poll(60_000) or not any(isinstance(m, Shutdown) for m in transport.recv_all(pull)):
            send_all(_heartbeat(spec.input_addr))
    finally:
        pull.close(linger=0)
        for push in pushes.values():
            push.close(linger=1000)
        ctx.term()


def _heartbeat(addr: str) -> Heartbeat:
    return Heartbeat(name="producer", role=Role.UNIFIED, ready=True, input_addr=addr, model=embedded_model())


def main(argv: list[str]) -> None:
    if len(argv) != 3 or argv[0] not in ("worker", "producer") or argv[1] != "--config":
        raise SystemExit("usage: python -m bench.overhead_fakes worker|producer --config '<JSON>'")
    obj = json.loads(argv[2])
    if argv[0] == "worker":
        run_worker(WorkerSpec(**obj))
    else:
        run_producer(ProducerSpec(**obj))


if __name__ == "__main__":
    main(sys.argv[1:])
