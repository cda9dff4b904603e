"""The prefill role: prefill disaggregated requests in chunks and hand their KV to the decode side.

A request arrives from the front end (``TokenizedRequest`` with its ``room``) and its
destination from the decode instance (``RoomDest``), in either order. Once both are here it is
schedulable: it is admitted (its own radix-cache prefix matched) and prefilled in page-aligned
chunks exactly as in the unified role. Each chunk's step also tells the worker which of the
request's pages that chunk completed and where they go on the decode side (``KVSend``), so the
transfer of one chunk overlaps the next chunk's compute; the last send carries the first
sampled token. The request then waits in ``transferring`` until the worker reports the room:
done (the decode side acknowledged every page: the pages are cached or freed) or failed.

Terminal messages: the decode instance streams the outputs, so a prefill instance tells the
front end only about failures (one ``RequestFailed``); an aborted or finished request ends here
silently.
"""

from __future__ import annotations

import logging

from protocol.config import ServerArgs
from protocol.messages import (
    INVALID_REQUEST,
    PEER_UNAVAILABLE,
    TRANSFER_FAILED,
    AbortRequest,
    FirstLogprob,
    KVSend,
    Message,
    PeerUnknown,
    RegisterDecode,
    RegisterReply,
    RequestFailed,
    RoomAbort,
    RoomDest,
    StepResult,
    TokenizedRequest,
    TransferResult,
    WorkerReady,
)
from scheduler_proc.batch import StepBuilder
from scheduler_proc.disagg import REGISTERED, DisaggCore, PeerLink, RoomLink, check_peer, with_max_new_tokens
from scheduler_proc.request import ReqState, Request

logger = logging.getLogger(__name__)


