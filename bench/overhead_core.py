"""The in-process rows of ``bench/overhead.py``: the scheduler core per step and the codec.

The core is driven as ``scheduler.run_scheduler`` drives it (requests in, ``form_step``, the
encoded ``StepBatch`` out, the worker's encoded ``StepResult`` back, the outbox encoded), with a
worker that answers at once: what is measured is the scheduler's own CPU time per step, in the
steady state where finished requests are replaced by arrivals and the waiting queue keeps its
length. Contexts are about ``context`` tokens; no two prompts share a prefix.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass

import msgpack
import numpy as np

from protocol.codec import decode, encode
from protocol.config import ServerArgs
from protocol.messages import (
    BatchOutput,
    ModelInfo,
    SamplingParams,
    StepBatch,
    StepResult,
    TokenizedRequest,
    WorkerReady,
)
from scheduler_proc import heap
from scheduler_proc.core import SchedulerCore

VOCAB = 32000
PAGE_SIZE = 16


@dataclass
class CoreCase:
    running: int
    waiting: int
    context: int = 1000  # prompt tokens; outputs add up to max_new more
    max_new: tuple[int, int] = (64, 512)  # each request's max_new_tokens, uniform in this range
    steps: int = 200  # measured steps, after the ramp to ``running``
    policy: str = "fcfs"


@dataclass
class CoreResult:
    median_step_ms: float
    p99_step_ms: float
    max_step_ms: float
    full_gc_ms: float  # one full collection in the final state: the worst pause a step can take
    steps: int
    finished: int
    batch_output: bytes  # the largest encoded BatchOutput seen, for the codec rows


class InstantWorker:
    """Answers a step with one token per sampling row (never a stop token: requests end by length)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def answer(self, frame: bytes) -> bytes:
        batch = decode(frame)
        assert isinstance(batch, StepBatch)
        slots = [e.slot for e in batch.extends if e.sample] + list(batch.decode_slots)
        tokens = self.rng.integers(1, VOCAB, len(slots)).tolist()
        logprobs = (-self.rng.random(len(slots))).tolist()
        return encode(StepResult(batch.step_id, slots, tokens, logprobs))


class Arrivals:
    """Fresh requests of ``context`` random tokens (made ahead, outside the measured time)."""

    def __init__(self, case: CoreCase, seed: int) -> None:
        self.case, self.rng, self.count = case, np.random.default_rng(seed), 0

    def make(self, n: int) -> list[bytes]:
        out = []
        for _ in range(n):
            self.count += 1
            prompt = self.rng.integers(1, VOCAB, self.case.context).tolist()
            max_new = int(self.rng.integers(self.case.max_new[0], self.case.max_new[1] + 1))
            sampling = SamplingParams(max_new_tokens=max_new, temperature=0.0, ignore_eos=True)
            msg = TokenizedRequest(rid=f"r{self.count}", input_ids=prompt, sampling=sampling,
                                   arrival_time=time.time())
            out.append(encode(msg))
        return out


