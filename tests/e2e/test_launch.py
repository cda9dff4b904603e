"""launch.py: a child that fails at start-up makes it exit non-zero with that child's error."""

from __future__ import annotations

import subprocess
import sys

from tests.e2e.server import REPO_ROOT
from tests.ports import free_tcp_port


def test_child_failing_at_start_up_fails_launch(tmp_path):
    missing = tmp_path / "no-such-model"
    proc = subprocess.run(
        [sys.executable, "launch.py", "--port", str(free_tcp_port()), "--model-path", str(missing)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode != 0
    assert "no-such-model" in proc.stderr
    assert "exited with code" in proc.stderr


def test_a_wildcard_host_is_refused_where_the_address_is_handed_to_peers():
    proc = subprocess.run(
        [sys.executable, "launch.py", "--mode", "prefill", "--host", "0.0.0.0"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "--host 0.0.0.0 binds every interface" in proc.stderr


def test_bad_flag_value_is_refused():
    proc = subprocess.run(
        [sys.executable, "launch.py", "--schedule-policy", "random"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "--schedule-policy" in proc.stderr
