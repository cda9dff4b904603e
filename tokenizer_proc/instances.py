"""The instances a front end talks to, and what it knows of each from their heartbeats.

An instance is attached by sending it ``AttachFrontend``, repeated every heartbeat interval for
as long as the front end runs: it is the front end's heartbeat (an instance detaches a silent
front end and aborts its requests). An instance is alive while its heartbeats keep coming, and
routable when alive, ready and connected. Silence for ``heartbeat_timeout`` makes it dead; it is
attached again as soon as it may come back. A connection that closes (the process died, or the
network dropped it: the PUSH socket's monitor says so at once) stops new requests going there
until zmq connects again, without failing those it holds: a blip heals, a death is told by the
heartbeats' silence, and meanwhile no request waits in a queue to a dead process.
An instance restarted at the same address (its launcher
restarts it, or an operator does) is told apart by the ``incarnation`` of its heartbeats: its
old requests count as lost like a dead instance's, and its new state is taken as it comes. A
decode instance's heartbeats also carry the state of its registration with each prefill
instance (``peers``); a change of that state is logged, refusals loudly.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import zmq
from zmq.utils.monitor import recv_monitor_message

from protocol import transport
from protocol.messages import AttachFrontend, Heartbeat, InstanceStatus, Message, ModelInfo, Role
from protocol.security import ClusterKeys

log = logging.getLogger("pdserve.frontend")


@dataclass(eq=False)
class Instance:
    index: int
    role: Role
    addr: str  # the instance's input address
    sock: zmq.Socket  # PUSH to ``addr``
    name: str = ""
    alive: bool = False
    ready: bool = False
    last_heartbeat: float = float("-inf")
    next_attach: float = 0.0
    queued_tokens: int = 0  # from the last heartbeat
    routed_tokens: int = 0  # tokens routed here since the last heartbeat
    model: ModelInfo | None = None
    # decode instances: prefill input address -> "registered" | "connecting" | "refused: <why>"
    peers: dict[str, str] = field(default_factory=dict)
    incarnation: str = ""  # of the process whose heartbeats come now
    connected: bool = True  # False from a closed connection until zmq has connected again
    monitor: zmq.Socket | None = None  # ``sock``'s connection events

    @property
    def load_tokens(self) -> int:
        return self.queued_tokens + self.routed_tokens

    @property
    def routable(self) -> bool:
        return self.alive and self.ready and self.connected

    def read_connection_events(self) -> None:
        """Take in what the monitor saw since the last call (never blocks)."""
        assert self.monitor is not None
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return
            connected = event == zmq.EVENT_HANDSHAKE_SUCCEEDED
            if connected == self.connected:
                continue
            self.connected = connected
            if connected:
                log.info("instance %s (%s): connected again", self.name, self.addr)
            else:
                log.warning("instance %s (%s): connection closed; no request goes there until it "
                            "connects again (its live ones fail if its heartbeats stop)",
                            self.name, self.addr)

    def send(self, msg: Message) -> None:
        transport.send(self.sock, msg, zmq.NOBLOCK)

    def unknown_status(self) -> InstanceStatus:
        """Status of an instance that did not answer: only what the front end knows."""
        return InstanceStatus(name=self.name, role=self.role, alive=False, ready=False)


@dataclass
class InstancePool:
    instances: list[Instance] = field(default_factory=list)
    _by_addr: dict[str, Instance] = field(default_factory=dict)
    _strangers: set[str] = field(default_factory=set)  # input addresses warned about
    _restarted: list[Instance] = field(default_factory=list)  # seen by a new incarnation, not yet expired

    @classmethod
    def connect(
        cls,
        ctx: zmq.Context,
        addrs: dict[Role, list[str]],
        max_message_bytes: int,
        keys: ClusterKeys | None = None,
    ) -> InstancePool:
        pool = cls()
        for role, role_addrs in addrs.items():
            for addr in role_addrs:
                sock = transport.connect(ctx, zmq.PUSH, addr, max_message_bytes, keys)
                inst = Instance(index=len(pool.instances), role=role, addr=addr, sock=sock, name=addr)
                inst.monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
                pool.instances.append(inst)
                pool._by_addr[addr] = inst
        return pool

    def __iter__(self) -> Iterator[Instance]:
        return iter(self.instances)

    def __len__(self) -> int:
        return len(self.instances)

    @property
    def all_ready(self) -> bool:
        return bool(self.instances) and all(inst.routable for inst in self.instances)

    def routable(self, role: Role) -> list[Instance]:
        return [inst for inst in self.instances if inst.role == role and inst.routable]

    def of_role(self, role: Role) -> list[Instance]:
        return [inst for inst in self.instances if inst.role == role]

    def get(self, addr: str) -> Instance | None:
        return self._by_addr.get(addr)

    def name_of(self, addr: str) -> str:
        inst = self._by_addr.get(addr)
        return addr if inst is None else inst.name

    def on_heartbeat(self, hb: Heartbeat, now: float) -> Instance | None:
        inst = self._by_addr.get(hb.input_addr)
        if inst is None:
            if hb.input_addr not in self._strangers:
                self._strangers.add(hb.input_addr)
                log.warning(
                    "heartbeat from an instance not configured here: %s at %s", hb.name, hb.input_addr
                )
            return None
        restarted = bool(inst.incarnation) and hb.incarnation != inst.incarnation
        if restarted:
            log.warning("instance %s (%s) restarted: the requests it held are lost", hb.name, inst.addr)
            self._restarted.append(inst)
            inst.peers = {}
        inst.incarnation = hb.incarnation
        if not inst.alive:
            log.info("instance %s (%s) is alive, ready=%s", hb.name, inst.addr, hb.ready)
        elif hb.ready and not inst.ready:
            log.info("instance %s is ready", hb.name)
        # Not routable until its next heartbeat: by then ``expire`` failed its old requests, and
        # no new one can be taken for an old one.
        inst.name, inst.alive, inst.ready = hb.name, True, hb.ready and not restarted
        inst.last_heartbeat = now
        inst.queued_tokens, inst.routed_tokens = hb.queued_tokens, 0
        if hb.model is not None:
            inst.model = hb.model
        if inst.role == Role.DECODE:  # the decode side's view of each pair is the one that counts
            self._log_peer_changes(inst, hb.peers)
            inst.peers = hb.peers
        return inst

    def _log_peer_changes(self, inst: Instance, peers: dict[str, str]) -> None:
        for addr, state in peers.items():
            if inst.peers.get(addr) == state:
                continue
            if state.startswith("refused"):
                log.error("%s refused by %s: %s", inst.name, self.name_of(addr), refusal_reason(state))
            else:
                log.info("%s with %s: %s", inst.name, self.name_of(addr), state)

    def read_connection_events(self) -> None:
        for inst in self.instances:
            inst.read_connection_events()

    def expire(self, now: float, timeout: float) -> list[Instance]:
        """Instances whose requests are lost: those whose heartbeats stopped (marked dead), and
        those that restarted since the last call (alive again, in their new incarnation)."""
        restarted, self._restarted = self._restarted, []
        dead = [inst for inst in self.instances if inst.alive and now - inst.last_heartbeat > timeout]
        for inst in dead:
            log.warning(
                "instance %s (%s): no heartbeat for %.1fs, marking it dead", inst.name, inst.addr, timeout
            )
            inst.alive = inst.ready = False
            inst.peers = {}  # a decode instance that comes back registers again
            inst.next_attach = now
        return [*dead, *(inst for inst in restarted if inst not in dead)]

    def attach_due(self, now: float, interval: float, attach: AttachFrontend) -> None:
        """Send ``attach`` to every instance once per interval (at once to one just dead)."""
        for inst in self.instances:
            if now >= inst.next_attach:
                try:
                    inst.send(attach)
                except zmq.Again:
                    log.debug("instance %s: attach not sent (queue full)", inst.addr)
                inst.next_attach = now + interval

    def close(self, linger_ms: int = 0) -> None:
        for inst in self.instances:
            if inst.monitor is not None:
                inst.sock.disable_monitor()
                inst.monitor.close(linger=0)
            inst.sock.close(linger=linger_ms)


def refusal_reason(state: str) -> str:
    """The reason in a peer state ``"refused: <why>"``."""
    return state.removeprefix("refused").lstrip(": ") or "no reason given"
