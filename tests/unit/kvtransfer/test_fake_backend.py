"""The fake backend's fault injection: delayed transfers, injected failures, a dead sender."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from kvtransfer import TransferError, TransferState, make_backend
from kvtransfer.fake import FakeSender
from tests.unit.kvtransfer.kv_helpers import FAST, Pair, connect, layout, pages_equal, pool, wait_results


@pytest.fixture
def fake() -> Iterator[Pair]:
    p = connect("fake")
    yield p
    p.close()


def faults(p: Pair):
    assert isinstance(p.sender, FakeSender)
    return p.sender.faults


def test_a_delayed_room_lands_after_its_delay(fake: Pair) -> None:
    faults(fake).delay(1, 0.2)
    fake.receiver.expect(1, fake.peer, [3])
    fake.sender.add_room(1)
    start = time.monotonic()
    fake.sender.send(1, [2], [3], first_token=6)
    assert fake.receiver.poll() == [] and fake.receiver.state(1) == TransferState.WAITING_FOR_INPUT
    (done,) = wait_results(fake.receiver, timeout=5.0)
    assert done.ok and done.first_token == 6 and time.monotonic() - start >= 0.2
    assert pages_equal(fake.src, [2], fake.dst, [3])
    assert wait_results(fake.sender)[0].ok


def test_an_abort_during_a_delay_writes_nothing(fake: Pair) -> None:
    faults(fake).delay(1, 0.1)
    fake.receiver.expect(1, fake.peer, [3])
    fake.sender.add_room(1)
    fake.sender.send(1, [2], [3], first_token=6)
    fake.receiver.abort(1, "client left")
    assert wait_results(fake.receiver)[0].state == TransferState.FAILED
    assert wait_results(fake.sender)[0].state == TransferState.FAILED
    assert fake.receiver.poll(timeout=0.2) == []
    assert all(float(c.abs().sum()) == 0.0 for caches in fake.dst for c in caches)


def test_an_injected_failure_fails_both_sides(fake: Pair) -> None:
    faults(fake).fail(1, "nic down")
    fake.receiver.expect(1, fake.peer, [3])
    fake.sender.add_room(1)
    fake.sender.send(1, [2], [3])
    for side in (fake.receiver, fake.sender):
        (failed,) = wait_results(side)
        assert failed.state == TransferState.FAILED and "nic down" in (failed.error or "")


def test_a_killed_sender_fails_every_room_and_refuses_registration(fake: Pair) -> None:
    fake.receiver.expect(1, fake.peer, [3])
    fake.receiver.expect(2, fake.peer, [4])
    fake.sender.add_room(1)
    faults(fake).kill()
    assert not fake.sender.send(1, [2], [3], first_token=1)
    assert {r.room for r in wait_results(fake.receiver, count=2)} == {1, 2}
    assert [r.room for r in wait_results(fake.sender)] == [1]  # room 2 was never added there
    other = make_backend("fake", "decode", layout("fake"), *pool(), config=FAST)
    with pytest.raises(TransferError, match="no fake KV sender"):
        other.register(fake.sender.address)


def test_an_address_is_free_again_after_close(fake: Pair) -> None:
    with pytest.raises(ValueError, match="in use"):
        make_backend("fake", "prefill", layout("fake"), *pool(0), address=fake.sender.address)
    fake.sender.close()
    again = make_backend("fake", "prefill", layout("fake"), *pool(0), address=fake.sender.address)
    again.close()
