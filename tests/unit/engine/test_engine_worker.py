"""The worker loop over real sockets: ready, pipelined steps, shutdown, failures."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq

from engine.worker_process import run_worker
from protocol import transport
from protocol.config import InstanceAddrs, ServerArgs, WorkerConfig, config_to_json
from protocol.messages import (
    ExtendReq,
    Message,
    NewReq,
    PageAppend,
    Shutdown,
    StepBatch,
    StepResult,
    WorkerFailed,
    WorkerReady,
)
from tests import REPO_ROOT
from tests.oracles import greedy_reference
from tests.signals import other_thread, skip_without_tgkill, tgkill
from tests.unit.engine.engine_driver import greedy, small_args

TIMEOUT_MS = 60_000


@dataclass
class SchedulerEnd:
    """The scheduler's side of the two worker sockets."""

    step: zmq.Socket
    result: zmq.Socket

    def send(self, msg: Message) -> None:
        transport.send(self.step, msg)

    def recv(self) -> Message:
        assert self.result.poll(TIMEOUT_MS), "no message from the worker"
        return transport.recv(self.result)


def worker_config(tmp_path: Path, args: ServerArgs) -> WorkerConfig:
    addrs = InstanceAddrs(
        input_addr=transport.ipc_addr(str(tmp_path), "in"),
        step_addr=transport.ipc_addr(str(tmp_path), "step"),
        result_addr=transport.ipc_addr(str(tmp_path), "result"),
    )
    return WorkerConfig(args=args, name="test-worker", role="unified", addrs=addrs)


@pytest.fixture
def zmq_ctx() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.term()


def connect_scheduler(ctx: zmq.Context, cfg: WorkerConfig) -> SchedulerEnd:
    result = transport.bind(ctx, zmq.PULL, cfg.addrs.result_addr)
    step = transport.connect(ctx, zmq.PUSH, cfg.addrs.step_addr)
    return SchedulerEnd(step, result)


def start_worker_thread(cfg: WorkerConfig) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def target() -> None:
        try:
            run_worker(cfg)
        except BaseException as e:  # noqa: BLE001 (the test inspects it)
            errors.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, errors


def test_pipelined_steps_use_the_future_token_map(tmp_path: Path, zmq_ctx: zmq.Context) -> None:
    """Three steps are sent before any result is read: the decodes' inputs can only come from
    the worker's own buffer. A released slot is reused by a new request in the same step."""
    cfg = worker_config(tmp_path, small_args())
    sched = connect_scheduler(zmq_ctx, cfg)
    thread, errors = start_worker_thread(cfg)
    try:
        ready = sched.recv()
        assert isinstance(ready, WorkerReady), ready
        assert ready.page_size == 4 and ready.max_slots == 4 + 2 and ready.num_pages == 1024 // 4 + 1
        assert ready.model.vocab_size == 320 and ready.model.eos_token_ids == [257]

        a, b = [256, 1, 2, 3, 4, 5], [256, 7, 7, 7, 7, 7, 7, 7, 7, 7]
        steps = [
            StepBatch(
                step_id=0,
                new_reqs=[NewReq(0, greedy(4, return_logprob=True)), NewReq(1, greedy(3))],
                page_appends=[PageAppend(0, [5, 6, 7]), PageAppend(1, [8, 9])],
                extends=[ExtendReq(0, 0, a), ExtendReq(1, 0, b[:8], sample=False)],
            ),
            StepBatch(
                step_id=1,
                page_appends=[PageAppend(1, [3])],
                extends=[ExtendReq(1, 8, b[8:])],
                decode_slots=[0],
                decode_positions=[6],
            ),
            StepBatch(step_id=2, decode_slots=[0, 1], decode_positions=[7, 10]),
            StepBatch(step_id=3, decode_slots=[0, 1], decode_positions=[8, 11]),
            StepBatch(
                step_id=4,
                released=[1],
                new_reqs=[NewReq(1, greedy(2))],
                page_appends=[PageAppend(1, [10, 11])],
                extends=[ExtendReq(1, 0, a)],
            ),
        ]
        for step in steps:
            sched.send(step)
        results = [sched.recv() for _ in steps]
        assert all(isinstance(r, StepResult) for r in results)
        assert [r.step_id for r in results] == [0, 1, 2, 3, 4]
        assert [r.slots for r in results] == [[0], [1, 0], [0, 1], [0, 1], [1]]
        tokens = {0: [], 1: []}
        for r in results[:4]:
            for slot, token in zip(r.slots, r.token_ids, strict=True):
                tokens[slot].append(token)
        ref_a, ref_b = greedy_reference(None, [a, b], 4)
        assert tokens[0] == ref_a and tokens[1] == ref_b[:3]
        assert results[4].token_ids == ref_a[:1]  # the reused slot starts clean
        assert results[0].logprobs is not None and results[0].logprobs[0] < 0.0
        sched.send(Shutdown(reason="test"))
        thread.join(timeout=TIMEOUT_MS / 1000)
        assert not thread.is_alive() and not errors
    finally:
        sched.step.close()
        sched.result.close()


def test_start_up_failure_is_reported(tmp_path: Path, zmq_ctx: zmq.Context) -> None:
    cfg = worker_config(tmp_path, small_args(model_path=str(tmp_path / "missing")))
    sched = connect_scheduler(zmq_ctx, cfg)
    thread, errors = start_worker_thread(cfg)
    try:
        failed = sched.recv()
        assert isinstance(failed, WorkerFailed) and "config.json" in failed.message
        thread.join(timeout=TIMEOUT_MS / 1000)
        assert len(errors) == 1 and isinstance(errors[0], FileNotFoundError)
    finally:
        sched.step.close()
        sched.result.close()


@pytest.mark.parametrize("to_thread", [False, True])
def test_worker_process_exits_cleanly_on_sigterm(
    tmp_path: Path, zmq_ctx: zmq.Context, to_thread: bool
) -> None:
    """Also when the kernel hands the signal to another thread than the one waiting for steps
    (``to_thread``: a zmq or torch thread, which the kernel is free to pick)."""
    if to_thread:
        skip_without_tgkill()
    cfg = worker_config(tmp_path, small_args())
    sched = connect_scheduler(zmq_ctx, cfg)
    env = {**os.environ, "PDSERVE_TORCH_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "engine", "--config", config_to_json(cfg)],
        cwd=REPO_ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert isinstance(sched.recv(), WorkerReady)
        if to_thread:
            tgkill(proc.pid, other_thread(proc.pid), signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=TIMEOUT_MS / 1000) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
        sched.step.close()
        sched.result.close()


def test_a_failing_step_is_reported(tmp_path: Path, zmq_ctx: zmq.Context) -> None:
    cfg = worker_config(tmp_path, small_args())
    sched = connect_scheduler(zmq_ctx, cfg)
    thread, errors = start_worker_thread(cfg)
    try:
        assert isinstance(sched.recv(), WorkerReady)
        sched.send(StepBatch(step_id=7, new_reqs=[NewReq(0, greedy(2))], extends=[ExtendReq(0, 0, [1, 2])]))
        failed = sched.recv()
        assert isinstance(failed, WorkerFailed) and "step 7" in failed.message and "pages" in failed.message
        thread.join(timeout=TIMEOUT_MS / 1000)
        assert len(errors) == 1 and isinstance(errors[0], ValueError)
    finally:
        sched.step.close()
        sched.result.close()
