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
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from protocol.config import (
    FrontendConfig,
    InstanceAddrs,
    SchedulerConfig,
    ServerArgs,
    WorkerConfig,
    config_to_json,
)
from protocol.transport import ipc_addr, ipc_dir

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
MODES = ("unified",)
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
    "page_size": "tokens per KV-cache page",
    "max_total_tokens": "KV pool size in tokens (overrides --mem-fraction-static)",
    "mem_fraction_static": "fraction of free device memory for the KV pool",
    "chunked_prefill_size": "longest prefill chunk per step, in tokens",
    "max_prefill_tokens": "prefill tokens per step, all requests together",
    "max_running_requests": "requests decoding at once",
    "max_queued_requests": "waiting requests beyond which new ones get a queue_full error",
    "schedule_policy": "order of the waiting queue",
    "disable_radix_cache": "do not reuse KV pages of shared prefixes",
    "disable_overlap_schedule": "form each step only after the previous one returned",
    "cuda_graph_max_bs": "largest decode batch captured in a CUDA graph",
    "max_message_bytes": "largest frame accepted from a client or a peer",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Launch a pdserve deployment.")
    parser.add_argument("--mode", choices=MODES, default="unified", help="what to start")
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


def parse_server_args(argv: list[str]) -> tuple[str, ServerArgs]:
    ns = vars(build_parser().parse_args(argv))
    mode = ns.pop("mode")
    args = ServerArgs(**ns)
    args.validate()
    return mode, args


# --------------------------------------------------------------------------------------------
# Children
# --------------------------------------------------------------------------------------------


@dataclass
class Child:
    """One supervised process; keeps the tail of its stderr to report a start-up failure."""

    name: str
    proc: subprocess.Popen
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=30))

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
    threading.Thread(target=child.forward_stderr, name=f"stderr-{name}", daemon=True).start()
    return child


@dataclass
class Deployment:
    client_addr: str
    children: list[Child]


def start_unified(args: ServerArgs) -> Deployment:
    directory = ipc_dir()
    addrs = InstanceAddrs(
        input_addr=ipc_addr(directory, "unified0-input"),
        step_addr=ipc_addr(directory, "unified0-step"),
        result_addr=ipc_addr(directory, "unified0-result"),
    )
    client_addr = f"tcp://{args.host}:{args.port}"
    frontend = FrontendConfig(
        args=args,
        client_addr=client_addr,
        output_addr=ipc_addr(directory, "frontend-output"),
        unified=[addrs.input_addr],
    )
    children = [
        spawn("worker", "engine", WorkerConfig(args=args, name="unified0", role="unified", addrs=addrs)),
        spawn(
            "scheduler",
            "scheduler_proc",
            SchedulerConfig(args=args, name="unified0", role="unified", addrs=addrs),
        ),
        spawn("frontend", "tokenizer_proc", frontend),
    ]
    return Deployment(client_addr, children)


# --------------------------------------------------------------------------------------------
# Supervision
# --------------------------------------------------------------------------------------------


class Supervisor:
    """Waits for readiness, then for a signal or a child's death, and stops everyone."""

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        self.wake = threading.Event()
        self.stop_signal: int | None = None

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_stop_signal)
        signal.signal(signal.SIGCHLD, lambda *_: self.wake.set())

    def _on_stop_signal(self, signum: int, _frame: object) -> None:
        self.stop_signal = signum
        self.wake.set()

    def dead_child(self) -> Child | None:
        return next((c for c in self.deployment.children if c.proc.poll() is not None), None)

    def wait_ready(self, timeout_s: float) -> bool:
        """True once the front end says ready; False on a signal or a dead child."""
        from tokenizer_proc.client import Client

        deadline = time.monotonic() + timeout_s
        with Client(self.deployment.client_addr, timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.stop_signal is not None or self.dead_child() is not None:
                    return False
                try:
                    if client.status().get("ready"):
                        return True
                except TimeoutError:
                    pass
                self.wake.wait(0.2)
                self.wake.clear()
        raise TimeoutError(f"the deployment was not ready within {timeout_s:.0f} s")

    def wait_until_stopped(self) -> Child | None:
        """Block until a stop signal (returns None) or a child's death (returns it)."""
        while True:
            if self.stop_signal is not None:
                return None
            dead = self.dead_child()
            if dead is not None:
                return dead
            self.wake.wait()
            self.wake.clear()

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
    print(
        f"launch: {child.name} exited with code {child.proc.returncode}; its last output:",
        file=sys.stderr,
    )
    sys.stderr.write("".join(child.tail))
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        mode, args = parse_server_args(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        print(f"launch: {e}", file=sys.stderr)
        return 2
    deployment = start_unified(args)
    supervisor = Supervisor(deployment)
    supervisor.install_signal_handlers()
    pids = " ".join(f"{c.name}={c.proc.pid}" for c in deployment.children)
    print(f"pdserve: started {mode}: {pids}", flush=True)
    try:
        if supervisor.wait_ready(timeout_s=float(os.environ.get("PDSERVE_READY_TIMEOUT", "900"))):
            print(f"pdserve ready: {mode} on {deployment.client_addr}", flush=True)
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
