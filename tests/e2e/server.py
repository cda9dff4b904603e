"""Start a real deployment with launch.py for end-to-end tests, and check it cleans up."""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from protocol.config import EMBEDDED
from protocol.security import ClusterKeys, generate
from tests import REPO_ROOT
from tests.ports import free_tcp_port
from tokenizer_proc.client import Client

READY_TIMEOUT_S = 240.0
CLUSTER_MODES = ("prefill", "decode", "frontend")  # tcp:// between processes: CURVE keys needed


@functools.cache
def e2e_key_dir() -> str:
    """One CURVE key directory for every cluster-mode process of the test session (they share
    an identity: the tests are not about which process holds which key)."""
    parent = tempfile.mkdtemp(prefix="pdserve-e2e-keys-")
    atexit.register(shutil.rmtree, parent, True)
    (directory,) = generate(parent, ["e2e"])
    return str(directory)


def e2e_keys() -> ClusterKeys:
    """The keys of ``e2e_key_dir``, for a test's own sockets to the processes it started."""
    return ClusterKeys.load(e2e_key_dir())


def key_flags(mode: str, flags: tuple[str, ...] = ()) -> list[str]:
    """``--cluster-key-dir`` for a cluster mode, unless ``flags`` choose keys or --insecure."""
    if mode not in CLUSTER_MODES or {"--cluster-key-dir", "--insecure"} & set(flags):
        return []
    return ["--cluster-key-dir", e2e_key_dir()]


@dataclass
class Server:
    addr: str  # the front end's ZMQ client address, or a standalone instance's input
    proc: subprocess.Popen
    log_path: str
    child_pids: dict[str, int] = field(default_factory=dict)
    http_url: str | None = None  # the OpenAI-compatible API (front-end modes)
    final_log: str | None = None  # the log once the deployment stopped (its file is gone)

    def client(self, timeout: float = 120.0) -> Client:
        return Client(self.addr, timeout=timeout)

    def log(self) -> str:
        if self.final_log is not None:
            return self.final_log
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def remove_log(self) -> None:
        """Keep the log in memory and delete its file (a deployment that stopped cleanly)."""
        self.final_log = self.log()
        os.unlink(self.log_path)


THREAD_ENVS = ("PDSERVE_TORCH_THREADS", "PDSERVE_CPU_OMP_THREADS")
TEST_MODEL = EMBEDDED.name  # the suite's model unless a test names one; launch's default is SmolLM2


def launch_flags(
    mode: str, flags: tuple[str, ...], model: str | None = TEST_MODEL
) -> tuple[list[str], str, str | None]:
    """launch.py's arguments for ``mode`` (free ports unless ``flags`` give ``--port`` /
    ``--zmq-port``; ``model`` unless they name one; None: launch's default), and the ZMQ address
    and HTTP URL they give."""
    argv = ["--mode", mode, *flags, *key_flags(mode, flags)]
    if model is not None and "--model-path" not in flags:
        argv += ["--model-path", model]
    host = _flag_value(flags, "--host") or "127.0.0.1"
    port = _flag_value(flags, "--port")
    if port is None:
        port = str(free_tcp_port())
        argv += ["--port", port]
    if mode in ("prefill", "decode"):
        return argv, f"tcp://{host}:{port}", None
    zmq_port = _flag_value(flags, "--zmq-port")
    if zmq_port is None:
        zmq_port = str(free_tcp_port())
        argv += ["--zmq-port", zmq_port]
    return argv, f"tcp://{host}:{zmq_port}", f"http://{host}:{port}"


def _flag_value(flags: tuple[str, ...], flag: str) -> str | None:
    return flags[flags.index(flag) + 1] if flag in flags else None


def _wait_for_line(proc: subprocess.Popen, prefix: str, timeout: float, lines: list[str]) -> str:
    found: list[str] = []
    done = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(prefix):
                found.append(line)
                done.set()
                return
        done.set()

    threading.Thread(target=read, daemon=True).start()
    timed_out = not done.wait(timeout)
    if not found:
        why = f"within {timeout:.0f} s" if timed_out else "before it closed its output"
        raise RuntimeError(f"no {prefix!r} line from launch.py {why}; stdout: {lines}")
    return found[0]


def _parse_pids(started_line: str) -> dict[str, int]:
    # "pdserve: started unified: worker=123 scheduler=124 frontend=125"
    pairs = started_line.strip().split(": ", 2)[-1].split()
    return {name: int(pid) for name, pid in (p.split("=") for p in pairs)}


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone before the open, or during the read
        return False


