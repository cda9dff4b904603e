"""The lifecycle of a data-plane link between one KV sender and one KV receiver, as each side
sees it: the sender keeps one ``Link`` per decode side that registered with it, the receiver
one per prefill side it was asked to register with. Each side's ``LinkTable`` owns its links
and applies the one transition rule (``LEGAL_MOVES``) to every move.

Losing and regaining a peer is one path on both sides: REGISTERED → LOST (heartbeat silence,
or UNREGISTERED from the sender: the link's rooms fail) → RE_REGISTERING (the receiver sends
REGISTER again, every heartbeat interval, until it is accepted) → REGISTERED. A first
registration starts in CONNECTING and ends REGISTERED or CLOSED (refused: forgotten).
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from kvtransfer.base import TransferError, log


class LinkState(enum.Enum):
    CONNECTING = "connecting"  # first REGISTER sent (receiver) or being checked (sender)
    REGISTERED = "registered"  # frames flow; heartbeats both ways
    LOST = "lost"  # silent, or dropped by the other side: its rooms failed
    RE_REGISTERING = "re_registering"  # REGISTER sent again, not answered yet
    CLOSED = "closed"  # refused or given up at the first registration: forgotten


LEGAL_MOVES: dict[LinkState, frozenset[LinkState]] = {
    LinkState.CONNECTING: frozenset({LinkState.REGISTERED, LinkState.CLOSED}),
    LinkState.REGISTERED: frozenset({LinkState.LOST}),
    LinkState.LOST: frozenset({LinkState.RE_REGISTERING}),
    LinkState.RE_REGISTERING: frozenset({LinkState.REGISTERED, LinkState.LOST}),
    LinkState.CLOSED: frozenset(),
}


class IllegalLinkMove(TransferError, RuntimeError):
    """A link was asked to move where ``LEGAL_MOVES`` does not allow: a bug, not a condition."""


@dataclass
class Link:
    """One peer as this side sees it. ``(session, epoch)`` names one registration of the
    receiver (its incarnation, and how often it lost the link): the sender answers a repeated
    REGISTER of the registration it holds without redoing it."""

    peer: str  # the receiver's name (sender side) or the sender's address (receiver side)
    state: LinkState = LinkState.CONNECTING
    last_seen: float = 0.0  # monotonic time of the last frame from the peer
    session: str = ""
    epoch: int = 0

    @property
    def registered(self) -> bool:
        return self.state is LinkState.REGISTERED


L = TypeVar("L", bound=Link)


class LinkTable(Generic[L]):
    """One side's links by peer; every state change goes through ``move``. Thread-safe for the
    lookups the worker thread makes; moves happen on the side's I/O thread."""

    def __init__(self) -> None:
        self._links: dict[str, L] = {}
        self._lock = threading.Lock()

    def add(self, link: L) -> L:
        """Track a new link (in CONNECTING); replaces a closed one of the same peer."""
        with self._lock:
            current = self._links.get(link.peer)
            if current is not None and current.state is not LinkState.CLOSED:
                raise IllegalLinkMove(f"a link to {link.peer} already exists ({current.state.value})")
            self._links[link.peer] = link
            return link

    def get(self, peer: str) -> L | None:
        with self._lock:
            return self._links.get(peer)

    def states(self) -> dict[str, str]:
        """Each open link's state, by peer."""
        with self._lock:
            return {peer: link.state.value for peer, link in self._links.items()}

    def __iter__(self) -> Iterator[L]:
        with self._lock:
            return iter(list(self._links.values()))

    def move(self, link: L, state: LinkState) -> None:
        """Move ``link`` to ``state``; raises IllegalLinkMove for a move the rule forbids. A
        closed link is forgotten."""
        if state not in LEGAL_MOVES[link.state]:
            raise IllegalLinkMove(f"link to {link.peer}: {link.state.value} → {state.value} is not allowed")
        log.debug("link to %s: %s → %s", link.peer, link.state.value, state.value)
        link.state = state
        if state is LinkState.CLOSED:
            with self._lock:
                if self._links.get(link.peer) is link:
                    del self._links[link.peer]
