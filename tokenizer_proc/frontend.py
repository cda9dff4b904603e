"""The front end: client socket, validation, tokenization, routing, detokenization, streaming.

One thread, one poll loop over two sockets: the client ROUTER and the PULL where instances
send outputs, reports and heartbeats. Timers (attach, liveness, status deadlines) run on every
turn of the loop; the poll timeout is bounded so that a stop request is seen promptly.
"""

from __future__ import annotations

import logging
import secrets
import signal
import threading
import time
from collections.abc import Iterable

import zmq

from protocol import transport
from protocol.config import DEFAULT_MAX_MESSAGE_BYTES, EMBEDDED, FrontendConfig
from protocol.messages import (
    INTERNAL,
    INVALID_REQUEST,
    PEER_UNAVAILABLE,
    AbortRequest,
    BatchOutput,
    ClientError,
    Heartbeat,
    Message,
    ModelInfo,
    ProtocolError,
    RequestFailed,
    SamplingParams,
    StatusReport,
    TokenizedRequest,
    decode,
    encode,
)
from tokenizer_proc.detokenizer import IncrementalDetokenizer
from tokenizer_proc.instances import Instance, InstancePool
from tokenizer_proc.request_state import LiveRequest, RequestTable
from tokenizer_proc.router import make_policy
from tokenizer_proc.status import PendingStatus, StatusCollector
from tokenizer_proc.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer
from tokenizer_proc.validation import (
    SEED_LIMIT,
    AbortCommand,
    GenerateCommand,
    InvalidRequest,
    ModelLimits,
    StatusCommand,
    check_prompt,
    parse_command,
    unpack_frame,
)

log = logging.getLogger("pdserve.frontend")

MAX_POLL_MS = 50  # bounds how long a stop request waits
MAX_BATCH = 256  # messages read from one socket per turn, so neither side starves
HARD_SIZE_FACTOR = 4  # zmq drops peers whose frames exceed this many times the app limit
STATUS_TIMEOUT_S = 1.0


