"""The front end tells a restarted instance (same address, new process) by the ``incarnation``
of its heartbeats: its old requests count as lost (``expire`` returns it once), its peer states
are forgotten, and it is routable again from its next heartbeat on."""

from __future__ import annotations

import zmq

from protocol.messages import Heartbeat, Role
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