class PrefillCore(DisaggCore):
    def __init__(
        self, args: ServerArgs, name: str, role: str, worker: WorkerReady, input_addr: str = ""
    ) -> None:
        super().__init__(args, name, role, worker, input_addr)
        self.awaiting: dict[int, Request] = {}  # room -> request still waiting for its destination
        self.early_dests: dict[int, tuple[RoomDest, float]] = {}  # destinations that came first
        # Rooms refused by one side before the other side's message arrived: (forget at, code, why).
        self.refused_rooms: dict[int, tuple[float, str, str]] = {}
        self.acknowledged: set[Request] = set()  # transferred, its last step's result still due

    # ---------------------------------------------------------------------------- front end

    def on_request(self, msg: TokenizedRequest) -> None:
        refused = self.refused_rooms.pop(msg.room, None) if msg.room is not None else None
        if refused is not None:  # the decode side ended it before it arrived here
            self._refuse(msg.rid, refused[1], refused[2])
            return
        error = self._room_error(msg.room)
        if error is not None:
            self._refuse(msg.rid, INVALID_REQUEST, error)
            self._refuse_early_dest(msg.room, INVALID_REQUEST, error)
            return
        assert msg.room is not None
        super().on_request(msg)
        req = self.requests.get(msg.rid)
        if req is None or req.room != msg.room:  # refused by the common checks
            failed = self._outbox[-1]
            assert isinstance(failed, RequestFailed)
            self._refuse_early_dest(msg.room, failed.code, failed.message)
            return
        with_max_new_tokens(req, 1)  # this side samples the first token only
        queued = self.waiting.pop()  # just queued by the common path; it waits for its destination
        assert queued is req
        self.rooms[msg.room] = req
        self.links[msg.room] = RoomLink(since=self.clock())
        self.awaiting[msg.room] = req
        early = self.early_dests.pop(msg.room, None)
        if early is not None:
            self._take_dest(req, early[0])

    def on_abort(self, msg: AbortRequest) -> None:
        req = self.requests.get(msg.rid)
        if req is None:
            return
        logger.info("rid=%s room=%s aborted (%s) while %s", req.rid, req.room, msg.reason, req.state.value)
        self._end(req, ReqState.ABORTED)

    # ---------------------------------------------------------------------------- decode peers

    def _on_peer_control(self, msg: Message) -> bool:
        if isinstance(msg, RegisterDecode):
            self._register(msg)
        elif isinstance(msg, RoomDest):
            self._on_dest(msg)
        else:
            return False
        return True

    def _register(self, msg: RegisterDecode) -> None:
        theirs = msg.info
        error = check_peer(self.info, theirs)
        reply = RegisterReply(self.input_addr, ok=error is None, error=error or "", info=self.info)
        self._peer_outbox.append((theirs.input_addr, reply))
        if error is not None:
            logger.warning("refused decode instance %s (%s): %s", theirs.name, theirs.input_addr, error)
            return
        peer = self.peers.get(theirs.input_addr)
        if peer is None:
            logger.info("decode instance %s registered from %s", theirs.name, theirs.input_addr)
            peer = self.peers[theirs.input_addr] = PeerLink(theirs.input_addr)
        peer.state, peer.last_seen = REGISTERED, self.clock()

    def _on_stranger_heartbeat(self, addr: str) -> None:
        """A decode instance that still believes itself registered: tell it to register again."""
        self._peer_outbox.append((addr, PeerUnknown(self.input_addr)))

    def _on_dest(self, msg: RoomDest) -> None:
        peer = self.peers.get(msg.decode_addr)
        if peer is None or peer.state != REGISTERED:
            why = f"decode instance {msg.decode_addr} is not registered with prefill instance {self.name}"
            self._tell_abort(msg.decode_addr, msg.room, msg.rid, PEER_UNAVAILABLE, why)
            return
        refused = self.refused_rooms.pop(msg.room, None)
        if refused is not None:  # refused here before its destination arrived
            self._tell_abort(msg.decode_addr, msg.room, msg.rid, refused[1], refused[2])
            return
        ended = self.recent_rooms.get(msg.room)
        if ended is not None:
            self._tell_abort(msg.decode_addr, msg.room, msg.rid, TRANSFER_FAILED, ended[1])
            return
        req = self.rooms.get(msg.room)
        if req is None:
            self.early_dests[msg.room] = (msg, self.clock())
        elif req.rid != msg.rid or self.awaiting.get(msg.room) is not req:
            why = f"room {msg.room} is already in use (duplicate room id)"
            self._tell_abort(msg.decode_addr, msg.room, msg.rid, INVALID_REQUEST, why)
        else:
            self._take_dest(req, msg)

    def _take_dest(self, req: Request, dest: RoomDest) -> None:
        assert req.room is not None
        link = self.links[req.room]
        link.peer = dest.decode_addr
        problem = self._dest_problem(req, dest)
        if problem is not None:
            self._fail(req, INVALID_REQUEST, f"room {req.room}: {problem}")
            return
        del self.awaiting[req.room]
        link.dst_pages, link.skip_pages = list(dest.dst_pages), dest.cached_tokens // self.page_size
        link.since = self.clock()
        self.waiting.append(req)
        logger.debug(
            "rid=%s room=%d: destination known, %d pages to send", req.rid, req.room, len(dest.dst_pages)
        )

    def _dest_problem(self, req: Request, dest: RoomDest) -> str | None:
        prompt = len(req.prompt)
        if dest.cached_tokens % self.page_size or not 0 <= dest.cached_tokens <= prompt:
            return f"cached_tokens {dest.cached_tokens} is not a page-aligned prefix of {prompt} tokens"
        want = self.pool.pages_for(prompt) - dest.cached_tokens // self.page_size
        if len(dest.dst_pages) != want:
            return f"{len(dest.dst_pages)} destination pages for {want} pages to send"
        return None

    def _refuse_early_dest(self, room: int | None, code: str, message: str) -> None:
        """The request of ``room`` was refused here: its decode side must not wait for it."""
        if room is None:
            return
        early = self.early_dests.pop(room, None)
        if early is not None:
            self._tell_abort(early[0].decode_addr, room, early[0].rid, code, message)
        elif room not in self.rooms:
            self.refused_rooms[room] = (self.clock() + self.args.transfer_timeout, code, message)

    def _on_peer_abort(self, req: Request, msg: RoomAbort) -> None:
        """The decode side ended the request (and told the front end): end it here silently."""
        logger.info("rid=%s room=%s ended by the decode side: %s", req.rid, req.room, msg.message)
        self._end(req, ReqState.FAILED)

    def _on_unmatched_abort(self, msg: RoomAbort) -> None:
        """The decode side ended a request whose own message has not arrived here yet: refuse it
        when it does."""
        early = self.early_dests.get(msg.room)
        if msg.room in self.rooms or (early is not None and early[0].rid != msg.rid):
            return  # a live room of another request (the abort was about a duplicate)
        self.early_dests.pop(msg.room, None)
        self.refused_rooms[msg.room] = (self.clock() + self.args.transfer_timeout, msg.code, msg.message)

    def _peer_lost(self, peer: PeerLink, why: str) -> None:
        message = f"decode instance {peer.addr} stopped answering ({why})"
        logger.warning("%s: failing its requests", message)
        del self.peers[peer.addr]
        for req in self._requests_of(peer.addr):
            self._fail(req, PEER_UNAVAILABLE, message, tell_peer=False)
        self.early_dests = {r: d for r, d in self.early_dests.items() if d[0].decode_addr != peer.addr}

    # ---------------------------------------------------------------------------- scheduling

    def queued_requests(self) -> int:
        """Requests not started yet: waiting for their destination, or for a prefill slot."""
        return len(self.awaiting) + len(self.waiting)

    def _detach(self, req: Request) -> None:
        if req.room is not None and self.awaiting.get(req.room) is req:
            del self.awaiting[req.room]
            return
        super()._detach(req)

    def _schedule_chunk(self, req: Request, chunk: int, step: StepBuilder) -> None:
        super()._schedule_chunk(req, chunk, step)
        assert req.room is not None and req.res.slot is not None
        link = self.links[req.room]
        last = req.kv_len == req.num_tokens
        done = self.pool.pages_for(req.kv_len) if last else req.kv_len // self.page_size
        start = max(link.sent_pages, link.skip_pages)
        src = req.res.row[start:done]
        dst = link.dst_pages[start - link.skip_pages : done - link.skip_pages]
        link.sent_pages = max(done, link.sent_pages)
        if not src and not last:
            return
        step.batch.transfers.append(
            KVSend(req.room, req.res.slot, src, dst, first=not link.opened, last=last)
        )
        if not link.opened:
            link.opened = True
            self.open_rooms[req.room] = req

    def on_result(self, result: StepResult) -> None:
        """Also forward the first token's logprob (the data plane carries the token only) and end
        the requests whose acknowledgement came before this result."""
        sent = self.sent[0]
        if result.logprobs is not None:
            for row, logprob in zip(sent.rows, result.logprobs, strict=True):
                req, room = row.req, row.req.room
                link = self.links.get(room) if room is not None else None
                if link is not None and req.sampling.return_logprob and req.state is ReqState.TRANSFERRING:
                    assert room is not None
                    self._peer_outbox.append((link.peer, FirstLogprob(room, req.rid, logprob)))
        super().on_result(result)
        for req in [r for r in sent.members if r in self.acknowledged and not r.inflight]:
            self.acknowledged.discard(req)
            if req.live:
                self._end(req, ReqState.FINISHED)

    def _prefill_done(self, req: Request) -> None:
        """The last chunk is scheduled: the request waits for the decode side's acknowledgement."""
        assert req.room is not None
        req.transition(ReqState.TRANSFERRING)
        self.links[req.room].since = self.clock()

    def _on_transfer_result(self, req: Request, msg: TransferResult) -> None:
        if msg.ok and req.inflight:  # acknowledged before the last step's result was read here
            self.acknowledged.add(req)
        elif msg.ok:
            logger.debug("rid=%s room=%d: transferred", req.rid, msg.room)
            self._end(req, ReqState.FINISHED)
        else:
            self._transfer_failed(req, msg)

    def _transfer_failed(self, req: Request, msg: TransferResult) -> None:
        peer = self.links[msg.room].peer
        self._fail(
            req,
            TRANSFER_FAILED,
            f"KV transfer of room {msg.room} to decode instance {peer} failed: {msg.error}",
        )

    def _expire(self, now: float) -> None:
        """A destination whose request never came is dropped (and its decode side told). A request
        waiting for its destination has no timeout: it may queue on a busy decode instance for
        long, holding no pages; if that instance dies, the front end aborts it here."""
        self.refused_rooms = {r: v for r, v in self.refused_rooms.items() if v[0] > now}
        timeout = self.args.transfer_timeout
        for room, (dest, since) in list(self.early_dests.items()):
            if now - since > timeout:
                del self.early_dests[room]
                why = f"the request of room {room} did not reach {self.name} within {timeout:g} s"
                self._tell_abort(dest.decode_addr, room, dest.rid, TRANSFER_FAILED, why)
