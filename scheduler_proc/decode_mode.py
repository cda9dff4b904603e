"""The decode role: receive disaggregated requests' KV from prefill instances, decode, stream.

What a decode instance does differently from a unified one, all in ``DecodeRole``: it registers
with the prefill instances the front end names (``ConnectPrefill``); a request waits in its
room's transfer queue until it fits the KV budget with decode headroom reserved, then takes
destination pages for what the radix cache lacks, has the worker expect the room and tells the
prefill instance where the KV goes; when the worker reports the room done with the first token
and its logprob, the request is *ready* and joins the running batch at a step whose decodes
leave room for its first decode page (so a step never retracts a request it just joined). A
request retracted for memory resumes with a local prefill, exactly as in the unified role.
The protocol is in docs/design.md ("Scheduler roles", "Disaggregation flow", "Rooms").
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from protocol.messages import (
    INVALID_REQUEST,
    PEER_UNAVAILABLE,
    TRANSFER_FAILED,
    BatchOutput,
    ConnectPrefill,
    KVExpect,
    KVPeerRegistered,
    Message,
    PeerHeartbeat,
    PeerUnknown,
    RegisterDecode,
    RegisterKVPeer,
    RegisterReply,
    ReqOutput,
    Role,
    RoomAbort,
    RoomDest,
    TokenizedRequest,
    TransferResult,
)
from scheduler_proc.batch import pages_to_finish
from scheduler_proc.disagg import Pairing, check_peer
from scheduler_proc.peers import Peer, PeerState
from scheduler_proc.request import ReqState, Request
from scheduler_proc.role import Refusal
from scheduler_proc.rooms import Room, RoomState

if TYPE_CHECKING:
    from scheduler_proc.batch import SentStep, StepBuilder
    from scheduler_proc.core import SchedulerCore

logger = logging.getLogger(__name__)

S = RoomState


class DecodeRole:
    name = Role.DECODE
    streams_outputs = True

    def __init__(self, core: SchedulerCore, pairing: Pairing) -> None:
        self.core = core
        self.pairing = pairing
        self.rooms = pairing.rooms
        self.peers = pairing.peers

    # ---------------------------------------------------------------------------- registration

    def on_peer_message(self, msg: Message) -> bool:
        if isinstance(msg, PeerHeartbeat):
            self.pairing.heard(msg)
        elif isinstance(msg, RoomAbort):
            self._on_room_abort(msg)
        elif isinstance(msg, ConnectPrefill):
            for addr in msg.prefill_addrs:
                if addr not in self.peers:
                    self.peers.add(addr, PeerState.CONNECTING, self.core.clock())
                    self.core.to_peer(addr, RegisterDecode(self.pairing.info))
        elif isinstance(msg, RegisterReply):
            self._on_register_reply(msg)
        elif isinstance(msg, PeerUnknown):
            peer = self.peers.registered(msg.addr)
            if peer is not None:  # it restarted, or lost us: the rooms it held are gone
                self.peers.move(peer, PeerState.LOST, self.core.clock())
                self._peer_lost(peer, "it no longer knows this instance: it restarted, or dropped it")
        else:
            return False
        return True

    def _register_again(self, peer: Peer) -> None:
        """A lost peer: register again from the next beat on (until it answers)."""
        self.peers.move(peer, PeerState.CONNECTING, self.core.clock())

    def _on_register_reply(self, msg: RegisterReply) -> None:
        peer = self.peers.get(msg.prefill_addr)
        if peer is None or peer.state is not PeerState.CONNECTING:
            return  # an answer to a repeated registration
        error = msg.error if not msg.ok else self._reply_problem(msg)
        if error:
            self.peers.move(peer, PeerState.REFUSED, self.core.clock(), refusal=error)
            logger.warning("prefill instance %s refused the pairing: %s", peer.addr, error)
            return
        assert msg.info is not None and msg.info.transfer is not None
        self.peers.move(peer, PeerState.REGISTERING, self.core.clock())
        peer.transfer_addr, peer.incarnation = msg.info.transfer.address, msg.info.incarnation
        self.core.to_worker(RegisterKVPeer(peer.addr, peer.transfer_addr, msg.info.transfer.rank_addresses))

    def _reply_problem(self, msg: RegisterReply) -> str | None:
        if msg.info is None:
            return "the prefill instance sent no registration info"
        problem = check_peer(self.pairing.info, msg.info)
        if problem is None and not (msg.info.transfer and msg.info.transfer.address):
            problem = f"prefill instance {msg.info.name} sent no KV transfer address"
        return problem

    def _on_kv_peer_registered(self, msg: KVPeerRegistered) -> None:
        peer = self.peers.get(msg.prefill_addr)
        if peer is not None and peer.state is PeerState.REGISTERING:
            now = self.core.clock()
            if msg.ok:
                self.peers.move(peer, PeerState.REGISTERED, now)
            else:
                self.peers.move(peer, PeerState.REFUSED, now, refusal=msg.error)
            peer.last_seen = now
            logger.info("prefill instance %s: %s", peer.addr, peer.status)

    def _peer_lost(self, peer: Peer, why: str) -> None:
        """Its requests that still need it fail; it registers again if it comes back."""
        message = f"prefill instance {peer.addr} stopped answering ({why})"
        logger.warning("%s: failing its pending and transferring requests", message)
        self._register_again(peer)
        for room, req in self.pairing.requests_of(peer.addr):
            if room.state in (S.QUEUED, S.TRANSFERRING):
                self.pairing.fail(req, PEER_UNAVAILABLE, message, tell_peer=False)

    def peer_states(self) -> dict[str, str]:
        return self.peers.statuses()

    def link_states(self) -> dict[str, str]:
        return self.pairing.links

    def tick(self, now: float) -> None:
        lost = self.pairing.beat(now)
        if lost is None:
            return
        for peer, why in lost:
            self._peer_lost(peer, why)
        for peer in self.peers.in_state(PeerState.CONNECTING):  # no answer yet (not up yet, or restarted)
            self.core.to_peer(peer.addr, RegisterDecode(self.pairing.info))
        self.pairing.sweep(now)

    # ---------------------------------------------------------------------------- requests

    def screen(self, msg: TokenizedRequest) -> Refusal | None:
        refusal = self.pairing.room_refusal(msg.room)
        if refusal is not None:
            return refusal
        if not msg.prefill_addr:
            return Refusal(INVALID_REQUEST, "a disaggregated request must name its prefill instance")
        peer = self.peers.get(msg.prefill_addr)
        if peer is None or peer.state is not PeerState.REGISTERED:
            state = peer.status if peer else "unknown"
            why = f"prefill instance {msg.prefill_addr} is not registered with {self.core.name} ({state})"
            return Refusal(PEER_UNAVAILABLE, why)
        return None

    def refused(self, msg: TokenizedRequest, refusal: Refusal) -> None:
        if msg.prefill_addr and msg.room is not None:  # the prefill side ends it at once too
            self.pairing.tell_abort(msg.prefill_addr, msg.room, msg.rid, refusal.code, refusal.message)

    def hold(self, req: Request, msg: TokenizedRequest) -> bool:
        """It waits in the transfer queue for destination pages."""
        assert req.room is not None and msg.prefill_addr is not None
        self.rooms.add(req.room, req.rid, S.QUEUED, req=req, peer=msg.prefill_addr)
        return True

    def _on_room_abort(self, msg: RoomAbort) -> None:
        room = self.pairing.live_abort(msg)
        if room is None:
            logger.debug(
                "room=%d rid=%s: abort from %s for no live room here; ignored", msg.room, msg.rid, msg.addr
            )
        elif room.state in (S.READY, S.JOINED):  # a late failure of the prefill side no longer concerns it
            logger.info(
                "rid=%s room=%s: prefill side ended after the transfer: %s", msg.rid, msg.room, msg.message
            )
        else:
            assert room.req is not None
            self.pairing.fail(
                room.req, msg.code, f"prefill instance {msg.addr}: {msg.message}", tell_peer=False
            )

    def on_worker_message(self, msg: Message) -> bool:
        if self.pairing.on_worker_message(msg):
            return True
        if isinstance(msg, KVPeerRegistered):
            self._on_kv_peer_registered(msg)
            return True
        if not isinstance(msg, TransferResult):
            return False
        room = self.pairing.transfer_closed(msg)
        if room is None:
            return True
        if msg.ok and msg.first_token is not None:
            room.first_token, room.first_logprob = msg.first_token, msg.first_logprob
            self.rooms.move(room, S.READY)
        else:
            assert room.req is not None
            why = f"KV transfer of room {msg.room} from prefill instance {room.peer} failed: {msg.error}"
            self.pairing.fail(room.req, TRANSFER_FAILED, why)
        return True

    def detach(self, req: Request) -> bool:
        room = self.rooms.live_of(req)
        return room is not None and room.state in (S.QUEUED, S.TRANSFERRING, S.READY)

    def on_end(self, req: Request, cache: bool) -> bool:
        return self.pairing.end_room(req, cache)

    def on_chunk(self, req: Request, step: StepBuilder, last: bool) -> None:
        if last:  # a retracted request's local prefill
            self.core.start_running(req)

    def on_step_done(self, sent: SentStep) -> None:
        pass

    # ---------------------------------------------------------------------------- counts

    def owed_slots(self) -> int:
        """Admitted requests that take their worker slot when they join the running batch."""
        return self.rooms.count(S.TRANSFERRING, S.READY)

    def queued(self) -> int:
        """Requests waiting for destination pages (retracted ones wait in ``waiting``)."""
        return self.rooms.count(S.QUEUED)

    def queued_tokens(self) -> int:
        return sum(room.req.num_tokens for room in self.rooms.in_state(S.QUEUED) if room.req)

    # ---------------------------------------------------------------------------- steps

    def fill_step(self, step: StepBuilder) -> None:
        if self._join_and_decode(step) and not step.batch.decode_slots:
            self._join_and_decode(step)  # retraction emptied the batch and gave pages back: join now
        self.core.schedule_prefills(step)  # retracted requests resume with a local prefill
        self._admit_transfers()
        self.pairing.add_deltas(step)

    def _join_and_decode(self, step: StepBuilder) -> bool:
        """Join what fits, then schedule the running decodes; True if that retracted any."""
        joined = self._join_ready(step)
        retracted = self.core.schedule_decodes(step)
        assert not joined.intersection(retracted), "a request was retracted in the step it joined"
        return bool(retracted)

    def _join_ready(self, step: StepBuilder) -> set[int]:
        """Move ready requests into the running batch while this step's decodes leave room for
        their first decode page; the others stay ready, holding their pages but no slot.
        Returns the slots the joined requests took."""
        ready = self.rooms.in_state(S.READY)
        if not ready:
            return set()
        outputs, joined = [], set()
        spare = self.core.pool.available_pages() - self._decode_pages_needed()
        for room in ready:
            if (need := self._first_page_need(room)) <= spare:
                spare -= need
                outputs.append(self._join(room, step, joined))
            elif self._stalled():
                outputs.append(self._spill(room))
                spare = self.core.pool.available_pages() - self._decode_pages_needed()
        if outputs:
            self.core.to_frontend(BatchOutput(outputs=outputs))
        return joined

    def _decode_pages_needed(self) -> int:
        return sum(self.core.needs_page(r) for r in self.core.running if r.remaining_new_tokens > 0)

    def _first_page_need(self, room: Room) -> int:
        """Pages its first decode takes (the first token's KV), unless that token is its last."""
        req = room.req
        assert req is not None
        fills_row = len(req.prompt) >= len(req.res.row) * self.core.page_size
        return int(fills_row and req.sampling.max_new_tokens > 1)

    def _stalled(self) -> bool:
        """Nothing that would free pages runs or drains: only ready or transferring requests hold them."""
        core = self.core
        return not core.running and core.chunked_req is None and not self.rooms.count(S.DRAINING)

    def _start_decoding(self, room: Room) -> ReqOutput:
        """``room``'s request joins the running batch and streams its first token."""
        req = room.req
        assert req is not None and room.first_token is not None
        self.rooms.move(room, S.JOINED)
        self.core.start_running(req)
        req.kv_len = len(req.prompt)
        req.scheduled_outputs = 1
        first = room.first_logprob
        out = self.core.emit_token(req, room.first_token, first.logprob if first is not None else None)
        if first is not None and first.top_token_ids is not None and req.sampling.top_logprobs:
            out.top_token_ids, out.top_logprobs = [first.top_token_ids], [first.top_logprobs or []]
        return out

    def _join(self, room: Room, step: StepBuilder, joined: set[int]) -> ReqOutput:
        req = room.req
        assert req is not None
        out = self._start_decoding(room)
        if req.live:  # unless the first token ended it, it takes a worker slot
            (req.res.slot,) = self.core.pool.slots.alloc(1) or (None,)
            assert req.res.slot is not None, "admission kept a slot for every transferring request"
            step.add_new(req)
            step.batch.new_reqs[-1].next_token = room.first_token
            joined.add(req.res.slot)
        return out

    def _spill(self, room: Room) -> ReqOutput:
        """Nothing else can free pages and ``room``'s first decode page does not fit: it streams
        its first token and is retracted before taking a slot (its prompt's KV enters the prefix
        cache), so the next ready request can join; it resumes with a local prefill."""
        req = room.req
        assert req is not None
        out = self._start_decoding(room)
        if req.live:
            self.core.retract(req)
        return out

    def _admit_transfers(self) -> None:
        core = self.core
        queue = [room.req for room in self.rooms.in_state(S.QUEUED) if room.req is not None]
        if not queue or not core.has_room():
            return
        core.sort_queue(queue, core.pool.cache)
        holders = [r.req for r in self.rooms.in_state(S.TRANSFERRING, S.READY) if r.req]
        reserved = core.reserved_pages() + sum(
            pages_to_finish(r, len(r.res.row), core.pool, core.new_token_ratio) for r in holders
        )
        for req in queue:
            if not core.has_room():
                break
            need = self._try_admit_transfer(req, reserved)
            if need is None:
                break
            reserved += need

    def _try_admit_transfer(self, req: Request, reserved: int) -> int | None:
        """Admit ``req``: destination pages, the worker's expect, the prefill side's RoomDest.
        Returns the pages still reserved for it beyond those allocated; None if it does not fit."""
        pool, room = self.core.pool, self.rooms.live_of(req)
        assert room is not None
        match = pool.cache.match_prefix(req.prompt)
        req.res.take_prefix(pool, match)  # locked first: no eviction below can take it
        need = pages_to_finish(req, len(match.pages), pool, self.core.new_token_ratio)
        if need > pool.available_pages() - reserved:
            req.res.release(pool)
            return None
        pages = pool.alloc_pages(pool.pages_for(len(req.prompt)) - len(match.pages))
        assert pages is not None, "admission checked the pages"
        req.res.append_pages(pages)
        prefix = len(match.pages) * self.core.page_size
        req.kv_len = prefix  # only the cached prefix holds valid KV until the transfer is done
        req.cached_tokens = prefix
        req.first_scheduled_time = time.time()
        req.transition(ReqState.TRANSFERRING)
        self.rooms.move(room, S.TRANSFERRING)
        room.open = True
        peer = self.peers.get(room.peer)
        assert peer is not None
        self.pairing.expect(KVExpect(room.id, peer.transfer_addr, pages))
        self.core.to_peer(room.peer, RoomDest(room.id, req.rid, self.pairing.input_addr, pages, prefix))
        logger.debug(
            "rid=%s room=%d: %d destination pages, %d tokens cached", req.rid, room.id, len(pages), prefix
        )
        return need - len(pages)
