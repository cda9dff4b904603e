"""What the prefill and decode roles share (DESIGN.md "Disaggregation").

- **Rooms.** Each disaggregated request carries a ``room`` minted by the front end; a room is
  live on an instance while its request is, and remembered for a while after it ended, so a
  duplicate is refused and a late message for it is ignored.
- **Pages on the data plane.** Once the worker opened a room (prefill: the first page send;
  decode: the expect), the worker's KV transfer may read or write the request's pages until it
  reports the room's ``TransferResult``. A request that ends before that is *draining*: its
  room is aborted in the next step and its pages return only with the worker's result.
  The data plane reports every room it opened within its own timeouts; a guard well past them
  catches a room it never reports: the request fails (if still live) and its pages return.
- **Peers.** Registered prefill/decode instances exchange ``PeerHeartbeat``; one silent for
  ``heartbeat_timeout`` is dead and the requests paired with it fail with ``peer_unavailable``.
- **Steps.** A step may carry only data-plane deltas (aborts, expects); it is sent like any
  other and answered with an empty result.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol.config import SchedulerConfig, ServerArgs
from protocol.messages import (
    PROTOCOL_VERSION,
    TRANSFER_FAILED,
    KVExpect,
    Message,
    PeerHeartbeat,
    PeerInfo,
    RequestFailed,
    RoomAbort,
    StepBatch,
    TransferResult,
    WorkerReady,
)
from scheduler_proc.batch import StepBuilder
from scheduler_proc.core import SchedulerCore
from scheduler_proc.request import ReqState, Request

logger = logging.getLogger(__name__)

ROOM_MEMORY_S = 120.0  # how long an ended room is remembered (duplicates refused, late messages ignored)
REGISTERED = "registered"
CONNECTING = "connecting"
TRANSFER_GUARD_FACTOR = 2  # the data plane times out first; the guard only catches a room it never reports

# The fields a (decode, prefill) pair must agree on, in the order they are checked.
MATCHED_FIELDS = (
    "protocol_version",
    "model",
    "num_layers",
    "num_kv_heads",
    "head_dim",
    "page_size",
    "dtype",
    "transfer_backend",
    "tp_size",
    "tp_rank",
)


def peer_info(args: ServerArgs, name: str, input_addr: str, worker: WorkerReady) -> PeerInfo:
    """This instance's side of the registration check."""
    model = worker.model
    return PeerInfo(
        name=name,
        input_addr=input_addr,
        model=model.name,
        num_layers=model.num_layers,
        num_kv_heads=model.num_kv_heads,
        head_dim=model.head_dim,
        page_size=worker.page_size,
        dtype=model.dtype,
        transfer_backend=worker.transfer.backend if worker.transfer else args.transfer_backend,
        protocol_version=PROTOCOL_VERSION,
        transfer=worker.transfer,
    )


def check_peer(ours: PeerInfo, theirs: PeerInfo) -> str | None:
    """Why ``theirs`` cannot pair with ``ours`` (naming the first field that differs), or None."""
    for name in MATCHED_FIELDS:
        mine, other = getattr(ours, name), getattr(theirs, name)
        if mine != other:
            return f"{name} mismatch: instance {ours.name} has {mine!r}, instance {theirs.name} has {other!r}"
    if not theirs.input_addr:
        return f"instance {theirs.name} sent no input address"
    return None


@dataclass
class PeerLink:
    """A peer instance: its registration state (as the heartbeat reports it) and liveness."""

    addr: str
    state: str = CONNECTING  # "connecting" | "registering" | "registered" | "refused: <why>"
    last_seen: float = 0.0
    transfer_addr: str = ""  # decode side: the prefill worker's KV sender


@dataclass
class RoomLink:
    """A live room's pairing: the peer instance and, on the prefill side, where its pages go."""

    peer: str = ""  # the peer's input address ("" until known)
    since: float = 0.0  # when the room entered its current wait (timeouts)
    dst_pages: list[int] = field(default_factory=list)
    skip_pages: int = 0  # leading prompt pages the decode side holds already (not sent)
    sent_pages: int = 0  # leading pages of the row handled by earlier sends
    opened: bool = False  # the worker opened the room on the data plane


@dataclass
class Draining:
    """An ended request whose room the worker still holds open: its pages wait for the report."""

    req: Request
    cache: bool  # cache its KV when the pages return
    since: float


