"""The scheduler's rooms: one ``Room`` per disaggregated request (or per message about one that
came before it), owned by one ``RoomTable`` per instance, the only place a room's state changes.

A room holds all of its pairing's state: the request, the peer instance, destination pages and
what was sent of them, the data-plane ``open`` flag, timers, the first token and its logprob, a
refusal or an early destination, and how it ended. Its states and their legal transitions per
side are written down once below and checked on every move; an illegal one is a bug and raises.
The protocol is in docs/design.md ("Rooms").
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol.dataplane import TokenLogprob
from protocol.messages import Role, RoomDest
from scheduler_proc.request import IllegalTransition, Request

logger = logging.getLogger(__name__)


class RoomState(enum.Enum):
    # prefill side
    EARLY_DEST = "early_dest"  # its destination came before its request
    REFUSED = "refused"  # one side refused it before the other side's message came here
    AWAITING_DEST = "awaiting_dest"  # its request is here, its destination not yet
    ACKNOWLEDGED = "acknowledged"  # transferred; the result of its last step is still due
    # decode side
    READY = "ready"  # KV and first token here: joins the running batch when its first page fits
    JOINED = "joined"  # decoding here (or retracted and resuming): no longer needs its peer
    # both sides
    QUEUED = "queued"  # prefill: destination known, prefilling; decode: waiting for destination pages
    TRANSFERRING = "transferring"  # its KV moves on the data plane; the worker reports its end
    DRAINING = "draining"  # ended, but the worker holds it open: its pages wait for the report
    ENDED = "ended"  # remembered a while: a duplicate is refused, a late message ignored


S = RoomState
_GONE = None  # not in the table: a move from it is a creation, to it a drop
_Moves = dict[RoomState | None, frozenset[RoomState | None]]

TRANSITIONS: dict[Role, _Moves] = {
    Role.PREFILL: {
        _GONE: frozenset({S.EARLY_DEST, S.REFUSED, S.AWAITING_DEST}),
        S.EARLY_DEST: frozenset({S.AWAITING_DEST, S.REFUSED, _GONE}),
        S.REFUSED: frozenset({_GONE}),
        S.AWAITING_DEST: frozenset({S.QUEUED, S.ENDED}),
        S.QUEUED: frozenset({S.TRANSFERRING, S.ENDED, S.DRAINING}),
        S.TRANSFERRING: frozenset({S.ACKNOWLEDGED, S.ENDED, S.DRAINING}),
        S.ACKNOWLEDGED: frozenset({S.ENDED}),
        S.DRAINING: frozenset({S.ENDED}),
        S.ENDED: frozenset({_GONE}),
    },
    Role.DECODE: {
        _GONE: frozenset({S.QUEUED}),
        S.QUEUED: frozenset({S.TRANSFERRING, S.ENDED}),
        S.TRANSFERRING: frozenset({S.READY, S.ENDED, S.DRAINING}),
        S.READY: frozenset({S.JOINED, S.ENDED}),
        S.JOINED: frozenset({S.ENDED}),
        S.DRAINING: frozenset({S.ENDED}),
        S.ENDED: frozenset({_GONE}),
    },
}

LIVE = frozenset({S.AWAITING_DEST, S.QUEUED, S.TRANSFERRING, S.ACKNOWLEDGED, S.READY, S.JOINED})
IN_USE = LIVE | {S.DRAINING, S.ENDED}  # a request for the room is a duplicate


@dataclass(eq=False)
class Room:
    id: int
    rid: str
    state: RoomState
    since: float  # when it entered its current state (timeouts, memory)
    req: Request | None = None  # while live
    peer: str = ""  # the peer instance's input address ("" until known)
    dest: RoomDest | None = None  # prefill: a destination that came before its request
    dst_pages: list[int] = field(default_factory=list)  # prefill: where its pages go
    skip_pages: int = 0  # prefill: leading prompt pages the decode side holds already (not sent)
    sent_pages: int = 0  # prefill: leading pages of the row handled by earlier sends
    open: bool = False  # the worker holds it open on the data plane (its pages are in use there)
    cache: bool = True  # draining: cache its KV when the pages return
    first_token: int | None = None  # decode: the token the prefill side sampled
    first_logprob: TokenLogprob | None = None
    refusal: tuple[str, str] = ("", "")  # REFUSED: (code, message)
    ended_as: str = ""  # ENDED: what a late message for it is told


class RoomTable:
    """Every room this instance knows, with an index by state (in the order rooms entered it)."""

    def __init__(self, side: Role, clock: Callable[[], float]) -> None:
        self.side = side
        self._moves = TRANSITIONS[side]
        self._clock = clock
        self._rooms: dict[int, Room] = {}
        self._by_state: dict[RoomState, dict[int, Room]] = {s: {} for s in RoomState}

    def get(self, room: int | None) -> Room | None:
        return None if room is None else self._rooms.get(room)

    def live_of(self, req: Request) -> Room | None:
        """``req``'s room while both are live."""
        room = self.get(req.room)
        return room if room is not None and room.req is req and room.state in LIVE else None

    def in_state(self, *states: RoomState) -> list[Room]:
        return [room for s in states for room in self._by_state[s].values()]

    def count(self, *states: RoomState) -> int:
        return sum(len(self._by_state[s]) for s in states)

    def add(self, room: int, rid: str, state: RoomState, **fields: object) -> Room:
        assert room not in self._rooms, f"room {room} is in the table already"
        self._check(room, _GONE, state)
        entry = self._rooms[room] = Room(room, rid, state, self._clock(), **fields)  # type: ignore[arg-type]
        self._by_state[state][room] = entry
        return entry

    def move(self, room: Room, to: RoomState) -> None:
        self._check(room.id, room.state, to)
        del self._by_state[room.state][room.id]
        logger.debug("room=%d %s → %s", room.id, room.state.value, to.value)
        room.state, room.since = to, self._clock()
        self._by_state[to][room.id] = room
        if to is S.ENDED:  # remembered for late messages only: let go of the request
            room.req, room.dst_pages = None, []

    def drop(self, room: Room) -> None:
        self._check(room.id, room.state, _GONE)
        del self._by_state[room.state][room.id]
        del self._rooms[room.id]

    def forget_ended(self, now: float, memory_s: float) -> None:
        """Drop rooms ended more than ``memory_s`` ago (oldest first)."""
        for room in self.in_state(S.ENDED):
            if now - room.since < memory_s:
                return
            self.drop(room)

    def _check(self, room: int, frm: RoomState | None, to: RoomState | None) -> None:
        if to not in self._moves.get(frm, frozenset()):
            raise IllegalTransition(f"{self.side.value} room={room}: {_name(frm)} → {_name(to)}")


def _name(state: RoomState | None) -> str:
    return "(none)" if state is None else state.value
