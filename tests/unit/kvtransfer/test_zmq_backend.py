"""zmq backend specifics: two processes, dead peers, late frames, and the decode side's rule that
pages a remote writer may still touch are reported only after it acknowledges (or dies)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
import zmq

from kvtransfer import RegistrationRefused, TransferConfig, TransferState, make_backend
from kvtransfer.kernels import PagedCaches, gather_pages_ref
from kvtransfer.link_receiver import LinkReceiver
from kvtransfer.zmq_backend import ZmqReceiver
from protocol.codec import Message, decode, encode
from protocol.dataplane import (
    KVAbort,
    KVAbortAck,
    KVAck,
    KVChunk,
    KVHeartbeat,
    KVRegister,
    KVRegistered,
    KVRoom,
    KVUnregistered,
    TokenLogprob,
)
from tests.unit.kvtransfer.kv_helpers import (
    FAST,
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

M = TypeVar("M", bound=Message)
QUIET_PEER = TransferConfig.uniform(5.0, heartbeat_interval=0.05, heartbeat_timeout=30.0)

PREFILL_CHILD = prefill_child("zmq")


def test_pages_move_between_two_processes(tmp_path: Path) -> None:
    addr = f"ipc://{tmp_path}/kv.sock"
    child = spawn_child(PREFILL_CHILD, addr)
    dst = pool()
    receiver = make_backend("zmq", "decode", layout("zmq"), *dst, config=FAST)
    try:
        peer = receiver.register(addr, timeout=60.0)
        receiver.expect(5, peer, [10, 11, 12, 13, 14])
        (done,) = wait_results(receiver, timeout=60.0)
        assert done.ok and done.first_token == 77
        assert pages_equal(pool(seed=0), [1, 2, 3, 4, 5], dst, [10, 11, 12, 13, 14])
        out, _ = child.communicate(timeout=60)
        assert child.returncode == 0 and out.strip() == "DONE"  # the ack reached the sender
    finally:
        receiver.close()
        stop_child(child)


def test_registration_with_a_bad_address_fails_at_once() -> None:
    receiver = make_backend("zmq", "decode", layout("zmq"), *pool(), config=FAST)
    try:
        with pytest.raises(RegistrationRefused, match="could not connect"):
            receiver.register("bogus://nowhere", timeout=30.0)
    finally:
        receiver.close()


def test_a_dead_prefill_peer_fails_its_rooms() -> None:
    p = connect("zmq")
    try:
        p.receiver.expect(1, p.peer, [1])
        p.sender.close()
        (failed,) = wait_results(p.receiver, timeout=10.0)
        assert failed.state == TransferState.FAILED and "stopped answering" in (failed.error or "")
    finally:
        p.receiver.close()


def test_a_dead_decode_peer_fails_its_rooms() -> None:
    p = connect("zmq")
    try:
        p.receiver.expect(1, p.peer, [1])
        p.sender.add_room(1)
        wait_state(p.receiver, 1, TransferState.WAITING_FOR_INPUT)  # the sender knows its peer
        p.receiver.close()
        (failed,) = wait_results(p.sender, timeout=10.0)
        assert failed.state == TransferState.FAILED and "stopped answering" in (failed.error or "")
    finally:
        p.sender.close()


class RawPrefill:
    """A prefill peer speaking the link protocol by hand, to send what a real one would not."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.peer = b""

    def recv(self, kind: type[M]) -> M:
        """The next frame of ``kind`` (heartbeats skipped)."""
        while True:
            assert self.sock.poll(5000), f"no {kind.TYPE} frame"
            self.peer, header, *_ = self.sock.recv_multipart()
            msg = decode(header)
            if not isinstance(msg, KVHeartbeat):
                assert isinstance(msg, kind), msg
                return msg

    def send(self, msg: Message, *payload: bytes) -> None:
        self.sock.send_multipart([self.peer, encode(msg), *payload])

    def accept(self, receiver: LinkReceiver) -> str:
        """Let ``receiver`` register with this peer."""
        result: list[str] = []
        t = threading.Thread(target=lambda: result.append(receiver.register(self.address, timeout=5.0)))
        t.start()
        self.recv(KVRegister)
        self.send(KVRegistered(ok=True))
        t.join()
        return result[0]

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


@pytest.fixture
def raw() -> Any:
    peer = RawPrefill()
    yield peer
    peer.close()


def test_late_and_stray_chunks_are_ignored(raw: RawPrefill) -> None:
    dst = pool()
    receiver = ZmqReceiver(layout("zmq"), *dst, config=QUIET_PEER)
    try:
        peer = raw.accept(receiver)
        receiver.expect(1, peer, [2])
        raw.recv(KVRoom)
        src = PagedCaches(*pool(seed=3))
        payload = gather_pages_ref(src, [4]).numpy().tobytes()
        raw.send(KVChunk(99, [2], last=True, first_token=1), payload)  # unknown room
        raw.send(KVChunk(1, [2], last=True, first_token=8, first_logprob=TokenLogprob(-0.5)), payload)
        (done,) = wait_results(receiver)
        assert done.ok and done.first_token == 8 and done.first_logprob == TokenLogprob(-0.5)
        other = gather_pages_ref(PagedCaches(*pool(seed=4)), [4]).numpy().tobytes()
        raw.send(KVChunk(1, [2], last=True, first_token=9), other)  # late: room is done
        raw.send(KVAbort(1, "late abort"))
        raw.send(KVHeartbeat())
        assert receiver.poll(timeout=0.3) == []
        assert pages_equal(pool(seed=3), [4], dst, [2])
    finally:
        receiver.close()