def make_core(case: CoreCase) -> SchedulerCore:
    per_request = -(-(case.context + case.max_new[1]) // PAGE_SIZE)
    num_pages = case.running * per_request * 5 // 4 + 64
    args = ServerArgs(
        page_size=PAGE_SIZE,
        max_running_requests=case.running,
        max_queued_requests=case.waiting + case.running + 64,
        schedule_policy=case.policy,
    )
    model = ModelInfo("bench", "FakeForCausalLM", VOCAB, 8192, 1, 1, 4, "float32", [2])
    ready = WorkerReady(model, num_pages, PAGE_SIZE, case.running, 8192, "cpu")
    return SchedulerCore(args, "bench", "unified", ready)


def _step(core: SchedulerCore, worker: InstantWorker, incoming: list[bytes],
          freezer: heap.ArrivalFreezer) -> list[bytes]:
    """One turn of the scheduler loop (the worker's own time excluded); the encoded outputs."""
    for frame in incoming:
        core.on_request(decode(frame))
    freezer.note(core.arrivals)  # as run_scheduler's loop does after its inputs
    batch = core.form_step()
    if batch is None:
        return []
    frame = encode(batch)
    paused = time.thread_time()
    answer = worker.answer(frame)
    worker_time = time.thread_time() - paused
    core.on_result(decode(answer))
    outputs = [encode(m) for m in core.take_outbox()]
    _credit(worker_time)
    return outputs


_credited = [0.0]


def _credit(seconds: float) -> None:
    """The fake worker's CPU time inside a step, taken off by the caller."""
    _credited[0] += seconds


def measure_core(case: CoreCase, seed: int = 0) -> CoreResult:
    """Drive a core through its ramp to ``case.running``, then measure ``case.steps`` steps
    (the fake worker's own CPU time excluded from each)."""
    core = make_core(case)
    worker, arrivals = InstantWorker(seed), Arrivals(case, seed)
    heap.freeze()  # as run_scheduler does once the worker is ready
    freezer = heap.ArrivalFreezer()
    for frame in arrivals.make(case.running + case.waiting):
        core.on_request(decode(frame))
        freezer.note(core.arrivals)
    times, biggest, finished = [], b"", 0
    pending = arrivals.make(case.running)  # replacements for the requests that finish
    ramp, ramp_limit, ramped = 0, 4 * case.running + 50, False
    while len(times) < case.steps:
        live_before = len(core.requests)
        need = max(case.running + case.waiting - live_before, 0)
        incoming, pending = pending[:need], pending[need:]
        if len(pending) < case.running:
            pending += arrivals.make(case.running)
        _credited[0] = 0.0
        start = time.thread_time()
        outputs = _step(core, worker, incoming, freezer)
        elapsed = time.thread_time() - start - _credited[0]
        if not ramped:
            ramp += 1  # still filling the batch: not measured
            ramped = len(core.running) >= case.running or ramp >= ramp_limit
            continue
        times.append(elapsed)
        finished += live_before + len(incoming) - len(core.requests)
        if outputs:
            biggest = max([biggest, *outputs], key=len)
    start = time.thread_time()
    gc.collect()
    full_gc = time.thread_time() - start
    times_ms = sorted(t * 1e3 for t in times)
    return CoreResult(
        median_step_ms=statistics.median(times_ms),
        p99_step_ms=times_ms[min(len(times_ms) - 1, int(len(times_ms) * 0.99))],
        max_step_ms=times_ms[-1],
        full_gc_ms=full_gc * 1e3,
        steps=len(times_ms),
        finished=finished,
        batch_output=biggest,
    )


# ------------------------------------------------------------------------------------ codec


@dataclass
class CodecResult:
    rows: int
    encode_ms: float  # the BatchOutput message, encoded
    plain_ms: float  # the same content as plain msgpack lists (the floor)
    decode_ms: float


def measure_codec(frame: bytes, reps: int = 200) -> CodecResult:
    """Encode (and decode) a step's ``BatchOutput`` as the scheduler sent it."""
    msg = decode(frame)
    assert isinstance(msg, BatchOutput)
    rows = msg.rows()
    plain = [[o.rid for o in rows], [t for o in rows for t in o.token_ids], [o.finished for o in rows]]
    return CodecResult(
        rows=len(rows),
        encode_ms=_median_ms(lambda: encode(msg), reps),
        plain_ms=_median_ms(lambda: msgpack.packb(plain), reps),
        decode_ms=_median_ms(lambda: decode(frame), reps),
    )


def _median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.thread_time_ns()
        fn()
        times.append(time.thread_time_ns() - start)
    # thread_time's resolution is coarse on some kernels: a batch of calls is timed as well
    start = time.thread_time_ns()
    for _ in range(reps):
        fn()
    batch = (time.thread_time_ns() - start) / reps
    return min(statistics.median(times), batch) / 1e6 if batch > 0 else statistics.median(times) / 1e6
