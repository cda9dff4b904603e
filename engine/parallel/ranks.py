"""The processes of a tensor-parallel instance: each joins the group (``join_tensor_parallel``);
rank 0 is the instance's ordinary worker process (``engine.worker_process.run_worker``), the others run
``run_follower``: the same ``Worker`` on their part of the model, fed by rank 0's relayed frames
(``engine.parallel.steps``), silent towards the scheduler.

Sampling runs on every rank, as in SGLang: the gathered logits are the same bits everywhere and
the sampler is deterministic (counter-based noise from the request's seed), so every rank draws
the same tokens and keeps the same future-token map; only rank 0's result is sent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.parallel.group import (
    SINGLE_RANK,
    TensorParallel,
    close_tensor_parallel,
    init_tensor_parallel,
    split_cpu_threads,
)
from engine.parallel.steps import RankLost, RelayEnded, check_ranks_agree, receive_frame
from protocol.config import ServerArgs, WorkerConfig
from protocol.messages import Shutdown, StepBatch, decode

if TYPE_CHECKING:
    import torch

    from engine.models.config import ModelConfig
    from engine.worker import Worker

logger = logging.getLogger("pdserve.worker")
NODES_ADVICE = (
    "Start launch.py on every node with the same model and the same flags, but for --node-rank "
    "(and the HTTP --host / --port of node 0)"
)
Handlers = Mapping[type, Callable[[Any], None]]  # relayed message type → what a follower does with it


def join_tensor_parallel(cfg: WorkerConfig) -> TensorParallel:
    """This process's rank in its instance's group (``SINGLE_RANK`` for ``--tp-size 1``);
    raises ValueError, on every rank, for a model that ``--tp-size`` cannot split."""
    args = cfg.args
    if args.tp_size == 1:
        return SINGLE_RANK
    from engine import cpu_env
    from engine.weights import model_config, resolve_device
    from protocol.model_source import resolve_model

    model = model_config(resolve_model(args.model_path))
    device = resolve_device(args.device)
    tp = init_tensor_parallel(
        model, args.tp_size, cfg.tp_rank, cfg.dist_init_method, device, timeout_s=2 * args.watchdog_timeout,
        nnodes=args.nnodes,
    )
    if args.nnodes > 1:  # on one host every rank has the launcher's flags
        check_ranks_agree(tp, engine_facts(args, model, device), NODES_ADVICE)
    if device.type == "cpu":
        _, source = cpu_env.choose_threads(args.cpu_omp_threads)
        split_cpu_threads(tp, threads_chosen_by_default=source == "default")
    return tp


def engine_facts(args: ServerArgs, model: ModelConfig, device: torch.device) -> dict[str, object]:
    """What every rank of an instance must share for their collectives to meet and their parts to
    make one model: the model's shape and weights' source, the slots (the decode batch sizes
    captured and warmed up), the pages. The scheduling flags are rank 0's alone (its scheduler
    makes every step) and the pool's size is the smallest rank's (``min_over_ranks``)."""
    from engine.weights import resolve_dtype

    flags = {
        "--load-format": args.load_format, "--device": device.type,
        "--dtype": str(resolve_dtype(args.dtype, model, device)).removeprefix("torch."),
        "--seed": args.seed, "--context-length": args.context_length, "--page-size": args.page_size,
        "--max-running-requests": args.max_running_requests, "--attention-backend": args.attention_backend,
        "--cuda-graph-max-bs": args.cuda_graph_max_bs, "--disable-cuda-graph": args.disable_cuda_graph,
    }
    return flags | {f"model {name}": value for name, value in dataclasses.asdict(model).items()}


def moves_kv_in_parts(cfg: WorkerConfig) -> bool:
    """Whether each rank of this disaggregated instance moves its own KV heads, pool to pool
    (``kvtransfer.tp_parts``), rather than through rank 0 (``kvtransfer.tp_hub``). Over a
    slicing backend even one rank does, pairing with whichever ranks of a peer hold its heads
    (``kvtransfer.tp_slices``)."""
    from protocol.dataplane import TP_HUB_BACKENDS, TP_SLICING_BACKENDS

    backend = cfg.args.transfer_backend
    return backend not in TP_HUB_BACKENDS and (cfg.args.tp_size > 1 or backend in TP_SLICING_BACKENDS)


@dataclass
class FollowerRole:
    """What a role's rank other than 0 runs: each relayed step, and handlers of the other
    relayed messages."""

    step: Callable[[StepBatch], object]
    handlers: Handlers = field(default_factory=dict)


# A role's rank other than 0: its ``FollowerRole``, from its worker and group; what it opens it
# registers with the ``ExitStack``, closed when the rank ends (or when the hooks raise).
FollowerHooks = Callable[["Worker", TensorParallel, contextlib.ExitStack], FollowerRole]


def run_follower(cfg: WorkerConfig, decodes: bool = True, hooks: FollowerHooks | None = None) -> None:
    """A rank other than 0: load its part, warm up with the others, then run every relayed
    step until rank 0 relays ``Shutdown``. Exits non-zero when rank 0 is gone (its collectives
    fail): on node 0 the launcher sees the instance's death; on another node (``--nnodes``) its
    launcher starts the rank again, which waits for rank 0's next store (``join_store``). A
    role's ``hooks`` give the step to run and handlers of the other relayed messages
    (``decodes`` as rank 0 creates its worker), and close what they opened when it ends."""
    from engine.worker import Worker
    from engine.worker_process import apply_process_settings, freeze_start_up_heap

    apply_process_settings(cfg.args)
    tp = join_tensor_parallel(cfg)
    if tp.local_size == tp.size:
        _follow_rank_0_to_the_end()
    try:
        with contextlib.ExitStack() as opened:
            worker = Worker.create(cfg.args, decodes=decodes, tp=tp)
            role = FollowerRole(worker.step) if hooks is None else hooks(worker, tp, opened)
            logger.info("%s rank %d of %d ready", cfg.name, tp.rank, tp.size)
            freeze_start_up_heap()
            follow_steps(role.step, tp, role.handlers)
    except RankLost as e:
        logger.error("%s", e)
        raise SystemExit(1) from None
    finally:
        close_tensor_parallel(tp)


def follow_steps(
    step: Callable[[StepBatch], object], tp: TensorParallel, handlers: Handlers | None = None
) -> None:
    """Run each relayed ``StepBatch`` (its result is rank 0's to send) until ``Shutdown``;
    ``handlers`` take the other relayed messages they name."""
    while True:
        try:
            frame = receive_frame(tp)
        except RelayEnded:
            logger.info("rank %d: rank 0 stopped serving", tp.rank)
            return
        if frame is None:
            continue
        msg = decode(frame)
        if isinstance(msg, Shutdown):
            logger.info("rank %d: shutdown: %s", tp.rank, msg.reason or "requested")
            return
        if (handle := (handlers or {}).get(type(msg))) is not None:
            handle(msg)
        elif isinstance(msg, StepBatch):
            step(msg)
        else:
            logger.warning("rank %d: ignoring relayed %s", tp.rank, msg.TYPE)


def _follow_rank_0_to_the_end() -> None:
    """A rank on rank 0's host ignores SIGTERM and SIGINT: whatever stops the instance stops
    rank 0 too (the launcher signals every process; Ctrl-C the process group), which then tells
    this rank to end, and they close the group together. Left to the signal, this rank would
    leave its collective while rank 0 still relays, and both would wait out the close barrier.
    Rank 0's death ends this rank anyway (``RankLost``); a rank on another node keeps its
    signals (its launcher may stop it alone)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
