"""The configuration each process is started with.

``ServerArgs`` holds every command-line flag (names follow SGLang's where the meaning matches).
Each child process gets its role's config as JSON on its command line (``--config``), rebuilt
and type-checked by the codec, so no pickle crosses the process boundary (docs/design.md,
"Launcher and supervision").

The flags that name an implementation (a schedule policy, a KV transfer backend, ...) take the
names that the implementing package registers; protocol imports none of our packages, so those
names come in as ``FlagChoices``, gathered by ``launch.flag_choices``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from protocol.codec import build
from protocol.messages import Role

T = TypeVar("T")

DTYPES = ("auto", "float32", "float16", "bfloat16")
DEVICES = ("auto", "cpu", "cuda")

# Served without --model-path: SmolLM2-135M-Instruct, shipped as a GGUF file by a Python package
# (protocol.model_source.PACKAGED_MODELS). The tiny random model is `pdserve-embedded-llama`.
DEFAULT_MODEL_PATH = "smollm2-135m-instruct"
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20  # any socket that faces a client or a peer
WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "*")  # "every interface": never an address to hand out


class Mode(StrEnum):
    """What one ``launch.py`` starts (docs/design.md, "Who uses it and how")."""

    UNIFIED = "unified"
    PREFILL = "prefill"
    DECODE = "decode"
    FRONTEND = "frontend"
    PD = "pd"


@dataclass(frozen=True)
class FlagChoices:
    """The values each flag with a fixed set of values accepts, keyed by ``ServerArgs`` field.
    Those that name an implementation are the names in the registry of the package that
    implements it."""

    schedule_policy: tuple[str, ...]
    routing_policy: tuple[str, ...]
    transfer_backend: tuple[str, ...]
    attention_backend: tuple[str, ...]
    load_format: tuple[str, ...]
    dtype: tuple[str, ...] = DTYPES
    device: tuple[str, ...] = DEVICES

    def by_field(self) -> dict[str, tuple[str, ...]]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def flag_name(field_name: str) -> str:
    """The command-line flag of a ``ServerArgs`` field: ``page_size`` → ``--page-size``."""
    return "--" + field_name.replace("_", "-")


@dataclass(frozen=True)
class EmbeddedModel:
    """The embedded default model served when no ``--model-path`` is given: a small
    Llama-architecture model with seeded random weights (built by ``engine``) and a byte-level
    tokenizer (built by ``tokenizer_proc``). Token ids 0..255 are the bytes; then BOS and EOS."""

    name: str = "pdserve-embedded-llama"
    vocab_size: int = 320
    bos_token_id: int = 256
    eos_token_id: int = 257
    hidden_size: int = 256
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 32
    context_len: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5


EMBEDDED = EmbeddedModel()


@dataclass
class ServerArgs:
    # Model
    # What protocol.model_source.resolve_model reads. launch.py's default is DEFAULT_MODEL_PATH;
    # configurations built in code (tests, benchmarks) get the tiny embedded model.
    model_path: str = EMBEDDED.name
    load_format: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    context_length: int | None = None
    served_model_name: str | None = None
    seed: int = 0  # seed of the embedded / dummy weights
    # Front end
    host: str = "127.0.0.1"
    port: int = 30000  # front-end modes: the HTTP API; prefill / decode: the instance's input
    zmq_port: int | None = None  # the front end's ZMQ client port; None: port + 1
    tokenizer_worker_num: int = 1  # front-end processes, each with its HTTP server, sharing --port
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # Memory and scheduling
    page_size: int = 16
    max_total_tokens: int | None = None  # KV pool size in tokens; overrides the fraction
    mem_fraction_static: float = 0.85  # of free GPU memory (on CPU: of a share of MemAvailable) for the pool
    chunked_prefill_size: int = 2048
    max_prefill_tokens: int = 16384
    max_running_requests: int = 256
    max_queued_requests: int = 4096
    schedule_policy: str = "fcfs"
    disable_radix_cache: bool = False
    disable_overlap_schedule: bool = False
    init_new_token_ratio: float = 0.7  # fraction of max_new_tokens reserved as decode headroom
    min_new_token_ratio: float = 0.1
    # Engine
    attention_backend: str = "auto"
    cuda_graph_max_bs: int | None = None  # None: --max-running-requests (every decode batch replays)
    disable_cuda_graph: bool = False
    cpu_omp_threads: int | None = None  # torch threads of a CPU worker; None: engine.cpu_env's default
    tp_size: int = 1  # tensor-parallel ranks of an instance: one worker process each (engine.parallel)
    nnodes: int = 1  # hosts an instance's tensor-parallel ranks span (SGLang's multi-node flags)
    node_rank: int = 0  # this host's index among them: it runs ranks [node_rank, node_rank + 1) × tp/nnodes
    dist_init_addr: str | None = None  # HOST:PORT of rank 0's rendezvous store (on node 0), --nnodes > 1
    # Liveness
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 5.0
    watchdog_timeout: float = 300.0  # a step in flight longer than this fails the instance
    drain_timeout: float = 30.0  # on SIGTERM, how long in-flight requests may take to finish
    # Disaggregation
    routing_policy: str = "round_robin"
    transfer_backend: str = "zmq"
    transfer_timeout: float = 30.0
    # Security (docs/design.md, "Security")
    cluster_key_dir: str | None = None  # CURVE keys for every socket between pdserve processes
    insecure: bool = False  # allow a tcp:// cluster mode without keys
    # Logging
    log_level: str = "info"

    def validate(self, choices: FlagChoices) -> None:
        """Raise ValueError naming the first flag whose value is not allowed."""
        for name, allowed in choices.by_field().items():
            _choice(flag_name(name), getattr(self, name), allowed)
        _positive("--page-size", self.page_size)
        _positive("--chunked-prefill-size", self.chunked_prefill_size)
        _positive("--max-prefill-tokens", self.max_prefill_tokens)
        _positive("--max-running-requests", self.max_running_requests)
        _positive("--max-queued-requests", self.max_queued_requests)
        if self.watchdog_timeout <= 0:
            raise ValueError("--watchdog-timeout must be > 0")
        if self.drain_timeout < 0:
            raise ValueError("--drain-timeout must be ≥ 0")
        if self.chunked_prefill_size < self.page_size:
            raise ValueError("--chunked-prefill-size must be at least --page-size")
        if self.max_total_tokens is not None and self.max_total_tokens < 2 * self.page_size:
            raise ValueError("--max-total-tokens must hold at least two pages")
        if self.cpu_omp_threads is not None:
            _positive("--cpu-omp-threads", self.cpu_omp_threads)
        _positive("--tp-size", self.tp_size)
        _positive("--tokenizer-worker-num", self.tokenizer_worker_num)
        if self.cuda_graph_max_bs is not None:
            _positive("--cuda-graph-max-bs", self.cuda_graph_max_bs)
        self._check_nodes()
        if not 0.0 < self.mem_fraction_static <= 1.0:
            raise ValueError("--mem-fraction-static must be in (0, 1]")
        if self.load_format == "dummy" and self.model_path in (EMBEDDED.name, DEFAULT_MODEL_PATH):
            raise ValueError("--load-format dummy needs --model-path (a directory with config.json)")

    def _check_nodes(self) -> None:
        """``--nnodes`` / ``--node-rank`` / ``--dist-init-addr`` (SGLang's meaning)."""
        _positive("--nnodes", self.nnodes)
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"--node-rank must be in [0, --nnodes {self.nnodes}); got {self.node_rank}")
        if self.tp_size % self.nnodes:
            raise ValueError(
                f"--tp-size {self.tp_size} must be a multiple of --nnodes {self.nnodes}: every node runs "
                "the same number of ranks"
            )
        if self.nnodes == 1:
            if self.dist_init_addr is not None:
                raise ValueError("--dist-init-addr is a multi-node instance's rendezvous: give --nnodes > 1")
            return
        if self.dist_init_addr is None:
            raise ValueError(
                f"--nnodes {self.nnodes} needs --dist-init-addr HOST:PORT: an address of node 0, where "
                "rank 0 listens for the other ranks (the same on every node)"
            )
        split_host_port(self.dist_init_addr)

    @property
    def ranks_per_node(self) -> int:
        return self.tp_size // self.nnodes

    def node_tp_ranks(self) -> range:
        """The tensor-parallel ranks this node runs: node R runs ``[R·N/K, (R+1)·N/K)``."""
        return range(self.node_rank * self.ranks_per_node, (self.node_rank + 1) * self.ranks_per_node)

    @property
    def graph_max_batch(self) -> int:
        """The largest decode batch captured in a CUDA graph: by default the largest the
        instance admits, so that no decode step at full load runs eagerly."""
        return self.max_running_requests if self.cuda_graph_max_bs is None else self.cuda_graph_max_bs

    @property
    def client_port(self) -> int:
        """The first front end's ZMQ client port (``frontend_ports``)."""
        return self.zmq_port if self.zmq_port is not None else self.port + 1

    def frontend_ports(self, index: int) -> tuple[int, int]:
        """Front end ``index``'s ZMQ client port, and the port its instances send outputs to when
        they run on other hosts: the clients' ports ``client_port`` … ``+ N - 1``, then the
        outputs' (one front end: ``client_port`` and the port after it)."""
        n = self.tokenizer_worker_num
        return self.client_port + index, self.client_port + n + index


