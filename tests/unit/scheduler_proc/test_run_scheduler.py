"""``run_scheduler`` over real ipc sockets, with a fake worker thread and a fake front end."""

from __future__ import annotations

import signal
import subprocess
import sys

import msgpack

from protocol.config import SchedulerConfig, config_to_json
from protocol.messages import (
    INTERNAL,
    INVALID_REQUEST,
    PROTOCOL_VERSION,
    SHUTTING_DOWN,
    AbortRequest,
    BatchOutput,
    Heartbeat,
    RequestFailed,
    Shutdown,
    StatusQuery,
    StatusReport,
)
from scheduler_proc.core import SchedulerCore
from scheduler_proc.scheduler import MAX_REPLY_TO_SOCKETS, WorkerLost, _Loop
from tests.fakes.scheduler import FakeWorker, make_request, reference_generate
from tests.fakes.scheduler_loop import TIMEOUT_MS, FrontEnd, Scheduler, config


def test_serves_requests_status_and_heartbeats_then_shuts_down(ctx, addrs, start_worker):
    worker = start_worker()
    scheduler = Scheduler(config(addrs))
    front = FrontEnd(ctx, addrs)
    try:
        beat = front.attach()
        assert beat.ready and beat.role == "unified" and beat.model.name == "fake"
        assert beat.input_addr == addrs.input_addr
        requests = [make_request(f"r{i}", [i + 1, 2, 3, 4, 5, 6], max_new=6, seed=i) for i in range(3)]
        for req in requests:
            front.send(req)
        front.to_instance.send(b"\xc1 not msgpack")  # dropped with a warning; serving goes on
        front.send(make_request("r0", [1]))
        failed = front.recv(RequestFailed)
        assert failed.rid == "r0" and failed.code == INVALID_REQUEST
        tokens: dict[str, list[int]] = {r.rid: [] for r in requests}
        finished = set()
        batches = [m for m in front.received if isinstance(m, BatchOutput)]  # before the failure
        while len(finished) < len(requests):
            for out in (batches.pop(0) if batches else front.recv(BatchOutput)).rows():
                tokens[out.rid] += out.token_ids
                if out.finished:
                    finished.add(out.rid)
        for req in requests:
            assert tokens[req.rid] == reference_generate(req.input_ids, req.sampling)
        front.send(StatusQuery(qid=7))
        report = front.recv(StatusReport)
        status = report.status
        assert report.qid == 7 and status.alive and status.ready and status.pending == 0
        assert status.free_pages + status.cached_pages == status.total_pages == 63
        while len(front.heartbeats) < 3:  # periodic, every heartbeat_interval
            front.recv(Heartbeat)
        front.send(Shutdown(reason="test"))
        scheduler.join()
        assert scheduler.error is None
        worker.thread.join(TIMEOUT_MS / 1000)
        assert isinstance(worker.seen[-1], Shutdown)
    finally:
        front.close()


def test_replies_go_to_every_attached_front_end(ctx, addrs, start_worker):
    """Messages carry no sender: every attached front end gets every reply (each drops the rids
    it does not own), so a request from either one is answered there."""
    start_worker()
    scheduler = Scheduler(config(addrs))
    first, second = FrontEnd(ctx, addrs, "fe1"), FrontEnd(ctx, addrs, "fe2")
    try:
        first.attach()
        second.attach()
        second.send(make_request("r", [1, 2, 3], max_new=1, stop=False))
        for front in (first, second):
            assert front.recv(BatchOutput).rows()[0].rid == "r"
        first.send(StatusQuery(qid=1))
        for front in (first, second):
            assert front.recv(StatusReport).qid == 1
        second.send(Shutdown())
        scheduler.join()
    finally:
        first.close()
        second.close()


def raw_frame(kind: str, **fields: object) -> bytes:
    """A frame the codec accepts, whatever the types of ``fields``."""
    return msgpack.packb({"type": kind, "v": PROTOCOL_VERSION, **fields})


def test_a_message_that_makes_a_handler_raise_is_answered_and_serving_goes_on(ctx, addrs, start_worker):
    start_worker()
    scheduler = Scheduler(config(addrs))
    front = FrontEnd(ctx, addrs)
    try:
        front.attach()
        bad = {"max_new_tokens": 4, "seed": 1, "temperature": 0.0}
        for fields in (
            dict(rid="bad1", input_ids=[1, 2], sampling=5),
            dict(rid="bad2", input_ids=[1, 2], sampling={**bad, "max_new_tokens": "9"}),
            dict(rid="bad3", input_ids=[1, 10**9], sampling=bad),
            dict(rid=[1], input_ids=[1, 2], sampling=bad),  # unreadable rid: logged only
        ):
            front.to_instance.send(raw_frame("tokenized_request", **fields))
        front.to_instance.send(raw_frame("abort_request", rid={"x": 1}))
        for rid in ("bad1", "bad2", "bad3"):
            failed = front.recv(RequestFailed)
            assert failed.rid == rid and failed.code == INVALID_REQUEST
        req = make_request("good", [1, 2, 3], max_new=3, stop=False)
        front.send(req)
        tokens = []
        while len(tokens) < 3:
            tokens += front.recv(BatchOutput).rows()[0].token_ids
        assert tokens == reference_generate(req.input_ids, req.sampling)
        assert [m.rid for m in front.received if isinstance(m, RequestFailed)] == ["bad1", "bad2", "bad3"]
        front.send(Shutdown())
        scheduler.join()
        assert scheduler.error is None
    finally:
        front.close()


