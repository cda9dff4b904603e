"""Process lifetime: a worker process dies with its parent (protocol.process)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests import REPO_ROOT

CHILD = (
    "import time; from protocol.process import die_with_parent; "
    "die_with_parent(); print('armed', flush=True); time.sleep(60)"
)
# The parent starts the child, waits until it is armed, prints its pid, and exits.
PARENT = f"""
import subprocess, sys
child = subprocess.Popen(
    [sys.executable, "-c", {CHILD!r}], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
)
assert child.stdout.readline().strip() == "armed"
print(child.pid, flush=True)
"""


def is_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] in ("Z", "X")  # zombies are dead too
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux only")
def test_child_dies_when_its_parent_exits() -> None:
    parent = subprocess.run(
        [sys.executable, "-c", PARENT], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert parent.returncode == 0, parent.stderr
    pid = int(parent.stdout.strip())
    deadline = time.monotonic() + 10
    while not is_gone(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if not is_gone(pid):
        os.kill(pid, 9)
        pytest.fail("the child outlived its parent")
