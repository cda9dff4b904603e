"""``run_scheduler`` in the prefill role over real ipc sockets, with a fake worker thread, a fake
front end and fake decode instances: registration (accepted, and refused naming the field),
peer heartbeats, and status replies to ``StatusQuery.reply_to``."""

from __future__ import annotations

import dataclasses
import shutil
import threading

import pytest
import zmq

from protocol import transport
from protocol.config import InstanceAddrs, SchedulerConfig
from protocol.messages import (
    AttachFrontend,
    Heartbeat,
    Message,
    PeerHeartbeat,
    RegisterDecode,
    RegisterReply,
    Shutdown,
    StatusQuery,
    StatusReport,
    StepBatch,
    TransferEndpoint,
)
from scheduler_proc.disagg import peer_info
from scheduler_proc.scheduler import run_scheduler
from tests.fakes.disagg import fake_layout, with_layout
from tests.fakes.scheduler import FakeWorker, make_args

TIMEOUT_MS = 10_000


class WorkerThread:
    """Reports ready (with a KV sender address), answers steps, stops on Shutdown."""

    def __init__(self, ctx: zmq.Context, addrs: InstanceAddrs) -> None:
        self.steps = transport.bind(ctx, zmq.PULL, addrs.step_addr)
        self.results = transport.connect(ctx, zmq.PUSH, addrs.result_addr)
        self.worker = FakeWorker(page_size=4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def ready(self):
        ready = self.worker.ready()
        ready.transfer = TransferEndpoint(fake_layout(ready), "fake://prefill-kv")
        return ready

    def _serve(self) -> None:
        try:
            transport.send(self.results, self.ready())
            while self.steps.poll(TIMEOUT_MS):
                msg = transport.recv(self.steps)
                if isinstance(msg, Shutdown):
                    return
                assert isinstance(msg, StepBatch)
                transport.send(self.results, self.worker.step(msg))
        finally:
            self.steps.close()
            self.results.close(linger=1000)


@pytest.fixture
def deployment():
    ctx = zmq.Context()
    directory = transport.ipc_dir()
    addrs = InstanceAddrs(*(transport.ipc_addr(directory, n) for n in ("input", "step", "result")))
    cfg = SchedulerConfig(make_args(heartbeat_interval=0.05), "prefill0", "prefill", addrs)
    worker = WorkerThread(ctx, addrs)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            run_scheduler(cfg)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    inboxes: dict[str, zmq.Socket] = {}

    def inbox(name: str) -> tuple[str, zmq.Socket]:
        addr = transport.ipc_addr(directory, name)
        inboxes[addr] = transport.bind(ctx, zmq.PULL, addr)
        return addr, inboxes[addr]

    to_instance = transport.connect(ctx, zmq.PUSH, addrs.input_addr)
    yield to_instance, inbox, worker
    transport.send(to_instance, Shutdown("test over"))
    thread.join(TIMEOUT_MS / 1000)
    worker.thread.join(TIMEOUT_MS / 1000)
    assert not thread.is_alive() and not errors, errors
    for sock in [to_instance, *inboxes.values()]:
        sock.close()
    ctx.term()
    shutil.rmtree(directory, ignore_errors=True)


def next_of(sock: zmq.Socket, kind: type) -> Message:
    while sock.poll(TIMEOUT_MS):
        msg = transport.recv(sock)
        if isinstance(msg, kind):
            return msg
    raise AssertionError(f"no {kind.__name__}")


def test_registration_heartbeats_and_status_replies(deployment):
    to_instance, inbox, worker = deployment
    frontend_addr, frontend = inbox("frontend")
    transport.send(to_instance, AttachFrontend(frontend_addr))
    assert next_of(frontend, Heartbeat).role == "prefill"

    probe_addr, probe = inbox("probe")
    transport.send(to_instance, StatusQuery(qid=5, reply_to=probe_addr))
    report = next_of(probe, StatusReport)
    assert report.qid == 5 and report.status.role == "prefill" and report.status.ready

    good_addr, good = inbox("decode-good")
    info = peer_info("decode0", good_addr, worker.ready())
    transport.send(to_instance, RegisterDecode(info))
    reply = next_of(good, RegisterReply)
    assert reply.ok and reply.info is not None and reply.info.transfer.address == "fake://prefill-kv"
    assert next_of(good, PeerHeartbeat).addr == reply.prefill_addr

    bad_addr, bad = inbox("decode-bad")
    other = dataclasses.replace(with_layout(info, page_size=8), name="decode1", input_addr=bad_addr)
    transport.send(to_instance, RegisterDecode(other))
    refused = next_of(bad, RegisterReply)
    assert not refused.ok and refused.error.startswith("page_size mismatch")
    # heartbeats sent before the registration may still be queued: a later one shows it
    peers = [next_of(frontend, Heartbeat).peers]
    while peers[-1] != {good_addr: "registered"} and len(peers) < 10:
        peers.append(next_of(frontend, Heartbeat).peers)
    assert peers[-1] == {good_addr: "registered"}, peers
