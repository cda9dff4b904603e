"""The front end tells a restarted instance (same address, new process) by the ``incarnation``
of its heartbeats: its old requests count as lost (``expire`` returns it once), its peer states
are forgotten, and it is routable again from its next heartbeat on."""

from __future__ import annotations

import time

import zmq

from protocol import transport
from protocol.messages import AttachFrontend, Heartbeat, Role
from tokenizer_proc.instances import InstancePool

PREFILL, DECODE = "ipc:///tmp/pdserve-test-p", "ipc:///tmp/pdserve-test-d"


def heartbeat(incarnation: str, peers: dict[str, str] | None = None) -> Heartbeat:
    return Heartbeat(name="decode0", role=Role.DECODE, ready=True, input_addr=DECODE,
                     peers=peers or {}, incarnation=incarnation)


def test_a_new_incarnation_is_a_restart_reported_once_and_routable_from_its_next_heartbeat():
    ctx = zmq.Context()
    pool = InstancePool.connect(ctx, {Role.PREFILL: [PREFILL], Role.DECODE: [DECODE]}, 1 << 20)
    try:
        inst = pool.get(DECODE)
        assert inst is not None
        pool.on_heartbeat(heartbeat("first", {PREFILL: "registered"}), now=1.0)
        assert inst.routable and pool.expire(1.1, timeout=5.0) == []
        pool.on_heartbeat(heartbeat("first", {PREFILL: "registered"}), now=2.0)  # the same process
        assert pool.expire(2.1, timeout=5.0) == []

        pool.on_heartbeat(heartbeat("second"), now=3.0)
        assert inst.alive and not inst.routable and inst.peers == {}
        assert pool.expire(3.1, timeout=5.0) == [inst]  # its old requests are failed now
        assert pool.expire(3.2, timeout=5.0) == []  # once
        pool.on_heartbeat(heartbeat("second", {PREFILL: "registered"}), now=4.0)
        assert inst.routable and inst.peers == {PREFILL: "registered"}
    finally:
        pool.close()
        ctx.term()


def test_an_instance_dead_then_back_in_a_new_incarnation_is_reported_dead_then_restarted():
    ctx = zmq.Context()
    pool = InstancePool.connect(ctx, {Role.DECODE: [DECODE]}, 1 << 20)
    try:
        inst = pool.get(DECODE)
        pool.on_heartbeat(heartbeat("first"), now=1.0)
        assert pool.expire(10.0, timeout=5.0) == [inst] and not inst.alive
        pool.on_heartbeat(heartbeat("second"), now=11.0)
        assert pool.expire(11.1, timeout=5.0) == [inst]  # requests routed to it since (none) go too
        pool.on_heartbeat(heartbeat("second"), now=12.0)
        assert inst.routable
    finally:
        pool.close()
        ctx.term()


def wait_for(condition, pool: InstancePool, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pool.read_connection_events()
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_a_closed_connection_stops_routing_at_once_and_a_new_one_resumes_it(ipc_dir):
    """Without waiting for the heartbeats' silence: the socket monitor reports the close."""
    addr = f"ipc://{ipc_dir}/unified0"
    ctx = zmq.Context()
    listener = transport.bind(ctx, zmq.PULL, addr)
    pool = InstancePool.connect(ctx, {Role.UNIFIED: [addr]}, 1 << 20)
    try:
        inst = pool.get(addr)
        assert inst is not None
        pool.on_heartbeat(Heartbeat(name="unified0", role=Role.UNIFIED, ready=True, input_addr=addr), now=1.0)
        assert inst.routable
        inst.send(AttachFrontend(output_addr="ipc://nowhere"))
        assert listener.poll(5000)  # connected
        listener.close(linger=0)  # the instance's process is gone
        assert wait_for(lambda: not inst.routable, pool) and inst.alive  # its requests are not failed
        listener = transport.bind(ctx, zmq.PULL, addr)
        assert wait_for(lambda: inst.routable, pool)
    finally:
        listener.close(linger=0)
        pool.close()
        ctx.term()


def test_new_requests_avoid_an_instance_whose_connection_closed(make_deployment):
    dep = make_deployment({}, {}, routing_policy="round_robin", heartbeat_timeout=30.0)
    dead, survivor = dep.fakes
    dead.stop()
    with dep.client(timeout=5.0) as client:  # far less than the heartbeat timeout
        # Once a status query went unanswered the front end has also read the monitor's event.
        deadline = time.monotonic() + 5.0
        while [i["alive"] for i in client.status()["instances"]] != [False, True]:
            assert time.monotonic() < deadline
        texts = [client.generate("x", max_new_tokens=2)["text"] for _ in range(4)]
        assert client.status()["ready"]
    assert texts == ["He"] * 4 and len(survivor.requests()) == 4 and not dead.requests()