@dataclass
class InstanceAddrs:
    """The sockets of one instance (scheduler + worker). ``input_addr`` is the instance's
    public address (front ends and peers send to it); the other two are internal."""

    input_addr: str
    step_addr: str  # scheduler → worker
    result_addr: str  # worker → scheduler


@dataclass
class SchedulerConfig:
    args: ServerArgs
    name: str
    role: Role
    addrs: InstanceAddrs


@dataclass
class WorkerConfig:
    args: ServerArgs
    name: str
    role: Role
    addrs: InstanceAddrs
    tp_rank: int = 0  # rank 0 talks to the scheduler; the others follow it (--tp-size > 1)
    dist_init_method: str = ""  # the ranks' rendezvous: file:// in the ipc directory, tcp:// across nodes

    @property
    def process_name(self) -> str:
        return f"{self.name}-worker" if self.tp_rank == 0 else f"{self.name}-worker-tp{self.tp_rank}"

    def tensor_parallel_ranks(self, directory: str) -> list[WorkerConfig]:
        """One config per rank of ``--tp-size`` that this node runs. On one node they share a
        rendezvous file new to this start (a restarted instance must not meet its previous
        incarnation's file) in ``directory``; across nodes, rank 0's store at ``--dist-init-addr``
        (``tcp://``: rank 0 serves it, in its own process, so a restarted rank 0 serves a new one)."""
        if self.args.tp_size == 1:
            return [self]
        if self.args.nnodes > 1:
            init = f"tcp://{self.args.dist_init_addr}"
        else:
            init = "file://" + os.path.join(directory, f"{self.name}-tp-{secrets.token_hex(8)}")
        return [
            dataclasses.replace(self, tp_rank=rank, dist_init_method=init)
            for rank in self.args.node_tp_ranks()
        ]


