"""nixl backend specifics: page descriptors, one-sided writes between two processes (the decode
side's pump drives UCX progress), a decode process killed mid-room, a failing WRITE that drops
and heals the link, WRITEs in flight (they block neither the link nor other rooms, keep their
room's chunk order, hold an abort's results until they stop, are cancelled with a lost link,
and every handle is released), malformed registrations, idle CPU, and the error without the
package. The KVSender / KVReceiver contract itself runs over nixl in ``test_contract.py``."""

from __future__ import annotations

import os
import signal
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest

from kvtransfer import KVSender, TransferConfig, TransferState, make_backend, nixl_backend
from kvtransfer import nixl_agent as nixl_agent_module
from kvtransfer.nixl_agent import NixlUnavailable, page_indices, page_rows
from tests.unit.kvtransfer.kv_helpers import (
    FAST,
    NEEDS_NIXL,
    NUM_PAGES,
    connect,
    layout,
    pages_equal,
    pool,
    prefill_child,
    spawn_child,
    stop_child,
    wait_results,
    wait_state,
)

SLOW_START = TransferConfig.uniform(30.0, heartbeat_interval=0.05, heartbeat_timeout=2.0)
IDLE = TransferConfig.uniform(5.0, heartbeat_interval=0.5, heartbeat_timeout=5.0)

PREFILL_CHILD = prefill_child("nixl")

STALLING_PREFILL_CHILD = """
import sys, time
import torch
torch.set_num_threads(1)
from kvtransfer import make_backend
from tests.unit.kvtransfer.kv_helpers import FAST, layout, pool
sender = make_backend("nixl", "prefill", layout("nixl"), *pool(seed=0), address=sys.argv[1], config=FAST)
sender.add_room(6)
sender.send(6, [1], [10])
print("sent", flush=True)
time.sleep(600)
"""

DECODE_CHILD = """
import sys, time
import torch
torch.set_num_threads(1)
from kvtransfer import make_backend
from tests.unit.kvtransfer.kv_helpers import FAST, layout, pool
receiver = make_backend("nixl", "decode", layout("nixl"), *pool(), config=FAST)
receiver.expect(9, receiver.register(sys.argv[1], timeout=60), [2, 3])
print("expecting", flush=True)
time.sleep(600)
"""


def test_page_descriptors_are_every_page_of_every_array_array_major() -> None:
    addresses, num_pages, page_bytes = [1 << 20, 5 << 20, 9 << 20], 6, 256
    rows = page_rows(addresses, num_pages, page_bytes, device_id=3)
    expected = [(a + p * page_bytes, page_bytes, 3) for a in addresses for p in range(num_pages)]
    assert rows.dtype == np.uint64 and [tuple(map(int, r)) for r in rows] == expected
    pages = [4, 0, 5]
    idx = page_indices(pages, len(addresses), num_pages)
    assert idx.dtype == np.int32
    assert [expected[i][0] for i in idx] == [a + p * page_bytes for a in addresses for p in pages]


def test_without_the_package_choosing_nixl_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nixl_agent_module, "NIXL_MODULES", ("pdserve_no_such_nixl",))
    assert not nixl_agent_module.nixl_available()
    with pytest.raises(NixlUnavailable, match=r"pip install 'pdserve\[nixl\]'"):
        make_backend("nixl", "decode", layout("nixl"), *pool(), config=FAST)


@NEEDS_NIXL
def test_pages_move_between_two_processes(tmp_path: Path) -> None:
    addr = f"ipc://{tmp_path}/kv.sock"
    child = spawn_child(PREFILL_CHILD, addr)
    dst = pool()
    receiver = make_backend("nixl", "decode", layout("nixl"), *dst, config=FAST)
    try:
        peer = receiver.register(addr, timeout=60.0)
        receiver.expect(5, peer, [10, 11, 12, 13, 14])
        (done,) = wait_results(receiver, timeout=60.0)
        assert done.ok and done.first_token == 77
        assert pages_equal(pool(seed=0), [1, 2, 3, 4, 5], dst, [10, 11, 12, 13, 14])
        out, _ = child.communicate(timeout=60)
        assert child.returncode == 0 and out.strip().splitlines()[-1] == "DONE"  # the ack came back
        assert receiver._pump.busy == 0  # type: ignore[attr-defined]  # polled: no more progress
    finally:
        receiver.close()
        stop_child(child)


