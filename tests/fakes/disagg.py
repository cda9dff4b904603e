"""An in-process xPyD cluster for the prefill and decode scheduler cores: fake workers (the
scheduler tests' fake model, whose outputs depend on every token read back through the page
tables), a fake KV data plane between them, and a fake front end that routes every message.

The fake data plane keeps the real contract: a room opens on the prefill side with its first
send and on the decode side with its expect; pages move only once both are known; every opened
room ends in exactly one ``TransferResult`` per side; aborts and dead peers fail both sides;
a destination page is never written twice nor outside the room's announced pages.

(Over 400 lines on purpose: the fake data plane, the two fake workers and the cluster that drives
them are one fake, each part small and used only through ``Cluster``.)
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

from prefill_worker.worker import token_logprob
from protocol.dataplane import KVLayout, TokenLogprob
from protocol.messages import (
    AbortRequest,
    BatchOutput,
    ConnectPrefill,
    KVPeerRegistered,
    Message,
    PeerInfo,
    RegisterKVPeer,
    RequestFailed,
    SamplingParams,
    StepBatch,
    StepResult,
    TokenizedRequest,
    TransferEndpoint,
    TransferResult,
    WorkerReady,
)
from scheduler_proc.core import SchedulerCore
from scheduler_proc.decode_mode import DecodeRole
from scheduler_proc.peers import PeerTable
from scheduler_proc.rooms import RoomState, RoomTable
from tests.fakes.scheduler import FakeWorker, make_args, reference_generate

STOP = 0


@dataclass
class FakeRoom:
    prefill: FakePrefillWorker | None = None
    decode: FakeDecodeWorker | None = None
    dst_pages: list[int] | None = None
    pending: list[tuple[list[int], list[int], int | None, float | None]] = field(default_factory=list)
    written: set[int] = field(default_factory=set)
    held: bool = False  # the test holds the pages back (a slow transfer)


class FakeLink:
    """The KV data plane of the whole cluster."""

    def __init__(self) -> None:
        self.rooms: dict[int, FakeRoom] = {}
        self.pages_moved = 0

    def open(self, worker: FakePrefillWorker, room: int) -> None:
        entry = self.rooms.setdefault(room, FakeRoom())
        assert entry.prefill is None, f"room {room} opened twice on the prefill side"
        entry.prefill = worker

    def expect(self, worker: FakeDecodeWorker, room: int, peer: str, dst_pages: list[int]) -> None:
        entry = self.rooms.setdefault(room, FakeRoom())
        assert entry.decode is None, f"room {room} expected twice"
        if not worker.registered.get(peer):
            entry.decode = worker
            self._finish(room, ok=False, error=f"{peer} is not a registered prefill peer")
            return
        entry.decode, entry.dst_pages = worker, list(dst_pages)
        self._deliver(room)

    def send(
        self,
        room: int,
        src: list[int],
        dst: list[int],
        first_token: int | None,
        first_logprob: TokenLogprob | None = None,
    ) -> None:
        entry = self.rooms.get(room)
        if entry is None or entry.prefill is None:
            return  # the room failed a moment ago
        assert len(src) == len(dst)
        entry.pending.append((src, dst, first_token, first_logprob))
        self._deliver(room)

    def hold(self, room: int) -> None:
        self.rooms.setdefault(room, FakeRoom()).held = True

    def release(self, room: int) -> None:
        if room in self.rooms:
            self.rooms[room].held = False
            self._deliver(room)

    def abort(self, room: int, reason: str) -> None:
        if room in self.rooms:
            self._finish(room, ok=False, error=reason)

    def kill(self, worker: FakeWorker) -> None:
        """``worker`` died: its rooms stall (the survivor's scheduler notices by heartbeat)."""
        for entry in self.rooms.values():
            if entry.prefill is worker:
                entry.prefill = None
            if entry.decode is worker:
                entry.decode = None

    def _deliver(self, room: int) -> None:
        entry = self.rooms[room]
        if entry.decode is None or entry.prefill is None or entry.dst_pages is None or entry.held:
            return
        pending, entry.pending = entry.pending, []
        for src, dst, first_token, first_logprob in pending:
            for s, d in zip(src, dst, strict=True):
                assert d in entry.dst_pages, f"room {room}: page {d} was not announced"
                assert d not in entry.written, f"room {room}: page {d} written twice"
                entry.written.add(d)
                entry.decode.kv[d] = list(entry.prefill.kv[s])
                self.pages_moved += 1
            if first_token is not None:
                assert entry.written == set(entry.dst_pages), f"room {room}: pages left unwritten"
                self._finish(room, ok=True, first_token=first_token, first_logprob=first_logprob)
                return

    def _finish(
        self,
        room: int,
        ok: bool,
        first_token: int | None = None,
        error: str = "",
        first_logprob: TokenLogprob | None = None,
    ) -> None:
        """Both sides hear the end; the decode side also gets the first token and its logprob,
        as the real decode worker reports them."""
        entry = self.rooms.pop(room)
        if entry.prefill is not None:
            entry.prefill.results.append(TransferResult(room, ok, error=error))
        if entry.decode is not None:
            token, logprob = (first_token, first_logprob) if ok else (None, None)
            entry.decode.results.append(TransferResult(room, ok, token, error, first_logprob=logprob))


def fake_layout(ready: WorkerReady, backend: str = "fake") -> KVLayout:
    """The KV layout a real worker of this shape would report (what registration compares)."""
    m = ready.model
    return KVLayout(m.name, m.num_layers, ready.page_size, m.num_kv_heads, m.head_dim, m.dtype, backend)


def with_layout(info: PeerInfo, **changes: object) -> PeerInfo:
    """``info`` whose worker reports a layout with ``changes``."""
    layout = dataclasses.replace(info.transfer.layout, **changes)
    return dataclasses.replace(info, transfer=dataclasses.replace(info.transfer, layout=layout))


class FakePrefillWorker(FakeWorker):
    def __init__(self, link: FakeLink, name: str, **kw: int) -> None:
        super().__init__(**kw)
        self.link, self.name = link, name
        self.results: list[Message] = []

    def ready(self, max_context_len: int = 4096) -> WorkerReady:
        ready = super().ready(max_context_len)
        ready.transfer = TransferEndpoint(fake_layout(ready), f"fake://{self.name}")
        return ready

    def step(self, batch: StepBatch) -> StepResult:
        for room in batch.abort_rooms:
            self.link.abort(room, "prefill side: aborted")
        result = super().step(batch)
        rows = {slot: row for row, slot in enumerate(result.slots)}
        for send in batch.transfers:
            if send.first:
                self.link.open(self, send.room)
            if send.last:
                row = rows[send.slot]
                token, logprob = result.token_ids[row], token_logprob(result, row)
            else:
                token, logprob = None, None
            self.link.send(send.room, send.src_pages, send.dst_pages, token, logprob)
        return result


class FakeDecodeWorker(FakeWorker):
    def __init__(self, link: FakeLink, name: str, **kw: int) -> None:
        super().__init__(**kw)
        self.link, self.name = link, name
        self.results: list[Message] = []
        self.registered: dict[str, bool] = {}

    def ready(self, max_context_len: int = 4096) -> WorkerReady:
        ready = super().ready(max_context_len)
        ready.transfer = TransferEndpoint(fake_layout(ready))
        return ready

    def register(self, msg: RegisterKVPeer) -> None:
        self.registered[msg.transfer_addr] = True
        self.results.append(KVPeerRegistered(msg.prefill_addr, ok=True))

    def step(self, batch: StepBatch) -> StepResult:
        for expect in batch.expects:
            self.link.expect(self, expect.room, expect.peer, expect.dst_pages)
        for room in batch.abort_rooms:
            self.link.abort(room, "decode side: aborted")
        seeds = {new.slot: new.next_token for new in batch.new_reqs if new.next_token is not None}
        if not seeds:
            return super().step(batch)
        released = super().step(
            dataclasses.replace(
                batch, new_reqs=[], page_appends=[], extends=[], decode_slots=[], decode_positions=[]
            )
        )
        assert not released.slots
        self.last_token.update(seeds)  # after the released slots were forgotten, as in the engine
        return super().step(dataclasses.replace(batch, released=[]))


@dataclass
class Instance:
    core: SchedulerCore
    worker: FakePrefillWorker | FakeDecodeWorker
    inbox: deque[Message] = field(default_factory=deque)
    inflight: deque[StepResult] = field(default_factory=deque)
    dead: bool = False

    @property
    def addr(self) -> str:
        return self.core.role.pairing.input_addr  # type: ignore[attr-defined]


@dataclass
class FrontendLog:
    """What the front end received, per request: tokens from decode instances, failures from either."""

    tokens: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    logprobs: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    finish: dict[str, str] = field(default_factory=dict)
    cached: dict[str, int] = field(default_factory=dict)
    failed: dict[str, list[RequestFailed]] = field(default_factory=lambda: defaultdict(list))

    def add(self, inst: Instance, msg: Message) -> None:
        if isinstance(msg, RequestFailed):
            assert len(self.failed[msg.rid]) < 2, f"rid={msg.rid}: more than one failure per instance pair"
            self.failed[msg.rid].append(msg)
            return
        assert isinstance(msg, BatchOutput), f"{inst.core.name} sent {msg.TYPE} to the front end"
        assert isinstance(inst.core.role, DecodeRole), "outputs come from decode instances only"
        for out in msg.rows():
            assert out.rid not in self.finish, f"rid={out.rid}: output after its final one"
            self.tokens[out.rid].extend(out.token_ids)
            self.logprobs[out.rid].extend(out.logprobs or [])
            if out.finished:
                self.finish[out.rid] = out.finish_reason or ""
                self.cached[out.rid] = out.cached_tokens


def sampling(
    max_new: int = 8, seed: int = 1, stop: bool = True, return_logprob: bool = False
) -> SamplingParams:
    stop_ids = [STOP] if stop else []
    return SamplingParams(
        max_new_tokens=max_new,
        seed=seed,
        temperature=0.0,
        stop_token_ids=stop_ids,
        return_logprob=return_logprob,
    )


class Cluster:
    """P prefill and D decode instances wired by a fake front end; ``run`` drives them all."""

    def __init__(
        self,
        num_prefill: int = 1,
        num_decode: int = 1,
        overlap: bool = False,
        worker: dict[str, int] | None = None,
        prefill_worker: dict[str, int] | None = None,
        decode_worker: dict[str, int] | None = None,
        **overrides: object,
    ) -> None:
        self.link = FakeLink()
        self.log = FrontendLog()
        self.depth = 2 if overlap else 1
        self.now = 1000.0
        shape = dict(num_pages=64, page_size=4, max_slots=8) | (worker or {})
        self.instances: dict[str, Instance] = {}
        p_shape = shape | (prefill_worker or {})
        self.prefills = [
            self._add("prefill", FakePrefillWorker, f"prefill{i}", p_shape, overrides)
            for i in range(num_prefill)
        ]
        d_shape = shape | (decode_worker or {})
        self.decodes = [
            self._add("decode", FakeDecodeWorker, f"decode{i}", d_shape, overrides) for i in range(num_decode)
        ]
        self._next_room = 100

    def _add(self, role, worker_cls, name, shape, overrides) -> Instance:  # type: ignore[no-untyped-def]
        worker = worker_cls(self.link, name, **shape)
        args = make_args(
            page_size=shape["page_size"],
            heartbeat_interval=1.0,
            heartbeat_timeout=5.0,
            transfer_timeout=30.0,
            **overrides,
        )
        core = SchedulerCore(
            args, name, role, worker.ready(), input_addr=f"inproc://{name}", clock=lambda: self.now
        )
        inst = Instance(core, worker)
        self.instances[inst.addr] = inst
        return inst

    # ---------------------------------------------------------------------------- front end

    def connect(self) -> None:
        for d in self.decodes:
            d.inbox.append(ConnectPrefill([p.addr for p in self.prefills]))
        self.run()
        for d in self.decodes:
            assert set(d.core.peer_states().values()) <= {"registered"}, d.core.peer_states()

    def submit(
        self,
        rid: str,
        prompt: list[int],
        p: int = 0,
        d: int = 0,
        decode_first: bool = False,
        room: int | None = None,
        **kw: object,
    ) -> int:
        if room is None:
            room, self._next_room = self._next_room, self._next_room + 1
        params = sampling(**kw)  # type: ignore[arg-type]
        to_p = TokenizedRequest(rid, prompt, params, arrival_time=time.time(), room=room)
        to_d = TokenizedRequest(
            rid, prompt, params, arrival_time=time.time(), room=room, prefill_addr=self.prefills[p].addr
        )
        first, second = (
            (self.decodes[d], self.prefills[p]) if decode_first else (self.prefills[p], self.decodes[d])
        )
        first.inbox.append(to_d if first is self.decodes[d] else to_p)
        second.inbox.append(to_d if second is self.decodes[d] else to_p)
        return room

    def abort(self, rid: str) -> None:
        for inst in self.instances.values():
            inst.inbox.append(AbortRequest(rid))

    # ---------------------------------------------------------------------------- driving

    def live(self) -> list[Instance]:
        return [i for i in self.instances.values() if not i.dead]

    def round(self) -> bool:
        """Deliver every message, run one step per instance, hand results back. True if anything moved."""
        moved = False
        for inst in self.live():
            moved |= self._deliver(inst)
            batch = inst.core.form_step() if len(inst.inflight) < self.depth else None
            if batch is not None:
                inst.inflight.append(inst.worker.step(batch))
                moved = True
            if inst.inflight and (len(inst.inflight) >= self.depth or batch is None):
                inst.core.on_result(inst.inflight.popleft())
                moved = True
            for msg in inst.worker.results:
                inst.core.on_worker_message(msg)
                moved = True
            inst.worker.results.clear()
            inst.core.tick(self.now)
            moved |= self._route(inst)
        return moved

    def _deliver(self, inst: Instance) -> bool:
        moved = bool(inst.inbox)
        while inst.inbox:
            msg = inst.inbox.popleft()
            if isinstance(msg, TokenizedRequest):
                inst.core.on_request(msg)
            elif isinstance(msg, AbortRequest):
                inst.core.on_abort(msg)
            else:
                assert inst.core.on_peer_message(msg), msg
        return moved

    def _route(self, inst: Instance) -> bool:
        out = inst.core.take_outbox()
        peer = inst.core.take_peer_outbox()
        work = inst.core.take_worker_outbox()
        for msg in out:
            self.log.add(inst, msg)
        for addr, msg in peer:
            target = self.instances[addr]
            if not target.dead:
                target.inbox.append(msg)
        for msg in work:
            assert isinstance(msg, RegisterKVPeer) and isinstance(inst.worker, FakeDecodeWorker)
            inst.worker.register(msg)
        return bool(out or peer or work)

    def run(self, max_rounds: int = 3000) -> None:
        """Until nothing moves and nothing is in flight."""
        for _ in range(max_rounds):
            if not self.round() and not any(i.inflight for i in self.live()):
                return
        raise AssertionError(
            f"not settled after {max_rounds} rounds: {[i.core.status() for i in self.live()]}"
        )

    def advance(self, seconds: float, tick: float = 0.5) -> None:
        """Let ``seconds`` pass in ticks shorter than the heartbeat interval, so live peers keep
        hearing from each other."""
        end = self.now + seconds
        while self.now < end:
            self.now = min(self.now + tick, end)
            self.run()

    def kill(self, inst: Instance) -> None:
        inst.dead = True
        inst.inflight.clear()
        self.link.kill(inst.worker)

    # ---------------------------------------------------------------------------- checks

    def assert_no_leak(self) -> None:
        for inst in self.live():
            core, status = inst.core, inst.core.status()
            assert not core.requests and not core.sent and not open_rooms(core), status
            assert status.free_pages + status.cached_pages == status.total_pages, status
            assert core.pool.slots.num_free == core.pool.slots.capacity, status
        assert not self.link.rooms, f"rooms left open on the data plane: {list(self.link.rooms)}"


def rooms(core: SchedulerCore) -> RoomTable:
    return core.role.pairing.rooms  # type: ignore[attr-defined]


def peers(core: SchedulerCore) -> PeerTable:
    return core.role.pairing.peers  # type: ignore[attr-defined]


def open_rooms(core: SchedulerCore) -> list[int]:
    """Rooms ``core`` counts open on the data plane (live or draining)."""
    return [room.id for room in rooms(core).in_state(*RoomState) if room.open]


def state_of(core: SchedulerCore, room: int) -> RoomState | None:
    entry = rooms(core).get(room)
    return None if entry is None else entry.state


def expected(prompt: list[int], max_new: int = 8, seed: int = 1, stop: bool = True) -> list[int]:
    return reference_generate(prompt, sampling(max_new, seed, stop))
