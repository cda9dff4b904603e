"""The processes the launcher starts (``Child``: one ``python -m <package>``, its stderr
forwarded and its tail kept for a start-up failure report) and how it tells that they are ready
(probes: one readiness check each, True once ready)."""

from __future__ import annotations

import collections
import itertools
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq

from protocol.config import config_to_json
from protocol.messages import StatusQuery, StatusReport
from protocol.security import ClusterKeys
from protocol.transport import bind, connect, ipc_addr, recv, send

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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

    def poll(self) -> int | None:
        return self.proc.poll()

    def terminate(self) -> None:
        self.proc.terminate()

    def kill(self) -> None:
        self.proc.kill()


def spawn(name: str, package: str, config: object, env: dict[str, str] | None = None) -> Child:
    return spawn_module(name, package, ["--config", config_to_json(config)], env)


def spawn_module(
    name: str, package: str, argv: list[str], env: dict[str, str] | None = None,
    pass_fds: tuple[int, ...] = (),
) -> Child:
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-m", package, *argv],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        pass_fds=pass_fds,
    )
    child = Child(name, proc)
    child.forwarder = threading.Thread(target=child.forward_stderr, name=f"stderr-{name}", daemon=True)
    child.forwarder.start()
    return child


def http_probe(url: str) -> Callable[[], bool]:
    import urllib.error
    import urllib.request

    def probe() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2.0) as reply:
                return reply.status == 200
        except (OSError, urllib.error.URLError):
            return False

    return probe


def frontend_probe(client_addr: str) -> Callable[[], bool]:
    from tokenizer_proc.client import Client

    client = Client(client_addr, timeout=2.0)

    def probe() -> bool:
        try:
            return bool(client.status().get("ready"))
        except TimeoutError:
            return False

    return probe


def instance_probe(input_addr: str, directory: str, keys: ClusterKeys | None) -> Callable[[], bool]:
    """Ask a standalone instance for its status (reply to our own socket) until it is ready."""
    ctx = zmq.Context.instance()
    reply_addr = ipc_addr(directory, "launch-probe")
    replies = bind(ctx, zmq.PULL, reply_addr, keys=keys)
    requests = connect(ctx, zmq.PUSH, input_addr, keys=keys)
    qids = itertools.count()

    def probe() -> bool:
        send(requests, StatusQuery(qid=next(qids), reply_to=reply_addr))
        if not replies.poll(2000):
            return False
        report = recv(replies)
        return isinstance(report, StatusReport) and report.status.ready

    return probe