@NEEDS_NIXL
def test_a_prefill_process_killed_mid_room_fails_the_room_on_the_decode_side(tmp_path: Path) -> None:
    addr = f"ipc://{tmp_path}/kv.sock"
    child = spawn_child(STALLING_PREFILL_CHILD, addr)
    dst = pool()
    receiver = make_backend("nixl", "decode", layout("nixl"), *dst, config=SLOW_START)
    try:
        receiver.expect(6, receiver.register(addr, timeout=60.0), [10, 11])
        wait_state(receiver, 6, TransferState.TRANSFERRING, timeout=30.0)  # the first page landed
        assert pages_equal(pool(seed=0), [1], dst, [10])
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        (failed,) = wait_results(receiver, timeout=15.0)
        assert failed.state is TransferState.FAILED and "stopped answering" in (failed.error or ""), failed
        assert receiver._pump.busy == 0  # type: ignore[attr-defined]
    finally:
        receiver.close()
        stop_child(child)


@NEEDS_NIXL
def test_a_decode_process_killed_mid_room_fails_the_room_on_the_prefill_side() -> None:
    sender = make_backend("nixl", "prefill", layout("nixl"), *pool(seed=0), address="tcp://127.0.0.1:*",
                          config=SLOW_START)
    child = spawn_child(DECODE_CHILD, sender.address)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "expecting"
        sender.add_room(9)
        wait_state(sender, 9, TransferState.WAITING_FOR_INPUT, timeout=30.0)
        sender.send(9, [1], [2])
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        sender.send(9, [4], [3], first_token=1)
        (failed,) = wait_results(sender, timeout=15.0)
        assert failed.state is TransferState.FAILED
        assert "NIXL WRITE" in (failed.error or "") or "stopped answering" in (failed.error or ""), failed
    finally:
        sender.close()
        stop_child(child)


