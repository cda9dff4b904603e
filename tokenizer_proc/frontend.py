"""The front end: client socket, validation, tokenization, routing, detokenization, streaming.

One thread, one poll loop over two sockets: the client ROUTER and the PULL where instances
send outputs, reports and heartbeats. Timers (attach, liveness, status deadlines, introducing
decode instances to prefill instances) run on every turn of the loop; the poll timeout is
bounded so that a stop request is seen promptly. Whether each request goes to one unified
instance or to a prefill + decode pair is the topology's business (``topology.py``): the rest
of the front end sees a ``Route`` and treats both alike. (Over 400 lines: one poll loop and the
handlers of its two sockets, which share its state; the parts with state of their own live in
``connections.py``, ``request_state.py``, ``status.py``, ``topology.py``, ``outbox.py``.) The
client outputs of a turn leave when its instance messages are read (``outbox.py``).

Shutdown: SIGTERM/SIGINT stop at once (live requests fail with ``shutting_down``); SIGUSR2, what
launch.py sends on its own SIGTERM, drains: new generate requests are refused with
``shutting_down``, live ones get ``--drain-timeout`` seconds to finish, then the rest fail.
Before closing, the instance messages already queued are read, so that failures an instance
reported before it stopped reach their clients as such (docs/design.md, "Launcher and
supervision").
"""

from __future__ import annotations

import functools
import logging
import secrets
import signal
import time
from collections.abc import Callable, Iterable
from itertools import repeat

import zmq

from protocol import transport
from protocol.config import DEFAULT_MAX_MESSAGE_BYTES, FrontendConfig
from protocol.messages import (
    INTERNAL,
    INVALID_REQUEST,
    PEER_UNAVAILABLE,
    QUEUE_FULL,
    SHUTTING_DOWN,
    AbortRequest,
    AttachFrontend,
    BatchOutput,
    ClientError,
    ClientMetrics,
    ClientOutput,
    FinishReason,
    Heartbeat,
    Message,
    ProtocolError,
    RequestFailed,
    Role,
    StatusReport,
    TokenizedRequest,
    decode,
    encode,
)
from protocol.process import StopFlag, StopRequest, stop_on_sigterm
from protocol.security import ClusterKeys
from protocol.validation import preview
from tokenizer_proc.admission import Admission
from tokenizer_proc.connections import (
    CLIENT_QUEUE_MESSAGES,
    ClientConnections,
    assigned_by_router,
    bind_client_socket,
)
from tokenizer_proc.detokenizer import IncrementalDetokenizer
from tokenizer_proc.instances import InstancePool
from tokenizer_proc.metrics import FrontendMetrics, MetricsExposition
from tokenizer_proc.metrics_share import MetricsShare
from tokenizer_proc.outbox import Outbox
from tokenizer_proc.request_state import LiveRequest, RequestTable
from tokenizer_proc.status import PendingStatus, StatusCollector
from tokenizer_proc.tokenizer import load_tokenizer
from tokenizer_proc.topology import Route, topology_for
from tokenizer_proc.validation import (
    AbortCommand,
    GenerateCommand,
    InvalidRequest,
    MetricsCommand,
    StatusCommand,
    parse_command,
    unpack_frame,
)

log = logging.getLogger("pdserve.frontend")

MAX_POLL_MS = 50  # bounds how long a stop request waits
_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.NOBLOCK | zmq.SNDMORE)
DRAIN_BUDGET_S = 0.01  # time spent reading one socket per turn, so neither side starves
HARD_SIZE_FACTOR = 4  # zmq drops peers whose frames exceed this many times the app limit
CLOSE_LINGER_MS = 200
STATUS_TIMEOUT_S = 1.0  # at most; an instance silent for heartbeat_timeout is dead anyway