class Frontend:
    def __init__(self, cfg: FrontendConfig, ctx: zmq.Context | None = None) -> None:
        self.cfg = cfg
        args = cfg.args
        self._ctx = ctx or zmq.Context.instance()
        self._tokenizer: Tokenizer = load_tokenizer(args.model_path)
        self._limits: ModelLimits | None = None
        self._eos_ids: list[int] = list(self._tokenizer.eos_token_ids)
        self._policy = make_policy(args.routing_policy)
        self._requests = RequestTable()
        self._status = StatusCollector()
        self._rid_prefix = secrets.token_hex(4)
        self._rid_counter = 0
        self._ready_once = False
        self._rng = secrets.SystemRandom()
        # Client frames are checked against max_message_bytes in the app (to answer with an
        # error); zmq's limit is only a hard guard. Instances batch the outputs of hundreds of
        # requests into one frame: their guard never drops below the default limit, since zmq
        # enforces it by silently dropping the connection.
        client_guard = args.max_message_bytes * HARD_SIZE_FACTOR
        instance_guard = max(args.max_message_bytes, DEFAULT_MAX_MESSAGE_BYTES) * HARD_SIZE_FACTOR
        self._clients = transport.bind(self._ctx, zmq.ROUTER, cfg.client_addr, client_guard)
        self._clients.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._outputs = transport.bind(self._ctx, zmq.PULL, cfg.output_addr, instance_guard)
        self._pool = InstancePool.connect(self._ctx, {"unified": cfg.unified}, instance_guard)
        self._poller = zmq.Poller()
        self._poller.register(self._clients, zmq.POLLIN)
        self._poller.register(self._outputs, zmq.POLLIN)
        log.info(
            "front end on %s, %d instance(s), outputs on %s",
            cfg.client_addr,
            len(self._pool),
            cfg.output_addr,
        )

    # ---------------------------------------------------------------------------------- loop

    def serve(self, stop: threading.Event) -> None:
        while not stop.is_set():
            events = dict(self._poller.poll(self._poll_timeout_ms()))
            caught_up = True
            if self._outputs in events:
                caught_up = self._drain(self._outputs, self._read_instance_message)
            if self._clients in events:
                self._drain(self._clients, self._read_client_frames)
            self._run_timers(time.monotonic(), caught_up)

    def close(self) -> None:
        self._clients.close(linger=0)
        self._outputs.close(linger=0)
        self._pool.close()

    def _poll_timeout_ms(self) -> int:
        deadline = self._status.next_deadline
        if deadline is None:
            return MAX_POLL_MS
        return max(0, min(MAX_POLL_MS, int((deadline - time.monotonic()) * 1e3) + 1))

    def _drain(self, sock: zmq.Socket, handle) -> bool:
        """Handle what is queued on ``sock``, at most MAX_BATCH; True when nothing is left."""
        for _ in range(MAX_BATCH):
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
        if outputs_caught_up:
            for inst in self._pool.expire(now, args.heartbeat_timeout):
                reqs = self._requests.of_instance(inst)
                self._fail_requests(reqs, f"instance {inst.name} stopped responding")
        self._pool.attach_due(now, args.heartbeat_interval, self.cfg.output_addr)
        for pending in self._status.expired(now):
            self._reply_status(pending)

    # ------------------------------------------------------------------------- client side

    def _read_client_frames(self, frames: list[zmq.Frame]) -> None:
        conn = frames[0].bytes
        if len(frames) != 2:
            self._send_error(
                conn, None, INVALID_REQUEST, f"expected one frame per message, got {len(frames) - 1}"
            )
            return
        try:
            cmd = parse_command(unpack_frame(frames[1].buffer, self.cfg.args.max_message_bytes))
        except InvalidRequest as e:
            self._refuse(conn, e.rid, e)
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

    def _refuse(self, conn: bytes, rid: str | None, e: InvalidRequest) -> None:
        log.info("rid=%s (client) invalid request: %s", rid, e)
        self._send_error(conn, rid, INVALID_REQUEST, str(e))

    def _generate(self, conn: bytes, cmd: GenerateCommand) -> None:
        if self._requests.find(conn, cmd.rid) is not None:
            raise InvalidRequest(f"rid {cmd.rid!r} is already in use by a live request")
        candidates = self._pool.routable("unified")
        if not (self._ready_once and candidates and self._limits is not None):
            ready = sum(inst.routable for inst in self._pool)
            self._send_error(
                conn, cmd.rid, PEER_UNAVAILABLE, f"not ready: {ready} of {len(self._pool)} instances ready"
            )
            return
        input_ids = self._tokenize(cmd)
        check_prompt(input_ids, cmd.sampling, self._limits)
        inst = self._policy.pick(candidates, input_ids)
        req = self._new_request(conn, cmd, inst, len(input_ids))
        try:
            inst.send(
                TokenizedRequest(
                    rid=req.rid,
                    input_ids=input_ids,
                    sampling=self._sampling_params(cmd),
                    priority=cmd.priority,
                    arrival_time=time.time(),
                )
            )
        except zmq.Again:
            self._send_error(conn, cmd.rid, INTERNAL, f"instance {inst.name} is not accepting requests")
            return
        inst.routed_tokens += len(input_ids)
        self._requests.add(req)
        log.debug(
            "rid=%s (client rid %s): %d prompt tokens to %s", req.rid, cmd.rid, len(input_ids), inst.name
        )

    def _tokenize(self, cmd: GenerateCommand) -> list[int]:
        if cmd.input_ids is not None:
            return cmd.input_ids
        if not self._tokenizer.has_text:
            raise InvalidRequest("this model has no tokenizer.json: send input_ids instead of text")
        return self._tokenizer.encode(cmd.text or "")

    def _new_request(
        self, conn: bytes, cmd: GenerateCommand, inst: Instance, prompt_tokens: int
    ) -> LiveRequest:
        if cmd.sampling.stop and not self._tokenizer.has_text:
            raise InvalidRequest("stop strings need a tokenizer (this model has none): use stop_token_ids")
        self._rid_counter += 1
        return LiveRequest(
            conn=conn,
            client_rid=cmd.rid,
            rid=f"{self._rid_prefix}-{self._rid_counter}",
            instance=inst,
            stream=cmd.stream,
            return_logprob=cmd.return_logprob,
            detok=IncrementalDetokenizer(self._tokenizer, cmd.sampling.stop),
            prompt_tokens=prompt_tokens,
            arrival=time.perf_counter(),
        )

    def _sampling_params(self, cmd: GenerateCommand) -> SamplingParams:
        s = cmd.sampling
        stop_ids = (
            list(s.stop_token_ids)
            if s.ignore_eos
            else list(dict.fromkeys([*s.stop_token_ids, *self._eos_ids]))
        )
        return SamplingParams(
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=-1 if s.top_k == 0 else s.top_k,
            seed=s.seed if s.seed is not None else self._rng.randrange(SEED_LIMIT),
            stop_token_ids=stop_ids,
            ignore_eos=s.ignore_eos,
            return_logprob=cmd.return_logprob,
        )

    def _abort(self, conn: bytes, client_rid: str) -> None:
        req = self._requests.find(conn, client_rid)
        if req is None:
            log.debug("abort of unknown rid %s ignored", client_rid)
            return
        log.info("rid=%s (client rid %s): aborted by the client", req.rid, client_rid)
        self._abort_at_instance(req, "abort")  # the instance answers with the final output

    def _start_status(self, conn: bytes, cmd: StatusCommand) -> None:
        pending = self._status.start(conn, cmd.rid, self._pool, time.monotonic() + STATUS_TIMEOUT_S)
        if pending.complete:
            self._reply_status(pending)

    def _reply_status(self, pending: PendingStatus) -> None:
        self._send(pending.conn, pending.reply(self._pool.all_ready))

    def _send_error(self, conn: bytes, rid: str | None, code: str, message: str) -> None:
        self._send(conn, ClientError(rid=rid, code=code, message=message))

    def _send(self, conn: bytes, msg: Message) -> bool:
        """Send to a client; a client that left has its live requests aborted."""
        try:
            self._clients.send_multipart([conn, encode(msg)])
            return True
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
        self._client_left(conn)
        return False

    def _client_left(self, conn: bytes) -> None:
        for req in self._requests.of_conn(conn):
            log.info("rid=%s (client rid %s): client left, aborting", req.rid, req.client_rid)
            self._requests.remove(req)
            self._abort_at_instance(req, "abort")

    def _abort_at_instance(self, req: LiveRequest, reason: str) -> None:
        try:
            req.instance.send(AbortRequest(rid=req.rid, reason=reason))
        except zmq.Again:
            log.warning("rid=%s: abort not sent to %s (queue full)", req.rid, req.instance.name)

    def _fail_requests(self, reqs: Iterable[LiveRequest], message: str) -> None:
        """Fail requests of a dead instance; should it come back, it is told to drop them."""
        for req in reqs:
            log.warning("rid=%s (client rid %s): %s", req.rid, req.client_rid, message)
            self._requests.remove(req)
            self._abort_at_instance(req, "abort")
            self._send_error(req.conn, req.client_rid, PEER_UNAVAILABLE, message)

    # ----------------------------------------------------------------------- instance side

    def _read_instance_message(self, frames: list[zmq.Frame]) -> None:
        try:
            msg = decode(frames[0].bytes)
        except ProtocolError as e:
            log.error("unreadable message from an instance: %s", e)
            return
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
        now = time.perf_counter()
        for out in batch.outputs:
            req = self._requests.get(out.rid)
            if req is None:
                continue  # finished here already (stop string, departed client): drop
            msg = req.apply(out, now)
            if req.finished:
                self._requests.remove(req)
                if not out.finished:
                    self._abort_at_instance(req, "stop")
                log.debug(
                    "rid=%s finished (%s), %d tokens", req.rid, req.finish_reason, req.completion_tokens
                )
            if msg is not None:
                self._send(req.conn, msg)

    def _on_request_failed(self, msg: RequestFailed) -> None:
        req = self._requests.get(msg.rid)
        if req is None:
            return
        log.warning("rid=%s (client rid %s) failed: %s: %s", req.rid, req.client_rid, msg.code, msg.message)
        self._requests.remove(req)
        self._send_error(req.conn, req.client_rid, msg.code, msg.message)

    def _on_heartbeat(self, hb: Heartbeat) -> None:
        inst = self._pool.on_heartbeat(hb, time.monotonic())
        if inst is None:
            return
        if inst.model is not None and self._limits is None:
            self._learn_model(inst.model)
        if self._pool.all_ready and not self._ready_once:
            self._ready_once = True
            if self._limits is None:
                self._limits = self._tokenizer_limits()
            log.info("front end ready: %d instance(s)", len(self._pool))

    def _tokenizer_limits(self) -> ModelLimits:
        """Limits when no instance reported its model: the tokenizer's vocabulary, the
        configured (or embedded default's) context length."""
        log.warning("no instance reported its model: limits come from the tokenizer")
        context_len = self.cfg.args.context_length
        if context_len is None and isinstance(self._tokenizer, ByteTokenizer):
            context_len = EMBEDDED.context_len
        return ModelLimits(vocab_size=self._tokenizer.vocab_size, context_len=context_len)

    def _learn_model(self, model: ModelInfo) -> None:
        context_len = self.cfg.args.context_length or model.context_len
        self._limits = ModelLimits(vocab_size=model.vocab_size, context_len=context_len)
        self._eos_ids = list(dict.fromkeys([*self._tokenizer.eos_token_ids, *model.eos_token_ids]))
        if isinstance(self._tokenizer, ByteTokenizer) and model.vocab_size != self._tokenizer.vocab_size:
            log.warning(
                "byte tokenizer expects %d tokens; the model has %d",
                self._tokenizer.vocab_size,
                model.vocab_size,
            )
        log.info(
            "model %s: vocab %d, context %d, eos %s", model.name, model.vocab_size, context_len, self._eos_ids
        )


def run_frontend(cfg: FrontendConfig, stop: threading.Event | None = None) -> None:
    """Serve until ``stop`` is set (or, when none is given, until SIGTERM or SIGINT)."""
    if stop is None:
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    frontend = Frontend(cfg)
    try:
        frontend.serve(stop)
    finally:
        frontend.close()
        log.info("front end stopped")