@NEEDS_NIXL
def test_a_failing_write_fails_its_room_drops_the_link_and_the_link_heals(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    p = connect("nixl")
    agent = p.sender._nixl._agent  # type: ignore[attr-defined]
    real_state = agent.write_state

    def broken_once(handle: object) -> str:  # the posted WRITE errs, as when its peer dies
        monkeypatch.setattr(agent, "write_state", real_state)
        return "injected UCX endpoint error"

    monkeypatch.setattr(agent, "write_state", broken_once)
    try:
        p.receiver.expect(1, p.peer, [1, 2])
        p.sender.add_room(1)
        p.sender.send(1, [3, 4], [1, 2], first_token=5)
        (failed,) = wait_results(p.sender)
        assert failed.state is TransferState.FAILED and "injected UCX endpoint error" in (failed.error or "")
        (failed,) = wait_results(p.receiver)
        assert failed.state is TransferState.FAILED
        # The decode side was told (UNREGISTERED), registers again, and the next room moves.
        deadline, room = time.monotonic() + 10.0, 2
        while True:
            p.receiver.expect(room, p.peer, [6])
            p.sender.add_room(room)
            p.sender.send(room, [7], [6], first_token=8)
            (result,) = wait_results(p.receiver)
            if not result.ok:  # never announced here: it would wait out its bootstrap timeout
                p.sender.abort(room)
            wait_results(p.sender)
            if result.ok or time.monotonic() > deadline:
                break
            room += 1  # the room raced the re-registration: a new one, shortly
            time.sleep(0.05)
        assert result.ok and result.first_token == 8
        assert pages_equal(p.src, [7], p.dst, [6])
    finally:
        p.close()


class HeldWrites:
    """The sender's next ``hold`` WRITEs look in progress (whatever NIXL says) until ``let_go``;
    counts the WRITEs posted and the handles released."""

    def __init__(self, sender: KVSender, monkeypatch: pytest.MonkeyPatch, hold: int) -> None:
        agent = sender._nixl._agent  # type: ignore[attr-defined]
        self.posted: list[object] = []
        self.released: list[object] = []
        self._held: list[object] = []
        self._hold = hold
        self._gate = threading.Event()
        real_post, real_state, real_release = agent.post_write, agent.write_state, nixl_backend.release

        def post(*args: object) -> object:
            handle = real_post(*args)
            self.posted.append(handle)
            if len(self._held) < self._hold:
                self._held.append(handle)
            return handle

        def state(handle: object) -> str:
            if not self._gate.is_set() and any(h is handle for h in self._held):
                return "PROC"
            return real_state(handle)

        def release(handle: object) -> bool:
            ok = real_release(handle)
            if ok:
                self.released.append(handle)
            return ok

        monkeypatch.setattr(agent, "post_write", post)
        monkeypatch.setattr(agent, "write_state", state)
        monkeypatch.setattr(nixl_backend, "release", release)

    def wait_posted(self, count: int, timeout: float = 5.0) -> None:
        end = time.monotonic() + timeout
        while len(self.posted) < count:
            assert time.monotonic() < end, f"{len(self.posted)} WRITEs posted, not {count}"
            time.sleep(0.005)

    def let_go(self) -> None:
        self._gate.set()

    def all_released(self) -> bool:
        return len(self.released) == len(self.posted) and all(
            any(r is h for r in self.released) for h in self.posted
        )


@NEEDS_NIXL
def test_a_write_in_flight_blocks_neither_the_link_nor_other_rooms_and_chunks_keep_their_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    p = connect("nixl")
    held = HeldWrites(p.sender, monkeypatch, hold=1)
    try:
        p.receiver.expect(1, p.peer, [1, 2])
        p.receiver.expect(2, p.peer, [3])
        p.sender.add_room(1)
        p.sender.add_room(2)
        wait_state(p.sender, 1, TransferState.WAITING_FOR_INPUT)
        p.sender.send(1, [4], [1])  # held in flight
        held.wait_posted(1)
        p.sender.send(1, [5], [2], first_token=7)  # done at once, but goes after the held chunk
        p.sender.send(2, [6], [3], first_token=8)
        (done,) = wait_results(p.receiver)
        assert done.room == 2 and done.ok and done.first_token == 8
        # Longer than the heartbeat timeout: the I/O loop kept answering heartbeats meanwhile.
        time.sleep(FAST.heartbeat_timeout * 1.3)
        assert p.receiver.state(1) is TransferState.WAITING_FOR_INPUT, "the last chunk overtook the first"
        assert list(p.sender.link_states().values()) == ["registered"]
        assert list(p.receiver.link_states().values()) == ["registered"]
        held.let_go()
        (done,) = wait_results(p.receiver)
        assert done.room == 1 and done.ok and done.first_token == 7
        assert pages_equal(p.src, [4, 5, 6], p.dst, [1, 2, 3])
        assert sorted(r.room for r in wait_results(p.sender, count=2) if r.ok) == [1, 2]
        assert held.all_released() and len(held.posted) == 3
    finally:
        p.close()


@NEEDS_NIXL
@pytest.mark.parametrize("aborting_side", ["prefill", "decode"])
def test_an_abort_during_a_write_is_reported_on_both_sides_only_once_the_write_stopped(
    monkeypatch: pytest.MonkeyPatch, aborting_side: str
) -> None:
    p = connect("nixl")
    held = HeldWrites(p.sender, monkeypatch, hold=1)
    try:
        p.receiver.expect(1, p.peer, [1, 2])
        p.sender.add_room(1)
        wait_state(p.sender, 1, TransferState.WAITING_FOR_INPUT)
        p.sender.send(1, [4], [1])
        held.wait_posted(1)
        (p.sender if aborting_side == "prefill" else p.receiver).abort(1, "test abort")
        # Neither side may reuse the pages while the WRITE may still read and write them.
        assert p.sender.poll(timeout=0.3) == [] and p.receiver.poll(timeout=0.1) == []
        held.let_go()
        (on_prefill,) = wait_results(p.sender)
        (on_decode,) = wait_results(p.receiver)
        assert on_prefill.state is on_decode.state is TransferState.FAILED
        assert "test abort" in (on_prefill.error or "") and "test abort" in (on_decode.error or "")
        assert held.all_released()
        assert list(p.sender.link_states().values()) == ["registered"]  # an abort keeps the link
    finally:
        p.close()


@NEEDS_NIXL
def test_writes_in_flight_to_a_lost_peer_are_cancelled_and_their_rooms_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    p = connect("nixl")
    held = HeldWrites(p.sender, monkeypatch, hold=2)
    try:
        p.receiver.expect(1, p.peer, [1, 2])
        p.sender.add_room(1)
        wait_state(p.sender, 1, TransferState.WAITING_FOR_INPUT)
        p.sender.send(1, [4], [1])
        p.sender.send(1, [5], [2], first_token=3)
        held.wait_posted(2)
        p.receiver.close()  # silent from now on: the heartbeat drops the link
        (failed,) = wait_results(p.sender, timeout=FAST.heartbeat_timeout * 4)
        assert failed.state is TransferState.FAILED and "stopped answering" in (failed.error or "")
        assert held.all_released()  # cancelled while NIXL still said in progress
    finally:
        p.sender.close()


@NEEDS_NIXL
@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ({}, "shared no NIXL pool"),
        ({"nixl": {"agent_metadata": "not bytes"}}, "malformed NIXL pool"),
        ({"nixl": {"agent_metadata": b"x", "memory": "DRAM", "device_id": 0, "num_pages": 4,
                   "page_bytes": 1, "addresses": [1]}}, "KV arrays"),
        ({"nixl": {"agent_metadata": b"x", "memory": "DISK", "device_id": 0, "num_pages": 4,
                   "page_bytes": 1, "addresses": [1]}}, "memory 'DISK'"),
    ],
)
def test_a_malformed_nixl_registration_is_refused(extra: dict, problem: str) -> None:
    sender = make_backend("nixl", "prefill", layout("nixl"), *pool(0), address="tcp://127.0.0.1:*",
                          config=FAST)
    try:
        mover = sender._nixl  # type: ignore[attr-defined]
        with pytest.raises(ValueError, match=problem):
            mover.open_peer("decode-x", extra, layout("nixl"))
        good = dict(agent_metadata=b"garbage", memory="DRAM", device_id=0, num_pages=NUM_PAGES,
                    page_bytes=mover._agent.page_bytes, addresses=[4096] * mover._agent.num_arrays)
        with pytest.raises(ValueError, match="could not load the decode side's agent"):
            mover.open_peer("decode-x", {"nixl": good}, layout("nixl"))
        with pytest.raises(ValueError, match="decode pages are"):  # a decode rank of 2 holds half the heads
            mover.open_peer("decode-x", {"nixl": good}, layout("nixl", tp_size=2))
    finally:
        sender.close()


