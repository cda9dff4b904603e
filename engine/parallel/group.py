"""The tensor-parallel ranks of one instance and how a model splits over them.

One worker process per rank; rank 0 talks to the scheduler. The ranks form one
``torch.distributed`` group: NCCL on CUDA, gloo on the CPU (plus a gloo group on CUDA for the
step frames, which are host bytes). On one host they meet at a ``file://`` rendezvous and gloo
uses loopback; across ``--nnodes`` hosts at rank 0's TCP store (``serve_store``, bound exactly
to ``--dist-init-addr``; unauthenticated: the nodes must share a trusted network) and gloo
uses the interface that reaches node 0. ``TensorParallel`` is that group as the model sees it: a
single rank (``SINGLE_RANK``) needs no process group and its layers are the plain ones.

``ModelSplit`` is the arithmetic of the split. As SGLang does it: the MLP's intermediate size
divides evenly; KV heads are sharded when there are at least as many as ranks, else each is
replicated on ``tp_size / num_kv_heads`` ranks (whose query heads then divide evenly); the
vocabulary is split in equal shards, the last one padded. Beyond SGLang: KV heads that do not
divide by the ranks are dealt out whole, each with its group of query heads, the first ranks
taking one more (SmolLM2-135M's 3 over 2 ranks: 2 and 1), so the ranks' attention is uneven
but every rank keeps the model's query-to-KV grouping. A model that cannot split is refused
with the reason.
"""

from __future__ import annotations

import datetime
import fcntl
import logging
import os
import socket
import struct
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from engine.models.config import ModelConfig
from protocol.dataplane import kv_head_range

logger = logging.getLogger("pdserve.worker")

MIN_GROUP_TIMEOUT_S = 600.0  # longest a collective may wait (start-up: the ranks load the model at once)
LOOPBACK_INTERFACE = "lo"
CLOSE_BARRIER_S = 10.0  # how long a closing rank waits for the others to close too
STORE_RETRY_S = 1.0  # a rank of another node: between attempts to reach rank 0's store
STORE_CONNECT_S = 5.0  # one attempt's connection to a store that accepted a probe
FORMED_KEY = "pdserve/formed"  # set in rank 0's store once its group is complete
SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


class RankLost(RuntimeError):
    """Another rank of this instance is gone (its connection closed, or the group timed out)."""


