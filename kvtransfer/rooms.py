"""Per-side room bookkeeping: every state change of every room goes through ``RoomTable``."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

from kvtransfer.base import DuplicateRoom, RoomResult, TransferConfig, TransferState, log
from protocol.dataplane import TokenLogprob


@dataclass
class Room:
    """A room's bookkeeping on one side. Backends keep their per-room data here too, so one
    table owns everything a room holds and nothing outlives it."""

    room: int
    state: TransferState
    deadline: float
    peer: str | None = None
    dst_pages: list[int] | None = None  # the destination pages the decode side announced
    received: set[int] = field(default_factory=set)  # decode side: destination pages written
    pending: list[Any] = field(default_factory=list)  # prefill side: chunks not moved yet
    first_token: int | None = None
    first_logprob: TokenLogprob | None = None
    error: str | None = None
    reported: bool = True  # False: created by the peer; dropped silently unless adopted locally
    held: bool = False  # final, but its result waits until a remote writer has stopped

    @property
    def unwritten(self) -> int:
        """Decode side: announced destination pages no chunk has written yet."""
        return len(self.dst_pages or []) - len(self.received)

    def check_send(self, src_pages: list[int], dst_pages: list[int]) -> str | None:
        """Prefill side: why a chunk copying ``src_pages`` into ``dst_pages`` may not go out."""
        if len(src_pages) != len(dst_pages):
            return f"{len(src_pages)} source pages but {len(dst_pages)} destination pages"
        stray = set(dst_pages) - set(self.dst_pages or [])
        if stray:
            return f"destination pages {sorted(stray)[:8]} were not announced for this room"
        return None

    def check_landing(self, dst_pages: list[int]) -> str | None:
        """Decode side: why a chunk may not land in ``dst_pages``."""
        expected = set(self.dst_pages or [])
        stray = [p for p in dst_pages if p not in expected]
        if stray:
            return f"chunk writes pages {stray[:8]} that were not announced for room {self.room}"
        again = [p for p in dst_pages if p in self.received]
        if again:
            return f"chunk writes pages {again[:8]} of room {self.room} a second time"
        return None


class RoomTable:
    """Thread-safe table of one side's rooms; the single owner of state transitions."""

    def __init__(self, config: TransferConfig) -> None:
        self.config = config
        self._rooms: dict[int, Room] = {}
        self._results: list[RoomResult] = []
        self._failed_recently: dict[int, tuple[str, float]] = {}  # reported room -> (error, until)
        self._cond = threading.Condition(threading.RLock())

    # ---- creation and lookup -----------------------------------------------------------

    def add(self, room: int, state: TransferState, *, reported: bool = True, **fields: Any) -> Room:
        with self._cond:
            if room in self._rooms:
                raise DuplicateRoom(f"room {room} is already in use on this side")
            deadline = time.monotonic() + self.config.timeout(state)
            entry = Room(room, state, deadline, reported=reported, **fields)
            self._rooms[room] = entry
            return entry

    def claim(self, room: int, state: TransferState) -> Room:
        """Add ``room`` for this side, or adopt it if the peer announced it first (an announced
        room is only reported once claimed); raises DuplicateRoom if this side has it already."""
        with self._cond:
            entry = self._rooms.get(room)
            if entry is None or entry.reported:
                return self.add(room, state)
            entry.reported = True
            return entry

    def get(self, room: int) -> Room | None:
        with self._cond:
            return self._rooms.get(room)

    def live(self, room: int) -> Room | None:
        """The room if it is known and not final."""
        with self._cond:
            entry = self._rooms.get(room)
            return None if entry is None or entry.state.final else entry

    def failed_recently(self, room: int) -> str | None:
        """Why ``room`` failed, if it did so and was reported within the bootstrap timeout: an
        announcement arriving after that is refused rather than taken for a new room."""
        with self._cond:
            error, until = self._failed_recently.get(room, (None, 0.0))
            return error if until > time.monotonic() else None

    def state(self, room: int) -> TransferState | None:
        with self._cond:
            entry = self._rooms.get(room)
            return None if entry is None else entry.state

    def rooms_of(self, peer: str) -> list[Room]:
        with self._cond:
            return [r for r in self._rooms.values() if r.peer == peer and not r.state.final]

    def live_rooms(self) -> list[Room]:
        with self._cond:
            return [r for r in self._rooms.values() if not r.state.final]

    # ---- transitions -------------------------------------------------------------------

    def announce(self, room: int, peer: str, dst_pages: list[int]) -> str | None:
        """Prefill side: ``peer`` announced ``room`` with its destination pages. Returns why it
        is refused, or None: the room then waits for input (created unreported if this side
        has not added it yet, so it is dropped silently unless ``claim`` adopts it)."""
        with self._cond:
            entry = self._rooms.get(room)
            if entry is None:
                gone = self.failed_recently(room)
                if gone is not None:  # failed here before the announcement arrived
                    return gone
                entry = self.add(room, TransferState.WAITING_FOR_INPUT, reported=False)
            elif entry.dst_pages is not None or entry.state.final:
                return entry.error or f"room {room} was already announced"
            entry.peer, entry.dst_pages = peer, dst_pages
            self._move(room, TransferState.WAITING_FOR_INPUT)
            return None

    def land(
        self,
        entry: Room,
        dst_pages: list[int],
        first_token: int | None,
        first_logprob: TokenLogprob | None = None,
    ) -> str | None:
        """Decode side: a chunk was written into ``dst_pages``; the last one (``first_token``
        set, with its logprob if any) completes the room. Returns why the room must fail
        instead, or None."""
        with self._cond:
            entry.received.update(dst_pages)
            if first_token is None:
                self._move(entry.room, TransferState.TRANSFERRING)
                return None
            if entry.unwritten:
                return f"the last chunk left {entry.unwritten} pages unwritten"
            self._move(entry.room, TransferState.DONE, first_token=first_token, first_logprob=first_logprob)
            return None

    def advance(self, room: int, state: TransferState, first_token: int | None = None) -> bool:
        """Move ``room`` forward to ``state`` (re-arming its timeout). Backward moves, moves out
        of a final state and unknown rooms are ignored: returns whether the room moved."""
        with self._cond:
            return self._move(room, state, first_token=first_token)

    def fail(self, room: int, error: str, hold: bool = False) -> bool:
        """Fail ``room``; with ``hold`` its result waits for ``release`` (a writer still running)."""
        with self._cond:
            return self._move(room, TransferState.FAILED, error=error, hold=hold)

    def release(self, room: int) -> None:
        """The remote writer of a held room has stopped: report it now."""
        with self._cond:
            entry = self._rooms.get(room)
            if entry is not None and entry.held:
                entry.held = False
                self._report(entry)

    def release_peer(self, peer: str) -> None:
        """A peer is known dead: every room it might still have been writing is reported."""
        with self._cond:
            for entry in [r for r in self._rooms.values() if r.peer == peer and r.held]:
                entry.held = False
                self._report(entry)

    def expired(self, now: float) -> list[Room]:
        with self._cond:
            return [r for r in self._rooms.values() if not r.state.final and r.deadline <= now]

    def next_deadline(self) -> float | None:
        with self._cond:
            return min((r.deadline for r in self._rooms.values() if not r.state.final), default=None)

    def _move(self, room: int, state: TransferState, *, first_token: int | None = None,
              first_logprob: TokenLogprob | None = None, error: str | None = None,
              hold: bool = False) -> bool:
        entry = self._rooms.get(room)
        if entry is None or not entry.state.may_move_to(state):
            return False
        entry.state = state
        if state.final:
            entry.first_token, entry.first_logprob = first_token, first_logprob
            entry.error, entry.held = error, hold
            if error is not None:
                log.info("room %d failed: %s", room, error)
            entry.pending.clear()
            if not hold:
                self._report(entry)
        else:
            entry.deadline = time.monotonic() + self.config.timeout(state)
        return True

    def _report(self, entry: Room) -> None:
        if entry.reported:
            self._results.append(
                RoomResult(entry.room, entry.state, entry.first_token, entry.first_logprob, entry.error)
            )
            self._cond.notify_all()
        else:
            del self._rooms[entry.room]

    # ---- results -----------------------------------------------------------------------

    def poll(self, timeout: float = 0.0) -> list[RoomResult]:
        """Results since the last call (waiting up to ``timeout`` seconds for one); the rooms
        they name are forgotten."""
        with self._cond:
            if not self._results and timeout > 0:
                self._cond.wait(timeout)
            results, self._results = self._results, []
            now = time.monotonic()
            self._failed_recently = {k: v for k, v in self._failed_recently.items() if v[1] > now}
            for r in results:
                self._rooms.pop(r.room, None)
                if r.state is TransferState.FAILED:
                    self._failed_recently[r.room] = (r.error or "failed", now + self.config.bootstrap_timeout)
            return results
