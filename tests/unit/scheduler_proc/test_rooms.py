"""The room state machine of each side: every legal transition is taken once, an illegal one
raises, and the table's index by state follows every move."""

from __future__ import annotations

from collections import deque

import pytest

from protocol.messages import Role
from scheduler_proc.request import IllegalTransition
from scheduler_proc.rooms import TRANSITIONS, RoomState, RoomTable

ROOM = 7


def path_to(side: Role, state: RoomState) -> list[RoomState]:
    """The shortest chain of states from creation to ``state``."""
    moves = TRANSITIONS[side]
    paths: dict[RoomState | None, list[RoomState]] = {None: []}
    queue: deque[RoomState | None] = deque([None])
    while queue:
        here = queue.popleft()
        for nxt in moves.get(here, ()):
            if nxt is not None and nxt not in paths:
                paths[nxt] = [*paths[here], nxt]
                queue.append(nxt)
    return paths[state]


def reach(side: Role, state: RoomState | None) -> RoomTable:
    table = RoomTable(side, clock=lambda: 0.0)
    if state is None:
        return table
    first, *rest = path_to(side, state)
    room = table.add(ROOM, "r", first)
    for nxt in rest:
        table.move(room, nxt)
    return table


LEGAL = [
    (side, frm, to) for side, moves in TRANSITIONS.items() for frm, targets in moves.items() for to in targets
]


@pytest.mark.parametrize(
    ("side", "frm", "to"),
    LEGAL,
    ids=[f"{s.value}:{f.value if f else 'new'}->{t.value if t else 'gone'}" for s, f, t in LEGAL],
)
def test_every_legal_transition(side, frm, to):
    table = reach(side, frm)
    if frm is None:
        room = table.add(ROOM, "r", to)
    elif to is None:
        table.drop(table.get(ROOM))
        assert table.get(ROOM) is None and table.count(*RoomState) == 0
        return
    else:
        room = table.get(ROOM)
        table.move(room, to)
    assert table.get(ROOM) is room and room.state is to
    assert table.in_state(to) == [room] and table.count(*RoomState) == 1


def test_every_state_of_each_side_is_reachable_and_leads_out_of_the_table():
    for side, moves in TRANSITIONS.items():
        for state in (s for s in moves if s is not None):
            assert path_to(side, state)[-1] is state
            seen, todo = set(), [state]
            while todo:  # a room in any state can still be forgotten
                here = todo.pop()
                seen.add(here)
                todo += [s for s in moves.get(here, ()) if s not in seen]
            assert None in seen, f"{side.value}: a room in {state.value} is never forgotten"


@pytest.mark.parametrize(
    ("side", "frm", "to"),
    [
        (Role.PREFILL, RoomState.ENDED, RoomState.QUEUED),  # an ended room never comes back
        (Role.PREFILL, RoomState.AWAITING_DEST, RoomState.DRAINING),  # not open on the data plane yet
        (Role.DECODE, RoomState.READY, RoomState.TRANSFERRING),
        (Role.DECODE, None, RoomState.AWAITING_DEST),  # a prefill-side state
    ],
)
def test_an_illegal_transition_raises(side, frm, to):
    table = reach(side, frm)
    with pytest.raises(IllegalTransition):
        if frm is None:
            table.add(ROOM, "r", to)
        else:
            table.move(table.get(ROOM), to)


def test_a_live_room_cannot_be_dropped():
    table = reach(Role.DECODE, RoomState.TRANSFERRING)
    with pytest.raises(IllegalTransition):
        table.drop(table.get(ROOM))


def test_ended_rooms_are_forgotten_oldest_first_after_their_memory():
    now = [0.0]
    table = RoomTable(Role.DECODE, clock=lambda: now[0])
    for room in (1, 2):
        table.move(table.add(room, f"r{room}", RoomState.QUEUED), RoomState.ENDED)
        now[0] += 10.0
    table.forget_ended(now=125.0, memory_s=120.0)
    assert table.get(1) is None and table.get(2) is not None
    table.forget_ended(now=130.0, memory_s=120.0)
    assert table.count(*RoomState) == 0
