"""Routing over prefill/decode pairs, readiness and room minting, without sockets."""

from __future__ import annotations

import logging

import pytest

from protocol.config import FrontendConfig, ServerArgs
from protocol.messages import Heartbeat
from tokenizer_proc.instances import Instance, InstancePool
from tokenizer_proc.topology import DisaggregatedTopology, PairRoute, UnifiedTopology, topology_for


def pd_pool(num_prefill: int, num_decode: int) -> InstancePool:
    """Every instance alive and ready, every decode instance registered with every prefill one."""
    pool = InstancePool()
    for role, n in (("prefill", num_prefill), ("decode", num_decode)):
        for i in range(n):
            addr = f"ipc://{role}-{i}"
            inst = Instance(len(pool), role, addr, sock=None, name=f"{role}{i}", alive=True, ready=True)
            pool.instances.append(inst)
            pool._by_addr[addr] = inst
    for d in pool.of_role("decode"):
        d.peers = {p.addr: "registered" for p in pool.of_role("prefill")}
    return pool


def names(route) -> tuple[str, str]:
    assert isinstance(route, PairRoute)
    return tuple(inst.name for inst in route.instances)


def test_round_robin_turns_on_both_sides():
    topo = DisaggregatedTopology(pd_pool(1, 2), "round_robin")
    assert [names(topo.route([1])) for _ in range(3)] == [
        ("prefill0", "decode0"),
        ("prefill0", "decode1"),
        ("prefill0", "decode0"),
    ]


def test_least_load_counts_heartbeats_and_routed_tokens_on_each_side():
    pool = pd_pool(2, 2)
    p0, p1, d0, d1 = pool.instances
    p0.queued_tokens, d0.queued_tokens = 10, 10
    topo = DisaggregatedTopology(pool, "least_load")
    route = topo.route([1] * 30)
    assert names(route) == ("prefill1", "decode1")
    route.instances[0].routed_tokens += 30  # what submit counts
    route.instances[1].routed_tokens += 30
    assert names(topo.route([1])) == ("prefill0", "decode0")


def test_prefix_routing_keeps_a_prefix_on_one_prefill_and_balances_decode():
    pool = pd_pool(3, 2)
    topo = DisaggregatedTopology(pool, "prefix")
    prompts = [[p, *[7] * 70] for p in range(30)]
    first = [topo.route(p).instances[0] for p in prompts]
    assert first == [topo.route([*p, 99]).instances[0] for p in prompts]  # same prefix, same prefill
    assert len(set(first)) > 1
    d0, d1 = pool.of_role("decode")
    d0.queued_tokens = 5
    assert {topo.route(p).instances[1] for p in prompts[:5]} == {d1}


def test_only_registered_live_pairs_are_used():
    pool = pd_pool(2, 2)
    p0, p1, d0, d1 = pool.instances
    d0.peers = {p0.addr: "registered", p1.addr: "refused: page_size mismatch (16 vs 32)"}
    d1.peers = {p0.addr: "connecting", p1.addr: "registered"}
    topo = DisaggregatedTopology(pool, "round_robin")
    assert {names(topo.route([1])) for _ in range(6)} == {("prefill0", "decode0"), ("prefill1", "decode1")}
    d1.alive = False
    assert {names(topo.route([1])) for _ in range(4)} == {("prefill0", "decode0")}
    p0.ready = False
    assert topo.route([1]) is None
    reason = topo.unavailable()
    assert "0 usable prefill/decode pairs" in reason
    assert "decode0 refused by prefill1: page_size mismatch (16 vs 32)" in reason


def test_ready_needs_a_registered_peer_on_every_instance():
    pool = pd_pool(2, 1)
    p0, p1, d0 = pool.instances
    topo = DisaggregatedTopology(pool, "round_robin")
    assert topo.ready
    d0.peers[p1.addr] = "refused: dtype mismatch"
    assert not topo.ready  # prefill1 has no decode peer
    assert topo.route([1]).instances == (p0, d0)  # but prefill0 + decode0 still serve
    d0.peers = {p0.addr: "connecting", p1.addr: "connecting"}
    assert not topo.ready and topo.route([1]) is None


def test_rooms_are_unique_and_differ_between_front_ends():
    a = DisaggregatedTopology(pd_pool(1, 1), "round_robin")
    b = DisaggregatedTopology(pd_pool(1, 1), "round_robin")
    rooms_a = [a.route([1]).room for _ in range(100)]
    rooms_b = [b.route([1]).room for _ in range(100)]
    assert len(set(rooms_a)) == 100 and all(isinstance(r, int) and 0 <= r < 2**63 for r in rooms_a)
    assert not set(rooms_a) & set(rooms_b)


def _cfg(unified: int, prefill: int, decode: int) -> FrontendConfig:
    def addrs(role: str, n: int) -> list[str]:
        return [f"ipc://{role}-{i}" for i in range(n)]

    return FrontendConfig(
        ServerArgs(),
        "tcp://127.0.0.1:1",
        "ipc://out",
        addrs("u", unified),
        addrs("p", prefill),
        addrs("d", decode),
    )


def test_topology_is_chosen_from_the_configuration():
    assert topology_for(_cfg(2, 0, 0)) is UnifiedTopology
    assert topology_for(_cfg(0, 1, 2)) is DisaggregatedTopology
    for bad in (_cfg(1, 1, 1), _cfg(0, 1, 0), _cfg(0, 0, 1), _cfg(0, 0, 0)):
        with pytest.raises(ValueError, match="either unified instances or both prefill and decode"):
            topology_for(bad)


def test_a_refusal_is_logged_once_naming_both_sides(caplog):
    pool = pd_pool(1, 1)
    prefill, decode = pool.instances
    decode.peers = {}
    hb = Heartbeat(
        name="decode0",
        role="decode",
        ready=True,
        input_addr=decode.addr,
        peers={prefill.addr: "refused: dtype mismatch (float16 vs bfloat16)"},
    )
    with caplog.at_level(logging.INFO, logger="pdserve.frontend"):
        pool.on_heartbeat(hb, now=0.0)
        pool.on_heartbeat(hb, now=0.1)
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert [r.getMessage() for r in refusals] == [
        "decode0 refused by prefill0: dtype mismatch (float16 vs bfloat16)"
    ]
    assert refusals[0].levelno == logging.ERROR