def test_malformed_payload_fails_the_room_and_tells_the_sender(raw: RawPrefill) -> None:
    receiver = ZmqReceiver(layout("zmq"), *pool(), config=QUIET_PEER)
    try:
        receiver.expect(1, raw.accept(receiver), [2])
        raw.recv(KVRoom)
        raw.send(KVChunk(1, [2], last=True, first_token=1), b"short")
        (failed,) = wait_results(receiver)
        assert failed.state == TransferState.FAILED and "payload" in (failed.error or "")
        assert raw.recv(KVAbort).room == 1
    finally:
        receiver.close()


class RemoteWriterMover:
    """Stands in for cuda_ipc on CPU: the prefill side writes the pages, nothing lands here."""

    remote_writes = True

    def __init__(self, pool: PagedCaches) -> None:
        pass

    def registration(self) -> dict[str, Any]:
        return {}

    def apply(self, dst_pages: list[int], payload: list[zmq.Frame]) -> None:
        pass


class RemoteWriterReceiver(LinkReceiver):
    mover_class = RemoteWriterMover


def test_with_a_remote_writer_an_abort_is_reported_after_its_ack(raw: RawPrefill) -> None:
    receiver = RemoteWriterReceiver(layout("zmq"), *pool(), config=QUIET_PEER)
    try:
        receiver.expect(1, raw.accept(receiver), [2, 3])
        raw.recv(KVRoom)
        raw.send(KVChunk(1, [2], last=False))
        receiver.abort(1)
        assert raw.recv(KVAbort).room == 1
        assert receiver.poll(timeout=0.3) == []  # the writer may still be writing page 3
        assert receiver.state(1) == TransferState.FAILED
        raw.send(KVAbortAck(1))
        (failed,) = wait_results(receiver)
        assert failed.room == 1 and failed.state == TransferState.FAILED
    finally:
        receiver.close()


def test_with_a_remote_writer_a_timeout_is_reported_when_the_writer_dies(raw: RawPrefill) -> None:
    config = TransferConfig.uniform(0.2, heartbeat_interval=0.05, heartbeat_timeout=1.0)
    receiver = RemoteWriterReceiver(layout("zmq"), *pool(), config=config)
    try:
        receiver.expect(1, raw.accept(receiver), [2])
        raw.recv(KVRoom)
        assert "timed out" in raw.recv(KVAbort).reason
        assert receiver.poll(timeout=0.3) == []  # no ack: held until the silent peer counts as dead
        (failed,) = wait_results(receiver, timeout=5.0)
        assert failed.state == TransferState.FAILED
    finally:
        receiver.close()


def test_sender_ignores_frames_for_unknown_rooms() -> None:
    p = connect("zmq")
    try:
        p.receiver.expect(1, p.peer, [1])
        p.receiver.abort(2)  # unknown room: nothing is sent
        ctx = zmq.Context()
        rogue = ctx.socket(zmq.DEALER)
        rogue.setsockopt(zmq.LINGER, 0)
        rogue.connect(p.sender.address)
        rogue.send(encode(KVAck(1)))  # not registered: told so, and ignored
        rogue.send(encode(KVRoom(3, [1])))
        for _ in range(2):
            assert rogue.poll(5000)
            assert isinstance(decode(rogue.recv()), KVUnregistered)
        rogue.close()
        ctx.term()
        p.sender.add_room(1)
        p.sender.send(1, [2], [1], first_token=4)
        assert wait_results(p.receiver)[0].first_token == 4
        assert torch.equal(p.dst[0][0][1], p.src[0][0][2])
    finally:
        p.close()


def test_a_decode_peer_dropped_as_dead_learns_it_and_registers_again() -> None:
    sender_cfg = TransferConfig.uniform(5.0, heartbeat_interval=0.05, heartbeat_timeout=0.3)
    silent_cfg = TransferConfig.uniform(5.0, heartbeat_interval=30.0, heartbeat_timeout=60.0)
    src, dst = pool(seed=0), pool()
    addr = "tcp://127.0.0.1:*"
    sender = make_backend("zmq", "prefill", layout("zmq"), *src, address=addr, config=sender_cfg)
    receiver = make_backend("zmq", "decode", layout("zmq"), *dst, config=silent_cfg)
    try:
        peer = receiver.register(sender.address, timeout=5.0)
        receiver.expect(1, peer, [1])
        sender.add_room(1)
        (dropped,) = wait_results(sender)  # the receiver sends no heartbeat for 30 s
        assert "stopped answering" in (dropped.error or "")
        (failed,) = wait_results(receiver)
        assert failed.room == 1 and "dropped us" in (failed.error or "")
        receiver.expect(2, peer, [2])  # a dead peer fails the room instead of raising
        assert "unavailable" in (wait_results(receiver)[0].error or "")
        assert receiver.register(sender.address, timeout=5.0) == peer
        receiver.expect(3, peer, [3])
        sender.add_room(3)
        sender.send(3, [4], [3], first_token=2)
        assert wait_results(receiver)[0].ok and wait_results(sender)[0].ok
        assert pages_equal(src, [4], dst, [3])
    finally:
        receiver.close()
        sender.close()