@dataclass
class FrontendConfig:
    args: ServerArgs
    client_addr: str  # tcp://host:port, ROUTER for clients
    output_addr: str  # PULL, outputs from instances
    unified: list[str] = field(default_factory=list)  # instance input addresses
    prefill: list[str] = field(default_factory=list)
    decode: list[str] = field(default_factory=list)
    siblings: FrontendSiblings | None = None  # with --tokenizer-worker-num > 1

    @property
    def name(self) -> str:
        return numbered("frontend", 0 if self.siblings is None else self.siblings.index)


def numbered(name: str, index: int) -> str:
    """The ``index``-th of several front ends or HTTP servers: ``frontend``, ``frontend1``, ...
    (a deployment of one keeps the plain name)."""
    return name if index == 0 else f"{name}{index}"


@dataclass
class FrontendSiblings:
    """This front end's place among the ``count`` front ends of one deployment, and the directory
    where each publishes its metrics for the others (tokenizer_proc/metrics_share.py)."""

    index: int
    count: int
    metrics_dir: str


def split_host_port(addr: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[IPv6]:PORT``) of ``--dist-init-addr``; ValueError saying what is wrong.
    A wildcard host is refused: the store binds exactly where the flag says, and the other
    nodes connect there."""
    host, sep, port = addr.rpartition(":")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError(f"--dist-init-addr {addr}: an IPv6 address goes in brackets, [ADDRESS]:PORT")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--dist-init-addr must be HOST:PORT (an address of node 0, a port); got {addr!r}")
    if host in WILDCARD_HOSTS:
        raise ValueError(
            f"--dist-init-addr {addr}: give the address of node 0 the other nodes reach, not a wildcard "
            "(rank 0's store listens there only)"
        )
    return host, int(port)


def _choice(flag: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{flag} must be one of {', '.join(allowed)}; got {value!r}")


def _positive(flag: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{flag} must be a positive integer; got {value}")


def config_to_json(cfg: Any) -> str:
    return json.dumps(dataclasses.asdict(cfg))


def config_from_json(cls: type[T], text: str) -> T:
    """``cls`` from ``config_to_json``'s text, each field checked by the codec (ProtocolError)."""
    obj = json.loads(text)
    if not isinstance(obj, dict):
        raise ValueError(f"a {cls.__name__} must be a JSON object")
    return build(cls, obj)
