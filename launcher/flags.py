"""launch.py's command line: one flag per ``ServerArgs`` field, named as SGLang names them
(``--model-path``, ``--page-size``, ...), the choice lists taken from the packages that implement
them, plus the launcher's own flags (mode, peers, the HTTP API's)."""

from __future__ import annotations

import argparse
import dataclasses
import os

from launcher.supervisor import RestartPolicy
from protocol.config import DEFAULT_MODEL_PATH, WILDCARD_HOSTS, FlagChoices, Mode, ServerArgs, flag_name
from protocol.security import KEYGEN_HINT, ClusterKeys

FLAG_HELP = {
    "model_path": "local Hugging Face model directory, a .gguf file, or a packaged model's short name: "
    "smollm2-135m-instruct (the default, installed by scripts/setup.sh) or pdserve-embedded-llama (a "
    "tiny random model built in, for tests)",
    "load_format": "auto: weights from the directory; dummy: random weights of the configured shape",
    "dtype": "auto: float32 on CPU, the model's dtype (or bfloat16) on CUDA",
    "device": "auto: CUDA if present, else CPU",
    "host": "interface to bind: the front end's HTTP and ZMQ client sockets, or a prefill/decode "
    "instance's input",
    "port": "unified, pd and frontend modes: the OpenAI-compatible HTTP API's port; prefill and decode "
    "modes: the instance's input port",
    "zmq_port": "the front end's ZMQ client port (default: --port + 1); with --tokenizer-worker-num N, "
    "front end i's is --zmq-port + i; in frontend mode, instances send their outputs to the N ports "
    "after those",
    "tokenizer_worker_num": "front-end processes (tokenization, detokenization, streaming), each with "
    "its own HTTP server; all serve --port (the kernel spreads connections over them) and the "
    "metrics of every scrape cover them all; raise it when one front-end core is saturated",
    "page_size": "tokens per KV-cache page",
    "max_total_tokens": "KV pool size in tokens (overrides --mem-fraction-static)",
    "mem_fraction_static": "fraction of free device memory for the KV pool (on CPU: of a quarter of "
    "the available memory)",
    "cpu_omp_threads": "torch threads of a CPU worker (default: physical cores minus 1, or minus 2 from "
    "8 cores, at least 1; env PDSERVE_CPU_OMP_THREADS)",
    "tp_size": "tensor-parallel ranks of an instance, one worker process each (NCCL on CUDA, gloo on "
    "the CPU); the model's attention heads must divide by it; a prefill and a decode instance may "
    "differ in it (--transfer-backend zmq: the KV moves through each instance's rank 0)",
    "nnodes": "hosts the --tp-size ranks span (unified mode): start launch.py on each with the same "
    "--tp-size, --nnodes and --dist-init-addr and its own --node-rank; node R runs ranks "
    "[R*tp/nnodes, (R+1)*tp/nnodes); the nodes must share a trusted network (the group is "
    "unauthenticated)",
    "node_rank": "this host's index among --nnodes: node 0 runs the whole instance (front end, scheduler, "
    "HTTP, rank 0), the others only their ranks",
    "dist_init_addr": "HOST:PORT where rank 0 (node 0) listens for the other ranks, the same on every node; "
    "needed with --nnodes > 1; HOST must be an address of node 0 (it binds there only)",
    "chunked_prefill_size": "longest prefill chunk per step, in tokens",
    "max_prefill_tokens": "prefill tokens per step, all requests together",
    "max_running_requests": "requests decoding at once",
    "max_queued_requests": "waiting requests beyond which new ones get a queue_full error",
    "schedule_policy": "order of the waiting queue",
    "transfer_backend": "KV data plane between prefill and decode instances: zmq (host-staged, any two "
    "hosts, no extra dependency), cuda_ipc (same host, device to device), nixl (one-sided NIXL / UCX "
    "writes into the decode pool: RDMA or NVLink on GPUs, TCP on CPU; pip install 'pdserve[nixl]'), "
    "fake (tests)",
    "heartbeat_interval": "seconds between heartbeats (instances to front ends and back)",
    "heartbeat_timeout": "seconds of silence after which an instance or a front end counts as dead",
    "watchdog_timeout": "seconds a step may run before its instance counts as hung: its requests fail "
    "(internal) and it exits",
    "drain_timeout": "on SIGTERM, seconds in-flight requests get to finish (new ones are refused with "
    "shutting_down) before the rest fail; a second signal stops at once",
    "disable_radix_cache": "do not reuse KV pages of shared prefixes",
    "disable_overlap_schedule": "form each step only after the previous one returned",
    "cuda_graph_max_bs": "largest decode batch captured in a CUDA graph (default: --max-running-requests, "
    "so that no decode step runs eagerly; lower it to save capture time and graph memory)",
    "max_message_bytes": "largest frame accepted from a client or a peer",
    "cluster_key_dir": "this process's CURVE key directory (made by 'launch.py keys'): authenticates and "
    "encrypts every socket between pdserve processes; needed by --mode prefill, decode and frontend",
    "insecure": "run --mode prefill, decode or frontend over tcp:// without keys: anyone who reaches "
    "a port can read outputs and send commands (trusted networks only)",
}


