"""Back-pressure towards a front end (scheduler_proc/frontends.py): what an instance sends a front
end waits in a bounded queue; a front end that stops reading makes the instance stop forming
steps instead of queueing outputs without bound, and once it reads again every request ends
with all its tokens, in order, and nothing leaked."""

from __future__ import annotations

import time

import zmq

from protocol import transport
from protocol.messages import BatchOutput, Shutdown
from scheduler_proc.frontends import Frontends
from tests.fakes.scheduler import make_request
from tests.fakes.scheduler_loop import FrontEnd, Scheduler, config
from tests.unit.scheduler_proc.test_frontend_liveness import StatusProbe

QUEUE = 4
REQUESTS = 8
MAX_NEW = 1200  # far more steps of output than the sockets' kernel buffers hold (~300)


def test_a_full_queue_keeps_the_rest_in_order_in_the_backlog(ctx, monkeypatch, ipc_dir):
    monkeypatch.setattr(transport, "OUTPUT_QUEUE_FRAMES", QUEUE)
    addr = transport.ipc_addr(ipc_dir, "out")
    inbox = transport.bind(ctx, zmq.PULL, addr, hwm=QUEUE)
    inbox.setsockopt(zmq.RCVBUF, 4096)
    frontends = Frontends(ctx, "inst")
    sock = frontends.attach(addr, "aa", now=0.0)
    frames = [i.to_bytes(4, "big") * 4096 for i in range(200)]  # 16 KiB each
    try:
        for frame in frames:
            frontends.send_all(frame)
        assert frontends.send_backlogs() == [sock], "200 frames of 16 KiB all queued at once"
        received = []
        while len(received) < len(frames):
            assert inbox.poll(5000), f"stuck after {len(received)} frames"
            received.append(inbox.recv())
            frontends.send_backlogs()
        assert received == frames
        assert frontends.send_backlogs() == []
    finally:
        inbox.close()
        for s in frontends.sockets():
            s.close()


def test_a_front_end_that_stops_reading_pauses_the_instance(ctx, addrs, start_worker, monkeypatch):
    monkeypatch.setattr(transport, "OUTPUT_QUEUE_FRAMES", QUEUE)
    worker = start_worker(num_pages=8 * 310, max_slots=REQUESTS)
    scheduler = Scheduler(config(addrs, heartbeat_timeout=60.0, max_running_requests=REQUESTS))
    front, probe = FrontEnd(ctx, addrs, hwm=QUEUE), StatusProbe(ctx, addrs.input_addr)
    try:
        front.attach()
        for i in range(REQUESTS):
            front.send(make_request(f"r{i}", [1, 2, 3, i + 4], max_new=MAX_NEW, stop=False))
        paused_at = _steps_once_steady(worker)
        print(f"paused after {paused_at} steps")
        assert paused_at < MAX_NEW // 2, f"{paused_at} steps ran while nobody read their outputs"
        tokens = {f"r{i}": 0 for i in range(REQUESTS)}
        finished: set[str] = set()
        while len(finished) < REQUESTS:
            for out in front.recv(BatchOutput).rows():
                tokens[out.rid] += len(out.token_ids)
                if out.finished:
                    finished.add(out.rid)
        assert tokens == {rid: MAX_NEW for rid in tokens}
        probe.wait_until_idle()
        front.send(Shutdown())
        scheduler.join()
        assert scheduler.error is None
    finally:
        front.close()
        probe.close()


def _steps_once_steady(worker, settle_s: float = 0.5, limit_s: float = 60.0) -> int:
    """The worker's step count once it has not moved for ``settle_s``."""
    deadline = time.monotonic() + limit_s
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        count = len(worker.seen)
        if count != last:
            last, since = count, time.monotonic()
        elif count > 0 and time.monotonic() - since >= settle_s:
            return count
        time.sleep(0.05)
    raise AssertionError(f"the worker never paused: {last} steps")