def launch_env(one_thread: bool = True) -> dict[str, str]:
    """launch.py's environment: this one's, unbuffered, one torch thread per worker unless not
    ``one_thread`` (then the workers' own default)."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_ENVS}
    return env | {"PYTHONUNBUFFERED": "1"} | ({"PDSERVE_TORCH_THREADS": "1"} if one_thread else {})


@contextlib.contextmanager
def running_server(
    *flags: str,
    mode: str = "unified",
    model: str | None = TEST_MODEL,
    prefix: tuple[str, ...] = (),
    one_thread: bool = True,
) -> Iterator[Server]:
    """A deployment started by launch.py (``prefix`` goes before the command, e.g. ``ip netns
    exec NS``; ``one_thread``: one torch thread per worker, else the workers' own default); on
    exit it is stopped with SIGTERM and every process it started must be gone."""
    argv, addr, http_url = launch_flags(mode, flags, model)
    fd, log_path = tempfile.mkstemp(prefix="pdserve-e2e-", suffix=".log")
    cmd = [*prefix, sys.executable, "launch.py", *argv]
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=launch_env(one_thread), stdout=subprocess.PIPE, stderr=fd, text=True,
        start_new_session=True,
    )
    os.close(fd)
    lines: list[str] = []
    server = Server(addr, proc, log_path, http_url=http_url)
    try:
        server.child_pids = _parse_pids(_wait_for_line(proc, "pdserve: started", 60, lines))
        _wait_for_line(proc, "pdserve ready", READY_TIMEOUT_S, lines)
        yield server
    except BaseException:
        sys.stderr.write(f"{server.log()[-5000:]}\n(the whole log: {log_path})\n")
        raise
    finally:
        stop_server(server)
    server.remove_log()  # only once it stopped cleanly: a failure's log stays for a look


def launch_to_exit(
    *flags: str, mode: str = "unified", model: str | None = TEST_MODEL, timeout: float = READY_TIMEOUT_S
) -> subprocess.CompletedProcess:
    """Run launch.py until it exits by itself (a refused start-up): its exit code and output.
    It runs in a session of its own, which is killed afterwards, so that no process it started
    outlives the test, past ``timeout`` either (the test then fails)."""
    argv, _, _ = launch_flags(mode, flags, model)
    proc = subprocess.Popen(
        [sys.executable, "launch.py", *argv], cwd=REPO_ROOT, env=launch_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        raise AssertionError(f"launch.py ran past {timeout} s; its output ends:\n{err[-5000:]}") from None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever it left behind
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@contextlib.contextmanager
def started_together(*servers: contextlib.AbstractContextManager[Server]) -> Iterator[list[Server]]:
    """Start ``servers`` at once (each on a thread), and stop them at once on exit."""
    e2e_key_dir()  # made once, before the threads: each would make its own (the cache is not locked)
    with ThreadPoolExecutor(len(servers)) as pool:
        started = [pool.submit(cm.__enter__) for cm in servers]
        try:
            yield [f.result() for f in started]
        finally:
            exc = sys.exc_info()  # each server logs its end on the way out of a failure
            running = [cm for cm, f in zip(servers, started, strict=True) if f.exception() is None]
            for stop in [pool.submit(cm.__exit__, *exc) for cm in running]:
                stop.result()


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
    try:
        server.proc.wait(60)
    except subprocess.TimeoutExpired:
        dump_stacks(server)
        os.killpg(server.proc.pid, signal.SIGKILL)
        raise AssertionError(
            f"launch.py did not stop within 60 s of SIGTERM; the end of its log:\n{server.log()[-20000:]}"
        ) from None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(pid_alive(p) for p in server.child_pids.values()):
        time.sleep(0.1)
    orphans = {n: p for n, p in server.child_pids.items() if pid_alive(p)}
    for pid in orphans.values():
        os.kill(pid, signal.SIGKILL)
    assert not orphans, f"processes left behind after SIGTERM: {orphans}"


def dump_stacks(server: Server) -> None:
    """Every pdserve process prints its threads' stacks on SIGUSR1 (to the log, via launch)."""
    for pid in [server.proc.pid, *server.child_pids.values()]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGUSR1)
    time.sleep(2.0)  # the stacks pass through launch's stderr forwarders


def wait_no_leak(client: Client, timeout: float = 30.0) -> dict:
    """Poll status until no request is live and free + cached pages equal the total."""
    deadline = time.monotonic() + timeout
    while True:
        status = client.status()
        clean = all(
            inst["pending"] + inst["prefilling"] + inst["transferring"] + inst["decoding"] == 0
            and inst["free_pages"] + inst["cached_pages"] == inst["total_pages"]
            for inst in status["instances"]
        )
        if clean:
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"requests or pages leaked: {status}")
        time.sleep(0.1)


@dataclass(frozen=True)
class ProcUsage:
    """What a process holds: resident memory (VmRSS, KiB) and open file descriptors."""

    rss_kib: int
    fds: int


def proc_usage(pid: int) -> ProcUsage:
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return ProcUsage(rss, len(os.listdir(f"/proc/{pid}/fd")))


def kv_sender_addr(server: Server) -> str:
    """The KV sender address of a prefill instance, as its worker logs it when ready."""
    match = re.search(r"KV sender at (\S+)", server.log())
    assert match, "the prefill worker logged no KV sender address"
    return match.group(1)


def frontend_output_addr(server: Server) -> str:
    """Where a ``--mode frontend`` front end takes its instances' messages: its port + 1."""
    host, port = server.addr.rsplit(":", 1)
    return f"{host}:{int(port) + 1}"