# Where the command line's default is not ServerArgs' (which is for configurations built in code).
CLI_DEFAULTS = {"model_path": DEFAULT_MODEL_PATH}


def flag_choices() -> FlagChoices:
    """The names each implementing package registers. Imported here, when the flags are parsed,
    not with this module: the engine and kvtransfer registries bring torch with them."""
    from engine.layers.backend import ATTENTION_BACKENDS
    from engine.weights import LOAD_FORMATS
    from kvtransfer import BACKENDS
    from scheduler_proc.policy import POLICIES
    from tokenizer_proc.router import ROUTING_POLICIES

    return FlagChoices(
        schedule_policy=tuple(POLICIES),
        routing_policy=ROUTING_POLICIES,
        transfer_backend=tuple(BACKENDS),
        attention_backend=ATTENTION_BACKENDS,
        load_format=LOAD_FORMATS,
    )


def build_parser(choices: FlagChoices) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Launch a pdserve deployment.")
    parser.add_argument("--mode", choices=list(map(str, Mode)), default=Mode.UNIFIED, help="what to start")
    parser.add_argument("--prefill", nargs="+", default=[], metavar="ADDR",
                        help="frontend mode: input addresses of the prefill instances")
    parser.add_argument("--decode", nargs="+", default=[], metavar="ADDR",
                        help="frontend mode: input addresses of the decode instances")
    parser.add_argument("--num-prefill", type=int, default=1, help="pd mode: prefill instances")
    parser.add_argument("--num-decode", type=int, default=1, help="pd mode: decode instances")
    parser.add_argument("--max-restarts", type=int, default=RestartPolicy.max_restarts,
                        help="an instance whose scheduler or worker dies is restarted alone, with back-off "
                        "(1 s doubling to 30 s); after this many failures in a row within a minute of "
                        "its start the launcher stops the deployment (0: never restart)")
    http = parser.add_argument_group("HTTP API (unified, pd and frontend modes, on --host:--port)")
    http.add_argument("--chat-template", default=None,
                      help="a Jinja chat template file (overrides the model's)")
    http.add_argument("--api-key", default=None,
                      help="HTTP clients must send 'Authorization: Bearer KEY' (default: $PDSERVE_API_KEY)")
    allowed = choices.by_field()
    for f in dataclasses.fields(ServerArgs):
        flag, help_text = flag_name(f.name), FLAG_HELP.get(f.name)
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", help=help_text)
        else:
            default = CLI_DEFAULTS.get(f.name, f.default)
            parser.add_argument(flag, type=_flag_type(f), default=default, choices=allowed.get(f.name),
                                help=help_text)
    return parser


def _flag_type(f: dataclasses.Field) -> type:
    text = str(f.type)
    for name, kind in (("int", int), ("float", float)):
        if text.startswith(name):
            return kind
    return str


