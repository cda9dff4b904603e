"""The worker: receives ``StepBatch`` deltas from its scheduler, runs them, answers with the
sampled tokens (protocol.messages "Scheduler ⇄ worker").

Messages are handled strictly in order. With the overlap schedule the scheduler sends step
N+1 before it has seen step N's result, so a decode's input token always comes from the
worker's own future-token map (``ModelRunner.next_tokens``), never from the message.

``Worker`` is the reusable core; the process around it (sockets, start-up failure, the step
loop, ``run_worker``) is ``engine.worker_process``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.cuda_graph import (
    EagerStepRunner,
    GraphStepRunner,
    StepRunner,
    compile_decode_variants,
    make_step_runner,
)
from engine.kv_pool import KVPool, PoolSizing, kv_bytes_per_token
from engine.layers.attention import attention_shapes
from engine.layers.backend import make_kernel_backend
from engine.models.config import ModelConfig
from engine.parallel.group import SINGLE_RANK, TensorParallel
from engine.penalties import SlotPenalties
from engine.pipeline import LaunchedStep
from engine.runner import ModelRunner
from engine.sampling import SamplingBatch, sample, top_logprobs
from engine.weights import LoadedModel, load_model
from protocol.config import ServerArgs
from protocol.messages import (
    ExtendReq,
    ModelInfo,
    NewReq,
    PageAppend,
    SamplingParams,
    StepBatch,
    StepResult,
    TransferEndpoint,
    WorkerReady,
)

if TYPE_CHECKING:
    from engine.kernels.small_batch_linear import SmallBatchLinear

logger = logging.getLogger("pdserve.worker")

SPARE_SLOTS = 2  # the overlap schedule admits new requests before the finished ones are released
@dataclass
class Worker:
    runner: ModelRunner
    loaded: LoadedModel
    num_pages: int
    max_context_len: int
    sampling: list[SamplingParams | None]  # per slot
    step_runner: StepRunner  # decode steps by CUDA-graph replay, or everything eagerly
    penalties: SlotPenalties  # token counts of the slots whose request asks for a penalty
    step_wait_limit_s: float | None = None  # a tensor-parallel rank's: its group's timeout

    @classmethod
    def create(cls, args: ServerArgs, decodes: bool = True, tp: TensorParallel = SINGLE_RANK) -> Worker:
        """Load the model, size and allocate the KV pool, capture the decode graphs, warm up.
        A worker that never ``decodes`` (a prefill instance's) skips the decode graphs and the
        decode kernels' warm-up: they would only cost start-up time and memory. ``tp``: this
        rank's part of a tensor-parallel instance (every rank runs this at once)."""
        loaded = load_model(args, tp)
        kernels = make_kernel_backend(args.attention_backend, loaded.device)
        if kernels.prepare_weights is not None:  # before the pool is sized from the memory left
            kernels.prepare_weights(loaded.model)
        cfg = loaded.config
        context_len = _context_len(args, cfg)
        max_slots = args.max_running_requests + SPARE_SLOTS
        max_pages_per_req = -(-context_len // args.page_size)
        pool = _allocate_pool(
            args, loaded, max_useful_tokens=max_slots * max_pages_per_req * args.page_size, tp=tp
        )
        if decodes and loaded.device.type == "cuda" and kernels.name == "triton":
            choose_small_batch_matmuls(kernels.linear, loaded.model)
        if kernels.warm_up is not None:
            kernels.warm_up(pool.k[0].dtype, attention_shapes(loaded.model), decodes)
        runner = ModelRunner(loaded.model, pool, kernels, max_slots, max_pages_per_req, loaded.device)
        max_context_len = min(context_len, (pool.num_pages - 1) * args.page_size)
        step_runner = make_step_runner(runner, args) if decodes else EagerStepRunner(runner)
        penalties = SlotPenalties(cfg.vocab_size, loaded.device)
        worker = cls(
            runner, loaded, pool.num_pages, max_context_len, [None] * max_slots, step_runner, penalties,
            tp.timeout_s,
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
        with the decode graphs (our kernels; the eager reference attention reads the lengths on
        the host, which would wait for the step in flight anyway). Of a tensor-parallel
        instance only rank 0 asks (``run_worker``); the other ranks run each relayed step to
        its end."""
        return self.runner.device.type == "cuda" and isinstance(self.step_runner, GraphStepRunner)

    def step(self, batch: StepBatch) -> StepResult:
        """Apply the deltas in protocol order, run the forward, sample (a tensor-parallel rank
        waits for the device at most its group's timeout: ``LaunchedStep.wait``)."""
        return self.launch(batch).result(self.step_wait_limit_s)

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
    sizing = PoolSizing(
        page_size=args.page_size,
        bytes_per_token=kv_bytes_per_token(cfg.num_layers, kv_heads, cfg.head_dim, loaded.dtype),
        max_total_tokens=args.max_total_tokens,
        mem_fraction_static=args.mem_fraction_static * _host_share(tp, cfg, loaded.device),
        max_useful_tokens=max_useful_tokens,
    )
    num_pages = tp.min_over_ranks(sizing.num_pages(loaded.device))
    pool = KVPool.allocate(
        cfg.num_layers, num_pages, args.page_size, kv_heads, cfg.head_dim, loaded.dtype, loaded.device
    )
    logger.info("KV pool: %d pages of %d tokens (%.1f MiB)", num_pages, args.page_size, pool.nbytes / 2**20)
    return pool


def _host_share(tp: TensorParallel, cfg: ModelConfig, device: torch.device) -> float:
    """The part of the host's pool budget this rank takes: on the CPU the host's ranks share one
    memory, each in proportion to its KV heads (an uneven split gives them the same page count)."""
    if tp.size == 1 or device.type != "cpu":
        return 1.0
    node = tp.rank - tp.local_rank
    heads = [split.num_kv_heads for split in tp.splits(cfg)[node : node + tp.local_size]]
    return heads[tp.local_rank] / sum(heads)


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
