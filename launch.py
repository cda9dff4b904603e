"""Start a pdserve deployment: ``python launch.py --mode unified [flags]``.

The launcher only supervises: it starts every role as its own Python process (``python -m
<package> --config <json>``), waits until the front end reports ready, prints the address,
and from then on waits for a signal or a child's death. Ctrl-C / SIGTERM stop every child; a
child that dies makes the launcher stop the rest and exit non-zero with that child's error.
Children run in their own session (so a terminal's Ctrl-C reaches only the launcher) and die
with it if it is killed outright (PR_SET_PDEATHSIG, see protocol/process.py).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq

from protocol.config import (
    FrontendConfig,
    InstanceAddrs,
    SchedulerConfig,
    ServerArgs,
    WorkerConfig,
    config_to_json,
)
from protocol.messages import StatusQuery, StatusReport
from protocol.process import SignalWakeup, dump_stacks_on_sigusr1
from protocol.transport import bind, connect, ipc_addr, ipc_dir, recv, send

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
MODES = ("unified", "prefill", "decode", "frontend", "pd")
STOP_GRACE_S = 10.0

logger = logging.getLogger("pdserve.launch")


# --------------------------------------------------------------------------------------------
# Flags: one per ServerArgs field, named as SGLang names them (--model-path, --page-size, ...)
# --------------------------------------------------------------------------------------------


FLAG_HELP = {
    "model_path": "local Hugging Face model directory; omit to serve the embedded default model",
    "load_format": "auto: weights from the directory; dummy: random weights of the configured shape",
    "dtype": "auto: float32 on CPU, the model's dtype (or bfloat16) on CUDA",
    "device": "auto: CUDA if present, else CPU",
    "host": "interface to bind: the front end's client socket, or a prefill/decode instance's input",
    "port": "the front end's client port (in frontend mode instances send outputs to port + 1), "
    "or a prefill/decode instance's input port",
    "page_size": "tokens per KV-cache page",
    "max_total_tokens": "KV pool size in tokens (overrides --mem-fraction-static)",
    "mem_fraction_static": "fraction of free device memory for the KV pool",
    "chunked_prefill_size": "longest prefill chunk per step, in tokens",
    "max_prefill_tokens": "prefill tokens per step, all requests together",
    "max_running_requests": "requests decoding at once",
    "max_queued_requests": "waiting requests beyond which new ones get a queue_full error",
    "schedule_policy": "order of the waiting queue",
    "heartbeat_interval": "seconds between heartbeats (instances to front ends and back)",
    "heartbeat_timeout": "seconds of silence after which an instance or a front end counts as dead",
    "disable_radix_cache": "do not reuse KV pages of shared prefixes",
    "disable_overlap_schedule": "form each step only after the previous one returned",
    "cuda_graph_max_bs": "largest decode batch captured in a CUDA graph",
    "max_message_bytes": "largest frame accepted from a client or a peer",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Launch a pdserve deployment.")
    parser.add_argument("--mode", choices=MODES, default="unified", help="what to start")
    parser.add_argument("--prefill", nargs="+", default=[], metavar="ADDR",
                        help="frontend mode: input addresses of the prefill instances")
    parser.add_argument("--decode", nargs="+", default=[], metavar="ADDR",
                        help="frontend mode: input addresses of the decode instances")
    parser.add_argument("--num-prefill", type=int, default=1, help="pd mode: prefill instances")
    parser.add_argument("--num-decode", type=int, default=1, help="pd mode: decode instances")
    for f in dataclasses.fields(ServerArgs):
        flag = "--" + f.name.replace("_", "-")
        help_text = FLAG_HELP.get(f.name)
        if f.type in ("bool", bool):
            parser.add_argument(flag, action="store_true", help=help_text)
        else:
            parser.add_argument(flag, type=_flag_type(f), default=f.default, help=help_text)
    return parser


def _flag_type(f: dataclasses.Field) -> type:
    text = str(f.type)
    for name, kind in (("int", int), ("float", float)):
        if text.startswith(name):
            return kind
    return str


LAUNCH_ONLY = ("mode", "prefill", "decode", "num_prefill", "num_decode")


# Modes whose --host is handed to other processes to connect to (the front end's output address,
# an instance's input and KV-transfer addresses), so it must name a reachable interface.
ADVERTISED_MODES = ("prefill", "decode", "frontend")
WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "*")


def parse_args(argv: list[str]) -> tuple[str, ServerArgs, argparse.Namespace]:
    ns = build_parser().parse_args(argv)
    fields = {k: v for k, v in vars(ns).items() if k not in LAUNCH_ONLY}
    args = ServerArgs(**fields)
    args.validate()
    if ns.mode == "frontend" and not (ns.prefill and ns.decode):
        raise ValueError("--mode frontend needs --prefill ADDR... and --decode ADDR...")
    if ns.mode == "pd" and (ns.num_prefill < 1 or ns.num_decode < 1):
        raise ValueError("--num-prefill and --num-decode must be at least 1")
    if ns.mode in ADVERTISED_MODES and args.host in WILDCARD_HOSTS:
        raise ValueError(
            f"--host {args.host} binds every interface, but a --mode {ns.mode} process also gives "
            "its address to other processes to connect back to: give the address they reach this "
            "host at (e.g. --host 10.0.0.5)"
        )
    return ns.mode, args, ns


# --------------------------------------------------------------------------------------------
# Children
# --------------------------------------------------------------------------------------------


@dataclass
class Child:
    """One supervised process; keeps the tail of its stderr to report a start-up failure."""

    name: str
    proc: subprocess.Popen
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=30))
    forwarder: threading.Thread | None = None

    def forward_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace")
            self.tail.append(line)
            sys.stderr.write(line)
            sys.stderr.flush()


def spawn(name: str, package: str, config: object) -> Child:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-m", package, "--config", config_to_json(config)],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    child = Child(name, proc)
    child.forwarder = threading.Thread(target=child.forward_stderr, name=f"stderr-{name}", daemon=True)
    child.forwarder.start()
    return child


@dataclass
class Deployment:
    """What a mode started: its children, and how to tell when it is ready."""

    mode: str
    address: str  # what the deployment serves on (a front end's or an instance's address)
    children: list[Child]
    probe: Callable[[], bool]  # one readiness check; True once ready


WORKER_PACKAGES = {"unified": "engine", "prefill": "prefill_worker", "decode": "decode_worker"}


def start_instance(args: ServerArgs, name: str, role: str, input_addr: str, directory: str) -> list[Child]:
    """One instance: its worker and its scheduler."""
    addrs = InstanceAddrs(
        input_addr=input_addr,
        step_addr=ipc_addr(directory, f"{name}-step"),
        result_addr=ipc_addr(directory, f"{name}-result"),
    )
    worker = WorkerConfig(args=args, name=name, role=role, addrs=addrs)
    scheduler = SchedulerConfig(args=args, name=name, role=role, addrs=addrs)
    return [
        spawn(f"{name}-worker", WORKER_PACKAGES[role], worker),
        spawn(f"{name}-scheduler", "scheduler_proc", scheduler),
    ]


def start_frontend(
    args: ServerArgs, output_addr: str, unified: list[str], prefill: list[str], decode: list[str]
) -> tuple[str, Child]:
    client_addr = f"tcp://{args.host}:{args.port}"
    cfg = FrontendConfig(
        args=args,
        client_addr=client_addr,
        output_addr=output_addr,
        unified=unified,
        prefill=prefill,
        decode=decode,
    )
    return client_addr, spawn("frontend", "tokenizer_proc", cfg)


def start(mode: str, args: ServerArgs, ns: argparse.Namespace) -> Deployment:
    directory = ipc_dir()
    if mode in ("prefill", "decode"):
        addr = f"tcp://{args.host}:{args.port}"
        # Named by address: instances of one deployment start from separate launches.
        children = start_instance(args, f"{mode}@{args.host}:{args.port}", mode, addr, directory)
        return Deployment(mode, addr, children, instance_probe(addr, directory))
    unified: list[str] = []
    prefill: list[str] = list(ns.prefill)
    decode: list[str] = list(ns.decode)
    children: list[Child] = []
    if mode == "unified":
        unified = [ipc_addr(directory, "unified0-input")]
        children += start_instance(args, "unified0", "unified", unified[0], directory)
    elif mode == "pd":
        prefill = [ipc_addr(directory, f"prefill{i}-input") for i in range(ns.num_prefill)]
        decode = [ipc_addr(directory, f"decode{i}-input") for i in range(ns.num_decode)]
        for i, addr in enumerate(prefill):
            children += start_instance(args, f"prefill{i}", "prefill", addr, directory)
        for i, addr in enumerate(decode):
            children += start_instance(args, f"decode{i}", "decode", addr, directory)
    # Instances on other hosts send their outputs back over TCP, beside the client port;
    # a deployment that launch starts whole stays on this host and uses ipc.
    if mode == "frontend":
        output_addr = f"tcp://{args.host}:{args.port + 1}"
    else:
        output_addr = ipc_addr(directory, "frontend-output")
    client_addr, frontend = start_frontend(args, output_addr, unified, prefill, decode)
    return Deployment(mode, client_addr, [*children, frontend], frontend_probe(client_addr))


def frontend_probe(client_addr: str) -> Callable[[], bool]:
    from tokenizer_proc.client import Client

    client = Client(client_addr, timeout=2.0)

    def probe() -> bool:
        try:
            return bool(client.status().get("ready"))
        except TimeoutError:
            return False

    return probe


def instance_probe(input_addr: str, directory: str) -> Callable[[], bool]:
    """Ask a standalone instance for its status (reply to our own socket) until it is ready."""
    ctx = zmq.Context.instance()
    reply_addr = ipc_addr(directory, "launch-probe")
    replies = bind(ctx, zmq.PULL, reply_addr)
    requests = connect(ctx, zmq.PUSH, input_addr)
    qids = itertools.count()

    def probe() -> bool:
        send(requests, StatusQuery(qid=next(qids), reply_to=reply_addr))
        if not replies.poll(2000):
            return False
        report = recv(replies)
        return isinstance(report, StatusReport) and report.status.ready

    return probe


# --------------------------------------------------------------------------------------------
# Supervision
# --------------------------------------------------------------------------------------------


SIGNAL_CHECK_S = 0.5  # longest wait between checks of the children


class Supervisor:
    """Waits for readiness, then for a signal or a child's death, and stops everyone."""

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        self.stop_signal: int | None = None
        self.wakeup = SignalWakeup()

    def install_signal_handlers(self) -> None:
        self.wakeup.install()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_stop_signal)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so that it wakes the wait

    def _on_stop_signal(self, signum: int, _frame: object) -> None:
        self.stop_signal = signum

    def dead_child(self) -> Child | None:
        return next((c for c in self.deployment.children if c.proc.poll() is not None), None)

    def wait_ready(self, timeout_s: float) -> bool:
        """True once the deployment says ready; False on a signal or a dead child."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.stop_signal is not None or self.dead_child() is not None:
                return False
            if self.deployment.probe():
                return True
            self.wakeup.wait(0.2)
        raise TimeoutError(f"the deployment was not ready within {timeout_s:.0f} s")

    def wait_until_stopped(self) -> Child | None:
        """Block until a stop signal (returns None) or a child's death (returns it)."""
        while True:
            if self.stop_signal is not None:
                return None
            dead = self.dead_child()
            if dead is not None:
                return dead
            self.wakeup.wait(SIGNAL_CHECK_S)

    def stop_all(self) -> None:
        children = self.deployment.children
        for child in children:
            if child.proc.poll() is None:
                child.proc.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for child in children:
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop within %.0f s; killing it", child.name, STOP_GRACE_S)
                child.proc.kill()
                child.proc.wait()


def report_failure(child: Child) -> None:
    if child.forwarder is not None:
        child.forwarder.join(timeout=5.0)  # the child has exited: its stderr is about to end
    print(
        f"launch: {child.name} exited with code {child.proc.returncode}; its last output:",
        file=sys.stderr,
    )
    sys.stderr.write("".join(child.tail))
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        mode, args, ns = parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        print(f"launch: {e}", file=sys.stderr)
        return 2
    deployment = start(mode, args, ns)
    supervisor = Supervisor(deployment)
    supervisor.install_signal_handlers()
    dump_stacks_on_sigusr1()
    pids = " ".join(f"{c.name}={c.proc.pid}" for c in deployment.children)
    print(f"pdserve: started {mode}: {pids}", flush=True)
    try:
        if supervisor.wait_ready(timeout_s=float(os.environ.get("PDSERVE_READY_TIMEOUT", "900"))):
            print(f"pdserve ready: {mode} on {deployment.address}", flush=True)
            dead = supervisor.wait_until_stopped()
        else:
            dead = supervisor.dead_child()
    except TimeoutError as e:
        print(f"launch: {e}", file=sys.stderr)
        supervisor.stop_all()
        return 1
    supervisor.stop_all()
    if dead is not None:
        report_failure(dead)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
