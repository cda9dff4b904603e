"""The README's HTTP examples, run as written: the deployment its `serve` block starts, then its
`curl` and `openai` blocks against it (the ports moved to free ones, nothing else changed)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import pytest

from tests import REPO_ROOT
from tests.e2e.server import running_server
from tests.ports import free_tcp_port

README_PORT = "8000"
ANSWER = "Paris"


def readme_example(name: str) -> str:
    """The fenced block right after ``<!-- README example: NAME -->``."""
    text = (REPO_ROOT / "README.md").read_text()
    match = re.search(rf"<!-- README example: {name} -->\n```\w*\n(.*?)```", text, re.S)
    assert match is not None, f"README.md has no example {name!r}"
    return match.group(1)


def launch_flags(serve: str, http_port: int) -> tuple[str, list[str]]:
    """The mode and flags of the README's ``python launch.py ...`` line."""
    argv = shlex.split(serve.replace(README_PORT, str(http_port)))
    assert argv[:2] == ["python", "launch.py"], argv
    flags = argv[2:]
    mode = flags[flags.index("--mode") + 1]
    del flags[flags.index("--mode") : flags.index("--mode") + 2]
    return mode, flags


@pytest.fixture(scope="module")
def http_port():
    try:
        import gguf  # noqa: F401

        from protocol.model_source import resolve_model

        resolve_model("smollm2-135m-instruct")
    except (ImportError, FileNotFoundError) as e:  # scripts/setup.sh installs both
        pytest.skip(f"the README's model is not installed: {e}")
    port = free_tcp_port(count=1)
    mode, flags = launch_flags(readme_example("serve"), port)
    with running_server(*flags, mode=mode):
        yield port


def test_the_curl_example_answers_the_question(http_port: int) -> None:
    command = readme_example("curl").replace(README_PORT, str(http_port))
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert ANSWER in out.stdout, out.stdout


def test_the_openai_example_streams_the_answer(http_port: int) -> None:
    code = readme_example("openai").replace(README_PORT, str(http_port))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert ANSWER in out.stdout, out.stdout
