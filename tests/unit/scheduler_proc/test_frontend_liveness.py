"""A front end repeats ``AttachFrontend`` as its heartbeat; the instance detaches one that falls
silent and, with no front end left, aborts the requests nobody can receive any more."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import zmq

from protocol import transport
from protocol.messages import (
    AttachFrontend,
    BatchOutput,
    Heartbeat,
    InstanceStatus,
    Shutdown,
    StatusQuery,
    StatusReport,
)
from scheduler_proc.frontends import Frontends
from tests.fakes.scheduler import make_request
from tests.fakes.scheduler_loop import TIMEOUT_MS, FrontEnd, Scheduler, config

HEARTBEAT_TIMEOUT_S = 0.5
STEP_DELAY_S = 0.02  # a 100-token request lasts 2 s: far longer than the heartbeat timeout


class StatusProbe:
    """Asks the instance for its status on a socket of its own (``reply_to``), as launch.py
    does: the answers do not depend on a front end being attached."""

    def __init__(self, ctx: zmq.Context, input_addr: str) -> None:
        self.reply_addr = f"{input_addr}-probe"
        self.replies = transport.bind(ctx, zmq.PULL, self.reply_addr)
        self.requests = transport.connect(ctx, zmq.PUSH, input_addr)

    def status(self) -> InstanceStatus:
        transport.send(self.requests, StatusQuery(qid=0, reply_to=self.reply_addr))
        assert self.replies.poll(TIMEOUT_MS), "no status report"
        return transport.recv(self.replies).status

    def wait_until_idle(self) -> InstanceStatus:
        deadline = time.monotonic() + TIMEOUT_MS / 1000
        while True:
            status = self.status()
            live = status.pending + status.prefilling + status.transferring + status.decoding
            if live == 0 and status.free_pages + status.cached_pages == status.total_pages:
                return status
            assert time.monotonic() < deadline, f"requests or pages left behind: {status}"
            time.sleep(0.05)

    def close(self) -> None:
        self.replies.close()
        self.requests.close()


@contextlib.contextmanager
def beating(ctx: zmq.Context, input_addr: str, attach: AttachFrontend) -> Iterator[None]:
    """Send ``attach`` every 50 ms from a thread (on a socket of its own: zmq sockets are not
    thread-safe) while the block runs."""
    sock, stop = transport.connect(ctx, zmq.PUSH, input_addr), threading.Event()

    def beat() -> None:
        while True:
            transport.send(sock, attach)
            if stop.wait(0.05):
                return

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        sock.close()


def test_a_silent_front_end_is_detached_and_its_requests_aborted(ctx, addrs, start_worker):
    worker = start_worker(step_delay_s=STEP_DELAY_S)
    scheduler = Scheduler(config(addrs, heartbeat_timeout=HEARTBEAT_TIMEOUT_S))
    front, probe = FrontEnd(ctx, addrs), StatusProbe(ctx, addrs.input_addr)
    try:
        with beating(ctx, addrs.input_addr, AttachFrontend(front.output_addr)):  # however slow the start
            front.attach()
            for i in range(2):  # both fit in the fake worker's 63 pages of 4 tokens
                front.send(make_request(f"r{i}", [1, 2, 3, 4, 5], max_new=100, stop=False))
            front.recv(BatchOutput)  # decoding; then the front end says nothing more
        status = probe.wait_until_idle()
        assert len(worker.seen) < 100, "not aborted: the requests ran to their end"
        assert status.alive and status.ready
        # A front end that comes back is attached again and served.
        front.attach()
        front.send(make_request("again", [1, 2, 3], max_new=2, stop=False))
        out = front.recv(BatchOutput).rows()[0]
        while not out.finished:
            out = front.recv(BatchOutput).rows()[0]
        assert out.rid == "again" and out.finish_reason == "length"
        front.send(Shutdown())
        scheduler.join()
        assert scheduler.error is None
    finally:
        front.close()
        probe.close()


def test_a_front_end_that_keeps_beating_keeps_its_requests(ctx, addrs, start_worker):
    start_worker(step_delay_s=STEP_DELAY_S)
    scheduler = Scheduler(config(addrs, heartbeat_timeout=HEARTBEAT_TIMEOUT_S))
    front = FrontEnd(ctx, addrs)
    try:
        with beating(ctx, addrs.input_addr, AttachFrontend(front.output_addr)):
            front.recv(Heartbeat)
            front.send(make_request("long", [1, 2, 3], max_new=60, stop=False))  # 1.2 s
            tokens: list[int] = []
            while True:
                out = front.recv(BatchOutput).rows()[0]
                tokens += out.token_ids
                if out.finished:
                    break
            assert out.finish_reason == "length" and len(tokens) == 60
            front.send(Shutdown())
            scheduler.join()
    finally:
        front.close()


def test_only_the_requests_of_the_silent_front_end_are_aborted(ctx, addrs, start_worker):
    start_worker(step_delay_s=STEP_DELAY_S)
    scheduler = Scheduler(config(addrs, heartbeat_timeout=HEARTBEAT_TIMEOUT_S))
    silent, alive = FrontEnd(ctx, addrs, "silent"), FrontEnd(ctx, addrs, "alive")
    try:
        with beating(ctx, addrs.input_addr, AttachFrontend(alive.output_addr, rid_prefix="bb")):
            alive.recv(Heartbeat)
            silent.attach("aa")
            silent.send(make_request("aa-1", [1, 2, 3], max_new=100, stop=False))
            alive.send(make_request("bb-1", [4, 5, 6], max_new=60, stop=False))
            finish: dict[str, str] = {}
            tokens = {"aa-1": 0, "bb-1": 0}
            while len(finish) < 2:  # every reply goes to every attached front end
                for out in alive.recv(BatchOutput).rows():
                    tokens[out.rid] += len(out.token_ids)
                    if out.finished:
                        finish[out.rid] = out.finish_reason
            assert finish == {"aa-1": "abort", "bb-1": "length"}
            assert tokens["bb-1"] == 60 and tokens["aa-1"] < 100
            alive.send(Shutdown())
            scheduler.join()
    finally:
        silent.close()
        alive.close()


def test_frontends_expire_only_the_silent_and_close_their_sockets(ctx):
    frontends = Frontends(ctx, "inst")
    assert frontends.attach("ipc:///tmp/pdserve-test-a", "aa", now=0.0) is not None
    b = frontends.attach("ipc:///tmp/pdserve-test-b", "bb", now=0.0)
    assert frontends.attach("ipc:///tmp/pdserve-test-a", "aa", now=1.0) is None  # a beat, not a new one
    [gone] = frontends.take_departed(now=1.4, timeout=1.0)
    assert gone.addr == "ipc:///tmp/pdserve-test-b" and b is not None and b.closed
    assert gone.owns("bb-7") and not gone.owns("aa-7") and not gone.owns("bbb-7")
    assert len(list(frontends.sockets())) == 1
    assert [f.addr for f in frontends.take_departed(now=2.5, timeout=1.0)] == ["ipc:///tmp/pdserve-test-a"]
    assert not frontends


def test_a_front_end_restarted_at_the_same_address_departs_with_its_old_prefix(ctx):
    frontends = Frontends(ctx, "inst")
    sock = frontends.attach("ipc:///tmp/pdserve-test-a", "aa", now=0.0)
    assert frontends.attach("ipc:///tmp/pdserve-test-a", "cc", now=0.5) is None  # same socket
    [old] = frontends.take_departed(now=1.0, timeout=1.0)
    assert old.owns("aa-1") and not old.owns("cc-1")
    assert sock is not None and not sock.closed and list(frontends.sockets()) == [sock]
    assert frontends.take_departed(now=1.2, timeout=1.0) == []


def test_each_of_several_front_ends_gets_its_own_status_reports_and_every_output(ctx, addrs, start_worker):
    """Several front ends of one deployment (--tokenizer-worker-num) number their status queries
    each from 1: a report goes to the front end whose output address the query names, not to all."""
    start_worker()
    scheduler = Scheduler(config(addrs))
    fronts = [FrontEnd(ctx, addrs, "fe0"), FrontEnd(ctx, addrs, "fe1")]
    try:
        for i, front in enumerate(fronts):
            front.attach(rid_prefix=f"fe{i}")
        for front in fronts:
            front.send(StatusQuery(qid=1, reply_to=front.output_addr))
        for front in fronts:
            assert front.recv(StatusReport).qid == 1
        fronts[0].send(make_request("fe0-1", [1, 2, 3], max_new=2, stop=False))
        for front in fronts:  # the owner keeps the rows of its requests, the other drops them
            assert front.recv(BatchOutput).rows()[0].rid == "fe0-1"
        fronts[1].send(StatusQuery(qid=2, reply_to=fronts[1].output_addr))
        assert fronts[1].recv(StatusReport).qid == 2
        fronts[0].send(Shutdown())
        scheduler.join()
        reports = [[m.qid for m in front.received if isinstance(m, StatusReport)] for front in fronts]
        assert reports == [[1], [1, 2]]
    finally:
        for front in fronts:
            front.close()
