"""The worker's start-up heap is frozen (out of the garbage collector's walks) before its first step."""

from __future__ import annotations

import contextlib
import gc

import zmq

from engine.worker_process import StepHooks, WorkerProcess
from protocol import transport
from protocol.messages import Shutdown, StatusQuery


def test_serve_freezes_the_start_up_heap_before_the_first_message(monkeypatch) -> None:
    events: list[str] = []
    monkeypatch.setattr(gc, "freeze", lambda: events.append("freeze"))
    handlers = {StatusQuery: lambda msg: events.append("message")}
    ctx = zmq.Context()
    step_sock = ctx.socket(zmq.PULL)
    step_sock.bind("inproc://steps")
    scheduler = ctx.socket(zmq.PUSH)
    scheduler.connect("inproc://steps")
    result_sock = ctx.socket(zmq.PUSH)
    result_sock.bind("inproc://results")
    try:
        transport.send(scheduler, StatusQuery(qid=1))
        transport.send(scheduler, Shutdown(reason="test"))
        with contextlib.ExitStack() as stack:
            proc = WorkerProcess("worker", ctx, step_sock, result_sock, stack)
            proc.serve(StepHooks(step=lambda batch: events.append("step"), handlers=handlers))
        assert events == ["freeze", "message"]
    finally:
        for sock in (step_sock, scheduler, result_sock):
            sock.close(linger=0)
        ctx.term()

