"""The decode role: receive disaggregated requests' KV from prefill instances, decode, stream.

Registration: the front end's ``ConnectPrefill`` names the prefill instances; this instance
sends each a ``RegisterDecode`` (repeated until answered), checks the reply the same way, then
has its worker register its KV receiver with the prefill worker's KV sender. Only then is the
peer ``registered`` in the heartbeat (the front end routes only to registered pairs).

A request (``TokenizedRequest`` with ``room`` and ``prefill_addr``) waits in the transfer queue
until it fits this instance's KV budget with decode headroom reserved. Admission matches the
radix cache (page-aligned), allocates destination pages for the rest of the prompt, has the
worker expect the room (``KVExpect``) and tells the prefill instance ``RoomDest``; the request
is ``transferring``. When the worker reports the room done with the first token, the request
is *ready*; it joins the running batch at a step whose decodes leave room for its first decode
page (so a step never retracts a request it just joined): the first token is streamed, the
worker's future-token map is seeded with it (``NewReq.next_token``) and it decodes like any
running request. A decode request retracted for memory resumes with a local prefill of its
tokens (the decode worker is a full engine worker), exactly as in the unified role.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from protocol.config import ServerArgs
from protocol.messages import (
    INVALID_REQUEST,
    PEER_UNAVAILABLE,
    TRANSFER_FAILED,
    BatchOutput,
    ConnectPrefill,
    FirstLogprob,
    KVExpect,
    KVPeerRegistered,
    Message,
    PeerUnknown,
    RegisterDecode,
    RegisterKVPeer,
    RegisterReply,
    ReqOutput,
    RequestFailed,
    RoomAbort,
    RoomDest,
    TokenizedRequest,
    TransferResult,
    WorkerReady,
)
from scheduler_proc.batch import StepBuilder, pages_to_finish
from scheduler_proc.disagg import CONNECTING, REGISTERED, DisaggCore, PeerLink, RoomLink, check_peer
from scheduler_proc.request import ReqState, Request

logger = logging.getLogger(__name__)

REGISTERING = "registering"


@dataclass
class Transferred:
    """A request whose KV and first token are here; it joins the running batch at the next step
    (with ``return_logprob``, once the first token's logprob arrived, or gave up waiting for it)."""

    req: Request
    first_token: int
    since: float

    @property
    def room(self) -> int:
        assert self.req.room is not None
        return self.req.room


class DecodeCore(DisaggCore):
    def __init__(
        self, args: ServerArgs, name: str, role: str, worker: WorkerReady, input_addr: str = ""
    ) -> None:
        super().__init__(args, name, role, worker, input_addr)
        self.transfer_queue: list[Request] = []  # pending: no destination pages yet
        self.ready: list[Transferred] = []  # transferred: join the running batch next step
        self.first_logprobs: dict[int, float] = {}  # room -> the first token's logprob (FirstLogprob)

    # ---------------------------------------------------------------------------- registration

    def _on_peer_control(self, msg: Message) -> bool:
        if isinstance(msg, ConnectPrefill):
            for addr in msg.prefill_addrs:
                if addr not in self.peers:
                    self.peers[addr] = PeerLink(addr)
                    self._peer_outbox.append((addr, RegisterDecode(self.info)))
        elif isinstance(msg, RegisterReply):
            self._on_register_reply(msg)
        elif isinstance(msg, FirstLogprob):
            req = self.rooms.get(msg.room)
            if req is not None and req.rid == msg.rid:
                self.first_logprobs[msg.room] = msg.logprob
        elif isinstance(msg, PeerUnknown):
            peer = self.peers.get(msg.addr)
            if peer is not None and peer.state == REGISTERED:
                logger.warning("prefill instance %s dropped this instance; registering again", peer.addr)
                peer.state = CONNECTING  # registers again at the next heartbeat
        else:
            return False
        return True

    def _on_beat(self) -> None:
        for peer in self.peers.values():
            if peer.state == CONNECTING:  # no answer yet (not up yet, or restarted)
                self._peer_outbox.append((peer.addr, RegisterDecode(self.info)))

    def _on_register_reply(self, msg: RegisterReply) -> None:
        peer = self.peers.get(msg.prefill_addr)
        if peer is None or peer.state != CONNECTING:
            return  # an answer to a repeated registration
        error = msg.error if not msg.ok else self._reply_problem(msg)
        if error:
            peer.state = f"refused: {error}"
            logger.warning("prefill instance %s refused the pairing: %s", peer.addr, error)
            return
        assert msg.info is not None and msg.info.transfer is not None
        peer.state, peer.transfer_addr = REGISTERING, msg.info.transfer.address
        self._worker_outbox.append(RegisterKVPeer(peer.addr, peer.transfer_addr))

    def _reply_problem(self, msg: RegisterReply) -> str | None:
        if msg.info is None:
            return "the prefill instance sent no registration info"
        problem = check_peer(self.info, msg.info)
        if problem is None and not (msg.info.transfer and msg.info.transfer.address):
            problem = f"prefill instance {msg.info.name} sent no KV transfer address"
        return problem

    def _on_worker_event(self, msg: Message) -> bool:
        if not isinstance(msg, KVPeerRegistered):
            return False
        peer = self.peers.get(msg.prefill_addr)
        if peer is not None and peer.state == REGISTERING:
            peer.state = REGISTERED if msg.ok else f"refused: {msg.error}"
            peer.last_seen = self.clock()
            logger.info("prefill instance %s: %s", peer.addr, peer.state)
        return True

    def _peer_lost(self, peer: PeerLink, why: str) -> None:
        message = f"prefill instance {peer.addr} stopped answering ({why})"
        logger.warning("%s: failing its pending and transferring requests", message)
        peer.state = CONNECTING  # registers again if it comes back
        queued = set(self.transfer_queue)
        for req in self._requests_of(peer.addr):
            if req in queued or (req.state is ReqState.TRANSFERRING and not self._is_ready(req)):
                self._fail(req, PEER_UNAVAILABLE, message, tell_peer=False)

    # ---------------------------------------------------------------------------- requests

    def on_request(self, msg: TokenizedRequest) -> None:
        refusal = self._refusal(msg)
        if refusal is not None:
            code, error = refusal
            self._refuse(msg.rid, code, error)
            if msg.prefill_addr and msg.room is not None:
                self._tell_abort(msg.prefill_addr, msg.room, msg.rid, code, error)
            return
        assert msg.room is not None and msg.prefill_addr is not None
        super().on_request(msg)
        req = self.requests.get(msg.rid)
        if req is None or req.room != msg.room:  # refused by the common checks
            failed = self._outbox[-1]
            assert isinstance(failed, RequestFailed)
            self._tell_abort(msg.prefill_addr, msg.room, msg.rid, failed.code, failed.message)
            return
        queued = self.waiting.pop()  # just queued by the common path; it waits for its transfer
        assert queued is req
        self.transfer_queue.append(req)
        self.rooms[msg.room] = req
        self.links[msg.room] = RoomLink(peer=msg.prefill_addr, since=self.clock())

    def _refusal(self, msg: TokenizedRequest) -> tuple[str, str] | None:
        error = self._room_error(msg.room)
        if error is not None:
            return INVALID_REQUEST, error
        if not msg.prefill_addr:
            return INVALID_REQUEST, "a disaggregated request must name its prefill instance"
        peer = self.peers.get(msg.prefill_addr)
        if peer is None or peer.state != REGISTERED:
            state = peer.state if peer else "unknown"
            why = f"prefill instance {msg.prefill_addr} is not registered with {self.name} ({state})"
            return PEER_UNAVAILABLE, why
        return None

    def _on_peer_abort(self, req: Request, msg: RoomAbort) -> None:
        if self._transferred(req):  # a late failure of the prefill side no longer concerns it
            logger.info(
                "rid=%s room=%s: prefill side ended after the transfer: %s", req.rid, req.room, msg.message
            )
            return
        self._fail(req, msg.code, f"prefill instance {msg.addr}: {msg.message}", tell_peer=False)

    def _transferred(self, req: Request) -> bool:
        return req.state is ReqState.DECODING or bool(req.output_ids) or self._is_ready(req)

    def _on_transfer_result(self, req: Request, msg: TransferResult) -> None:
        if msg.ok and msg.first_token is not None:
            self.ready.append(Transferred(req, msg.first_token, self.clock()))
            return
        peer = self.links[msg.room].peer
        self._fail(
            req,
            TRANSFER_FAILED,
            f"KV transfer of room {msg.room} from prefill instance {peer} failed: {msg.error}",
        )

    def _is_ready(self, req: Request) -> bool:
        return any(t.req is req for t in self.ready)

    def _end(self, req: Request, state: ReqState) -> None:
        super()._end(req, state)
        if req.room is not None:
            self.first_logprobs.pop(req.room, None)

    def _detach(self, req: Request) -> None:
        if req.state is ReqState.PENDING and req in self.transfer_queue:
            self.transfer_queue.remove(req)
        elif req.state is ReqState.TRANSFERRING:
            self.ready = [t for t in self.ready if t.req is not req]
        else:
            super()._detach(req)

    # ---------------------------------------------------------------------------- state

    @property
    def num_running(self) -> int:
        return super().num_running + self._slot_debt

    @property
    def queued_tokens(self) -> int:
        return super().queued_tokens + sum(r.num_tokens for r in self.transfer_queue)

    @property
    def _slot_debt(self) -> int:
        """Admitted requests that take their worker slot when they join the running batch."""
        return len(self.open_rooms) + len(self.ready)

    def _has_room(self) -> bool:
        return self.num_running < self.max_running and self.pool.slots.num_free > self._slot_debt

    def queued_requests(self) -> int:
        """Requests not started yet: waiting for destination pages, or retracted."""
        return len(self.transfer_queue) + len(self.waiting)

    # ---------------------------------------------------------------------------- steps

    def _fill_step(self, step: StepBuilder) -> None:
        if self._join_and_decode(step) and not step.batch.decode_slots:
            self._join_and_decode(step)  # retraction emptied the batch and gave pages back: join now
        self._schedule_prefills(step)  # retracted requests resume with a local prefill
        self._admit_transfers()

    def _join_and_decode(self, step: StepBuilder) -> bool:
        """Join what fits, then schedule the running decodes; True if that retracted any."""
        released_before = len(self._released)
        joined = self._join_ready(step)
        self._schedule_decodes(step)
        retracted = self._released[released_before:]
        assert not joined.intersection(retracted), "a request was retracted in the step it joined"
        return bool(retracted)

    def _join_ready(self, step: StepBuilder) -> set[int]:
        """Move ready requests into the running batch while this step's decodes leave room for
        their first decode page; the others stay ready, holding their pages but no slot.
        Returns the slots the joined requests took."""
        if not self.ready:
            return set()
        now, still, outputs, joined = self.clock(), [], [], set()
        spare = self.pool.available_pages() - self._decode_pages_needed()
        for entry in self.ready:
            if not self._may_join(entry, now):
                still.append(entry)
            elif (need := self._first_page_need(entry.req)) <= spare:
                spare -= need
                outputs.append(self._join(entry, step, joined))
            elif self._stalled():
                outputs.append(self._spill(entry))
                spare = self.pool.available_pages() - self._decode_pages_needed()
            else:
                still.append(entry)
        self.ready = still
        if outputs:
            self._outbox.append(BatchOutput(outputs=outputs))
        return joined

    def _decode_pages_needed(self) -> int:
        return sum(self._needs_page(r) for r in self.running if r.remaining_new_tokens > 0)

    def _first_page_need(self, req: Request) -> int:
        """Pages its first decode takes (the first token's KV), unless that token is its last."""
        fills_row = len(req.prompt) >= len(req.res.row) * self.page_size
        return int(fills_row and req.sampling.max_new_tokens > 1)

    def _stalled(self) -> bool:
        """Nothing that would free pages runs or drains: only ready or transferring requests hold them."""
        return not self.running and self.chunked_req is None and not self.draining

    def _start_decoding(self, entry: Transferred) -> ReqOutput:
        """``entry`` joins the running batch and streams its first token."""
        req = entry.req
        req.transition(ReqState.DECODING)
        req.kv_len = len(req.prompt)
        req.scheduled_outputs = 1
        self.running.append(req)
        return self._emit_token(req, entry.first_token, self.first_logprobs.pop(entry.room, None))

    def _join(self, entry: Transferred, step: StepBuilder, joined: set[int]) -> ReqOutput:
        out = self._start_decoding(entry)
        req = entry.req
        if req.live:  # unless the first token ended it, it takes a worker slot
            (req.res.slot,) = self.pool.slots.alloc(1) or (None,)
            assert req.res.slot is not None, "admission kept a slot for every transferring request"
            step.add_new(req)
            step.batch.new_reqs[-1].next_token = entry.first_token
            joined.add(req.res.slot)
        return out

    def _spill(self, entry: Transferred) -> ReqOutput:
        """Nothing else can free pages and ``entry``'s first decode page does not fit: it streams
        its first token and is retracted before taking a slot (its prompt's KV enters the prefix
        cache), so the next ready request can join; it resumes with a local prefill."""
        out = self._start_decoding(entry)
        if entry.req.live:
            self._retract(entry.req)
        return out

    def _may_join(self, entry: Transferred, now: float) -> bool:
        req = entry.req
        if not req.sampling.return_logprob or entry.room in self.first_logprobs:
            return True
        if now - entry.since <= self.args.heartbeat_timeout:
            return False
        logger.warning(
            "rid=%s room=%s: no logprob of the first token from the prefill side", req.rid, req.room
        )
        return True

    def _admit_transfers(self) -> None:
        if not self.transfer_queue or not self._has_room():
            return
        self._sort_waiting(self.transfer_queue, self.pool.cache)
        holders = self._admitted() + list(self.open_rooms.values()) + [t.req for t in self.ready]
        reserved = sum(pages_to_finish(r, len(r.res.row), self.pool, self.new_token_ratio) for r in holders)
        admitted: set[Request] = set()
        for req in self.transfer_queue:
            if not self._has_room():
                break
            need = self._try_admit_transfer(req, reserved)
            if need is None:
                break
            reserved += need
            admitted.add(req)
        if admitted:
            self.transfer_queue = [r for r in self.transfer_queue if r not in admitted]

    def _try_admit_transfer(self, req: Request, reserved: int) -> int | None:
        """Admit ``req``: destination pages, the worker's expect, the prefill side's RoomDest.
        Returns the pages still reserved for it beyond those allocated; None if it does not fit."""
        assert req.room is not None
        match = self.pool.cache.match_prefix(req.prompt)
        req.res.take_prefix(self.pool, match)  # locked first: no eviction below can take it
        need = pages_to_finish(req, len(match.pages), self.pool, self.new_token_ratio)
        if need > self.pool.available_pages() - reserved:
            req.res.release(self.pool)
            return None
        pages = self.pool.alloc_pages(self.pool.pages_for(len(req.prompt)) - len(match.pages))
        assert pages is not None, "admission checked the pages"
        req.res.append_pages(pages)
        prefix = len(match.pages) * self.page_size
        req.kv_len = prefix  # only the cached prefix holds valid KV until the transfer is done
        req.cached_tokens = prefix
        req.first_scheduled_time = time.time()
        req.transition(ReqState.TRANSFERRING)
        link = self.links[req.room]
        link.since = self.clock()
        self.open_rooms[req.room] = req
        self._expects.append(KVExpect(req.room, self.peers[link.peer].transfer_addr, pages))
        self._peer_outbox.append((link.peer, RoomDest(req.room, req.rid, self.input_addr, pages, prefix)))
        logger.debug(
            "rid=%s room=%d: %d destination pages, %d tokens cached", req.rid, req.room, len(pages), prefix
        )
        return need - len(pages)
