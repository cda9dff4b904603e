"""Fake instance (scheduler) threads and a front end thread for the front end's tests.

The fake binds a PULL on its input address, answers ``AttachFrontend`` with heartbeats,
``TokenizedRequest`` with one token per step per live request (from ``script``, then EOS),
``AbortRequest`` with a final output and ``StatusQuery`` with a ``StatusReport``.
A fake decode instance does the same and registers with the prefill instances that
``ConnectPrefill`` names (or refuses, as told), reporting it in its heartbeats; a fake prefill
instance holds its requests without output (or fails them, as told) until aborted.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import zmq

from protocol import transport
from protocol.config import EMBEDDED, FrontendConfig, ServerArgs
from protocol.messages import (
    QUEUE_FULL,
    AbortRequest,
    AttachFrontend,
    BatchOutput,
    ConnectPrefill,
    Heartbeat,
    InstanceStatus,
    Message,
    ModelInfo,
    ReqOutput,
    RequestFailed,
    StatusQuery,
    StatusReport,
    TokenizedRequest,
)
from tests.ports import free_tcp_port
from tokenizer_proc.client import Client
from tokenizer_proc.frontend import run_frontend

HEARTBEAT_S = 0.05
TOTAL_PAGES = 64
CONTEXT_LEN = 256
STEP_S = 0.002


def embedded_model_info(context_len: int = CONTEXT_LEN) -> ModelInfo:
    return ModelInfo(
        name=EMBEDDED.name,
        architecture="LlamaForCausalLM",
        vocab_size=EMBEDDED.vocab_size,
        context_len=context_len,
        num_layers=EMBEDDED.num_layers,
        num_kv_heads=EMBEDDED.num_kv_heads,
        head_dim=EMBEDDED.head_dim,
        dtype="float32",
        eos_token_ids=[EMBEDDED.eos_token_id],
    )


@dataclass
class FakeRequest:
    req: TokenizedRequest
    produced: int = 0


@dataclass
class FakeInstance:
    input_addr: str
    name: str = "fake-0"
    role: str = "unified"
    ready: bool = True
    answers_status: bool = True
    max_queued_tokens: int = 100  # longer prompts are refused with queue_full
    script: list[int] = field(default_factory=lambda: list(b"Hello, world!"))
    heartbeats: threading.Event = field(default_factory=threading.Event)
    generating: threading.Event = field(default_factory=threading.Event)
    received: list[Message] = field(default_factory=list)
    attached: threading.Event = field(default_factory=threading.Event)
    got_request: threading.Event = field(default_factory=threading.Event)
    got_abort: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _live: dict[str, FakeRequest] = field(default_factory=dict)
    _thread: threading.Thread | None = None

    def start(self) -> FakeInstance:
        self.heartbeats.set()
        self.generating.set()
        ctx = zmq.Context.instance()
        pull = transport.bind(ctx, zmq.PULL, self.input_addr)  # bound before the front end starts
        self._thread = threading.Thread(target=self._run, args=(ctx, pull), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=5)
        assert not self._thread.is_alive()

    def aborts(self) -> list[AbortRequest]:
        return [m for m in self.received if isinstance(m, AbortRequest)]

    def requests(self) -> list[TokenizedRequest]:
        return [m for m in self.received if isinstance(m, TokenizedRequest)]

    def _run(self, ctx: zmq.Context, pull: zmq.Socket) -> None:
        push: zmq.Socket | None = None
        next_heartbeat = 0.0
        try:
            while not self._stop.is_set():
                busy = self._live and self.generating.is_set()
                if pull.poll(int(STEP_S * 1e3) if busy else int(HEARTBEAT_S * 1e3) // 2):
                    for msg in transport.recv_all(pull):
                        self.received.append(msg)
                        if isinstance(msg, AttachFrontend) and push is None:
                            push = transport.connect(ctx, zmq.PUSH, msg.output_addr)
                            self.attached.set()
                        elif push is not None:
                            self._handle(push, msg)
                if push is None:
                    continue
                now = time.monotonic()
                if self.heartbeats.is_set() and now >= next_heartbeat:
                    transport.send(push, self._heartbeat())
                    next_heartbeat = now + HEARTBEAT_S
                if self.generating.is_set() and self._live:
                    transport.send(push, self._step())
        finally:
            pull.close(linger=0)
            if push is not None:
                push.close(linger=0)

    def _handle(self, push: zmq.Socket, msg: Message) -> None:
        if isinstance(msg, TokenizedRequest):
            self.got_request.set()
            if len(msg.input_ids) > self.max_queued_tokens:
                transport.send(push, RequestFailed(msg.rid, QUEUE_FULL, "the fake's queue is full"))
                return
            self._admit(push, msg)
        elif isinstance(msg, AbortRequest):
            self.got_abort.set()
            self._abort(push, msg)
        elif isinstance(msg, StatusQuery) and self.answers_status:
            transport.send(push, StatusReport(qid=msg.qid, status=self._status()))

    def _admit(self, push: zmq.Socket, msg: TokenizedRequest) -> None:
        self._live[msg.rid] = FakeRequest(msg)

    def _abort(self, push: zmq.Socket, msg: AbortRequest) -> None:
        if self._live.pop(msg.rid, None) is not None:
            final = ReqOutput(rid=msg.rid, token_ids=[], finished=True, finish_reason=msg.reason)
            transport.send(push, BatchOutput(outputs=[final]))

    def _step(self) -> BatchOutput:
        outputs = [self._next_token(fake) for fake in self._live.values()]
        for out in outputs:
            if out.finished:
                del self._live[out.rid]
        return BatchOutput(outputs=outputs)

    def _next_token(self, fake: FakeRequest) -> ReqOutput:
        req, sampling = fake.req, fake.req.sampling
        at = fake.produced
        token = self.script[at % len(self.script)]
        if at >= len(self.script) and not sampling.ignore_eos:
            token = EMBEDDED.eos_token_id
        fake.produced += 1
        out = ReqOutput(rid=req.rid, token_ids=[token])
        if at == 0:
            out.prompt_tokens, out.cached_tokens, out.queue_ms = len(req.input_ids), 0, 1.5
        if sampling.return_logprob:
            out.logprobs = [-0.25]
        if token in sampling.stop_token_ids:
            out.finished, out.finish_reason = True, "stop"
        elif fake.produced >= sampling.max_new_tokens:
            out.finished, out.finish_reason = True, "length"
        return out

    def _heartbeat(self) -> Heartbeat:
        return Heartbeat(
            name=self.name,
            role=self.role,
            ready=self.ready,
            input_addr=self.input_addr,
            model=embedded_model_info(),
            queued_tokens=sum(len(f.req.input_ids) for f in self._live.values()),
            running=len(self._live),
        )

    def _status(self) -> InstanceStatus:
        used = len(self._live)
        return InstanceStatus(
            name=self.name,
            role=self.role,
            alive=True,
            ready=self.ready,
            decoding=used,
            free_pages=TOTAL_PAGES - used,
            cached_pages=0,
            total_pages=TOTAL_PAGES,
        )


@dataclass
class FakeDecode(FakeInstance):
    """Registers with the prefill instances of each ``ConnectPrefill`` after ignoring the first
    ``ignore_connects`` of them; ``refuse`` maps a prefill address to the refusal's reason."""

    role: str = "decode"
    refuse: dict[str, str] = field(default_factory=dict)
    ignore_connects: int = 0
    peers: dict[str, str] = field(default_factory=dict)
    fail_on_abort: tuple[str, str] | None = None  # answer an abort with this failure instead

    def connects(self) -> list[ConnectPrefill]:
        return [m for m in self.received if isinstance(m, ConnectPrefill)]

    def _handle(self, push: zmq.Socket, msg: Message) -> None:
        if not isinstance(msg, ConnectPrefill):
            super()._handle(push, msg)
        elif self.ignore_connects > 0:
            self.ignore_connects -= 1
        else:
            self.peers = {addr: self._registration(addr) for addr in msg.prefill_addrs}

    def _abort(self, push: zmq.Socket, msg: AbortRequest) -> None:
        if self.fail_on_abort is None:
            super()._abort(push, msg)
        elif self._live.pop(msg.rid, None) is not None:
            transport.send(push, RequestFailed(msg.rid, *self.fail_on_abort, role="decode"))

    def _registration(self, prefill_addr: str) -> str:
        reason = self.refuse.get(prefill_addr)
        return "registered" if reason is None else f"refused: {reason}"

    def _heartbeat(self) -> Heartbeat:
        hb = super()._heartbeat()
        hb.peers = dict(self.peers)
        return hb


