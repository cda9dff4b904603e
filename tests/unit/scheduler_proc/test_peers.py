"""The peer lifecycle: every legal transition taken once, an illegal one refused, and a lost peer
registered again through the one path (heartbeat silence → lost → registering again)."""

from __future__ import annotations

import pytest

from scheduler_proc.peers import TRANSITIONS, PeerState, PeerTable
from scheduler_proc.request import IllegalTransition
from tests.fakes.disagg import Cluster, expected, peers

ADDR = "inproc://peer"
P = PeerState

# how to bring a new peer into each state (the decode side's path, or the prefill side's)
PATHS: dict[PeerState | None, list[PeerState]] = {
    None: [],
    P.CONNECTING: [P.CONNECTING],
    P.REGISTERING: [P.CONNECTING, P.REGISTERING],
    P.REGISTERED: [P.REGISTERED],
    P.REFUSED: [P.CONNECTING, P.REFUSED],
    P.LOST: [P.REGISTERED, P.LOST],
}
LEGAL = [(frm, to) for frm, targets in TRANSITIONS.items() for to in targets]


def table_with(state: PeerState | None) -> PeerTable:
    table = PeerTable()
    path = PATHS[state]
    if path:
        peer = table.add(ADDR, path[0], now=1.0)
        for nxt in path[1:]:
            table.move(peer, nxt, now=2.0, refusal="why" if nxt is P.REFUSED else "")
    return table


@pytest.mark.parametrize(
    ("frm", "to"), LEGAL, ids=[f"{f.value if f else 'new'}->{t.value}" for f, t in LEGAL]
)
def test_every_legal_transition(frm, to):
    table = table_with(frm)
    if frm is None:
        peer = table.add(ADDR, to, now=5.0)
    else:
        peer = table.get(ADDR)
        table.move(peer, to, now=5.0, refusal="page_size mismatch" if to is P.REFUSED else "")
    assert peer.state is to and table.in_state(to) == [peer]
    if to is P.REGISTERED:
        assert peer.last_seen == 5.0 and table.registered(ADDR) is peer
    expected_status = "refused: page_size mismatch" if to is P.REFUSED else to.value
    assert table.statuses() == {ADDR: expected_status}


@pytest.mark.parametrize(
    ("frm", "to"),
    [
        (P.REFUSED, P.CONNECTING),  # a refusal is final
        (P.CONNECTING, P.REGISTERED),  # not before the worker registered its KV receiver
        (P.REGISTERED, P.CONNECTING),  # only through lost
        (None, P.LOST),
    ],
)
def test_an_illegal_transition_is_refused(frm, to):
    table = table_with(frm)
    with pytest.raises(IllegalTransition):
        if frm is None:
            table.add(ADDR, to, now=1.0)
        else:
            table.move(table.get(ADDR), to, now=1.0)


def test_a_silent_decode_peer_is_lost_then_registers_again_and_serves():
    c = Cluster(chunked_prefill_size=8)
    c.connect()
    p, d = c.prefills[0], c.decodes[0]
    prompt = list(range(1, 14))
    d.dead = True  # silent: nothing reaches it, it sends nothing
    c.advance(6.0)  # past the heartbeat timeout
    assert peers(p.core).get(d.addr).state is P.LOST
    d.dead = False
    c.advance(2.0)  # its registration, repeated every beat, is taken again
    assert peers(p.core).get(d.addr).state is P.REGISTERED
    assert d.core.peer_states() == {p.addr: "registered"}
    c.submit("after", prompt, max_new=6, stop=False)
    c.run()
    assert c.log.tokens["after"] == expected(prompt, max_new=6, stop=False)
    assert not c.log.failed
    c.assert_no_leak()
