"""What the prefill and decode roles share: ``Pairing``, this instance's side of its pairings
with peer instances, a component both roles use (docs/design.md: "Rooms", "Peers and links").

It owns the ``RoomTable`` and the ``PeerTable``, the registration check (``peer_info``,
``check_peer``), peer heartbeats, ``RoomAbort``, the rooms ended while the worker holds them open
(draining), the guard that catches a room the data plane never reports, and the data-plane
deltas (aborts, expects) of the next step. Its methods return what happened; the roles decide.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from typing import TYPE_CHECKING

from protocol.messages import (
    INVALID_REQUEST,
    TRANSFER_FAILED,
    KVExpect,
    KVLinkStates,
    Message,
    PeerHeartbeat,
    PeerInfo,
    RequestFailed,
    Role,
    RoomAbort,
    TransferResult,
    WorkerReady,
)
from protocol.transport import is_private
from scheduler_proc.batch import StepBuilder
from scheduler_proc.peers import Peer, PeerState, PeerTable
from scheduler_proc.request import ReqState, Request
from scheduler_proc.role import Refusal
from scheduler_proc.rooms import LIVE, Room, RoomState, RoomTable

if TYPE_CHECKING:
    from scheduler_proc.core import SchedulerCore

logger = logging.getLogger(__name__)

ROOM_MEMORY_S = 120.0  # how long an ended room is remembered (duplicates refused, late messages ignored)
TRANSFER_GUARD_FACTOR = 2  # the data plane times out first; the guard only catches a room it never reports

def peer_info(name: str, input_addr: str, worker: WorkerReady) -> PeerInfo:
    """This instance's side of the registration: its worker's data-plane end, layout included,
    and a random incarnation of this process (a peer that sees a new one knows it restarted)."""
    if worker.transfer is None:
        raise ValueError(f"the worker of disaggregated instance {name} reported no KV data-plane end")
    return PeerInfo(name=name, input_addr=input_addr, transfer=worker.transfer,
                    incarnation=secrets.token_hex(6))


def check_peer(ours: PeerInfo, theirs: PeerInfo) -> str | None:
    """Why ``theirs`` cannot pair with ``ours`` (naming the first field that differs), or None."""
    if not theirs.input_addr:
        return f"instance {theirs.name} sent no input address"
    ours_label, theirs_label = f"instance {ours.name}", f"instance {theirs.name}"
    return ours.transfer.layout.mismatch(theirs.transfer.layout, ours_label, theirs_label)


def told_to_peer(ours: PeerInfo, theirs: PeerInfo, problem: str, authenticated: bool) -> str:
    """What the peer hears of a refused registration: the whole ``problem`` when it is
    authenticated (CURVE keys, or a private ipc address), else only the field that mismatched,
    so that a stranger does not learn this instance's values (they go to the local log)."""
    if authenticated:
        return problem
    field = ours.transfer.layout.mismatched_field(theirs.transfer.layout)
    return f"{field} mismatch" if field else "registration refused"


def with_max_new_tokens(req: Request, max_new_tokens: int) -> None:
    """Replace ``req``'s sampling with a copy that stops after ``max_new_tokens``."""
    req.sampling = dataclasses.replace(req.sampling, max_new_tokens=max_new_tokens)


