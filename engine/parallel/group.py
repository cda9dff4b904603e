"""The tensor-parallel ranks of one instance and how a model splits over them.

One worker process per rank; rank 0 talks to the scheduler. The ranks form one
``torch.distributed`` group: NCCL on CUDA, gloo on the CPU (plus a gloo group on CUDA for the
step frames, which are host bytes). ``TensorParallel`` is that group as the model sees it: a
single rank (``SINGLE_RANK``) needs no process group and its layers are the plain ones.

``ModelSplit`` is the arithmetic of the split, as SGLang does it: query heads and the MLP's
intermediate size divide evenly (a model that cannot is refused with the reason); KV heads are
sharded when there are at least as many as ranks, else each is replicated on
``tp_size / num_kv_heads`` ranks; the vocabulary is split in equal shards, the last one padded.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from engine.models.config import ModelConfig

logger = logging.getLogger("pdserve.worker")

MIN_GROUP_TIMEOUT_S = 600.0  # longest a collective may wait (start-up: the ranks load the model at once)
LOOPBACK_INTERFACE = "lo"
CLOSE_BARRIER_S = 10.0  # how long a closing rank waits for the others to close too


@dataclass(frozen=True)
class ModelSplit:
    """One rank's part of a model: heads, KV heads, intermediate rows, vocabulary rows."""

    tp_size: int
    tp_rank: int
    num_heads: int  # query heads of this rank
    num_kv_heads: int  # KV heads of this rank (1 when replicated)
    kv_head_start: int  # the first KV head (of the model's) this rank holds
    intermediate_size: int
    vocab_shard: int  # vocabulary rows per rank (the last rank's padded)
    vocab_start: int

    @classmethod
    def of(cls, cfg: ModelConfig, tp_size: int, tp_rank: int = 0) -> ModelSplit:
        """Raise ValueError naming what does not divide (``--tp-size`` and the model's number)."""
        check_splittable(cfg, tp_size)
        if cfg.num_kv_heads >= tp_size:
            kv_heads = cfg.num_kv_heads // tp_size
            kv_start = tp_rank * kv_heads
        else:
            kv_heads = 1
            kv_start = tp_rank // (tp_size // cfg.num_kv_heads)
        vocab_shard = -(-cfg.vocab_size // tp_size)
        return cls(
            tp_size=tp_size,
            tp_rank=tp_rank,
            num_heads=cfg.num_heads // tp_size,
            num_kv_heads=kv_heads,
            kv_head_start=kv_start,
            intermediate_size=cfg.intermediate_size // tp_size,
            vocab_shard=vocab_shard,
            vocab_start=tp_rank * vocab_shard,
        )


def check_splittable(cfg: ModelConfig, tp_size: int) -> None:
    """Refuse a ``--tp-size`` that does not split the model (SGLang's rules)."""
    if tp_size < 1:
        raise ValueError(f"--tp-size must be a positive integer; got {tp_size}")
    if cfg.num_heads % tp_size:
        raise ValueError(
            f"--tp-size {tp_size} does not divide the model's {cfg.num_heads} attention heads: "
            f"tensor parallelism needs num_attention_heads % tp_size == 0"
        )
    kv = cfg.num_kv_heads
    if (kv >= tp_size and kv % tp_size) or (kv < tp_size and tp_size % kv):
        raise ValueError(
            f"--tp-size {tp_size} and the model's {kv} KV heads: the KV heads must be a multiple of "
            f"--tp-size (sharded) or divide it (replicated)"
        )
    if cfg.intermediate_size % tp_size:
        raise ValueError(
            f"--tp-size {tp_size} does not divide the model's intermediate size {cfg.intermediate_size}"
        )


@dataclass(frozen=True)
class TensorParallel:
    """This process's rank in its instance's tensor-parallel group, and the collectives the
    parallel layers call. ``group`` is None for a single rank."""

    size: int = 1
    rank: int = 0
    group: Any = None  # the tensors' process group (NCCL on CUDA, gloo on the CPU)
    control: Any = None  # gloo: the step frames rank 0 relays

    def split(self, cfg: ModelConfig) -> ModelSplit:
        return ModelSplit.of(cfg, self.size, self.rank)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks, in place (every rank gets the same bits)."""
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C] on every rank → [N, C × size], rank 0's columns first."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def min_over_ranks(self, value: int) -> int:
        """The smallest ``value`` of all ranks (e.g. KV pages: every rank must hold as many)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return int(t.item())


SINGLE_RANK = TensorParallel()

def init_tensor_parallel(
    cfg: ModelConfig, tp_size: int, tp_rank: int, init_method: str, device: torch.device, timeout_s: float
) -> TensorParallel:
    """Join the instance's process group (after checking the model splits, so that a model that
    cannot is refused on every rank at once, before any rank waits for another). On CUDA each
    rank takes the device of its rank."""
    check_splittable(cfg, tp_size)
    if tp_size == 1:
        return SINGLE_RANK
    if not init_method:
        raise ValueError(f"--tp-size {tp_size} needs the ranks' rendezvous (WorkerConfig.dist_init_method)")
    if device.type == "cuda":
        if (gpus := torch.cuda.device_count()) < tp_size:
            raise ValueError(f"--tp-size {tp_size} needs {tp_size} GPUs; this host has {gpus}")
        torch.cuda.set_device(tp_rank)
    _prefer_loopback_for_gloo()
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=max(timeout_s, MIN_GROUP_TIMEOUT_S))
    dist.init_process_group(
        backend, init_method=init_method, rank=tp_rank, world_size=tp_size, timeout=timeout
    )
    world = dist.group.WORLD
    control = world if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    logger.info("tensor parallel: rank %d of %d (%s)", tp_rank, tp_size, backend)
    return TensorParallel(tp_size, tp_rank, world, control)


def rank_device(device: torch.device, tp: TensorParallel) -> torch.device:
    """The device of this rank: ``cuda:<rank>`` for tensor parallelism on CUDA."""
    if device.type == "cuda" and tp.size > 1:
        return torch.device("cuda", tp.rank)
    return device


def split_cpu_threads(tp: TensorParallel, threads_chosen_by_default: bool) -> None:
    """Ranks on one host share its cores: a default thread count is divided among them (an
    explicit ``--cpu-omp-threads`` is per rank and kept)."""
    if tp.size > 1 and threads_chosen_by_default:
        threads = max(1, torch.get_num_threads() // tp.size)
        torch.set_num_threads(threads)
        logger.info("CPU: %d torch threads per rank (%d ranks)", threads, tp.size)


def close_tensor_parallel(tp: TensorParallel) -> None:
    """Leave the group together: every rank meets the others before tearing its connections
    down (a gloo rank that destroyed its group while a peer still used theirs aborted at exit).
    A rank that is gone already is not waited for long."""
    if tp.size > 1 and dist.is_initialized():
        try:
            dist.monitored_barrier(tp.control, timeout=datetime.timedelta(seconds=CLOSE_BARRIER_S))
        except RuntimeError as e:
            logger.warning("tensor parallel: rank %d leaves without the others: %s", tp.rank, e)
        dist.destroy_process_group()


def _prefer_loopback_for_gloo() -> None:
    """The ranks of an instance run on one host: gloo's pairs use the loopback interface, not
    whatever the host name resolves to (unless ``GLOO_SOCKET_IFNAME`` says otherwise)."""
    names = {name for _, name in socket.if_nameindex()}
    if LOOPBACK_INTERFACE in names:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", LOOPBACK_INTERFACE)
