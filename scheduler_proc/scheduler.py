"""The scheduler process's event loop: sockets, heartbeats and the overlap pipeline around
``SchedulerCore``.

Sockets: PULL ``input_addr`` (front ends and peers), PULL ``result_addr`` (worker → scheduler),
PUSH ``step_addr`` (scheduler → worker), one PUSH per attached front end, per peer instance and
per recent ``StatusQuery.reply_to`` address (at most ``MAX_REPLY_TO_SOCKETS`` of those).

Front ends: messages carry no sender, so an instance cannot tell which front end a request came
from. Outputs and failures therefore go to every attached front end (one frame, encoded once):
internal request ids are unique across front ends (each mints them under its own random prefix)
and a front end drops outputs and failures of rids it does not know, so each reply reaches the
front end that owns the request; a deployment with several front ends (``--tokenizer-worker-num``)
costs each of them a dictionary miss per other row, and the scheduler nothing more. A status
report goes to its query's ``reply_to`` (a front end's output address: through that front end's
queue, in order with its outputs). Front ends repeat ``AttachFrontend``
every heartbeat interval; one silent for the heartbeat timeout is detached, and the requests of a
departed (or restarted) front end are aborted (by id prefix; all of them once no front end is
left), so a dead front end costs neither an unbounded queue nor decode steps for nobody
(scheduler_proc/frontends.py).

Security: with ``--cluster-key-dir`` every socket to or from another process is CURVE
(protocol/security.py): only holders of an allowed key reach the input socket. A ``Shutdown`` is
obeyed only on a private (ipc) input, never from the network (docs/design.md, "Security").

A message from a front end or a peer that makes a handler raise is logged and, when it names a
request id, answered with ``RequestFailed(INVALID_REQUEST)``; the instance keeps serving.

Watchdog: a step in flight for longer than ``--watchdog-timeout`` means a hung worker: every
live request fails (``internal``, naming the watchdog) and the process exits with ``WorkerLost``
(non-zero), as on a ``WorkerFailed``; past half that time the instance already reports itself
not ready (heartbeats and status), so no new request is routed to it. On either failure the
sockets to the front ends linger a moment, so that those failures reach them.

Overlap: up to two steps are in flight, so while the worker runs step N the scheduler has
already formed and sent step N+1; then it processes N's result. With
``--disable-overlap-schedule`` one step is in flight at a time.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable

import zmq

from protocol import transport
from protocol.config import SchedulerConfig
from protocol.messages import (
    INTERNAL,
    INVALID_REQUEST,
    PEER_UNAVAILABLE,
    SHUTTING_DOWN,
    AbortRequest,
    AttachFrontend,
    Heartbeat,
    Message,
    ProtocolError,
    RequestFailed,
    Shutdown,
    StatusQuery,
    StatusReport,
    StepResult,
    TokenizedRequest,
    WorkerFailed,
    WorkerReady,
    decode,
    encode,
)
from protocol.security import ClusterKeys
from protocol.validation import preview
from scheduler_proc.core import ROLES, SchedulerCore
from scheduler_proc.frontends import Frontends
from scheduler_proc.heap import ArrivalFreezer, IdleFreezer, freeze

logger = logging.getLogger(__name__)

WORKER_START_TIMEOUT_S = 600.0
SIGNAL_CHECK_MS = 200  # longest wait before pending signal handlers get to run
MAX_REPLY_TO_SOCKETS = 16  # status reply_to addresses kept connected (least recently used closed)
FAILURE_LINGER_MS = 2000  # how long the last failures may take to reach the front ends
STALL_FRACTION = 0.5  # of --watchdog-timeout: a step in flight longer than this reports not ready


class WorkerLost(RuntimeError):
    """The worker failed, or never became ready."""


def run_scheduler(cfg: SchedulerConfig, worker_start_timeout: float = WORKER_START_TIMEOUT_S) -> None:
    """Serve until a ``Shutdown`` arrives on the input socket; raises WorkerLost when the worker
    fails or does not report ready within ``worker_start_timeout`` seconds."""
    if cfg.role not in ROLES:
        raise ValueError(f"scheduler role {cfg.role!r} is not supported; expected one of {', '.join(ROLES)}")
    ctx = zmq.Context()
    sockets: list[zmq.Socket] = []
    try:
        args = cfg.args
        keys = ClusterKeys.from_dir(args.cluster_key_dir)
        inputs = transport.bind(ctx, zmq.PULL, cfg.addrs.input_addr, args.max_message_bytes, keys)
        results = transport.bind(ctx, zmq.PULL, cfg.addrs.result_addr)
        steps = transport.connect(ctx, zmq.PUSH, cfg.addrs.step_addr)
        sockets += [inputs, results, steps]
        ready = _wait_for_worker(results, worker_start_timeout)
        logger.info(
            "%s: worker ready on %s: %d pages of %d tokens, %d slots",
            cfg.name,
            ready.device,
            ready.num_pages - 1,
            ready.page_size,
            ready.max_slots,
        )
        core = SchedulerCore.from_config(cfg, ready)
        freeze()  # the start-up heap is never walked again (scheduler_proc/heap.py)
        loop = _Loop(cfg, core, ready, ctx, inputs, results, steps, keys)
        try:
            loop.run()
        except WorkerLost:
            for sock in loop.frontends.sockets():
                sock.setsockopt(zmq.LINGER, FAILURE_LINGER_MS)
            raise
        finally:
            sockets += [*loop.frontends.sockets(), *loop.peers.values(), *loop.reply_to.values()]
    finally:
        for sock in sockets:
            sock.close()
        ctx.term()


def _wait_for_worker(results: zmq.Socket, timeout: float) -> WorkerReady:
    """The worker's first message; waited for in short polls, so that a SIGTERM the kernel gave
    another thread gets its handler run (only the main thread runs them, between polls)."""
    deadline = time.monotonic() + timeout
    while not results.poll(SIGNAL_CHECK_MS):
        if time.monotonic() > deadline:
            raise WorkerLost(f"the worker did not report ready within {timeout:.0f} s")
    msg = transport.recv(results)
    if isinstance(msg, WorkerFailed):
        raise WorkerLost(f"the worker failed to start: {msg.message}")
    if not isinstance(msg, WorkerReady):
        raise WorkerLost(f"expected worker_ready from the worker, got {msg.TYPE}")
    return msg


def _poll(poller: zmq.Poller, timeout_s: float, writable: list[zmq.Socket]) -> list[tuple[zmq.Socket, int]]:
    """Wait for input, or also for room in the ``writable`` sockets' queues."""
    for sock in writable:
        poller.register(sock, zmq.POLLOUT)
    try:
        return poller.poll(timeout_s * 1000)
    finally:
        for sock in writable:
            poller.unregister(sock)


