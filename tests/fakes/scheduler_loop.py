"""A scheduler process's surroundings for tests of ``run_scheduler`` over real ipc sockets: a fake
worker thread, a fake front end, and ``run_scheduler`` in a thread."""

from __future__ import annotations

import threading
import time

import zmq

from protocol import transport
from protocol.config import InstanceAddrs, SchedulerConfig
from protocol.messages import AttachFrontend, Heartbeat, Message, Shutdown, StepBatch, WorkerFailed
from scheduler_proc.scheduler import run_scheduler
from tests.fakes.scheduler import FakeWorker, make_args

TIMEOUT_MS = 10_000


def config(addrs: InstanceAddrs, **overrides: object) -> SchedulerConfig:
    args = make_args(heartbeat_interval=0.05, disable_overlap_schedule=False, **overrides)
    return SchedulerConfig(args=args, name="inst0", role="unified", addrs=addrs)


class FakeWorkerThread:
    """Binds the step socket, reports ready (or failed), serves steps until Shutdown or stop()."""

    def __init__(self, ctx, addrs, fail_at_start=False, fail_at_step=None, step_delay_s=0.0, **worker_kw):
        self.steps = transport.bind(ctx, zmq.PULL, addrs.step_addr)
        self.results = transport.connect(ctx, zmq.PUSH, addrs.result_addr)
        self.worker = FakeWorker(**{"page_size": 4, **worker_kw})
        self.seen: list[Message] = []
        self.fail_at_start, self.fail_at_step = fail_at_start, fail_at_step
        self.step_delay_s = step_delay_s  # a worker slow enough that requests stay live a while
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            if self.fail_at_start:
                transport.send(self.results, WorkerFailed("no GPU"))
                return
            transport.send(self.results, self.worker.ready())
            while not self._stop.is_set():
                if not self.steps.poll(50):
                    continue
                msg = transport.recv(self.steps)
                self.seen.append(msg)
                if isinstance(msg, Shutdown):
                    return
                assert isinstance(msg, StepBatch)
                if msg.step_id == self.fail_at_step:
                    transport.send(self.results, WorkerFailed("CUDA error"))
                    return
                self._stop.wait(self.step_delay_s)
                transport.send(self.results, self.worker.step(msg))
        finally:
            self.steps.close()
            self.results.close(linger=1000)

    def stop(self):
        self._stop.set()
        self.thread.join(TIMEOUT_MS / 1000)
        assert not self.thread.is_alive()


class Scheduler:
    """run_scheduler in a thread; remembers what it raised."""

    def __init__(self, cfg: SchedulerConfig, **kw: object) -> None:
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(cfg,), kwargs=kw, daemon=True)
        self.thread.start()

    def _run(self, cfg, **kw):
        try:
            run_scheduler(cfg, **kw)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e

    def join(self):
        self.thread.join(TIMEOUT_MS / 1000)
        assert not self.thread.is_alive(), "run_scheduler did not return"


class FrontEnd:
    def __init__(self, ctx, addrs: InstanceAddrs, name: str = "frontend", hwm: int = 0):
        self.output_addr = f"{addrs.input_addr}-{name}"
        self.inbox = transport.bind(ctx, zmq.PULL, self.output_addr, hwm=hwm)
        self.to_instance = transport.connect(ctx, zmq.PUSH, addrs.input_addr)
        self.heartbeats: list[Heartbeat] = []
        self.received: list[Message] = []

    def send(self, msg):
        transport.send(self.to_instance, msg)

    def attach(self, rid_prefix: str = "") -> Heartbeat:
        """Attach to the instance; returns the heartbeat it answers with."""
        self.send(AttachFrontend(self.output_addr, rid_prefix=rid_prefix))
        return self.recv(Heartbeat)

    def recv(self, kind):
        """The next message of type ``kind``; every message received on the way is recorded."""
        deadline = time.monotonic() + TIMEOUT_MS / 1000
        while time.monotonic() < deadline:
            if not self.inbox.poll(100):
                continue
            msg = transport.recv(self.inbox)
            self.received.append(msg)
            if isinstance(msg, Heartbeat):
                self.heartbeats.append(msg)
            if isinstance(msg, kind):
                return msg
        raise AssertionError(f"no {kind.__name__} within {TIMEOUT_MS} ms")

    def close(self):
        self.inbox.close()
        self.to_instance.close()