@dataclass
class FakePrefill(FakeInstance):
    """Holds each request, as if prefilling it for its decode instance, until it is aborted;
    with ``fail`` set, fails each request with that (code, message) instead."""

    role: str = "prefill"
    fail: tuple[str, str] | None = None
    late_fail: tuple[str, str] | None = None  # sent for every held request at each status query
    _held: dict[str, TokenizedRequest] = field(default_factory=dict)

    def _handle(self, push: zmq.Socket, msg: Message) -> None:
        if isinstance(msg, StatusQuery) and self.late_fail is not None:
            for rid in self._held:
                transport.send(push, RequestFailed(rid, *self.late_fail, role="prefill"))
        super()._handle(push, msg)

    def _admit(self, push: zmq.Socket, msg: TokenizedRequest) -> None:
        if self.fail is None:
            self._held[msg.rid] = msg
        else:
            transport.send(push, RequestFailed(msg.rid, *self.fail))

    def _abort(self, push: zmq.Socket, msg: AbortRequest) -> None:
        self._held.pop(msg.rid, None)

    def _status(self) -> InstanceStatus:
        status = super()._status()
        status.prefilling = len(self._held)
        status.free_pages -= len(self._held)
        return status


@dataclass
class Deployment:
    cfg: FrontendConfig
    fakes: list[FakeInstance]
    stop: threading.Event
    thread: threading.Thread

    @property
    def fake(self) -> FakeInstance:
        return self.fakes[0]

    @property
    def prefills(self) -> list[FakePrefill]:
        return [f for f in self.fakes if isinstance(f, FakePrefill)]

    @property
    def decodes(self) -> list[FakeDecode]:
        return [f for f in self.fakes if isinstance(f, FakeDecode)]

    def client(self, timeout: float = 5.0) -> Client:
        return Client(self.cfg.client_addr, timeout=timeout)