class Pairing:
    def __init__(self, core: SchedulerCore, side: Role, worker: WorkerReady, input_addr: str) -> None:
        self.core = core
        self.side = side
        self.input_addr = input_addr
        self.info = peer_info(core.name, input_addr, worker)
        # peers reached with keys, or only by this host's user (ipc), may hear a refusal's details
        self.peers_authenticated = core.args.cluster_key_dir is not None or is_private(input_addr)
        self.rooms = RoomTable(side, core.clock)
        self.peers = PeerTable()
        self._abort_rooms: list[int] = []
        self._expects: list[KVExpect] = []
        self._next_beat = 0.0
        self.links: dict[str, str] = {}  # the worker's data-plane links, as it last reported them

    # ---------------------------------------------------------------------------- rooms

    def on_worker_message(self, msg: Message) -> bool:
        """The worker messages both sides take alike; False for the others."""
        if isinstance(msg, KVLinkStates):
            self.links = msg.links
            return True
        return False

    def room_refusal(self, room: int | None) -> Refusal | None:
        """A request without a room, or for a room in use here (live or remembered), is refused."""
        if room is None:
            why = f"a {self.side.value} instance serves only disaggregated requests (with a room)"
            return Refusal(INVALID_REQUEST, why)
        entry = self.rooms.get(room)
        if entry is not None and entry.state not in (RoomState.EARLY_DEST, RoomState.REFUSED):
            return Refusal(INVALID_REQUEST, f"room {room} is already in use (duplicate room id)")
        return None

    def fail(self, req: Request, code: str, message: str, tell_peer: bool = True) -> None:
        """End ``req`` as failed: one ``RequestFailed`` to the front end, and (unless the failure
        came from the peer) a ``RoomAbort`` so the peer instance ends it at once too."""
        room = self.rooms.live_of(req)
        logger.warning("rid=%s room=%s failed (%s): %s", req.rid, req.room, code, message)
        self.core.end(req, ReqState.FAILED)
        self.core.to_frontend(RequestFailed(req.rid, code, message, role=self.side))
        if tell_peer and room is not None and room.peer:
            self.tell_abort(room.peer, room.id, req.rid, code, message)

    def tell_abort(self, peer: str, room: int, rid: str, code: str, message: str) -> None:
        self.core.to_peer(peer, RoomAbort(room, rid, self.input_addr, code, message))

    def end_room(self, req: Request, cache: bool) -> bool:
        """``req`` ended: so does its room; True if the worker holds the room open, so its pages
        stay until the worker reports it (the room is aborted in the next step)."""
        room = self.rooms.live_of(req)
        if room is None:
            return False
        room.ended_as = f"room {room.id} already ended ({req.state.value})"
        if not room.open:
            self.rooms.move(room, RoomState.ENDED)
            return False
        room.cache = cache
        self.rooms.move(room, RoomState.DRAINING)
        self._abort_rooms.append(room.id)
        logger.debug("rid=%s room=%d: pages held until the worker closes the room", req.rid, room.id)
        return True

    def transfer_closed(self, msg: TransferResult) -> Room | None:
        """The worker closed ``msg.room``: the live room whose transfer ended (for the role to
        decide), or None (a draining room's pages are released here; a late result is ignored)."""
        room = self.rooms.get(msg.room)
        if room is None or not room.open:
            logger.debug("room=%d: late transfer result ignored", msg.room)
            return None
        room.open = False
        if room.state is not RoomState.DRAINING:
            self._count_transfer(room, msg.ok)
            return room
        self._release_drained(room)
        logger.debug("rid=%s room=%d: pages released after the room closed", room.rid, msg.room)
        return None

    def _count_transfer(self, room: Room, ok: bool) -> None:
        """A live room's transfer ended (an aborted one's does not count): its bytes and time
        (since the room became ``TRANSFERRING``), or a failure."""
        if not ok:
            self.core.metrics.transfer_failed()
            return
        assert room.req is not None
        if self.side is Role.PREFILL:
            pages = len(room.dst_pages)
        else:  # the prompt's pages less those the decode side had cached
            cached = (room.req.cached_tokens or 0) // self.core.page_size
            pages = self.core.pool.pages_for(len(room.req.prompt)) - cached
        self.core.metrics.transfer_done(pages, self.core.clock() - room.since)

    def _release_drained(self, room: Room) -> None:
        assert room.req is not None
        self.core.release(room.req, room.cache)
        self.rooms.move(room, RoomState.ENDED)

    def live_abort(self, msg: RoomAbort) -> Room | None:
        """The live room that a peer's ``RoomAbort`` is about (same request), if any."""
        room = self.rooms.get(msg.room)
        if room is not None and room.state in LIVE and room.rid == msg.rid:
            return room
        return None

    def requests_of(self, peer: str) -> list[tuple[Room, Request]]:
        """The live rooms paired with ``peer`` and their requests."""
        rooms = self.rooms.in_state(*LIVE)
        return [(room, room.req) for room in rooms if room.peer == peer and room.req is not None]

    def expect(self, msg: KVExpect) -> None:
        self._expects.append(msg)

    def add_deltas(self, step: StepBuilder) -> None:
        """The next step carries the rooms to abort and to expect on the data plane."""
        step.batch.abort_rooms, self._abort_rooms = self._abort_rooms, []
        step.batch.expects, self._expects = self._expects, []

    # ---------------------------------------------------------------------------- peers

    def heard(self, msg: PeerHeartbeat) -> bool:
        """A peer's heartbeat; False if it comes from an instance not registered here."""
        peer = self.peers.registered(msg.addr)
        if peer is not None:
            peer.last_seen = self.core.clock()
        return peer is not None

    def beat(self, now: float) -> list[tuple[Peer, str]] | None:
        """Once per heartbeat interval: a heartbeat to every registered peer; those silent past
        the heartbeat timeout are lost instead (returned with why). None between beats."""
        if now < self._next_beat:
            return None
        args = self.core.args
        self._next_beat = now + args.heartbeat_interval
        beat, lost = PeerHeartbeat(addr=self.input_addr), []
        for peer in self.peers.in_state(PeerState.REGISTERED):
            silent = now - peer.last_seen
            if silent > args.heartbeat_timeout:
                self.peers.move(peer, PeerState.LOST, now)
                lost.append((peer, f"no heartbeat for {silent:.1f} s"))
            else:
                self.core.to_peer(peer.addr, beat)
        return lost

    def sweep(self, now: float) -> None:
        """After each beat: guard the rooms the worker never reported, forget old ended rooms."""
        self._guard_rooms(now)
        self.rooms.forget_ended(now, ROOM_MEMORY_S)

    def _guard_rooms(self, now: float) -> None:
        """Rooms the worker never reported, long after every data-plane timeout passed: a live
        request fails, and the pages of either come back (the worker is told to drop the room)."""
        args = self.core.args
        limit = TRANSFER_GUARD_FACTOR * args.transfer_timeout + args.heartbeat_timeout
        for room in self.rooms.in_state(RoomState.TRANSFERRING):
            if room.open and now - room.since > limit:
                assert room.req is not None
                room.open = False  # so that ending it releases the pages at once
                self._abort_rooms.append(room.id)
                self.core.metrics.transfer_failed()
                self.fail(room.req, TRANSFER_FAILED, f"room {room.id}: no transfer result within {limit:g} s")
        for room in self.rooms.in_state(RoomState.DRAINING):
            if now - room.since > limit:
                logger.warning(
                    "rid=%s room=%d: no report of the aborted room within %g s; pages released",
                    room.rid,
                    room.id,
                    limit,
                )
                room.open = False
                self._release_drained(room)