LAUNCH_ONLY = (
    "mode", "prefill", "decode", "num_prefill", "num_decode", "max_restarts",
    "chat_template", "api_key",
)


# Modes whose --host is handed to other processes to connect to (the front end's output address,
# an instance's input and KV-transfer addresses), so it must name a reachable interface.
ADVERTISED_MODES = (Mode.PREFILL, Mode.DECODE, Mode.FRONTEND)


def parse_args(argv: list[str]) -> tuple[Mode, ServerArgs, argparse.Namespace]:
    """Exits through argparse (status 2) on an unknown flag or value; raises ValueError on a
    combination of values that is not allowed."""
    choices = flag_choices()
    ns = build_parser(choices).parse_args(argv)
    ns.mode = Mode(ns.mode)
    fields = {k: v for k, v in vars(ns).items() if k not in LAUNCH_ONLY}
    args = ServerArgs(**fields)
    args.validate(choices)
    if ns.mode == Mode.FRONTEND and not (ns.prefill and ns.decode):
        raise ValueError("--mode frontend needs --prefill ADDR... and --decode ADDR...")
    if args.zmq_port is not None and ns.mode in (Mode.PREFILL, Mode.DECODE):
        raise ValueError("--zmq-port is the front end's: use it with --mode unified, pd or frontend")
    if args.tokenizer_worker_num > 1 and ns.mode in (Mode.PREFILL, Mode.DECODE):
        raise ValueError("--tokenizer-worker-num counts front ends: use it with --mode unified, pd, frontend")
    if ns.mode not in (Mode.PREFILL, Mode.DECODE) and args.port in _front_end_zmq_ports(ns.mode, args):
        raise ValueError(f"--port {args.port} is also a ZMQ port of the front end: choose another --zmq-port")
    if ns.max_restarts < 0:
        raise ValueError(f"--max-restarts must be ≥ 0, got {ns.max_restarts}")
    if args.nnodes > 1 and ns.mode != Mode.UNIFIED:
        raise ValueError(f"--nnodes {args.nnodes} is supported in --mode unified only for now")
    if ns.mode == Mode.PD and (ns.num_prefill < 1 or ns.num_decode < 1):
        raise ValueError("--num-prefill and --num-decode must be at least 1")
    if ns.mode in ADVERTISED_MODES and args.host in WILDCARD_HOSTS:
        raise ValueError(
            f"--host {args.host} binds every interface, but a --mode {ns.mode} process also gives "
            "its address to other processes to connect back to: give the address they reach this "
            "host at (e.g. --host 10.0.0.5)"
        )
    if args.cluster_key_dir is not None:  # children run from the repository root
        args.cluster_key_dir = os.path.abspath(args.cluster_key_dir)
    _check_security(ns.mode, args)
    return ns.mode, args, ns


def _front_end_zmq_ports(mode: Mode, args: ServerArgs) -> tuple[int, ...]:
    """The front ends' TCP ports beside the HTTP one: clients, and (frontend mode) outputs."""
    ports = [args.frontend_ports(i) for i in range(args.tokenizer_worker_num)]
    if mode == Mode.FRONTEND:
        return tuple(p for pair in ports for p in pair)
    return tuple(client for client, _ in ports)


def _check_security(mode: Mode, args: ServerArgs) -> None:
    """A cluster mode talks tcp:// to other processes: it needs keys, or an explicit --insecure."""
    if args.cluster_key_dir is not None and args.insecure:
        raise ValueError("give either --cluster-key-dir or --insecure, not both")
    if args.cluster_key_dir is not None:
        ClusterKeys.load(args.cluster_key_dir)  # ValueError naming the missing file
    elif mode in ADVERTISED_MODES and not args.insecure:
        raise ValueError(
            f"--mode {mode} talks to other processes over tcp://: give it --cluster-key-dir DIR "
            f"({KEYGEN_HINT}; every process of the deployment gets its own directory), or --insecure "
            "on a network where every host is trusted"
        )