class Frontend:
    def __init__(self, cfg: FrontendConfig) -> None:
        self.cfg = cfg
        args = cfg.args
        topology = topology_for(cfg)
        self._ctx = zmq.Context.instance()
        self._tokenizer = load_tokenizer(args.model_path)
        self._admission = Admission(self._tokenizer, args.context_length)
        self._requests = RequestTable()
        self._outbox = Outbox()  # the client outputs of this turn of the loop
        self._status = StatusCollector(reply_to=cfg.output_addr)
        self._metrics = FrontendMetrics()
        self._exposition = MetricsExposition()
        self._share = MetricsShare(cfg.siblings, self._metrics) if cfg.siblings is not None else None
        self._rid_prefix = secrets.token_hex(4)
        self._rid_counter = 0
        self._attach = AttachFrontend(output_addr=cfg.output_addr, rid_prefix=self._rid_prefix)
        self._ready_once = False
        self._drain_deadline: float | None = None  # set once draining
        # Client frames are checked against max_message_bytes in the app (to answer with an
        # error); zmq's limit is only a hard guard. Instances batch the outputs of hundreds of
        # requests into one frame: their guard never drops below the default limit, since zmq
        # enforces it by silently dropping the connection.
        client_guard = args.max_message_bytes * HARD_SIZE_FACTOR
        instance_guard = max(args.max_message_bytes, DEFAULT_MAX_MESSAGE_BYTES) * HARD_SIZE_FACTOR
        self._clients = bind_client_socket(self._ctx, cfg.client_addr, client_guard)
        self._connections = ClientConnections(self._clients)
        # pyzmq's Socket.send checks its arguments in Python (~0.4 µs a call, two calls per
        # client message); its base class's send is the same send without them
        self._send_to_clients = functools.partial(zmq.backend.Socket.send, self._clients)
        keys = ClusterKeys.from_dir(args.cluster_key_dir)  # instances: CURVE (docs/design.md, "Security")
        self._outputs = transport.bind(
            self._ctx, zmq.PULL, cfg.output_addr, instance_guard, keys, hwm=transport.OUTPUT_QUEUE_FRAMES
        )
        roles = {Role.UNIFIED: cfg.unified, Role.PREFILL: cfg.prefill, Role.DECODE: cfg.decode}
        self._pool = InstancePool.connect(self._ctx, roles, instance_guard, keys)
        self._topology = topology(self._pool, args.routing_policy)
        self._poller = zmq.Poller()
        self._poller.register(self._clients, zmq.POLLIN)
        self._poller.register(self._outputs, zmq.POLLIN)
        log.info(
            "front end on %s, %d unified + %d prefill + %d decode instance(s), outputs on %s",
            cfg.client_addr,
            len(cfg.unified),
            len(cfg.prefill),
            len(cfg.decode),
            cfg.output_addr,
        )

    # ---------------------------------------------------------------------------------- loop

    def serve(self, stop: StopRequest, drain: StopRequest | None = None) -> None:
        """Serve until ``stop`` is set, or until drained once ``drain`` is set."""
        while not stop.is_set():
            if drain is not None and drain.is_set() and self._drained(time.monotonic()):
                return
            events = dict(self._poller.poll(self._poll_timeout_ms()))
            caught_up = True
            if self._outputs in events:
                caught_up = self._drain(self._outputs, self._read_instance_message)
            self._send_outbox()
            if self._clients in events:
                self._drain(self._clients, self._read_client_frames)
            self._run_timers(time.monotonic(), caught_up)

    @property
    def draining(self) -> bool:
        return self._drain_deadline is not None

    def _drained(self, now: float) -> bool:
        """Start draining (first call); True once no request is live or the drain time is up."""
        if self._drain_deadline is None:
            self._drain_deadline = now + self.cfg.args.drain_timeout
            log.info("draining: %d live request(s), at most %g s", len(self._requests),
                     self.cfg.args.drain_timeout)
        return not self._requests or now >= self._drain_deadline

    def close(self) -> None:
        """Read what instances already sent, fail the live requests (``shutting_down``), abort
        them at their instances, and close the sockets, giving the last replies a moment to leave."""
        self._drain(self._outputs, self._read_instance_message)
        self._send_outbox()
        for req in list(self._requests):
            self._requests.remove(req)
            self._abort_everywhere(req, FinishReason.ABORT)
            self._send_error(req.conn, req.client_rid, SHUTTING_DOWN, "the front end is shutting down")
        self._connections.close()
        self._clients.close(linger=CLOSE_LINGER_MS)
        self._outputs.close(linger=0)
        self._pool.close(linger_ms=CLOSE_LINGER_MS)

    def _poll_timeout_ms(self) -> int:
        deadline = self._status.next_deadline
        if deadline is None:
            return MAX_POLL_MS
        return max(0, min(MAX_POLL_MS, int((deadline - time.monotonic()) * 1e3) + 1))

    def _drain(self, sock: zmq.Socket, handle: Callable[[list[zmq.Frame]], None]) -> bool:
        """Handle what is queued on ``sock`` for up to DRAIN_BUDGET_S; True when nothing is left."""
        deadline = time.monotonic() + DRAIN_BUDGET_S
        while time.monotonic() < deadline:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return True
            handle(frames)
        return False

    def _run_timers(self, now: float, outputs_caught_up: bool) -> None:
        """Silence is judged only when every queued instance message has been read: a front
        end that falls behind must not take its own backlog for dead instances."""
        args = self.cfg.args
        self._note_departures()
        self._pool.read_connection_events()
        if outputs_caught_up:
            for inst in self._pool.expire(now, args.heartbeat_timeout):
                reqs = self._requests.involving(inst)
                self._fail_requests(reqs, f"instance {inst.name} ({inst.role}) stopped responding")
        self._pool.attach_due(now, args.heartbeat_interval, self._attach)
        self._topology.tick(now, args.heartbeat_interval)
        for pending in self._status.expired(now):
            self._reply_status(pending)
        if self._share is not None:
            self._share.publish_changes()

    # ------------------------------------------------------------------------- client side

    def _read_client_frames(self, frames: list[zmq.Frame]) -> None:
        """Handle one client message; whatever a frame provokes costs that frame only."""
        self._note_departures()
        conn = frames[0].bytes
        if not assigned_by_router(conn):
            why = "a client must not choose its routing identity (ZMQ_ROUTING_ID)"
            self._send_error(conn, None, INVALID_REQUEST, why)
            return
        replaced = self._connections.spoke(conn, frames[-1].get(zmq.SRCFD))
        if replaced is not None:
            self._drop_client(replaced, "it left")
        if len(frames) != 2:
            self._send_error(
                conn, None, INVALID_REQUEST, f"expected one frame per message, got {len(frames) - 1}"
            )
            return
        try:
            obj = unpack_frame(frames[1].buffer, self.cfg.args.max_message_bytes)
            cmd = parse_command(obj)
        except InvalidRequest as e:
            self._refuse(conn, e.rid, e)
            return
        except Exception as e:  # noqa: BLE001 - a frame that breaks the parser is still only invalid
            log.warning("unreadable client frame: %s", preview(repr(e), 200))
            self._send_error(conn, None, INVALID_REQUEST, f"unreadable message ({type(e).__name__})")
            return
        try:
            if isinstance(cmd, GenerateCommand):
                self._generate(conn, cmd)
            elif isinstance(cmd, AbortCommand):
                self._abort(conn, cmd.rid)
            else:
                self._start_status(conn, cmd)
        except InvalidRequest as e:
            self._refuse(conn, cmd.rid, e)
        except Exception as e:  # a bug must cost one request, not the service
            log.exception("rid=%s (client): internal error", cmd.rid)
            why = preview(f"{type(e).__name__}: {e}", 200)
            self._send_error(conn, cmd.rid, INTERNAL, f"internal error: {why}")

    def _refuse(self, conn: bytes, rid: str | None, e: InvalidRequest) -> None:
        log.info("rid=%s (client) invalid request: %s", rid, e)
        self._send_error(conn, rid, INVALID_REQUEST, str(e))

    def _generate(self, conn: bytes, cmd: GenerateCommand) -> None:
        if self._requests.find(conn, cmd.rid) is not None:
            why = f"rid {preview(cmd.rid)} is already in use by a live request, which goes on"
            self._send(conn, ClientError(rid=cmd.rid, code=INVALID_REQUEST, message=why, duplicate=True))
            return
        if self.draining:
            self._send_error(conn, cmd.rid, SHUTTING_DOWN, "the service is shutting down")
            return
        if not self._ready_once:
            self._send_error(conn, cmd.rid, PEER_UNAVAILABLE, f"not ready: {self._topology.unavailable()}")
            return
        input_ids = self._admission.input_ids(cmd)
        route = self._topology.route(input_ids)
        if route is None:
            reason = f"no instance can serve it now: {self._topology.unavailable()}"
            self._send_error(conn, cmd.rid, PEER_UNAVAILABLE, reason)
            return
        req = self._live_request(conn, cmd, route, len(input_ids))
        req.batch_outputs = cmd.batch_outputs
        msg = TokenizedRequest(
            rid=req.rid,
            input_ids=input_ids,
            sampling=self._admission.sampling_params(cmd),
            priority=cmd.priority,
            arrival_time=time.time(),
        )
        try:
            route.submit(msg)
        except zmq.Again:
            self._send_error(conn, cmd.rid, INTERNAL, f"{route.describe()} is not accepting requests")
            return
        self._requests.add(req)
        log.debug(
            "rid=%s (client rid %s): %d prompt tokens to %s",
            req.rid,
            cmd.rid,
            len(input_ids),
            route.describe(),
        )

    def _live_request(
        self, conn: bytes, cmd: GenerateCommand, route: Route, prompt_tokens: int
    ) -> LiveRequest:
        self._rid_counter += 1
        return LiveRequest(
            conn=conn,
            client_rid=cmd.rid,
            rid=f"{self._rid_prefix}-{self._rid_counter}",
            route=route,
            stream=cmd.stream,
            return_logprob=cmd.return_logprob,
            detok=IncrementalDetokenizer(self._tokenizer, cmd.sampling.stop),
            prompt_tokens=prompt_tokens,
            arrival=time.perf_counter(),
        )

    def _abort(self, conn: bytes, client_rid: str) -> None:
        req = self._requests.find(conn, client_rid)
        if req is None:
            log.debug("abort of unknown rid %s ignored", client_rid)  # silent (docs/design.md)
            return
        log.info("rid=%s (client rid %s): aborted by the client", req.rid, client_rid)
        req.aborted_by_client = True
        self._abort_everywhere(req, FinishReason.ABORT)  # the (decode) instance answers with the final output

    def _start_status(self, conn: bytes, cmd: StatusCommand | MetricsCommand) -> None:
        """A ``status`` or ``metrics`` request: both ask every instance (status.py)."""
        timeout = min(STATUS_TIMEOUT_S, self.cfg.args.heartbeat_timeout)
        deadline = time.monotonic() + timeout
        metrics = isinstance(cmd, MetricsCommand)
        pending = self._status.start(conn, cmd.rid, self._pool, deadline, metrics)
        if pending.complete:
            self._reply_status(pending)

    def _reply_status(self, pending: PendingStatus) -> None:
        if pending.wants_metrics:
            frontend = self._metrics if self._share is None else self._share.deployment_metrics()
            text = self._exposition.render(frontend, pending.samples())
            self._send(pending.conn, ClientMetrics(rid=pending.rid, text=text))
            return
        ready = self._ready_once and not self.draining and self._topology.can_serve
        self._send(pending.conn, pending.reply(ready))

    def _send_error(self, conn: bytes, rid: str | None, code: str, message: str) -> None:
        self._send(conn, ClientError(rid=rid, code=code, message=message))

    def _send(self, conn: bytes, msg: Message) -> bool:
        """Send to a client, after the outputs queued for it this turn (they came first); one
        that left, or that does not read its replies, has its live requests aborted."""
        return self._send_frames(conn, [*self._outbox.take(conn), msg])

    def _send_outbox(self) -> None:
        for conn in self._outbox.connections():
            self._send_frames(conn, self._outbox.take(conn))

    def _send_frames(self, conn: bytes, frames: list[Message]) -> bool:
        for msg in frames:
            problem = self._deliver(conn, msg)
            if problem is not None:
                self._drop_client(conn, problem)
                return False
        return True

    def _deliver(self, conn: bytes, msg: Message) -> str | None:
        """Queue ``msg`` for ``conn`` without blocking; why it could not be, or None."""
        try:
            frame = encode(msg)
            # two plain sends (send_multipart's per-call flag arithmetic costs as much as a send);
            # an unroutable or full connection fails on the first, so nothing is half sent
            self._send_to_clients(conn, _MORE_NOBLOCK)
            self._send_to_clients(frame, _NOBLOCK)
            return None
        except zmq.Again:
            return f"it does not read its replies ({CLIENT_QUEUE_MESSAGES} are queued)"
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            return "it left"

    def _note_departures(self) -> None:
        for conn in self._connections.departed():
            self._drop_client(conn, "it left")

    def _drop_client(self, conn: bytes, why: str) -> None:
        """Abort the live requests of ``conn``; each gets an error, should it still fit."""
        self._outbox.take(conn)  # its outputs of this turn go nowhere
        for req in self._requests.of_conn(conn):
            log.info("rid=%s (client rid %s): aborted: %s", req.rid, req.client_rid, why)
            self._requests.remove(req)
            self._abort_everywhere(req, FinishReason.ABORT)
            self._deliver(conn, ClientError(rid=req.client_rid, code=QUEUE_FULL, message=f"aborted: {why}"))

    def _abort_everywhere(self, req: LiveRequest, reason: FinishReason) -> None:
        """Abort ``req`` at every instance of its route; one that no longer holds it ignores it."""
        for inst in req.route.instances:
            try:
                inst.send(AbortRequest(rid=req.rid, reason=reason))
            except zmq.Again:
                log.warning("rid=%s: abort not sent to %s (queue full)", req.rid, inst.name)

    def _fail_requests(self, reqs: Iterable[LiveRequest], message: str) -> None:
        """Fail requests of a dead instance: the surviving side of a pair is told to drop them,
        and so is the dead one, should it come back."""
        for req in reqs:
            log.warning(
                "rid=%s (client rid %s, %s): %s", req.rid, req.client_rid, req.route.describe(), message
            )
            self._requests.remove(req)
            self._abort_everywhere(req, FinishReason.ABORT)
            self._send_error(req.conn, req.client_rid, PEER_UNAVAILABLE, message)

    # ----------------------------------------------------------------------- instance side

    def _read_instance_message(self, frames: list[zmq.Frame]) -> None:
        try:
            msg = decode(frames[0].bytes)
        except ProtocolError as e:
            log.error("unreadable message from an instance: %s", e)
            return
        try:
            self._on_instance_message(msg)
        except Exception:  # keep serving the other requests; the traceback names the bug
            log.exception("failed to handle %s from an instance", msg.TYPE)

    def _on_instance_message(self, msg: Message) -> None:
        if isinstance(msg, BatchOutput):
            self._on_batch_output(msg)
        elif isinstance(msg, Heartbeat):
            self._on_heartbeat(msg)
        elif isinstance(msg, RequestFailed):
            self._on_request_failed(msg)
        elif isinstance(msg, StatusReport):
            pending = self._status.answer(msg)
            if pending is not None:
                self._reply_status(pending)
        else:
            log.error("unexpected %s message from an instance", msg.TYPE)

    def _on_batch_output(self, batch: BatchOutput) -> None:
        """Each row to its request's outputs of this turn (``Outbox``): the full rows, then the
        column rows (one more plain token each: ``apply_token``, no ``ReqOutput`` built), in
        ``rows()`` order."""
        now = time.perf_counter()
        requests, metrics, outbox = self._requests, self._metrics, self._outbox
        for out in batch.outputs:
            req = requests.get(out.rid)
            if req is None:
                continue  # finished here already (stop string, departed client): drop
            metrics.on_output(req, len(out.token_ids), now)
            self._forward(req, req.apply(out, now), out.finished, now)
        lps = batch.logprobs if batch.logprobs is not None else repeat(None, len(batch.rids))
        for rid, token, lp in zip(batch.rids, batch.token_ids, lps, strict=True):
            req = requests.get(rid)
            if req is None:
                continue
            metrics.on_output(req, 1, now)
            msg = req.apply_token(token, None if lp is None or lp != lp else lp, now)  # NaN: not asked for
            if msg is not None and not req.finished:
                outbox.add(req.conn, req.rid, msg, req.batch_outputs)  # the common case, inline
            else:
                self._forward(req, msg, False, now)

    def _forward(
        self, req: LiveRequest, msg: ClientOutput | None, instance_finished: bool, now: float
    ) -> None:
        """Retire ``req`` if that output finished it, and queue ``msg`` for this turn's sends."""
        if req.finished:
            self._metrics.on_finished(req, now)
            self._requests.remove(req)
            if not instance_finished:
                self._abort_everywhere(req, FinishReason.STOP)
            log.debug("rid=%s finished (%s), %d tokens", req.rid, req.finish_reason, req.completion_tokens)
        if msg is not None:
            self._outbox.add(req.conn, req.rid, msg, req.batch_outputs)

    def _on_request_failed(self, msg: RequestFailed) -> None:
        req = self._requests.get(msg.rid)
        if req is None:
            return
        if msg.role == Role.PREFILL and req.streaming:
            # The decode side already holds the whole KV cache and streams: a late prefill-side
            # failure (e.g. a lost acknowledgement) must not end the request.
            log.info("rid=%s: ignored a late prefill-side failure: %s", req.rid, msg.message)
            return
        self._requests.remove(req)
        self._abort_everywhere(req, FinishReason.ABORT)  # the other side of a pair still holds it
        if req.aborted_by_client:
            # The instance failed it (e.g. its transfer, cut short by the abort's other half)
            # before our abort reached it: to the client it ends as the abort it asked for.
            log.info("rid=%s: failed after the client aborted it (%s): an abort", req.rid, msg.code)
            now = time.perf_counter()
            final = req.abort(now)
            self._metrics.on_finished(req, now)
            self._outbox.add(req.conn, req.rid, final, req.batch_outputs)
            return
        log.warning(
            "rid=%s (client rid %s, %s) failed: %s: %s",
            req.rid,
            req.client_rid,
            req.route.describe(),
            msg.code,
            msg.message,
        )
        self._send_error(req.conn, req.client_rid, msg.code, msg.message)

    def _on_heartbeat(self, hb: Heartbeat) -> None:
        inst = self._pool.on_heartbeat(hb, time.monotonic())
        if inst is None:
            return
        if inst.model is not None and self._admission.limits is None:
            self._admission.learn_model(inst.model)
        if self._topology.ready and not self._ready_once:
            self._ready_once = True
            if self._admission.limits is None:
                self._admission.assume_tokenizer_limits()
            log.info("front end ready: %d instance(s)", len(self._pool))


def drain_on_sigusr2() -> StopFlag:
    """A drain request that SIGUSR2 sets (launch.py's way to drain the front end)."""
    flag = StopFlag()
    signal.signal(signal.SIGUSR2, lambda *_: flag.set())
    return flag


def run_frontend(
    cfg: FrontendConfig, stop: StopRequest | None = None, drain: StopRequest | None = None
) -> None:
    """Serve until ``stop`` is set, or until drained once ``drain`` is set (when neither is
    given: SIGTERM or SIGINT stop, SIGUSR2 drains)."""
    if stop is None and drain is None:
        drain = drain_on_sigusr2()
    if stop is None:
        stop = stop_on_sigterm()
    frontend = Frontend(cfg)
    try:
        frontend.serve(stop, drain)
    finally:
        frontend.close()
        log.info("front end stopped")