@NEEDS_NIXL
def test_idle_sides_burn_no_cpu() -> None:
    """NIXL's own progress thread (which spins) is off; the pump sleeps while no room is live."""
    p = connect("nixl", IDLE)
    try:
        p.receiver.expect(1, p.peer, [1])
        p.sender.add_room(1)
        p.sender.send(1, [2], [1], first_token=3)
        assert wait_results(p.receiver)[0].ok and wait_results(p.sender)[0].ok
        start = time.process_time()
        time.sleep(1.0)
        idle = time.process_time() - start
        assert idle < 0.1, f"both sides together used {idle:.3f} s of CPU in 1 s of idling"
    finally:
        p.close()


@NEEDS_NIXL
def test_closing_both_sides_destroys_their_agents_at_once() -> None:
    """Left to the garbage collector, an agent that had WRITEs queued to a dead peer crashed the
    process at a random later moment (UCX completing them against deregistered memory)."""
    p = connect("nixl")
    # the C++ agents: every handle NIXL gives out holds one, not only the Python nixl_agent
    agents = [weakref.ref(p.sender._nixl._agent._agent.agent),  # type: ignore[attr-defined]
              weakref.ref(p.receiver._nixl.agent._agent.agent)]  # type: ignore[attr-defined]
    p.receiver.expect(1, p.peer, [1])
    p.sender.add_room(1)
    p.sender.send(1, [2], [1], first_token=3)
    assert wait_results(p.receiver)[0].ok and wait_results(p.sender)[0].ok
    p.close()
    assert [a() for a in agents] == [None, None]
