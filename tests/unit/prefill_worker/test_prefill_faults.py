"""The prefill worker's faults: wired in once at start-up, nothing when none is asked for."""

from __future__ import annotations

import time

from prefill_worker.faults import DelayedSender, with_faults
from protocol.dataplane import TokenLogprob
from protocol.faults import Faults
from tests.unit.kvtransfer.kv_helpers import connect, pages_equal, wait_results


def test_no_fault_leaves_the_sender_as_it_is() -> None:
    p = connect("fake")
    try:
        assert with_faults(p.sender, Faults(), "prefill-0") is p.sender
    finally:
        p.receiver.close()
        p.sender.close()


def test_delayed_sends_leave_late_in_order_and_carry_the_logprob() -> None:
    p = connect("fake")
    delayed = with_faults(p.sender, Faults(kv_send_delay_s=0.3), "prefill-0")
    try:
        assert isinstance(delayed, DelayedSender) and delayed.address == p.sender.address
        p.receiver.expect(1, p.peer, [4, 5])
        delayed.add_room(1)
        start = time.monotonic()
        assert delayed.send(1, [1], [4])
        assert delayed.send(1, [2], [5], first_token=9, first_logprob=TokenLogprob(-1.5))
        assert p.receiver.poll(0.1) == []
        (done,) = wait_results(p.receiver)
        assert time.monotonic() - start >= 0.3
        assert (done.ok, done.first_token, done.first_logprob) == (True, 9, TokenLogprob(-1.5))
        assert pages_equal(p.src, [1, 2], p.dst, [4, 5])
        assert wait_results(delayed)[0].ok  # results come through the wrapper
    finally:
        delayed.close()
        p.receiver.close()
        p.sender.close()