class DisaggCore(SchedulerCore):
    @classmethod
    def from_config(cls, cfg: SchedulerConfig, worker: WorkerReady) -> SchedulerCore:
        return cls(cfg.args, cfg.name, cfg.role, worker, input_addr=cfg.addrs.input_addr)

    def __init__(
        self, args: ServerArgs, name: str, role: str, worker: WorkerReady, input_addr: str = ""
    ) -> None:
        super().__init__(args, name, role, worker)
        self.input_addr = input_addr or f"inproc://{name}"
        self.info = peer_info(args, name, self.input_addr, worker)
        self.clock: Callable[[], float] = time.monotonic
        self.rooms: dict[int, Request] = {}  # live rooms
        self.links: dict[int, RoomLink] = {}
        self.recent_rooms: dict[int, tuple[float, str]] = {}  # ended room -> (forget at, how it ended)
        self.open_rooms: dict[int, Request] = {}  # live rooms the worker holds open
        self.draining: dict[int, Draining] = {}  # ended, room still open on the data plane
        self.peers: dict[str, PeerLink] = {}
        self._abort_rooms: list[int] = []
        self._expects: list[KVExpect] = []
        self._next_beat = 0.0

    # ---------------------------------------------------------------------------- rooms

    def _room_error(self, room: int | None) -> str | None:
        if room is None:
            return f"a {self.role} instance serves only disaggregated requests (with a room)"
        if room in self.rooms or room in self.recent_rooms:
            return f"room {room} is already in use (duplicate room id)"
        return None

    def _refuse(self, rid: str, code: str, message: str) -> None:
        logger.info("rid=%s refused (%s): %s", rid, code, message)
        self._outbox.append(RequestFailed(rid=rid, code=code, message=message, role=self.role))

    def _fail(self, req: Request, code: str, message: str, tell_peer: bool = True) -> None:
        """End ``req`` as failed: one ``RequestFailed`` to the front end, and (unless the failure
        came from the peer) a ``RoomAbort`` so the peer instance ends it at once too."""
        link = self.links.get(req.room) if req.room is not None else None
        logger.warning("rid=%s room=%s failed (%s): %s", req.rid, req.room, code, message)
        self._end(req, ReqState.FAILED)
        self._outbox.append(RequestFailed(rid=req.rid, code=code, message=message, role=self.role))
        if tell_peer and link is not None and link.peer:
            self._tell_abort(link.peer, req.room, req.rid, code, message)  # type: ignore[arg-type]

    def _tell_abort(self, peer: str, room: int, rid: str, code: str, message: str) -> None:
        self._peer_outbox.append((peer, RoomAbort(room, rid, self.input_addr, code, message)))

    def _end(self, req: Request, state: ReqState) -> None:
        super()._end(req, state)
        room = req.room
        if room is not None and self.rooms.get(room) is req:
            del self.rooms[room]
            self.links.pop(room, None)
            self.recent_rooms[room] = (
                self.clock() + ROOM_MEMORY_S,
                f"room {room} already ended ({state.value})",
            )

    def _release_ended(self, req: Request, cache: bool) -> None:
        room = req.room
        if room is not None and self.open_rooms.get(room) is req:
            del self.open_rooms[room]
            self.draining[room] = Draining(req, cache, self.clock())
            self._abort_rooms.append(room)
            logger.debug("rid=%s room=%d: pages held until the worker closes the room", req.rid, room)
            return
        super()._release_ended(req, cache)

    # ---------------------------------------------------------------------------- worker

    def on_worker_message(self, msg: Message) -> bool:
        if not isinstance(msg, TransferResult):
            return self._on_worker_event(msg)
        drained = self.draining.pop(msg.room, None)
        if drained is not None:
            self._release(drained.req, drained.cache)
            logger.debug("rid=%s room=%d: pages released after the room closed", drained.req.rid, msg.room)
            return True
        req = self.open_rooms.pop(msg.room, None)
        if req is None:
            logger.debug("room=%d: late transfer result ignored", msg.room)
            return True
        self._on_transfer_result(req, msg)
        return True

    def _on_worker_event(self, msg: Message) -> bool:
        return False

    def _on_transfer_result(self, req: Request, msg: TransferResult) -> None:
        raise NotImplementedError

    # ---------------------------------------------------------------------------- steps

    def _finish_step(self, step: StepBuilder) -> StepBatch | None:
        if step.empty and not (self._abort_rooms or self._expects):
            return None
        batch, sent = step.build(self._released)
        self._released = []
        self.sent.append(sent)
        self._next_step_id += 1
        batch.abort_rooms, self._abort_rooms = self._abort_rooms, []
        batch.expects, self._expects = self._expects, []
        return batch

    # ---------------------------------------------------------------------------- peers

    def on_peer_message(self, msg: Message) -> bool:
        if isinstance(msg, PeerHeartbeat):
            peer = self.peers.get(msg.addr)
            if peer is not None and peer.state == REGISTERED:
                peer.last_seen = self.clock()
            else:
                self._on_stranger_heartbeat(msg.addr)
            return True
        if isinstance(msg, RoomAbort):
            req = self.rooms.get(msg.room)
            if req is not None and req.rid == msg.rid:
                self._on_peer_abort(req, msg)
            else:
                self._on_unmatched_abort(msg)
            return True
        return self._on_peer_control(msg)

    def _on_peer_control(self, msg: Message) -> bool:
        return False

    def _on_stranger_heartbeat(self, addr: str) -> None:
        """A heartbeat from an instance not registered here (e.g. dropped after a silence)."""

    def _on_peer_abort(self, req: Request, msg: RoomAbort) -> None:
        raise NotImplementedError

    def _on_unmatched_abort(self, msg: RoomAbort) -> None:
        logger.debug(
            "room=%d rid=%s: abort from %s for no live room here; ignored", msg.room, msg.rid, msg.addr
        )

    def peer_states(self) -> dict[str, str]:
        return {addr: peer.state for addr, peer in self.peers.items()}

    def tick(self, now: float) -> None:
        """Once per heartbeat interval: heartbeats to the registered peers, dead peers, timeouts."""
        if now < self._next_beat:
            return
        self._next_beat = now + self.args.heartbeat_interval
        beat = PeerHeartbeat(addr=self.input_addr)
        for peer in list(self.peers.values()):
            if peer.state != REGISTERED:
                continue
            silent = now - peer.last_seen
            if silent > self.args.heartbeat_timeout:
                self._peer_lost(peer, f"no heartbeat for {silent:.1f} s")
            else:
                self._peer_outbox.append((peer.addr, beat))
        self._on_beat()
        self._expire(now)
        self._guard_rooms(now)
        self._forget_rooms(now)

    def _guard_rooms(self, now: float) -> None:
        """Rooms the worker never reported, long after every data-plane timeout passed: a live
        request fails, and the pages of either come back (the worker is told to drop the room)."""
        limit = TRANSFER_GUARD_FACTOR * self.args.transfer_timeout + self.args.heartbeat_timeout
        for room, req in list(self.open_rooms.items()):
            if req.state is ReqState.TRANSFERRING and now - self.links[room].since > limit:
                del self.open_rooms[room]  # so that ending it releases the pages at once
                self._abort_rooms.append(room)
                self._fail(req, TRANSFER_FAILED, f"room {room}: no transfer result within {limit:g} s")
        for room, drain in list(self.draining.items()):
            if now - drain.since > limit:
                del self.draining[room]
                logger.warning(
                    "rid=%s room=%d: no report of the aborted room within %g s; pages released",
                    drain.req.rid,
                    room,
                    limit,
                )
                self._release(drain.req, drain.cache)

    def _forget_rooms(self, now: float) -> None:
        """Drop ended rooms past their memory (oldest first: the dict is in end order)."""
        while self.recent_rooms:
            room, (until, _) = next(iter(self.recent_rooms.items()))
            if until > now:
                return
            del self.recent_rooms[room]

    def _on_beat(self) -> None:
        """Extra work at each heartbeat (the decode side retries registrations)."""

    def _peer_lost(self, peer: PeerLink, why: str) -> None:
        raise NotImplementedError

    def _expire(self, now: float) -> None:
        """Role-specific timeouts of waits the data plane does not cover."""

    def _requests_of(self, peer: str) -> list[Request]:
        return [self.rooms[r] for r, link in self.links.items() if link.peer == peer and r in self.rooms]


def with_max_new_tokens(req: Request, max_new_tokens: int) -> None:
    """Replace ``req``'s sampling with a copy that stops after ``max_new_tokens``."""
    req.sampling = dataclasses.replace(req.sampling, max_new_tokens=max_new_tokens)