def _recv_valid(sock: zmq.Socket, name: str, refuse: Callable[[RequestFailed], None]) -> list[Message]:
    """Every message queued on ``sock``; frames that are not messages of our protocol are logged
    and dropped, since the input socket faces other processes, possibly of another version."""
    out = []
    while True:
        try:
            frame = sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            return out
        try:
            out.append(decode(frame))
        except ProtocolError as e:
            logger.warning("%s: dropped a malformed frame on the input socket: %s", name, e)
            if e.message_type == TokenizedRequest.TYPE and e.rid is not None:  # its sender waits
                refuse(RequestFailed(rid=e.rid, code=INVALID_REQUEST, message=str(e)))


class _Loop:
    def __init__(
        self,
        cfg: SchedulerConfig,
        core: SchedulerCore,
        ready: WorkerReady,
        ctx: zmq.Context,
        inputs: zmq.Socket,
        results: zmq.Socket,
        steps: zmq.Socket,
        keys: ClusterKeys | None = None,
    ) -> None:
        self.cfg = cfg
        self.keys = keys  # CURVE client keys of every socket this loop connects
        self.core = core
        self.model = ready.model
        self.ctx = ctx
        self.inputs, self.results, self.steps = inputs, results, steps
        self.frontends = Frontends(ctx, cfg.name, keys)
        self.shutdown_allowed = transport.is_private(cfg.addrs.input_addr)
        self.peers: dict[str, zmq.Socket] = {}  # PUSH to peer instances
        self.reply_to: OrderedDict[str, zmq.Socket] = OrderedDict()  # status reply_to addresses, LRU
        self.max_inflight = 1 if cfg.args.disable_overlap_schedule else 2
        self.heartbeat_interval = cfg.args.heartbeat_interval
        self.watchdog_timeout = cfg.args.watchdog_timeout
        self.step_wait_start: float | None = None  # since when the oldest step in flight has run
        self.incarnation = secrets.token_hex(6)  # in every heartbeat: front ends tell a restart by it
        self.running = True
        self.idle_freezer = IdleFreezer()
        self.arrival_freezer = ArrivalFreezer()

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.inputs, zmq.POLLIN)
        poller.register(self.results, zmq.POLLIN)
        next_heartbeat = time.monotonic() + self.heartbeat_interval
        while self.running:
            backlogged = self.frontends.send_backlogs()
            if not backlogged:  # back-pressure: no new step while a front end lags behind
                self._send_steps()
            self._check_watchdog(time.monotonic())
            timeout = max(next_heartbeat - time.monotonic(), 0.0)
            events = dict(_poll(poller, timeout, writable=backlogged))
            if self.results in events:
                for msg in transport.recv_all(self.results):
                    self._on_worker_message(msg)
            if self.inputs in events:
                for msg in _recv_valid(self.inputs, self.cfg.name, self._reply):
                    self._on_input_guarded(msg)
            self.core.tick(time.monotonic())
            self.idle_freezer.note(not self.core.has_live_requests and not self.core.sent)
            self.arrival_freezer.note(self.core.arrivals)
            self._flush()
            if time.monotonic() >= next_heartbeat:
                self._detach_silent_frontends()
                self._heartbeat_all()
                next_heartbeat = time.monotonic() + self.heartbeat_interval

    def _send_steps(self) -> None:
        while len(self.core.sent) < self.max_inflight:
            batch = self.core.form_step()
            if batch is None:
                break
            transport.send(self.steps, batch)
            if self.step_wait_start is None:
                self.step_wait_start = time.monotonic()
        self._flush()

    def _check_watchdog(self, now: float) -> None:
        """Fail the instance when its oldest step in flight has run past ``--watchdog-timeout``."""
        if self.step_wait_start is None or now - self.step_wait_start <= self.watchdog_timeout:
            return
        step_id = self.core.sent[0].step_id
        why = (f"watchdog: the worker of instance {self.cfg.name} has run step {step_id} for "
               f"{now - self.step_wait_start:.1f} s, over --watchdog-timeout {self.watchdog_timeout:g} s")
        logger.error("%s: %s", self.cfg.name, why)
        self.core.fail_all(INTERNAL, why)
        self._flush()
        raise WorkerLost(why)

    @property
    def stalled(self) -> bool:
        """Whether the oldest step in flight has run past ``STALL_FRACTION`` of the watchdog."""
        start = self.step_wait_start
        return start is not None and time.monotonic() - start > STALL_FRACTION * self.watchdog_timeout

    def _on_worker_message(self, msg: Message) -> None:
        if isinstance(msg, StepResult):
            self.core.on_result(msg)
            self.step_wait_start = time.monotonic() if self.core.sent else None
            return
        if isinstance(msg, WorkerFailed):
            logger.error("%s: worker failed: %s", self.cfg.name, msg.message)
            code = msg.code if msg.code in (INTERNAL, PEER_UNAVAILABLE) else INTERNAL
            self.core.fail_all(code, f"the worker of instance {self.cfg.name} failed: {msg.message}")
            self._flush()
            raise WorkerLost(msg.message)
        if not self.core.on_worker_message(msg):
            logger.error("%s: unexpected %s from the worker; ignored", self.cfg.name, msg.TYPE)

    def _on_input_guarded(self, msg: Message) -> None:
        """``_on_input``, but a message that makes a handler raise (a frame the codec accepts can
        still carry fields of the wrong type) costs only that message, never the instance."""
        try:
            self._on_input(msg)
        except Exception as e:  # noqa: BLE001 - logged with its traceback; serving goes on
            rid = getattr(msg, "rid", None)
            logger.exception("%s: rid=%r: %s could not be handled; dropped", self.cfg.name, rid, msg.TYPE)
            if isinstance(rid, str):
                text = f"the instance could not handle this {msg.TYPE}: {type(e).__name__}: {e}"
                self._reply(RequestFailed(rid=rid, code=INVALID_REQUEST, message=text))

    def _on_input(self, msg: Message) -> None:
        if isinstance(msg, TokenizedRequest):
            self.core.on_request(msg)
        elif isinstance(msg, AbortRequest):
            self.core.on_abort(msg)
        elif isinstance(msg, StatusQuery):
            status = dataclasses.replace(self.core.status(), ready=not self.stalled)
            report = StatusReport(qid=msg.qid, status=status)
            if msg.metrics:
                report.metrics = self.core.metrics.snapshot(self.core)
            if msg.reply_to:
                self._report_to(msg.reply_to, report)
            else:
                self._reply(report)
        elif isinstance(msg, AttachFrontend):
            self._attach(msg)
        elif isinstance(msg, Shutdown) and not self.shutdown_allowed:
            logger.warning("%s: ignored a shutdown on the network input; stop the instance with a signal "
                           "to its launcher", self.cfg.name)
        elif isinstance(msg, Shutdown):
            logger.info("%s: shutting down (%s)", self.cfg.name, msg.reason or "requested")
            self.core.fail_all(SHUTTING_DOWN, f"instance {self.cfg.name} is shutting down")
            transport.send(self.steps, msg)
            self.running = False
        elif not self.core.on_peer_message(msg):
            logger.warning("%s: unexpected %s on the input socket; ignored", self.cfg.name, msg.TYPE)

    def _attach(self, msg: AttachFrontend) -> None:
        """A front end's attach, repeated as its heartbeat; a new one hears back at once."""
        sock = self.frontends.attach(msg.output_addr, msg.rid_prefix, time.monotonic())
        if sock is not None:
            transport.send(sock, self._heartbeat())

    def _detach_silent_frontends(self) -> None:
        """Requests whose front end is gone cannot reach their client: abort them rather than run
        them to their end. Those of a silent or restarted front end go (by id prefix), and every
        request once no front end is left."""
        gone = self.frontends.take_departed(time.monotonic(), self.cfg.args.heartbeat_timeout)
        if not gone:
            return
        orphans = [rid for rid in self.core.requests if not self.frontends or any(f.owns(rid) for f in gone)]
        if orphans:
            logger.warning("%s: aborting %d request(s) of departed front ends", self.cfg.name, len(orphans))
            for rid in orphans:
                self.core.on_abort(AbortRequest(rid=rid, reason="abort"))
            self._flush()

    def _heartbeat(self) -> Heartbeat:
        return Heartbeat(
            name=self.cfg.name,
            role=self.cfg.role,
            ready=not self.stalled,
            input_addr=self.cfg.addrs.input_addr,
            model=self.model,
            queued_tokens=self.core.queued_tokens,
            running=self.core.num_running,
            peers=self.core.peer_states(),
            incarnation=self.incarnation,
        )

    def _heartbeat_all(self) -> None:
        if self.frontends:
            self.frontends.send_all(encode(self._heartbeat()))

    def _reply(self, msg: Message) -> None:
        if not self.frontends:
            logger.debug("%s: no front end attached; %s dropped", self.cfg.name, msg.TYPE)
            return
        self.frontends.send_all(encode(msg))

    def _peer(self, addr: str) -> zmq.Socket | None:
        """The socket to a peer instance; None for an address zmq refuses (a peer's message
        named it: the reply is dropped, the instance keeps serving)."""
        sock = self.peers.get(addr)
        if sock is None:
            try:
                sock = self.peers[addr] = transport.connect(self.ctx, zmq.PUSH, addr, keys=self.keys)
            except zmq.ZMQError as e:
                logger.warning("%s: no reply to peer address %s: %s", self.cfg.name, preview(addr), e)
                return None
        return sock

    def _report_to(self, addr: str, report: StatusReport) -> None:
        """To an attached front end through its queue, else on a socket of its own (a probe)."""
        frontend = self.frontends.get(addr)
        if frontend is not None:
            frontend.send(encode(report))
        else:
            transport.send(self._reply_to(addr), report)

    def _reply_to(self, addr: str) -> zmq.Socket:
        """The socket to a status ``reply_to`` address; the least recently used of more than
        ``MAX_REPLY_TO_SOCKETS`` is closed, so callers that each use a fresh address cannot
        make the instance hold sockets without bound."""
        sock = self.reply_to.get(addr)
        if sock is not None:
            self.reply_to.move_to_end(addr)
            return sock
        sock = self.reply_to[addr] = transport.connect(self.ctx, zmq.PUSH, addr, keys=self.keys)
        if len(self.reply_to) > MAX_REPLY_TO_SOCKETS:
            _, oldest = self.reply_to.popitem(last=False)
            oldest.close()
        return sock

    def _flush(self) -> None:
        for msg in self.core.take_outbox():
            self._reply(msg)
        for addr, msg in self.core.take_peer_outbox():
            if (sock := self._peer(addr)) is not None:
                transport.send(sock, msg)
        for msg in self.core.take_worker_outbox():
            transport.send(self.steps, msg)
