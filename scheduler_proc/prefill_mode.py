"""The prefill role: prefill disaggregated requests in chunks and hand their KV to the decode side.

What a prefill instance does differently from a unified one, all in ``PrefillRole``: a request
(capped at one new token) waits for its destination (``RoomDest``, which may come first) before
it is queued; each prefill chunk's step also sends the pages that chunk completed (``KVSend``;
the last send carries the first sampled token, and its logprob, to the decode side); a prefilled
request waits in ``transferring`` until the worker reports the room; the front end hears only
failures (decode instances stream). Decode instances register here. The protocol is in
docs/design.md ("Scheduler roles", "Disaggregation flow", "Rooms").
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from protocol.messages import (
    INVALID_REQUEST,
    PEER_UNAVAILABLE,
    TRANSFER_FAILED,
    KVSend,
    Message,
    PeerHeartbeat,
    PeerInfo,
    PeerUnknown,
    RegisterDecode,
    RegisterReply,
    Role,
    RoomAbort,
    RoomDest,
    TokenizedRequest,
    TransferResult,
)
from scheduler_proc.disagg import Pairing, check_peer, told_to_peer, with_max_new_tokens
from scheduler_proc.peers import Peer, PeerState
from scheduler_proc.request import ReqState, Request
from scheduler_proc.role import Refusal
from scheduler_proc.rooms import Room, RoomState

if TYPE_CHECKING:
    from scheduler_proc.batch import SentStep, StepBuilder
    from scheduler_proc.core import SchedulerCore

logger = logging.getLogger(__name__)

S = RoomState


class PrefillRole:
    name = Role.PREFILL
    streams_outputs = False

    def __init__(self, core: SchedulerCore, pairing: Pairing) -> None:
        self.core = core
        self.pairing = pairing
        self.rooms = pairing.rooms
        self.peers = pairing.peers

    # ---------------------------------------------------------------------------- arrivals

    def screen(self, msg: TokenizedRequest) -> Refusal | None:
        room = self.rooms.get(msg.room)
        if room is not None and room.state is S.REFUSED:  # the decode side ended it before it came
            return Refusal(*room.refusal)
        return self.pairing.room_refusal(msg.room)

    def refused(self, msg: TokenizedRequest, refusal: Refusal) -> None:
        """Its decode side must not wait for it: told now if its destination came, else when it does."""
        if msg.room is None:
            return
        room = self.rooms.get(msg.room)
        if room is None:
            self.rooms.add(msg.room, msg.rid, S.REFUSED, refusal=(refusal.code, refusal.message))
        elif room.state is S.REFUSED:  # the refusal came from the decode side: it knows
            self.rooms.drop(room)
        elif room.state is S.EARLY_DEST:
            assert room.dest is not None
            self.pairing.tell_abort(
                room.dest.decode_addr, room.id, room.dest.rid, refusal.code, refusal.message
            )
            self.rooms.drop(room)

    def hold(self, req: Request, msg: TokenizedRequest) -> bool:
        """It waits for its destination; this side samples its first token only."""
        assert req.room is not None
        with_max_new_tokens(req, 1)
        room = self.rooms.get(req.room)
        if room is None:
            self.rooms.add(req.room, req.rid, S.AWAITING_DEST, req=req)
            return True
        self.rooms.move(room, S.AWAITING_DEST)
        room.rid, room.req = req.rid, req
        assert room.dest is not None
        self._take_dest(room, room.dest)
        return True

    # ---------------------------------------------------------------------------- decode peers

    def on_peer_message(self, msg: Message) -> bool:
        if isinstance(msg, PeerHeartbeat):
            if not self.pairing.heard(msg):  # it still believes itself registered: register again
                self.core.to_peer(msg.addr, PeerUnknown(self.pairing.input_addr))
        elif isinstance(msg, RoomAbort):
            self._on_room_abort(msg)
        elif isinstance(msg, RegisterDecode):
            self._register(msg)
        elif isinstance(msg, RoomDest):
            self._on_dest(msg)
        else:
            return False
        return True

    def _register(self, msg: RegisterDecode) -> None:
        theirs, ours = msg.info, self.pairing.info
        error = check_peer(ours, theirs)
        if error is not None:
            told = told_to_peer(ours, theirs, error, self.pairing.peers_authenticated)
            self.core.to_peer(theirs.input_addr, RegisterReply(ours.input_addr, ok=False, error=told))
            logger.warning("refused decode instance %s (%s): %s", theirs.name, theirs.input_addr, error)
            return
        self.core.to_peer(theirs.input_addr, RegisterReply(ours.input_addr, ok=True, info=ours))
        self._take_registration(theirs)

    def _take_registration(self, theirs: PeerInfo) -> None:
        """A new decode instance, one registering again after a loss, or one that restarted (a
        new incarnation: its old rooms are gone, so their requests fail here as on a loss)."""
        now, peer = self.core.clock(), self.peers.get(theirs.input_addr)
        if peer is None:
            logger.info("decode instance %s registered from %s", theirs.name, theirs.input_addr)
            peer = self.peers.add(theirs.input_addr, PeerState.REGISTERED, now)
        elif peer.state is PeerState.REGISTERED and peer.incarnation == theirs.incarnation:
            peer.last_seen = now
        else:
            if peer.state is PeerState.REGISTERED:
                self.peers.move(peer, PeerState.LOST, now)
                self._peer_lost(peer, "it restarted: a new incarnation registered")
            logger.info("decode instance %s registered again from %s", theirs.name, theirs.input_addr)
            self.peers.move(peer, PeerState.REGISTERED, now)
        peer.incarnation, peer.tp_size = theirs.incarnation, theirs.transfer.layout.tp_size

    def _on_dest(self, msg: RoomDest) -> None:
        if self.peers.registered(msg.decode_addr) is None:
            why = (
                f"decode instance {msg.decode_addr} is not registered with prefill instance {self.core.name}"
            )
            self.pairing.tell_abort(msg.decode_addr, msg.room, msg.rid, PEER_UNAVAILABLE, why)
            return
        room = self.rooms.get(msg.room)
        if room is None or room.state is S.EARLY_DEST:
            if room is not None:  # a repeated destination replaces the first
                self.rooms.drop(room)
            self.rooms.add(msg.room, msg.rid, S.EARLY_DEST, dest=msg, peer=msg.decode_addr)
        elif room.state is S.REFUSED:  # refused here before its destination arrived
            self.rooms.drop(room)
            self.pairing.tell_abort(msg.decode_addr, msg.room, msg.rid, *room.refusal)
        elif room.state in (S.DRAINING, S.ENDED):
            self.pairing.tell_abort(msg.decode_addr, msg.room, msg.rid, TRANSFER_FAILED, room.ended_as)
        elif room.rid != msg.rid or room.state is not S.AWAITING_DEST:
            why = f"room {msg.room} is already in use (duplicate room id)"
            self.pairing.tell_abort(msg.decode_addr, msg.room, msg.rid, INVALID_REQUEST, why)
        else:
            self._take_dest(room, msg)

    def _take_dest(self, room: Room, dest: RoomDest) -> None:
        req = room.req
        assert req is not None
        room.peer = dest.decode_addr
        problem = self._dest_problem(req, dest)
        if problem is not None:
            self.pairing.fail(req, INVALID_REQUEST, f"room {room.id}: {problem}")
            return
        room.dest, room.dst_pages = None, list(dest.dst_pages)
        room.skip_pages = dest.cached_tokens // self.core.page_size
        self.rooms.move(room, S.QUEUED)
        self.core.waiting.append(req)
        logger.debug(
            "rid=%s room=%d: destination known, %d pages to send", req.rid, room.id, len(dest.dst_pages)
        )

    def _dest_problem(self, req: Request, dest: RoomDest) -> str | None:
        prompt, page_size = len(req.prompt), self.core.page_size
        if dest.cached_tokens % page_size or not 0 <= dest.cached_tokens <= prompt:
            return f"cached_tokens {dest.cached_tokens} is not a page-aligned prefix of {prompt} tokens"
        want = self.core.pool.pages_for(prompt) - dest.cached_tokens // page_size
        if len(dest.dst_pages) != want:
            return f"{len(dest.dst_pages)} destination pages for {want} pages to send"
        return None

    def _on_room_abort(self, msg: RoomAbort) -> None:
        room = self.pairing.live_abort(msg)
        if room is not None:  # the decode side ended it (and told the front end): end it silently
            assert room.req is not None
            logger.info("rid=%s room=%s ended by the decode side: %s", msg.rid, msg.room, msg.message)
            self.core.end(room.req, ReqState.FAILED)
            return
        room = self.rooms.get(msg.room)
        if room is None or (room.state is S.EARLY_DEST and room.rid == msg.rid):
            # its request has not come yet: refuse it when it does
            if room is not None:
                self.rooms.move(room, S.REFUSED)
                room.dest, room.refusal = None, (msg.code, msg.message)
            else:
                self.rooms.add(msg.room, msg.rid, S.REFUSED, refusal=(msg.code, msg.message))
        elif room.state is S.REFUSED:
            room.refusal = (msg.code, msg.message)
        else:  # a live room of another request (the abort was about a duplicate), or one that ended
            logger.debug(
                "room=%d rid=%s: abort from %s for no live room here; ignored", msg.room, msg.rid, msg.addr
            )

    def _peer_lost(self, peer: Peer, why: str) -> None:
        message = f"decode instance {peer.addr} stopped answering ({why})"
        logger.warning("%s: failing its requests", message)
        for _, req in self.pairing.requests_of(peer.addr):
            self.pairing.fail(req, PEER_UNAVAILABLE, message, tell_peer=False)
        for room in self.rooms.in_state(S.EARLY_DEST):
            if room.peer == peer.addr:
                self.rooms.drop(room)

    def peer_states(self) -> dict[str, str]:
        return self.peers.statuses()

    def link_states(self) -> dict[str, str]:
        return self.pairing.links

    # ---------------------------------------------------------------------------- scheduling

    def fill_step(self, step: StepBuilder) -> None:
        self.core.schedule_prefills(step)
        self.pairing.add_deltas(step)

    def on_chunk(self, req: Request, step: StepBuilder, last: bool) -> None:
        """Send the pages this chunk completed (the last send also the trailing partial page);
        after the last chunk the request waits for the decode side's acknowledgement."""
        room = self.rooms.live_of(req)
        assert room is not None and req.res.slot is not None
        page_size = self.core.page_size
        done = self.core.pool.pages_for(req.kv_len) if last else req.kv_len // page_size
        start = max(room.sent_pages, room.skip_pages)
        src = req.res.row[start:done]
        dst = room.dst_pages[start - room.skip_pages : done - room.skip_pages]
        room.sent_pages = max(done, room.sent_pages)
        if src or last:
            peer = self.peers.get(room.peer)
            decode_tp_size = 1 if peer is None else peer.tp_size
            step.batch.transfers.append(KVSend(
                room.id, req.res.slot, src, dst, first=not room.open, last=last, decode_tp_size=decode_tp_size
            ))
            room.open = True
        if last:
            req.transition(ReqState.TRANSFERRING)
            self.rooms.move(room, S.TRANSFERRING)

    def on_step_done(self, sent: SentStep) -> None:
        """End the requests whose acknowledgement came before this result."""
        for req in sent.members:
            room = self.rooms.live_of(req)
            if room is not None and room.state is S.ACKNOWLEDGED and not req.inflight:
                self.core.end(req, ReqState.FINISHED)

    def on_worker_message(self, msg: Message) -> bool:
        if self.pairing.on_worker_message(msg):
            return True
        if not isinstance(msg, TransferResult):
            return False
        room = self.pairing.transfer_closed(msg)
        if room is None:
            return True
        req = room.req
        assert req is not None
        if msg.ok and req.inflight:  # acknowledged before the last step's result was read here
            self.rooms.move(room, S.ACKNOWLEDGED)
        elif msg.ok:
            logger.debug("rid=%s room=%d: transferred", req.rid, msg.room)
            self.core.end(req, ReqState.FINISHED)
        else:
            why = f"KV transfer of room {msg.room} to decode instance {room.peer} failed: {msg.error}"
            self.pairing.fail(req, TRANSFER_FAILED, why)
        return True

    def detach(self, req: Request) -> bool:
        room = self.rooms.live_of(req)
        return room is not None and room.state is S.AWAITING_DEST

    def on_end(self, req: Request, cache: bool) -> bool:
        return self.pairing.end_room(req, cache)

    def owed_slots(self) -> int:
        return 0

    def queued(self) -> int:
        """Requests waiting for their destination (those with one wait in ``waiting``)."""
        return self.rooms.count(S.AWAITING_DEST)

    def queued_tokens(self) -> int:
        return 0

    # ---------------------------------------------------------------------------- time

    def tick(self, now: float) -> None:
        lost = self.pairing.beat(now)
        if lost is None:
            return
        for peer, why in lost:
            self._peer_lost(peer, why)
        self._expire(now)
        self.pairing.sweep(now)

    def _expire(self, now: float) -> None:
        """A destination whose request never came is dropped (and its decode side told). A request
        waiting for its destination has no timeout: it may queue on a busy decode instance for
        long, holding no pages; if that instance dies, the front end aborts it here."""
        timeout = self.core.args.transfer_timeout
        for room in self.rooms.in_state(S.REFUSED):
            if now - room.since >= timeout:
                self.rooms.drop(room)
        for room in self.rooms.in_state(S.EARLY_DEST):
            if now - room.since > timeout:
                self.rooms.drop(room)
                why = f"the request of room {room.id} did not reach {self.core.name} within {timeout:g} s"
                self.pairing.tell_abort(room.peer, room.id, room.rid, TRANSFER_FAILED, why)
