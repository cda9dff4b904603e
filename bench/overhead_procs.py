"""The multi-process rows of ``bench/overhead.py``: the front end alone (a fake instance streams
to it as fast as it takes tokens) and a whole deployment (real front end, real scheduler, a
fake GPU worker that sleeps a fixed time per step). Every process is started here and stopped
before returning; CPU times are read from /proc.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field

import msgpack
import zmq

from bench.overhead_fakes import ProducerSpec, WorkerSpec
from protocol.config import (
    FrontendConfig,
    FrontendSiblings,
    InstanceAddrs,
    SchedulerConfig,
    ServerArgs,
    config_to_json,
)

START_TIMEOUT_S = 60.0
FINISH_TIMEOUT_S = 300.0
PAGE_SIZE = 16


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Processes:
    """Children started with ``python -m``; all stopped (terminated, then killed) on exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, module: str, *args: str) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=os.getcwd(), OMP_NUM_THREADS="1")
        proc = subprocess.Popen([sys.executable, "-m", module, *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.procs.append(proc)
        return proc

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            if proc.stderr is not None:
                proc.stderr.close()


@dataclass
class Clients:
    """``count`` streaming requests over a few DEALER sockets, connected in turn to each address
    of ``addrs`` (one per front end); collects every reply."""

    addrs: list[str]
    sockets: int
    ctx: zmq.Context = field(default_factory=zmq.Context)
    socks: list[zmq.Socket] = field(default_factory=list)
    tokens: dict[str, int] = field(default_factory=dict)
    finish: dict[str, str] = field(default_factory=dict)
    errors: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        for i in range(max(self.sockets, len(self.addrs))):
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.addrs[i % len(self.addrs)])
            self.socks.append(sock)

    def wait_ready(self) -> None:
        """Until every front end (the first socket to each) says it is ready."""
        deadline = time.monotonic() + START_TIMEOUT_S
        for sock in self.socks[:len(self.addrs)]:
            while not self._ready(sock):
                if time.monotonic() > deadline:
                    raise TimeoutError("the deployment did not become ready")
                time.sleep(0.1)

    @staticmethod
    def _ready(sock: zmq.Socket) -> bool:
        sock.send(msgpack.packb({"type": "status", "rid": uuid.uuid4().hex}))
        return bool(sock.poll(1000)) and bool(msgpack.unpackb(sock.recv()).get("ready"))

    def status(self) -> dict:
        self.socks[0].send(msgpack.packb({"type": "status", "rid": "final-status"}))
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.socks[0].poll(1000):
                reply = msgpack.unpackb(self.socks[0].recv())
                if reply.get("rid") == "final-status":
                    return reply
        raise TimeoutError("no status reply")

    def submit(self, count: int, prompt: list[int], max_new_tokens: int, batch_outputs: bool = False) -> None:
        for i in range(count):
            rid = f"c{i}"
            self.tokens[rid] = 0
            msg = {"type": "generate", "rid": rid, "input_ids": prompt, "stream": True,
                   "sampling_params": {"max_new_tokens": max_new_tokens, "ignore_eos": True}}
            if batch_outputs:
                msg["batch_outputs"] = True
            self.socks[i % len(self.socks)].send(msgpack.packb(msg))

    def collect(self) -> None:
        poller = zmq.Poller()
        for sock in self.socks:
            poller.register(sock, zmq.POLLIN)
        deadline = time.monotonic() + FINISH_TIMEOUT_S
        while len(self.finish) + len(self.errors) < len(self.tokens):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.tokens) - len(self.finish)} requests unfinished")
            for sock, _ in poller.poll(1000):
                while True:
                    try:
                        frame = msgpack.unpackb(sock.recv(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                    for msg in frame["outputs"] if frame.get("type") == "outputs" else [frame]:
                        self._take(msg)

    def _take(self, msg: dict) -> None:
        if msg.get("rid") not in self.tokens:
            return  # a late status reply
        if msg.get("type") == "error":
            self.errors.append(msg)
            return
        self.tokens[msg["rid"]] += len(msg["token_ids"])
        if msg["finished"]:
            self.finish[msg["rid"]] = msg["finish_reason"]

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        self.ctx.term()


def _frontend_config(tmp: str, instance_addr: str, index: int = 0, count: int = 1) -> FrontendConfig:
    """Front end ``index`` of ``count`` (they share their metrics, as launch.py's do)."""
    args = ServerArgs(heartbeat_interval=0.2, heartbeat_timeout=30.0)
    siblings = FrontendSiblings(index, count, tmp) if count > 1 else None
    return FrontendConfig(args=args, client_addr=f"ipc://{tmp}/clients{index}",
                          output_addr=f"ipc://{tmp}/outputs{index}", unified=[instance_addr],
                          siblings=siblings)


# ------------------------------------------------------------------------------------ front end


@dataclass
class FrontendResult:
    clients: int
    connections: int
    batch_outputs: bool
    tokens: int  # delivered to clients
    cpu_s: float  # the front ends' CPU time while streaming them, all together
    us_per_token: float
    tokens_per_s_per_core: float
    frontends: int = 1


def measure_frontend(clients: int = 256, tokens: int = 200, connections: int | None = None,
                     batch_outputs: bool = False, frontends: int = 1) -> FrontendResult:
    """``clients`` streaming requests over ``connections`` client connections (default: one
    each, up to 256) spread over ``frontends`` front-end processes, each asking for
    ``batch_outputs`` or not; the front ends' CPU per token. The fake instance sends every step
    to every front end, as an instance does: each keeps its own requests' rows."""
    with tempfile.TemporaryDirectory(prefix="pdserve-overhead-") as tmp, Processes() as procs:
        instance = f"ipc://{tmp}/instance"
        producer = ProducerSpec(input_addr=instance, clients=clients, tokens=tokens, frontends=frontends)
        procs.start("bench.overhead_fakes", "producer", "--config", json.dumps(asdict(producer)))
        configs = [_frontend_config(tmp, instance, i, frontends) for i in range(frontends)]
        pids = [procs.start("tokenizer_proc", "--config", config_to_json(cfg)).pid for cfg in configs]
        conn = Clients([cfg.client_addr for cfg in configs], sockets=connections or min(clients, 256))
        try:
            conn.wait_ready()
            start = sum(map(process_cpu_s, pids))
            conn.submit(clients, [1, 2, 3], tokens, batch_outputs)
            conn.collect()
            cpu = sum(map(process_cpu_s, pids)) - start
        finally:
            conn.close()
        delivered = sum(conn.tokens.values())
        if conn.errors or delivered != clients * tokens:
            why = f"{delivered} of {clients * tokens} tokens, errors {conn.errors[:3]}"
            raise RuntimeError(f"front end bench: {why}")
        per_token = cpu / delivered  # 0: too short a run for /proc's clock ticks (not a result)
        rate = 1 / per_token if per_token else math.nan
        return FrontendResult(clients, len(conn.socks), batch_outputs, delivered, cpu, per_token * 1e6, rate,
                              frontends)


# ------------------------------------------------------------------------------------ deployment


@dataclass
class DeploymentResult:
    running: int
    step_ms: float
    requests: int
    tokens: int
    full_steps: int  # steps with (nearly) every request decoding: where idle time is measured
    max_batch: int  # the most decode rows of one step
    gpu_idle_pct: float
    scheduler_cpu_ms_per_step: float
    leak_free: bool
    token_counts_right: bool


def measure_deployment(running: int = 512, step_ms: float = 10.0, tokens: int = 100,
                       prompt_len: int = 32) -> DeploymentResult:
    """``running`` streaming requests of ``tokens`` tokens each through a real front end and
    scheduler to a fake GPU worker; GPU idle % over the steps where the batch is full."""
    with tempfile.TemporaryDirectory(prefix="pdserve-overhead-") as tmp, Processes() as procs:
        addrs = InstanceAddrs(f"ipc://{tmp}/input", f"ipc://{tmp}/step", f"ipc://{tmp}/result")
        pages = running * -(-(prompt_len + tokens) // PAGE_SIZE) + 64
        worker = WorkerSpec(addrs.step_addr, addrs.result_addr, f"{tmp}/steps.json", step_ms, pages,
                            PAGE_SIZE, running)
        args = ServerArgs(page_size=PAGE_SIZE, max_running_requests=running, chunked_prefill_size=8192,
                          max_prefill_tokens=16384, heartbeat_interval=0.2, heartbeat_timeout=30.0)
        sched_cfg = SchedulerConfig(args=args, name="inst0", role="unified", addrs=addrs)
        procs.start("bench.overhead_fakes", "worker", "--config", json.dumps(asdict(worker)))
        scheduler = procs.start("scheduler_proc", "--config", config_to_json(sched_cfg))
        procs.start("tokenizer_proc", "--config", config_to_json(_frontend_config(tmp, addrs.input_addr)))
        conn = Clients([f"ipc://{tmp}/clients0"], sockets=16)
        try:
            conn.wait_ready()
            start = process_cpu_s(scheduler.pid)
            conn.submit(running, list(range(1, prompt_len + 1)), tokens)
            conn.collect()
            sched_cpu = process_cpu_s(scheduler.pid) - start
            status = conn.status()
        finally:
            conn.close()
        _shutdown(addrs.input_addr)
        scheduler.wait(30)
        deadline = time.monotonic() + 30
        while not os.path.exists(worker.report) and time.monotonic() < deadline:
            time.sleep(0.05)
        with open(worker.report) as f:
            record = json.load(f)
    full = [i for i, rows in enumerate(record["rows"]) if rows >= running * 0.95]
    waits = sum(record["waits"][i] for i in full)
    busy = sum(record["busy"][i] for i in full)
    insts = status.get("instances", [])
    leak_free = bool(insts) and all(
        i["free_pages"] + i["cached_pages"] == i["total_pages"] and i["decoding"] == 0 and i["pending"] == 0
        for i in insts
    )
    return DeploymentResult(
        running=running,
        step_ms=step_ms,
        requests=len(conn.finish),
        tokens=sum(conn.tokens.values()),
        full_steps=len(full),
        max_batch=max(record["rows"], default=0),
        gpu_idle_pct=100.0 * waits / (waits + busy) if full else float("nan"),
        scheduler_cpu_ms_per_step=1e3 * sched_cpu / max(len(record["rows"]), 1),
        leak_free=leak_free,
        token_counts_right=not conn.errors and all(n == tokens for n in conn.tokens.values())
        and all(r == "length" for r in conn.finish.values()),
    )


def _shutdown(input_addr: str) -> None:
    """Stop the instance as the launcher does: a Shutdown on its private input."""
    from protocol import transport
    from protocol.messages import Shutdown

    ctx = zmq.Context()
    sock = transport.connect(ctx, zmq.PUSH, input_addr)
    transport.send(sock, Shutdown(reason="bench done"))
    sock.close(linger=2000)
    ctx.term()
