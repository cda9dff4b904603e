"""Peer instances on the control plane: one ``Peer`` per paired instance, with a checked
lifecycle, owned by one ``PeerTable`` per instance.

A decode instance's peers (the prefill instances it registers with) go ``connecting →
registering → registered``, or end ``refused``. A prefill instance's peers (the decode instances
registered with it) start ``registered``. A registered peer silent past the heartbeat timeout is
``lost``; losing a peer and regaining it is one path: the decode side registers again
(``lost → connecting``, retried every beat) and the prefill side takes that registration
(``lost → registered``), answering a lost or unknown peer's heartbeat with ``PeerUnknown`` so
that a decode side that missed the loss registers again too. The protocol is in docs/design.md
("Peers and links").
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterator
from dataclasses import dataclass

from scheduler_proc.request import IllegalTransition

logger = logging.getLogger(__name__)


class PeerState(enum.Enum):
    CONNECTING = "connecting"  # decode side: RegisterDecode sent, repeated every beat
    REGISTERING = "registering"  # decode side: accepted; the worker registers its KV receiver
    REGISTERED = "registered"  # paired: requests may be routed over it
    REFUSED = "refused"  # the pair does not match (final)
    LOST = "lost"  # silent past the heartbeat timeout (or dropped us): registers again


P = PeerState
_NEW = None  # not in the table
TRANSITIONS: dict[PeerState | None, frozenset[PeerState]] = {
    _NEW: frozenset({P.CONNECTING, P.REGISTERED}),  # decode names it / prefill accepts it
    P.CONNECTING: frozenset({P.REGISTERING, P.REFUSED}),
    P.REGISTERING: frozenset({P.REGISTERED, P.REFUSED}),
    P.REGISTERED: frozenset({P.LOST}),
    P.LOST: frozenset({P.CONNECTING, P.REGISTERED}),  # decode registers again / prefill accepts it again
    P.REFUSED: frozenset(),
}


@dataclass(eq=False)
class Peer:
    addr: str  # the peer instance's input address
    state: PeerState
    last_seen: float
    transfer_addr: str = ""  # decode side: the prefill worker's KV sender
    incarnation: str = ""  # the peer process's, from its PeerInfo: a new one means it restarted
    tp_size: int = 1  # prefill side: the decode instance's ranks, from its layout
    refusal: str = ""  # REFUSED: why

    @property
    def status(self) -> str:
        """As the heartbeat to the front end reports it."""
        return f"refused: {self.refusal}" if self.state is P.REFUSED else self.state.value


class PeerTable:
    def __init__(self) -> None:
        self._peers: dict[str, Peer] = {}

    def __contains__(self, addr: object) -> bool:
        return addr in self._peers

    def __iter__(self) -> Iterator[Peer]:
        return iter(list(self._peers.values()))

    def __len__(self) -> int:
        return len(self._peers)

    def get(self, addr: str) -> Peer | None:
        return self._peers.get(addr)

    def registered(self, addr: str) -> Peer | None:
        peer = self._peers.get(addr)
        return peer if peer is not None and peer.state is P.REGISTERED else None

    def in_state(self, state: PeerState) -> list[Peer]:
        return [peer for peer in self._peers.values() if peer.state is state]

    def add(self, addr: str, state: PeerState, now: float) -> Peer:
        assert addr not in self._peers, f"peer {addr} is in the table already"
        _check(addr, _NEW, state)
        peer = self._peers[addr] = Peer(addr, state, now)
        return peer

    def move(self, peer: Peer, to: PeerState, now: float, refusal: str = "") -> None:
        _check(peer.addr, peer.state, to)
        logger.debug("peer %s: %s → %s", peer.addr, peer.state.value, to.value)
        peer.state, peer.refusal = to, refusal
        if to is P.REGISTERED:
            peer.last_seen = now

    def statuses(self) -> dict[str, str]:
        return {addr: peer.status for addr, peer in self._peers.items()}


def _check(addr: str, frm: PeerState | None, to: PeerState) -> None:
    if to not in TRANSITIONS[frm]:
        raise IllegalTransition(f"peer {addr}: {frm.value if frm else '(none)'} → {to.value}")
