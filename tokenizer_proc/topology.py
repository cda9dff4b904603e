"""How requests reach instances: each to one unified instance, or each to a prefill and a
decode instance (disaggregation: docs/design.md, "Disaggregation").

The front end picks its topology once at start-up from its configuration. A topology knows
when the deployment is ready, picks a ``Route`` for each request, and says why none can be
had. The disaggregated one also introduces the instances to each other: it tells every decode
instance where the prefill instances are (``ConnectPrefill``, repeated until the decode
instance's heartbeats list each of them) and uses a pair only once the decode instance
reports it registered with that prefill instance.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import secrets
from abc import ABC, abstractmethod
from collections.abc import Sequence

import zmq

from protocol.config import FrontendConfig
from protocol.dataplane import ROOM_ID_BITS
from protocol.messages import AbortRequest, ConnectPrefill, Role, TokenizedRequest
from tokenizer_proc.instances import Instance, InstancePool, refusal_reason
from tokenizer_proc.router import make_policy, pair_policies

log = logging.getLogger("pdserve.frontend")

REGISTERED = "registered"


class Route(ABC):
    """Where one request runs. ``instances`` are all that hold it: aborts go to each."""

    instances: tuple[Instance, ...]
    room: int | None = None

    @abstractmethod
    def submit(self, msg: TokenizedRequest) -> None:
        """Send the request to its instances; raises ``zmq.Again`` when one does not take it,
        in which case none of them keeps it."""

    def involves(self, inst: Instance, streaming: bool) -> bool:
        """Whether the request still depends on ``inst`` (``streaming``: outputs have come)."""
        return inst in self.instances

    def describe(self) -> str:
        names = "+".join(inst.name for inst in self.instances)
        return names if self.room is None else f"{names} room={self.room}"


class UnifiedRoute(Route):
    def __init__(self, instance: Instance) -> None:
        self.instances = (instance,)

    def submit(self, msg: TokenizedRequest) -> None:
        (inst,) = self.instances
        inst.send(msg)
        inst.routed_tokens += len(msg.input_ids)


class PairRoute(Route):
    """The prefill instance computes the prompt's KV cache and hands it to the decode
    instance, which streams the outputs; ``room`` pairs the two halves."""

    def __init__(self, prefill: Instance, decode: Instance, room: int) -> None:
        self.instances = (prefill, decode)
        self.room = room

    def submit(self, msg: TokenizedRequest) -> None:
        prefill, decode = self.instances
        prefill.send(dataclasses.replace(msg, room=self.room, prefill_addr=None))
        try:
            decode.send(dataclasses.replace(msg, room=self.room, prefill_addr=prefill.addr))
        except zmq.Again:
            prefill.send(AbortRequest(rid=msg.rid))
            raise
        for inst in self.instances:
            inst.routed_tokens += len(msg.input_ids)

    def involves(self, inst: Instance, streaming: bool) -> bool:
        """Once outputs stream, the decode instance holds the whole KV cache: the request no
        longer depends on the prefill instance (whose loss must not fail it)."""
        prefill, decode = self.instances
        return inst is decode or (inst is prefill and not streaming)


class Topology(ABC):
    def __init__(self, pool: InstancePool) -> None:
        self.pool = pool

    @property
    @abstractmethod
    def ready(self) -> bool:
        """Every instance is ready and can be routed to."""

    @property
    @abstractmethod
    def can_serve(self) -> bool:
        """A request could be routed now (status ``ready``, once the deployment was ready)."""

    @abstractmethod
    def route(self, input_ids: Sequence[int]) -> Route | None:
        """Where a request with prompt ``input_ids`` goes; None when nothing can take it."""

    @abstractmethod
    def unavailable(self) -> str:
        """Why requests may find no route now, for the client's error message."""

    @abstractmethod
    def tick(self, now: float, interval: float) -> None:
        """Periodic work, run on every turn of the front end's loop."""

    def _count_ready(self) -> str:
        ready = sum(inst.routable for inst in self.pool)
        return f"{ready} of {len(self.pool)} instances ready"


