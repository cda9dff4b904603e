"""Fixtures of the HTTP server's tests: one real unified deployment of the embedded model (started
by launch.py, as the end-to-end tests do) with the HTTP server in front of it, shared by the
tests of this package; HTTP servers in front of fake front ends; the test chat template."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from protocol.config import EMBEDDED
from tests.e2e.server import REPO_ROOT, Server, running_server, wait_no_leak
from tests.fakes.api import FakeFrontend
from tests.ports import free_tcp_port
from tokenizer_proc.client import Client

MODEL = EMBEDDED.name
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
START_TIMEOUT_S = 60.0


@dataclass
class ApiProcess:
    base_url: str
    proc: subprocess.Popen
    log_path: str

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")


@contextlib.contextmanager
def running_api(frontend_addr: str, *flags: str) -> Iterator[ApiProcess]:
    """``python -m api_server`` in front of ``frontend_addr``, stopped (SIGTERM) on exit."""
    port = free_tcp_port(count=1)
    fd, log_path = tempfile.mkstemp(prefix="pdserve-api-", suffix=".log")
    cmd = [sys.executable, "-m", "api_server", "--frontend-addr", frontend_addr, "--port", str(port),
           "--log-level", "warning", *flags]
    if "--model-path" not in flags:
        cmd += ["--model-path", MODEL]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=fd, stderr=fd, start_new_session=True)
    os.close(fd)
    api = ApiProcess(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        _wait_listening(api)
        yield api
    except BaseException:
        sys.stderr.write(api.log()[-5000:])
        raise
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            raise AssertionError(f"the API server did not stop on SIGTERM:\n{api.log()[-5000:]}") from None
        os.unlink(log_path)


def _wait_listening(api: ApiProcess) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            httpx.get(api.base_url + "/v1/models", timeout=5)
            return
        except httpx.TransportError:
            if api.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the API server did not start:\n{api.log()[-5000:]}") from None
            time.sleep(0.05)


@pytest.fixture(scope="session")
def template_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("api") / "chat.jinja"
    path.write_text(TEMPLATE)
    return path


@pytest.fixture(scope="session")
def deployment() -> Iterator[Server]:
    with running_server("--dtype", "float32") as server:
        yield server


@pytest.fixture(scope="session")
def api(deployment: Server, template_file: Path) -> Iterator[ApiProcess]:
    with running_api(deployment.addr, "--chat-template", str(template_file)) as proc:
        yield proc


@pytest.fixture()
def zmq_client(deployment: Server) -> Iterator[Client]:
    """The deployment's own ZMQ client; every test using it ends with nothing live or leaked."""
    with deployment.client() as client:
        yield client
        wait_no_leak(client)


@pytest.fixture()
def http(api: ApiProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api.base_url, timeout=60) as client:
        yield client


@pytest.fixture()
def fake_frontend() -> Iterator[FakeFrontend]:
    with FakeFrontend() as fake:
        yield fake