@dataclass(frozen=True)
class ModelSplit:
    """One rank's part of a model: heads, KV heads, intermediate rows, vocabulary rows."""

    tp_size: int
    tp_rank: int
    num_heads: int  # query heads of this rank
    head_start: int  # the first query head (of the model's) this rank holds
    num_kv_heads: int  # KV heads of this rank (1 when replicated)
    kv_head_start: int  # the first KV head (of the model's) this rank holds
    intermediate_size: int
    vocab_shard: int  # vocabulary rows per rank (the last rank's padded)
    vocab_start: int

    @classmethod
    def of(cls, cfg: ModelConfig, tp_size: int, tp_rank: int = 0) -> ModelSplit:
        """Raise ValueError naming what does not divide (``--tp-size`` and the model's number)."""
        check_splittable(cfg, tp_size)
        group = cfg.num_heads // cfg.num_kv_heads
        kv_start, kv_heads = kv_head_range(cfg.num_kv_heads, tp_size, tp_rank)
        if cfg.num_kv_heads >= tp_size:
            head_start, heads = kv_start * group, kv_heads * group
        else:
            heads = cfg.num_heads // tp_size
            head_start = tp_rank * heads
        vocab_shard = -(-cfg.vocab_size // tp_size)
        return cls(
            tp_size=tp_size,
            tp_rank=tp_rank,
            num_heads=heads,
            head_start=head_start,
            num_kv_heads=kv_heads,
            kv_head_start=kv_start,
            intermediate_size=cfg.intermediate_size // tp_size,
            vocab_shard=vocab_shard,
            vocab_start=tp_rank * vocab_shard,
        )


def check_splittable(cfg: ModelConfig, tp_size: int) -> None:
    """Refuse a ``--tp-size`` that does not split the model."""
    if tp_size < 1:
        raise ValueError(f"--tp-size must be a positive integer; got {tp_size}")
    kv = cfg.num_kv_heads
    if cfg.num_heads % kv:
        raise ValueError(f"the model's {cfg.num_heads} attention heads do not group over its {kv} KV heads")
    if kv < tp_size and tp_size % kv:
        raise ValueError(
            f"--tp-size {tp_size} and the model's {kv} KV heads: with fewer KV heads than ranks, "
            f"--tp-size must be a multiple of them (each replicated on as many ranks)"
        )
    if kv < tp_size and cfg.num_heads % tp_size:
        raise ValueError(
            f"--tp-size {tp_size} does not divide the model's {cfg.num_heads} attention heads: "
            f"with fewer KV heads than ranks, num_attention_heads % tp_size must be 0"
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
    local_size: int = 1  # the ranks on this host (--tp-size / --nnodes)
    node_group: Any = None  # gloo, this host's ranks: those that close together (None: ``control``)
    timeout_s: float | None = None  # the longest a collective may wait (None: one rank, none to wait for)

    @property
    def local_rank(self) -> int:
        """This rank's index among its host's (node R runs ranks R·local_size onwards)."""
        return self.rank % self.local_size

    def split(self, cfg: ModelConfig) -> ModelSplit:
        return ModelSplit.of(cfg, self.size, self.rank)

    def splits(self, cfg: ModelConfig) -> list[ModelSplit]:
        """Every rank's split, by rank."""
        return [ModelSplit.of(cfg, self.size, rank) for rank in range(self.size)]

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks, in place (every rank gets the same bits)."""
        try:
            dist.all_reduce(x, group=self.group)
        except RuntimeError as e:
            raise self.lost(e) from None
        return x

    def all_gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C] on every rank → [N, C × size], rank 0's columns first."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        try:
            dist.all_gather(parts, x.contiguous(), group=self.group)
        except RuntimeError as e:
            raise self.lost(e) from None
        return torch.cat(parts, dim=-1)

    def lost(self, error: RuntimeError) -> RuntimeError:
        """What a failed collective means: ``RankLost`` when it lost its peers (a closed
        connection or a timeout: another rank of this instance is gone), else ``error`` itself."""
        if not is_lost_peer(error):
            return error
        return RankLost(f"rank {self.rank}: another rank of this instance is gone ({error})")

    def min_over_ranks(self, value: int) -> int:
        """The smallest ``value`` of all ranks (e.g. KV pages: every rank must hold as many)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return int(t.item())


LOST_PEER_SIGNS = ("Connection reset", "Connection closed", "Broken pipe", "Timed out", "timed out")


def is_lost_peer(error: RuntimeError) -> bool:
    """Whether a collective failed because a peer went away (torch's distributed errors, or
    gloo's, which come as plain RuntimeErrors naming the closed connection or the timeout)."""
    return isinstance(error, dist.DistError) or any(sign in str(error) for sign in LOST_PEER_SIGNS)


SINGLE_RANK = TensorParallel()

def init_tensor_parallel(
    cfg: ModelConfig,
    tp_size: int,
    tp_rank: int,
    init_method: str,
    device: torch.device,
    timeout_s: float,
    nnodes: int = 1,
) -> TensorParallel:
    """Join the instance's process group (after checking the model splits, so that a model that
    cannot is refused on every rank at once, before any rank waits for another). On CUDA each
    rank takes the device of its index on its host. ``init_method``: ``file://`` (one host,
    gloo on loopback) or ``tcp://HOST:PORT`` (several: rank 0 serves the store there, gloo
    binds the interface that reaches HOST)."""
    check_splittable(cfg, tp_size)
    if tp_size == 1:
        return SINGLE_RANK
    if not init_method:
        raise ValueError(f"--tp-size {tp_size} needs the ranks' rendezvous (WorkerConfig.dist_init_method)")
    local_size = tp_size // nnodes
    if device.type == "cuda":
        if (gpus := torch.cuda.device_count()) < local_size:
            raise ValueError(f"--tp-size {tp_size} needs {local_size} GPUs per node; this host has {gpus}")
        torch.cuda.set_device(tp_rank % local_size)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=max(timeout_s, MIN_GROUP_TIMEOUT_S))
    rendezvous = urllib.parse.urlsplit(init_method)
    if rendezvous.scheme == "file":
        _prefer_loopback_for_gloo()
        dist.init_process_group(
            backend, init_method=init_method, rank=tp_rank, world_size=tp_size, timeout=timeout
        )
    elif rendezvous.scheme == "tcp" and rendezvous.hostname and rendezvous.port:
        host, port = rendezvous.hostname, rendezvous.port
        _prefer_interface_towards(host, port)
        store = serve_store(host, port, tp_size, timeout) if tp_rank == 0 else join_store(host, port, timeout)
        dist.init_process_group(backend, store=store, rank=tp_rank, world_size=tp_size, timeout=timeout)
        if tp_rank == 0:
            store.set(FORMED_KEY, "1")
    else:
        raise ValueError(f"unknown tensor-parallel rendezvous {init_method!r}: file://PATH or tcp://HOST:PORT")
    world = dist.group.WORLD
    control = world if backend == "gloo" else dist.new_group(backend="gloo", timeout=timeout)
    node_group = _node_group(tp_size, local_size, timeout) if nnodes > 1 else None
    split = ModelSplit.of(cfg, tp_size, tp_rank)
    logger.info(
        "tensor parallel: rank %d of %d (%s): query heads %d-%d of %d, KV heads %d-%d of %d", tp_rank,
        tp_size, backend, split.head_start, split.head_start + split.num_heads - 1, cfg.num_heads,
        split.kv_head_start, split.kv_head_start + split.num_kv_heads - 1, cfg.num_kv_heads,
    )
    return TensorParallel(tp_size, tp_rank, world, control, local_size, node_group, timeout.total_seconds())


def _node_group(tp_size: int, local_size: int, timeout: datetime.timedelta) -> Any:
    """A gloo group of this host's ranks (every rank creates every node's, in order)."""
    nodes = [list(range(start, start + local_size)) for start in range(0, tp_size, local_size)]
    mine, _ = dist.new_subgroups_by_enumeration(nodes, timeout=timeout, backend="gloo")
    return mine


def serve_store(host: str, port: int, world_size: int, timeout: datetime.timedelta) -> dist.TCPStore:
    """Rank 0's rendezvous store, listening on ``host:port`` only (torch's own would listen on
    every interface), new to this process: a restarted rank 0 never meets its predecessor's."""
    family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(socket.SOMAXCONN)
    except OSError as e:
        sock.close()
        raise ValueError(
            f"--dist-init-addr {host}:{port}: rank 0 cannot listen there ({e.strerror}); it must be an "
            "address of node 0 and a free port"
        ) from None
    return dist.TCPStore(
        host, port, world_size, True, timeout, wait_for_workers=False, master_listen_fd=sock.detach()
    )


def join_store(host: str, port: int, timeout: datetime.timedelta) -> dist.TCPStore:
    """A client of rank 0's store, once one that is forming a group answers: rank 0 may not be
    up yet (its node starts, or restarts its instance), or may still be the previous
    incarnation, whose group is complete (``FORMED_KEY``) and about to end; both are waited for,
    up to ``timeout``, coming back to the interpreter between attempts (signals are handled)."""
    deadline = time.monotonic() + timeout.total_seconds()
    waiting_said = False
    while True:
        if (store := _connect_store(host, port)) is not None:
            if not store.check([FORMED_KEY]):
                store.set_timeout(timeout)
                return store
            del store
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0's rendezvous at {host}:{port} took no new ranks within {timeout}")
        if not waiting_said:
            logger.info("tensor parallel: waiting for rank 0's rendezvous at %s:%d", host, port)
            waiting_said = True
        time.sleep(STORE_RETRY_S)


def _connect_store(host: str, port: int) -> dist.TCPStore | None:
    """A client of the store at ``host:port``, or None while nothing listens there (probed with
    a plain connection first: torch's client logs every failed attempt at length)."""
    try:
        with socket.create_connection((host, port), timeout=STORE_RETRY_S):
            pass
        return dist.TCPStore(host, port, None, False, datetime.timedelta(seconds=STORE_CONNECT_S))
    except (OSError, RuntimeError):  # RuntimeError: torch's DistNetworkError (rank 0 went away)
        return None


def rank_device(device: torch.device, tp: TensorParallel) -> torch.device:
    """The device of this rank: ``cuda:<its index on this host>`` for tensor parallelism on CUDA."""
    if device.type == "cuda" and tp.size > 1:
        return torch.device("cuda", tp.local_rank)
    return device


def split_cpu_threads(tp: TensorParallel, threads_chosen_by_default: bool) -> None:
    """Ranks on one host share its cores: a default thread count is divided among them (an
    explicit ``--cpu-omp-threads`` is per rank and kept)."""
    if tp.local_size > 1 and threads_chosen_by_default:
        threads = max(1, torch.get_num_threads() // tp.local_size)
        torch.set_num_threads(threads)
        logger.info("CPU: %d torch threads per rank (%d ranks on this host)", threads, tp.local_size)


def close_tensor_parallel(tp: TensorParallel) -> None:
    """Leave the group together: every rank meets the others before tearing its connections
    down (a gloo rank that destroyed its group while a peer still used theirs aborted at exit).
    A rank that is gone already is not waited for long. Across nodes only this host's ranks
    are met: a signal stops one host's, and the others learn it from their broken connections."""
    if tp.size > 1 and dist.is_initialized():
        closing_together = tp.control if tp.node_group is None else tp.node_group
        try:
            dist.monitored_barrier(closing_together, timeout=datetime.timedelta(seconds=CLOSE_BARRIER_S))
        except RuntimeError as e:
            logger.warning("tensor parallel: rank %d leaves without the others: %s", tp.rank, e)
        dist.destroy_process_group()


def _prefer_loopback_for_gloo() -> None:
    """The ranks of an instance run on one host: gloo's pairs use the loopback interface, not
    whatever the host name resolves to (unless ``GLOO_SOCKET_IFNAME`` says otherwise)."""
    names = {name for _, name in socket.if_nameindex()}
    if LOOPBACK_INTERFACE in names:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", LOOPBACK_INTERFACE)


def _prefer_interface_towards(host: str, port: int) -> None:
    """Ranks on several hosts: gloo's pairs bind the interface this host reaches ``host`` (rank
    0's node) through, unless ``GLOO_SOCKET_IFNAME`` says otherwise."""
    if "GLOO_SOCKET_IFNAME" in os.environ:
        return
    try:
        name = interface_towards(host, port)
    except OSError as e:  # the name does not resolve, or no route: the store's connect says so
        logger.warning("tensor parallel: no route to %s (%s)", host, e)
        return
    if name is None:
        logger.warning("tensor parallel: no interface found towards %s; gloo picks one by host name", host)
        return
    logger.info("tensor parallel: gloo on %s (towards %s)", name, host)
    os.environ["GLOO_SOCKET_IFNAME"] = name


def interface_towards(host: str, port: int) -> str | None:
    """The interface owning the local address of the route to ``host``: that of a UDP socket
    "connected" to it (connect only picks the route; nothing is sent)."""
    family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(addr)
        local = probe.getsockname()[0]
    return interface_of_address(local)


def interface_of_address(address: str) -> str | None:
    """The name of the interface holding ``address`` (IPv4: each interface's address by ioctl;
    IPv6: /proc/net/if_inet6), None if none does."""
    if ":" in address:
        wanted = socket.inet_pton(socket.AF_INET6, address.split("%")[0]).hex()
        try:
            with open("/proc/net/if_inet6") as f:
                rows = [line.split() for line in f]
        except OSError:
            return None
        return next((row[5] for row in rows if len(row) == 6 and row[0] == wanted), None)
    return next((name for _, name in socket.if_nameindex() if _ipv4_of(name) == address), None)


def _ipv4_of(interface: str) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", interface.encode()[:15]))
        except OSError:  # no IPv4 address
            return None
    return socket.inet_ntoa(packed[20:24])