class UnifiedTopology(Topology):
    def __init__(self, pool: InstancePool, routing_policy: str) -> None:
        super().__init__(pool)
        self._policy = make_policy(routing_policy)

    @property
    def ready(self) -> bool:
        return self.pool.all_ready

    @property
    def can_serve(self) -> bool:
        return bool(self.pool.routable(Role.UNIFIED))

    def route(self, input_ids: Sequence[int]) -> Route | None:
        candidates = self.pool.routable(Role.UNIFIED)
        return UnifiedRoute(self._policy.pick(candidates, input_ids)) if candidates else None

    def unavailable(self) -> str:
        return self._count_ready()

    def tick(self, now: float, interval: float) -> None:
        """Nothing to do: unified instances need no introduction to each other."""


class DisaggregatedTopology(Topology):
    def __init__(self, pool: InstancePool, routing_policy: str) -> None:
        super().__init__(pool)
        self._prefill_policy, self._decode_policy = pair_policies(routing_policy)
        self._prefills = pool.of_role(Role.PREFILL)
        self._decodes = pool.of_role(Role.DECODE)
        self._connect = ConnectPrefill(prefill_addrs=[p.addr for p in self._prefills])
        self._next_connect: dict[Instance, float] = {}
        # Unique over this front end's life (2**32 rooms); the random start makes it unlikely
        # that two front ends sharing instances mint the same room. Below 1 << ROOM_ID_BITS.
        self._rooms = itertools.count(secrets.randbits(ROOM_ID_BITS - 32) << 32)

    @property
    def ready(self) -> bool:
        if not self.pool.all_ready:
            return False
        peers = [self._registered(d) for d in self._decodes]
        paired_prefills = {p for registered in peers for p in registered}
        return all(peers) and paired_prefills.issuperset(self._prefills)

    @property
    def can_serve(self) -> bool:
        return bool(self._usable_pairs())

    def route(self, input_ids: Sequence[int]) -> Route | None:
        pairs = self._usable_pairs()
        if not pairs:
            return None
        prefill = self._prefill_policy.pick(list(pairs), input_ids)
        decode = self._decode_policy.pick(pairs[prefill], input_ids)
        return PairRoute(prefill, decode, next(self._rooms))

    def unavailable(self) -> str:
        usable = sum(len(decodes) for decodes in self._usable_pairs().values())
        parts = [f"{self._count_ready()}, {usable} usable prefill/decode pairs", *self.refusals()]
        return "; ".join(parts)

    def refusals(self) -> list[str]:
        """Each refused registration, as '<decode> refused by <prefill>: <why>'."""
        return [
            f"{d.name} refused by {self.pool.name_of(addr)}: {refusal_reason(state)}"
            for d in self._decodes
            for addr, state in d.peers.items()
            if state.startswith("refused")
        ]

    def tick(self, now: float, interval: float) -> None:
        """Tell each live decode instance where the prefill instances are, once per interval,
        until its heartbeats report a state for every one of them."""
        for d in self._decodes:
            if not d.alive or now < self._next_connect.get(d, now) or self._knows_every_prefill(d):
                continue
            try:
                d.send(self._connect)
            except zmq.Again:
                log.debug("instance %s: ConnectPrefill not sent (queue full)", d.name)
            self._next_connect[d] = now + interval

    def _knows_every_prefill(self, decode: Instance) -> bool:
        return all(p.addr in decode.peers for p in self._prefills)

    def _registered(self, decode: Instance) -> list[Instance]:
        """The prefill instances ``decode`` reports itself registered with."""
        peers = (self.pool.get(addr) for addr, state in decode.peers.items() if state == REGISTERED)
        return [p for p in peers if p is not None and p.role == Role.PREFILL]

    def _usable_pairs(self) -> dict[Instance, list[Instance]]:
        """Routable prefill instance -> the routable decode instances registered with it,
        both in configuration order."""
        pairs: dict[Instance, list[Instance]] = {p: [] for p in self._prefills if p.routable}
        for d in self._decodes:
            if d.routable:
                for p in self._registered(d):
                    if p in pairs:
                        pairs[p].append(d)
        return {p: decodes for p, decodes in pairs.items() if decodes}


def topology_for(cfg: FrontendConfig) -> type[Topology]:
    """The topology of the configured instances; raises ValueError for a mix that is neither."""
    if cfg.unified and not (cfg.prefill or cfg.decode):
        return UnifiedTopology
    if cfg.prefill and cfg.decode and not cfg.unified:
        return DisaggregatedTopology
    raise ValueError(
        "a front end serves either unified instances or both prefill and decode instances; got "
        f"{len(cfg.unified)} unified, {len(cfg.prefill)} prefill, {len(cfg.decode)} decode"
    )
