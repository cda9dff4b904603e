"""The README's examples, run as written: the deployment its `serve` block starts (the default
model, SmolLM2-135M-Instruct), then its `cli`, `zmq`, `curl` and `openai` blocks against it (the
ports moved to free ones, nothing else changed)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests import REPO_ROOT
from tests.e2e.server import Server, running_server

README_PORTS = ("30000", "30001")  # the README's HTTP and ZMQ ports
ANSWER = "Paris"


def readme_example(name: str) -> str:
    """The fenced block right after ``<!-- README example: NAME -->``."""
    text = (REPO_ROOT / "README.md").read_text()
    match = re.search(rf"<!-- README example: {name} -->\n```\w*\n(.*?)```", text, re.S)
    assert match is not None, f"README.md has no example {name!r}"
    return match.group(1)


def serve_flags(serve: str) -> tuple[str, list[str]]:
    """The mode and flags of the README's ``python launch.py ...`` line (comments dropped)."""
    argv = shlex.split(serve, comments=True)
    assert argv[:2] == ["python", "launch.py"], argv
    flags = argv[2:]
    if "--mode" not in flags:
        return "unified", flags
    at = flags.index("--mode")
    return flags[at + 1], flags[:at] + flags[at + 2 :]


def on_ports(example: str, server: Server) -> str:
    """``example`` with the README's ports replaced by the test deployment's."""
    assert server.http_url is not None
    http_port, zmq_port = server.http_url.rsplit(":", 1)[1], server.addr.rsplit(":", 1)[1]
    return example.replace(README_PORTS[0], http_port).replace(README_PORTS[1], zmq_port)


def run_example(argv: list[str]) -> str:
    """Run a README command with this interpreter's environment first on PATH (`python` in
    the README is it); its output."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    out = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def server():
    try:
        import gguf  # noqa: F401

        from protocol.model_source import resolve_model

        resolve_model("smollm2-135m-instruct")
    except (ImportError, FileNotFoundError) as e:  # scripts/setup.sh installs both
        pytest.skip(f"the README's model is not installed: {e}")
    mode, flags = serve_flags(readme_example("serve"))
    with running_server(*flags, mode=mode, model=None) as server:
        yield server


def test_the_curl_example_answers_the_question(server: Server) -> None:
    assert ANSWER in run_example(["bash", "-c", on_ports(readme_example("curl"), server)])


def test_the_openai_example_streams_the_answer(server: Server) -> None:
    assert ANSWER in run_example([sys.executable, "-c", on_ports(readme_example("openai"), server)])


def test_the_cli_example_generates_and_reports_status(server: Server) -> None:
    out = run_example(["bash", "-c", "set -e\n" + on_ports(readme_example("cli"), server)])
    assert ANSWER in out, out
    assert '"ready": true' in out, out


def test_the_zmq_example_generates_streams_and_polls(server: Server) -> None:
    out = run_example([sys.executable, "-c", on_ports(readme_example("zmq"), server)])
    assert out.count("\n") >= 2, out
    assert "finish_reason" in out or "token_ids" in out, out