def frontend_config(
    ipc: str, num_instances: int = 1, num_prefill: int = 0, num_decode: int = 0, **args
) -> FrontendConfig:
    """Unified instances by default; with ``num_prefill`` and ``num_decode``, only those."""
    server_args = ServerArgs(
        **{"heartbeat_interval": HEARTBEAT_S, "heartbeat_timeout": 0.4, "max_message_bytes": 4096, **args}
    )
    disaggregated = num_prefill or num_decode
    return FrontendConfig(
        args=server_args,
        client_addr=f"tcp://127.0.0.1:{free_tcp_port()}",
        output_addr=transport.ipc_addr(ipc, "frontend-out"),
        unified=[]
        if disaggregated
        else [transport.ipc_addr(ipc, f"instance-{i}") for i in range(num_instances)],
        prefill=[transport.ipc_addr(ipc, f"prefill-{i}") for i in range(num_prefill)],
        decode=[transport.ipc_addr(ipc, f"decode-{i}") for i in range(num_decode)],
    )


def pd_fakes(cfg: FrontendConfig, prefill_kws: list[dict], decode_kws: list[dict]) -> list[FakeInstance]:
    """Fake prefill instances ``prefill0``.. and decode instances ``decode0``.. of ``cfg``."""
    prefills = [
        FakePrefill(addr, name=f"prefill{i}", **kw)
        for i, (addr, kw) in enumerate(zip(cfg.prefill, prefill_kws, strict=True))
    ]
    decodes = [
        FakeDecode(addr, name=f"decode{i}", **kw)
        for i, (addr, kw) in enumerate(zip(cfg.decode, decode_kws, strict=True))
    ]
    return [*prefills, *decodes]


def start_deployment(cfg: FrontendConfig, fakes: list[FakeInstance]) -> Deployment:
    for fake in fakes:
        fake.start()
    stop = threading.Event()
    thread = threading.Thread(target=run_frontend, args=(cfg, stop), daemon=True)
    thread.start()
    return Deployment(cfg, fakes, stop, thread)


def stop_deployment(dep: Deployment) -> None:
    dep.stop.set()
    dep.thread.join(timeout=5)
    assert not dep.thread.is_alive()
    for fake in dep.fakes:
        fake.stop()