def test_the_loop_survives_a_handler_that_raises(ctx, addrs, start_worker, monkeypatch):
    """The guard, not only the validation: whatever a handler raises costs that message only."""
    start_worker()

    def broken(self, msg):
        raise KeyError("bug")

    monkeypatch.setattr(SchedulerCore, "on_abort", broken)
    scheduler = Scheduler(config(addrs))
    front = FrontEnd(ctx, addrs)
    try:
        front.attach()
        front.send(AbortRequest(rid="x"))
        failed = front.recv(RequestFailed)
        assert failed.rid == "x" and failed.code == INVALID_REQUEST and "KeyError" in failed.message
        front.send(StatusQuery(qid=3))
        assert front.recv(StatusReport).qid == 3
        front.send(Shutdown())
        scheduler.join()
        assert scheduler.error is None
    finally:
        front.close()


def test_status_reply_to_sockets_are_bounded(ctx, addrs):
    """A caller using a fresh reply_to address per query cannot make the instance hold a socket
    per address: the least recently used one is closed."""
    loop = _Loop(config(addrs), None, FakeWorker().ready(), ctx, None, None, None)  # type: ignore[arg-type]
    reply_addrs = [f"{addrs.input_addr}-reply{i}" for i in range(MAX_REPLY_TO_SOCKETS + 2)]
    socks = [loop._reply_to(addr) for addr in reply_addrs[:MAX_REPLY_TO_SOCKETS]]
    assert loop._reply_to(reply_addrs[0]) is socks[0]  # reused, and now the most recently used
    later = [loop._reply_to(addr) for addr in reply_addrs[MAX_REPLY_TO_SOCKETS:]]
    try:
        assert len(loop.reply_to) == MAX_REPLY_TO_SOCKETS
        assert socks[1].closed and socks[2].closed and not socks[0].closed
        assert list(loop.reply_to)[-3:] == [reply_addrs[0], *reply_addrs[MAX_REPLY_TO_SOCKETS:]]
    finally:
        for sock in [*socks, *later]:
            sock.close()


def test_shutdown_fails_live_requests(ctx, addrs, start_worker):
    start_worker()
    scheduler = Scheduler(config(addrs))
    front = FrontEnd(ctx, addrs)
    try:
        front.attach()
        front.send(make_request("slow", [1, 2, 3], max_new=200, stop=False))
        front.recv(BatchOutput)
        front.send(Shutdown())
        failed = front.recv(RequestFailed)
        assert failed.rid == "slow" and failed.code == SHUTTING_DOWN
        scheduler.join()
        assert scheduler.error is None
    finally:
        front.close()


def test_worker_failure_mid_run_fails_requests_and_raises(ctx, addrs, start_worker):
    start_worker(fail_at_step=2)
    scheduler = Scheduler(config(addrs))
    front = FrontEnd(ctx, addrs)
    try:
        front.attach()
        front.send(make_request("a", [1, 2, 3], max_new=50, stop=False))
        failed = front.recv(RequestFailed)
        assert failed.rid == "a" and failed.code == INTERNAL and "CUDA error" in failed.message
        scheduler.join()
        assert isinstance(scheduler.error, WorkerLost)
    finally:
        front.close()


def test_watchdog_fails_requests_of_a_hung_worker_and_raises(ctx, addrs, start_worker):
    """A step in flight past --watchdog-timeout: not ready after half of it, then every request
    fails (internal, naming the watchdog) and the loop raises WorkerLost."""
    start_worker(step_delay_s=5.0)
    scheduler = Scheduler(config(addrs, watchdog_timeout=1.0))
    front = FrontEnd(ctx, addrs)
    try:
        front.attach()
        front.send(make_request("a", [1, 2, 3], max_new=50, stop=False))
        while front.recv(Heartbeat).ready:
            pass
        failed = front.recv(RequestFailed)
        assert failed.rid == "a" and failed.code == INTERNAL and "watchdog" in failed.message
        scheduler.join()
        assert isinstance(scheduler.error, WorkerLost) and "--watchdog-timeout" in str(scheduler.error)
    finally:
        front.close()


def test_worker_failed_at_start_raises(addrs, start_worker):
    start_worker(fail_at_start=True)
    scheduler = Scheduler(config(addrs))
    scheduler.join()
    assert isinstance(scheduler.error, WorkerLost) and "no GPU" in str(scheduler.error)


def test_silent_worker_times_out(addrs):
    scheduler = Scheduler(config(addrs), worker_start_timeout=0.1)
    scheduler.join()
    assert isinstance(scheduler.error, WorkerLost) and "did not report ready" in str(scheduler.error)


def _spawn(cfg: SchedulerConfig) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "scheduler_proc", "--config", config_to_json(cfg)])


def test_main_exits_non_zero_when_the_worker_fails(addrs, start_worker):
    start_worker(fail_at_start=True)
    proc = _spawn(config(addrs))
    assert proc.wait(timeout=30) == 1


def test_main_exits_cleanly_on_sigterm(ctx, addrs, start_worker):
    start_worker()
    proc = _spawn(config(addrs))
    front = FrontEnd(ctx, addrs)
    try:
        front.attach()  # serving
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        front.close()
        if proc.poll() is None:
            proc.kill()
