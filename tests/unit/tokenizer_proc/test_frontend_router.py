from __future__ import annotations

import pytest

from tokenizer_proc.instances import Instance
from tokenizer_proc.router import LeastLoad, PrefixAffinity, RoundRobin, make_policy, pair_policies


def instances(n: int) -> list[Instance]:
    return [Instance(index=i, role="unified", addr=f"ipc://inst-{i}", sock=None) for i in range(n)]


def test_round_robin_cycles():
    insts = instances(3)
    policy = RoundRobin()
    assert [policy.pick(insts, [1]).index for _ in range(5)] == [0, 1, 2, 0, 1]


def test_least_load_counts_heartbeat_and_routed_tokens():
    a, b = instances(2)
    a.queued_tokens, b.queued_tokens = 100, 40
    assert LeastLoad().pick([a, b], [1]) is b
    b.routed_tokens = 70
    assert LeastLoad().pick([a, b], [1]) is a


def test_prefix_affinity_is_stable_and_moves_only_the_lost_instance_keys():
    insts = instances(4)
    policy = PrefixAffinity()
    prompts = [[p] + [1] * 70 for p in range(64)]  # longer than the affinity prefix
    before = [policy.pick(insts, p) for p in prompts]
    assert before == [policy.pick(insts, p + [99]) for p in prompts]  # same first tokens, same target
    assert len({i.index for i in before}) > 1
    after = [policy.pick(insts[1:], p) for p in prompts]
    assert all(b is a for b, a in zip(before, after, strict=True) if b is not insts[0])


def test_make_policy():
    assert isinstance(make_policy("least_load"), LeastLoad)
    with pytest.raises(ValueError, match="round_robin"):
        make_policy("random")


def test_pair_policies_route_prefix_for_prefill_and_load_for_decode():
    prefill, decode = pair_policies("prefix")
    assert isinstance(prefill, PrefixAffinity) and isinstance(decode, LeastLoad)
    prefill, decode = pair_policies("round_robin")
    assert isinstance(prefill, RoundRobin) and isinstance(decode, RoundRobin) and prefill is not decode
