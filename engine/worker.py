"""The worker: receives ``StepBatch`` deltas from its scheduler, runs them, answers with the
sampled tokens (protocol.messages "Scheduler ⇄ worker").

Messages are handled strictly in order. With the overlap schedule the scheduler sends step
N+1 before it has seen step N's result, so a decode's input token always comes from the
worker's own future-token map (``ModelRunner.next_tokens``), never from the message.

``Worker`` is the reusable core, ``worker_process`` / ``WorkerProcess.serve`` the reusable
process around it (sockets, start-up failure, the step loop); the prefill and decode workers
build on both with their own ``StepHooks``. ``run_worker`` is the plain worker of a unified
instance.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch
import zmq

from engine.cuda_graph import (
    EagerStepRunner,
    GraphStepRunner,
    StepRunner,
    compile_decode_variants,
    make_step_runner,
)
from engine.faults import with_step_faults
from engine.kv_pool import KVPool, PoolSizing, kv_bytes_per_token
from engine.layers.backend import make_kernel_backend
from engine.models.config import ModelConfig
from engine.parallel.group import SINGLE_RANK, TensorParallel, close_tensor_parallel
from engine.parallel.steps import NO_RELAY, Relay, make_relay
from engine.penalties import SlotPenalties
from engine.pipeline import LaunchedStep, Pipeline
from engine.runner import ModelRunner
from engine.sampling import SamplingBatch, sample, top_logprobs
from engine.weights import LoadedModel, load_model, resolve_device
from protocol import transport
from protocol.config import ServerArgs, WorkerConfig
from protocol.faults import Faults
from protocol.messages import (
    ExtendReq,
    Message,
    ModelInfo,
    NewReq,
    PageAppend,
    SamplingParams,
    Shutdown,
    StepBatch,
    StepResult,
    TransferEndpoint,
    WorkerFailed,
    WorkerReady,
    decode,
)

if TYPE_CHECKING:
    from engine.kernels.small_batch_linear import SmallBatchLinear

logger = logging.getLogger("pdserve.worker")

SPARE_SLOTS = 2  # the overlap schedule admits new requests before the finished ones are released
RESULT_LINGER_MS = 2000  # let the last message (WorkerFailed) leave before the socket closes
SIGNAL_CHECK_MS = 200  # longest wait for a step before pending signal handlers get to run

T = TypeVar("T")


class Closable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=Closable)


@dataclass
class Worker:
    runner: ModelRunner
    loaded: LoadedModel
    num_pages: int
    max_context_len: int
    sampling: list[SamplingParams | None]  # per slot
    step_runner: StepRunner  # decode steps by CUDA-graph replay, or everything eagerly
    penalties: SlotPenalties  # token counts of the slots whose request asks for a penalty

    @classmethod
    def create(cls, args: ServerArgs, decodes: bool = True, tp: TensorParallel = SINGLE_RANK) -> Worker:
        """Load the model, size and allocate the KV pool, capture the decode graphs, warm up.
        A worker that never ``decodes`` (a prefill instance's) skips the decode graphs and the
        decode kernels' warm-up: they would only cost start-up time and memory. ``tp``: this
        rank's part of a tensor-parallel instance (every rank runs this at once)."""
        loaded = load_model(args, tp)
        cfg = loaded.config
        context_len = _context_len(args, cfg)
        max_slots = args.max_running_requests + SPARE_SLOTS
        max_pages_per_req = -(-context_len // args.page_size)
        pool = _allocate_pool(
            args, loaded, max_useful_tokens=max_slots * max_pages_per_req * args.page_size, tp=tp
        )
        kernels = make_kernel_backend(args.attention_backend, loaded.device)
        if decodes and loaded.device.type == "cuda" and kernels.name == "triton":
            choose_small_batch_matmuls(kernels.linear, loaded.model)
        if decodes and kernels.warm_up_decode is not None:
            kernels.warm_up_decode(pool.k[0].dtype)
        runner = ModelRunner(loaded.model, pool, kernels, max_slots, max_pages_per_req, loaded.device)
        max_context_len = min(context_len, (pool.num_pages - 1) * args.page_size)
        # CUDA graphs around tensor-parallel collectives are not verified yet: such ranks run eagerly
        graphs = decodes and tp.size == 1
        step_runner = make_step_runner(runner, args) if graphs else EagerStepRunner(runner)
        penalties = SlotPenalties(cfg.vocab_size, loaded.device)
        worker = cls(
            runner, loaded, pool.num_pages, max_context_len, [None] * max_slots, step_runner, penalties
        )
        worker.warm_up(decodes)
        return worker

    @property
    def config(self) -> ModelConfig:
        return self.loaded.config

    def model_info(self) -> ModelInfo:
        cfg = self.config
        return ModelInfo(
            name=self.loaded.name,
            architecture=cfg.architecture,
            vocab_size=cfg.vocab_size,
            context_len=self.max_context_len,
            num_layers=cfg.num_layers,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            dtype=str(self.loaded.dtype).removeprefix("torch."),
            eos_token_ids=list(cfg.eos_token_ids),
        )

    def ready_message(self, transfer: TransferEndpoint | None = None) -> WorkerReady:
        return WorkerReady(
            model=self.model_info(),
            num_pages=self.num_pages,
            page_size=self.runner.page_size,
            max_slots=self.runner.max_slots,
            max_context_len=self.max_context_len,
            device=str(self.loaded.device),
            transfer=transfer,
        )

    def warm_up(self, decodes: bool = True) -> None:
        """One extend and (for a worker that ``decodes``) one decode on slot 0, written to the
        padding page, then every decode-kernel variant: kernels are compiled before the worker
        reports ready."""
        num_tokens = self.runner.page_size + 1
        num_pages = -(-(num_tokens + 1) // self.runner.page_size)  # the extend, then one decode
        new_req = NewReq(slot=0, sampling=SamplingParams(temperature=0.0))
        self.step(
            StepBatch(
                step_id=-3,
                new_reqs=[new_req],
                page_appends=[PageAppend(0, [0] * num_pages)],
                extends=[ExtendReq(0, 0, [0] * num_tokens)],
            )
        )
        if decodes:
            self.step(StepBatch(step_id=-2, decode_slots=[0], decode_positions=[num_tokens]))
        self.step(StepBatch(step_id=-1, released=[0]))
        if self.loaded.device.type == "cuda":
            if decodes and self.runner.kernels.name == "triton":
                compile_decode_variants(self.runner)
            torch.cuda.synchronize()

    @property
    def pipelined(self) -> bool:
        """Whether steps are launched ahead of the previous result (engine/pipeline.py): on CUDA
        with the decode graphs (one rank, our kernels; the eager reference attention reads the
        lengths on the host, which would wait for the step in flight anyway)."""
        return self.runner.device.type == "cuda" and isinstance(self.step_runner, GraphStepRunner)

    def step(self, batch: StepBatch) -> StepResult:
        """Apply the deltas in protocol order, run the forward, sample."""
        return self.launch(batch).result()

    @torch.inference_mode()
    def launch(self, batch: StepBatch) -> LaunchedStep:
        """``step`` up to the sampling, enqueued; the sampled values come to the host behind an
        event (``LaunchedStep.result`` reads them)."""
        start = time.perf_counter()
        self.runner.release_slots(batch.released)
        for slot in batch.released:
            self.sampling[slot] = None
        self.penalties.release(batch.released)
        for req in batch.new_reqs:
            self.sampling[req.slot] = req.sampling
            self.penalties.admit(req.slot, req.sampling, req.prompt_ids, req.output_ids)
        self.runner.release_slots([req.slot for req in batch.new_reqs])
        self.runner.append_pages([(a.slot, a.pages) for a in batch.page_appends])
        if not batch.extends and not batch.decode_slots:
            return LaunchedStep.empty(batch.step_id)

        logger.debug(
            "step %d: %d extends, %d decodes", batch.step_id, len(batch.extends), len(batch.decode_slots)
        )
        inputs, logits = self.step_runner.run(batch.extends, batch.decode_slots, batch.decode_positions)
        if not inputs.sample_slots:
            return LaunchedStep.empty(batch.step_id)
        params = [self.sampling[slot] for slot in inputs.sample_slots]
        penalty_rows = self.penalties.rows(inputs.sample_slots, params) if self.penalties.active else None
        sampling = SamplingBatch.build(
            params, inputs.sample_positions, self.config.vocab_size, logits.device, penalty_rows
        )
        tokens, logprobs = sample(logits, sampling)
        self.runner.set_next_tokens(inputs.sample_slots_device, tokens)
        if penalty_rows is not None:
            self.penalties.record(inputs.sample_slots, tokens)
        top = None
        if any(p.top_logprobs for p in params):  # from this step's logits, before the next step's
            k = max(p.top_logprobs for p in params)
            ids, values = top_logprobs(logits, min(k, logits.shape[1]))
            top = (ids, values, [p.top_logprobs for p in params])  # rows that did not ask: []
        return LaunchedStep.copying(batch.step_id, inputs.sample_slots, tokens, logprobs, top, start)


def choose_small_batch_matmuls(linear: SmallBatchLinear, model: torch.nn.Module) -> None:
    """Measure cuBLAS against our GEMV on this device for the model's matmul shapes (before the
    decode graphs are captured, which bake the choices in)."""
    from engine.kernels.small_batch_linear import describe, device_timer

    start = time.perf_counter()
    measured = linear.choose(model.matmul_weights(), device_timer())
    logger.info(
        "small-batch matmuls: our GEMV for %d of %d (rows, shape) in %.1f s", len(linear.choices),
        len(measured), time.perf_counter() - start,
    )
    logger.debug("small-batch matmuls:\n%s", describe(measured))


def _allocate_pool(
    args: ServerArgs, loaded: LoadedModel, max_useful_tokens: int, tp: TensorParallel = SINGLE_RANK
) -> KVPool:
    """The KV pool, sized by ``PoolSizing`` (after the weights are on the device). A
    tensor-parallel rank holds its KV heads only; the ranks agree on the smallest page count
    (the scheduler's page ids index every rank's pool), and on the CPU, where they share the
    host's memory, each takes its share of the budget."""
    cfg = loaded.config
    kv_heads = tp.split(cfg).num_kv_heads if tp.size > 1 else cfg.num_kv_heads
    share = tp.local_size if loaded.device.type == "cpu" else 1
    sizing = PoolSizing(
        page_size=args.page_size,
        bytes_per_token=kv_bytes_per_token(cfg.num_layers, kv_heads, cfg.head_dim, loaded.dtype),
        max_total_tokens=args.max_total_tokens,
        mem_fraction_static=args.mem_fraction_static / share,
        max_useful_tokens=max_useful_tokens,
    )
    num_pages = tp.min_over_ranks(sizing.num_pages(loaded.device))
    pool = KVPool.allocate(
        cfg.num_layers, num_pages, args.page_size, kv_heads, cfg.head_dim, loaded.dtype, loaded.device
    )
    logger.info("KV pool: %d pages of %d tokens (%.1f MiB)", num_pages, args.page_size, pool.nbytes / 2**20)
    return pool


def _context_len(args: ServerArgs, cfg: ModelConfig) -> int:
    """The longest sequence served: ``--context-length`` within what the model supports, and
    within Mistral's sliding window (full attention equals it only up to there)."""
    limit = cfg.max_position_embeddings
    if cfg.sliding_window:
        limit = min(limit, cfg.sliding_window)
    if args.context_length is not None and args.context_length > limit:
        logger.warning(
            "--context-length %d exceeds the model's %d; using %d", args.context_length, limit, limit
        )
    return min(args.context_length or limit, limit)


@dataclass
class StepHooks:
    """What a role adds to the plain step loop: how a ``StepBatch`` is run, the messages sent
    right after each step's result, and handlers for message types beyond the step protocol."""

    step: Callable[[StepBatch], StepResult]
    after_step: Callable[[], Iterable[Message]] = lambda: ()  # e.g. the rooms the KV side refused
    handlers: Mapping[type[Message], Callable[[Any], None]] = field(default_factory=dict)
    launch: Callable[[StepBatch], LaunchedStep] | None = None  # given: steps are pipelined


@dataclass
class WorkerProcess:
    """A worker process's end of its scheduler's two sockets, and what it closes on exit."""

    name: str
    ctx: zmq.Context
    step_sock: zmq.Socket
    result_sock: zmq.Socket
    exit_stack: contextlib.ExitStack

    def start(self, create: Callable[[], T]) -> T:
        """Run the start-up ``create``; if it fails, tell the scheduler (``WorkerFailed``) and re-raise."""
        try:
            return create()
        except Exception as e:
            self._report_failure(f"{self.name}: start-up failed: {type(e).__name__}: {e}")
            raise

    def join_tensor_parallel(self, cfg: WorkerConfig) -> TensorParallel:
        """Rank 0's place in its instance's group (``SINGLE_RANK`` for one rank), left with the
        others when the process ends."""
        from engine.parallel.ranks import join_tensor_parallel

        tp = self.start(lambda: join_tensor_parallel(cfg))
        self.exit_stack.callback(close_tensor_parallel, tp)
        return tp

    def closing(self, resource: C) -> C:
        """Close ``resource`` when the process ends: the last one registered first, all before the sockets."""
        return self.exit_stack.enter_context(contextlib.closing(resource))

    def announce_ready(self, ready: WorkerReady) -> None:
        """Tell the scheduler the worker is ready, and log what it offers."""
        transport.send(self.result_sock, ready)
        sender = ready.transfer.address if ready.transfer else ""
        kv_sender = f", KV sender at {sender}" if sender else ""
        logger.info("%s ready: %d pages, %d slots%s", self.name, ready.num_pages, ready.max_slots, kv_sender)

    def serve(self, hooks: StepHooks, relay: Relay = NO_RELAY) -> None:
        """Run steps until ``Shutdown``; a failing step sends ``WorkerFailed`` and re-raises.
        ``relay``: where each frame goes first (a tensor-parallel instance's other ranks).

        Waits in bounded polls, not one blocking receive: the kernel may deliver SIGTERM to any
        thread (zmq's I/O threads, torch's pool), and Python runs the handler only when the main
        thread comes back to the interpreter, which a receive blocked in libzmq never does.
        However it ends, the other ranks are told (``Relay.finish``)."""
        try:
            if hooks.launch is None:
                self._serve(hooks, relay)
            else:
                send = functools.partial(self._send_result, hooks)
                Pipeline(self.step_sock, hooks.launch, send, self._report_failure, hooks.handlers).serve(
                    self.ctx, relay)
        finally:
            relay.finish()

    def _serve(self, hooks: StepHooks, relay: Relay) -> None:
        while True:
            if not self.step_sock.poll(SIGNAL_CHECK_MS):
                relay.idle()
                continue
            frame = self.step_sock.recv()
            relay.forward(frame)
            msg = decode(frame)
            if isinstance(msg, Shutdown):
                logger.info("shutdown: %s", msg.reason or "requested")
                relay.finish(shutdown_relayed=True)
                return
            if (handle := hooks.handlers.get(type(msg))) is not None:
                handle(msg)
            elif isinstance(msg, StepBatch):
                self._run_step(hooks, msg)
            else:
                logger.warning("ignoring unexpected message %s", msg.TYPE)

    def _run_step(self, hooks: StepHooks, batch: StepBatch) -> None:
        try:
            result = hooks.step(batch)
        except Exception as e:
            self._report_failure(f"step {batch.step_id} failed: {type(e).__name__}: {e}")
            raise
        self._send_result(hooks, result)

    def _send_result(self, hooks: StepHooks, result: StepResult) -> None:
        transport.send(self.result_sock, result)
        for msg in hooks.after_step():
            transport.send(self.result_sock, msg)

    def _report_failure(self, message: str) -> None:
        logger.error("%s\n%s", message, traceback.format_exc())
        transport.send(self.result_sock, WorkerFailed(message=message))


@contextlib.contextmanager
def worker_process(cfg: WorkerConfig) -> Iterator[WorkerProcess]:
    """Apply the process settings (``apply_process_settings``), bind the step socket and connect
    the result socket; on exit close what the role registered, then the sockets (the result
    socket lingers, so that a last ``WorkerFailed`` still leaves)."""
    apply_process_settings(cfg.args)
    ctx = zmq.Context()
    step_sock = transport.bind(ctx, zmq.PULL, cfg.addrs.step_addr)
    result_sock = transport.connect(ctx, zmq.PUSH, cfg.addrs.result_addr)
    try:
        with contextlib.ExitStack() as exit_stack:
            yield WorkerProcess(cfg.name, ctx, step_sock, result_sock, exit_stack)
    finally:
        step_sock.close()
        result_sock.close(linger=RESULT_LINGER_MS)
        ctx.term()


def apply_process_settings(args: ServerArgs) -> None:
    """A worker computing on the CPU: torch threads and the allocator (``engine.cpu_env``). On
    CUDA only an explicit thread count (flag or environment) is applied."""
    from engine import cpu_env

    if resolve_device(args.device).type == "cpu":
        cpu_env.apply_threads(args.cpu_omp_threads)
        cpu_env.tune_malloc()
    elif args.cpu_omp_threads is not None or os.environ.get(cpu_env.LEGACY_THREADS_ENV):
        cpu_env.apply_threads(args.cpu_omp_threads)


def run_worker(cfg: WorkerConfig) -> None:
    """The worker process of a unified instance: start up (or report ``WorkerFailed`` and
    raise), report ready, serve until shutdown. A failing step ends the process (non-zero),
    which frees its memory; its scheduler fails the requests in flight."""
    from engine.parallel.ranks import run_follower

    if cfg.tp_rank > 0:
        run_follower(cfg)
        return
    faults = Faults.from_env()
    with worker_process(cfg) as proc:
        tp = proc.join_tensor_parallel(cfg)
        worker = proc.start(lambda: Worker.create(cfg.args, tp=tp))
        proc.announce_ready(worker.ready_message())
        launch = with_step_faults(worker.launch, faults) if worker.pipelined else None
        proc.serve(StepHooks(with_step_faults(worker.step, faults), launch=launch), make_relay(tp))
