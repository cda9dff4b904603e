"""Data-plane links: the lifecycle rule, and links that heal by themselves once both sides are
alive again (a side is "stopped" by blocking its I/O thread, as SIGSTOP would)."""

from __future__ import annotations

import time

import pytest
import zmq

from kvtransfer import KVReceiver, KVSender, TransferConfig, TransferState, make_backend
from kvtransfer.links import IllegalLinkMove, Link, LinkState, LinkTable
from protocol.codec import decode, encode
from protocol.dataplane import KVRegister, KVRegistered, KVRoom, KVRoomOk, TokenLogprob
from tests.unit.kvtransfer.kv_helpers import (
    Pair,
    connect,
    layout,
    pages_equal,
    pool,
    wait_results,
    wait_state,
)

S = LinkState
HEAL = TransferConfig.uniform(5.0, heartbeat_interval=0.05, heartbeat_timeout=0.3)


def test_links_move_only_along_the_rule() -> None:
    table: LinkTable[Link] = LinkTable()
    link = table.add(Link("p"))
    assert link.state is S.CONNECTING
    for state in (S.REGISTERED, S.LOST, S.RE_REGISTERING, S.LOST, S.RE_REGISTERING, S.REGISTERED):
        table.move(link, state)
    with pytest.raises(IllegalLinkMove):
        table.move(link, S.RE_REGISTERING)  # a registered link is lost first
    with pytest.raises(IllegalLinkMove):
        table.add(Link("p"))  # one link per peer
    table.move(link, S.LOST)
    with pytest.raises(IllegalLinkMove):
        table.move(link, S.REGISTERED)  # only through RE_REGISTERING


def test_a_closed_link_is_forgotten() -> None:
    table: LinkTable[Link] = LinkTable()
    link = table.add(Link("p"))
    table.move(link, S.CLOSED)
    assert table.get("p") is None and list(table) == []
    with pytest.raises(IllegalLinkMove):
        table.move(link, S.REGISTERED)
    table.add(Link("p"))


def stall(side: KVSender | KVReceiver, seconds: float) -> None:
    """Block ``side``'s I/O thread (no frame read or sent, no heartbeat) for ``seconds``."""
    side._io.submit(time.sleep, seconds)  # type: ignore[attr-defined]


def transfer_succeeds(p: Pair, room: int, deadline_s: float) -> float:
    """Open rooms until one moves (rooms opened while the link is still down fail at once);
    returns the seconds it took."""
    start = time.monotonic()
    while True:
        p.receiver.expect(room, p.peer, [room])
        p.sender.add_room(room)
        p.sender.send(room, [room + 1], [room], first_token=room)
        (decode_side,) = wait_results(p.receiver)
        if not decode_side.ok:
            p.sender.abort(room, "the decode side failed it")  # never announced: would wait
        (prefill_side,) = wait_results(p.sender)
        if decode_side.ok and prefill_side.ok:
            assert pages_equal(p.src, [room + 1], p.dst, [room])
            return time.monotonic() - start
        assert time.monotonic() - start < deadline_s, f"the link did not heal: {decode_side.error}"
        room += 1
        time.sleep(0.05)


@pytest.mark.parametrize("stalled", ["sender", "receiver"])
def test_a_link_lost_on_both_sides_heals_by_itself(stalled: str) -> None:
    p = connect("zmq", HEAL)
    try:
        p.receiver.expect(1, p.peer, [1])
        p.sender.add_room(1)
        wait_state(p.sender, 1, TransferState.WAITING_FOR_INPUT)  # both sides know the room
        stall(p.sender if stalled == "sender" else p.receiver, 1.0)  # past both heartbeat timeouts
        for side in (p.receiver, p.sender):
            (failed,) = wait_results(side, timeout=5.0)
            assert failed.room == 1 and failed.state == TransferState.FAILED
        assert transfer_succeeds(p, 2, deadline_s=5.0) < 5.0  # no register() call needed
    finally:
        p.close()


def test_first_token_and_logprob_travel_together(pair: Pair) -> None:
    pair.receiver.expect(4, pair.peer, [1, 2])
    pair.sender.add_room(4)
    pair.sender.send(4, [3], [1])
    pair.sender.send(4, [5], [2], first_token=17, first_logprob=TokenLogprob(-0.25, [17, 3], [-0.25, -2.0]))
    (done,) = wait_results(pair.receiver)
    assert (done.ok, done.first_token) == (True, 17)
    assert done.first_logprob == TokenLogprob(-0.25, [17, 3], [-0.25, -2.0])


class RawDecode:
    """A decode peer speaking the link protocol by hand."""

    def __init__(self, address: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, b"raw-decode")
        self.sock.connect(address)

    def ask(self, msg: KVRegister | KVRoom) -> object:
        self.sock.send(encode(msg))
        while True:
            assert self.sock.poll(5000), "no answer"
            answer = decode(self.sock.recv())
            if answer.TYPE != "kv_heartbeat":
                return answer

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


def test_a_repeated_register_is_answered_without_dropping_the_link() -> None:
    quiet = TransferConfig.uniform(5.0, heartbeat_interval=0.05, heartbeat_timeout=30.0)
    addr = "tcp://127.0.0.1:*"
    sender = make_backend("zmq", "prefill", layout("zmq"), *pool(seed=0), address=addr, config=quiet)
    raw = RawDecode(sender.address)
    try:
        register = KVRegister(layout("zmq"), session="s1", epoch=0)
        assert raw.ask(register) == KVRegistered(ok=True)
        assert raw.ask(KVRoom(1, [3])) == KVRoomOk(1)
        assert raw.ask(register) == KVRegistered(ok=True)  # e.g. a retry: the room lives on
        assert sender.state(1) == TransferState.WAITING_FOR_INPUT
        assert raw.ask(KVRegister(layout("zmq"), session="s1", epoch=1)) == KVRegistered(ok=True, epoch=1)
        assert sender.state(1) is None  # it lost the link meanwhile: the room failed (unclaimed)
    finally:
        raw.close()
        sender.close()

