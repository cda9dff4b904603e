"""The processes of a tensor-parallel instance: each joins the group (``join_tensor_parallel``);
rank 0 is the instance's ordinary worker process (``engine.worker.run_worker``), the others run
``run_follower``: the same ``Worker`` on their part of the model, fed by rank 0's relayed frames
(``engine.parallel.steps``), silent towards the scheduler.

Sampling runs on every rank, as in SGLang: the gathered logits are the same bits everywhere and
the sampler is deterministic (counter-based noise from the request's seed), so every rank draws
the same tokens and keeps the same future-token map; only rank 0's result is sent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from engine.parallel.group import (
    SINGLE_RANK,
    TensorParallel,
    close_tensor_parallel,
    init_tensor_parallel,
    split_cpu_threads,
)
from engine.parallel.steps import RankLost, receive_frame
from protocol.config import WorkerConfig
from protocol.messages import Shutdown, StepBatch, decode

logger = logging.getLogger("pdserve.worker")


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
        model, args.tp_size, cfg.tp_rank, cfg.dist_init_method, device, timeout_s=2 * args.watchdog_timeout
    )
    if device.type == "cpu":
        _, source = cpu_env.choose_threads(args.cpu_omp_threads)
        split_cpu_threads(tp, threads_chosen_by_default=source == "default")
    return tp


def refuse_tensor_parallel(cfg: WorkerConfig) -> None:
    """A disaggregated worker runs one rank for now (its KV transfer moves one pool): refuse
    ``--tp-size`` > 1 there, on every rank, rather than start ranks that would not cooperate."""
    if cfg.args.tp_size > 1:
        raise ValueError(f"--tp-size {cfg.args.tp_size}: a {cfg.role} worker runs one rank only for now")


def run_follower(cfg: WorkerConfig) -> None:
    """A rank other than 0: load its part, warm up with the others, then run every relayed
    step until rank 0 relays ``Shutdown``. Exits non-zero when rank 0 is gone (its collectives
    fail), which the launcher sees as the instance's death."""
    from engine.worker import Worker, apply_process_settings

    apply_process_settings(cfg.args)
    tp = join_tensor_parallel(cfg)
    try:
        worker = Worker.create(cfg.args, tp=tp)
        logger.info("%s rank %d of %d ready", cfg.name, tp.rank, tp.size)
        follow_steps(worker.step, tp)
    except RankLost as e:
        logger.error("%s", e)
        raise SystemExit(1) from None
    finally:
        close_tensor_parallel(tp)


def follow_steps(step: Callable[[StepBatch], object], tp: TensorParallel) -> None:
    """Run each relayed ``StepBatch`` (its result is rank 0's to send) until ``Shutdown``."""
    while True:
        frame = receive_frame(tp)
        if frame is None:
            continue
        msg = decode(frame)
        if isinstance(msg, Shutdown):
            logger.info("rank %d: shutdown: %s", tp.rank, msg.reason or "requested")
            return
        if isinstance(msg, StepBatch):
            step(msg)
        else:
            logger.warning("rank %d: ignoring relayed %s", tp.rank, msg.TYPE)
