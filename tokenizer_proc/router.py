"""Routing policies: which instance serves a request.

A policy picks among the instances that can take a request now (alive and ready) of one role.
Disaggregation applies one policy to the prefill instances and one to the decode instances
(``pair_policies``): prefix affinity matters only where the prompt is computed, so with
``prefix`` the decode side goes by load.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from tokenizer_proc.instances import Instance

PREFIX_AFFINITY_TOKENS = 64  # how many leading tokens decide the prefix-affinity target


class RoutingPolicy(ABC):
    name: ClassVar[str]

    @abstractmethod
    def pick(self, candidates: Sequence[Instance], input_ids: Sequence[int]) -> Instance:
        """One of ``candidates`` (never empty) for a request with prompt ``input_ids``."""


class RoundRobin(RoutingPolicy):
    name = "round_robin"

    def __init__(self) -> None:
        self._turn = 0

    def pick(self, candidates: Sequence[Instance], input_ids: Sequence[int]) -> Instance:
        chosen = candidates[self._turn % len(candidates)]
        self._turn += 1
        return chosen


class LeastLoad(RoutingPolicy):
    """Fewest queued tokens: the last heartbeat's count plus what was routed since."""

    name = "least_load"

    def pick(self, candidates: Sequence[Instance], input_ids: Sequence[int]) -> Instance:
        return min(candidates, key=lambda inst: (inst.load_tokens, inst.index))


class PrefixAffinity(RoutingPolicy):
    """Requests that share their first tokens go to the same instance, so its radix cache
    hits. Rendezvous hashing: losing an instance moves only the prefixes it held."""

    name = "prefix"

    def pick(self, candidates: Sequence[Instance], input_ids: Sequence[int]) -> Instance:
        key = tuple(input_ids[:PREFIX_AFFINITY_TOKENS])
        return max(candidates, key=lambda inst: hash((key, inst.addr)))


_POLICIES: dict[str, type[RoutingPolicy]] = {p.name: p for p in (RoundRobin, LeastLoad, PrefixAffinity)}
ROUTING_POLICIES = tuple(_POLICIES)  # the --routing-policy choices


def make_policy(name: str) -> RoutingPolicy:
    try:
        return _POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; choose one of {', '.join(_POLICIES)}") from None


def pair_policies(name: str) -> tuple[RoutingPolicy, RoutingPolicy]:
    """The (prefill, decode) policies of a disaggregated deployment routed by ``name``."""
    prefill = make_policy(name)
    decode = LeastLoad() if isinstance(prefill, PrefixAffinity) else make_policy(name)
    return prefill, decode
