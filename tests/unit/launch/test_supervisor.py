"""launch.py's supervisor stops when told, however many signals reach it and whichever thread
the kernel hands them to."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

from tests.e2e.server import REPO_ROOT
from tests.signals import other_thread, skip_without_tgkill, tgkill

SUPERVISED = textwrap.dedent("""
    import subprocess, sys, threading
    import launch

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    deployment = launch.Deployment("test", "nowhere", [launch.Child("sleeper", sleeper)], lambda: True)
    supervisor = launch.Supervisor(deployment)
    supervisor.install_signal_handlers()
    threading.Thread(target=threading.Event().wait, daemon=True).start()  # a thread to take signals
    print("waiting", flush=True)
    dead = supervisor.wait_until_stopped()
    supervisor.stop_all()
    print("stopped", dead, supervisor.stop_signal, sleeper.poll() is not None, flush=True)
""")


@contextlib.contextmanager
def supervisor_process() -> Iterator[subprocess.Popen]:
    """The supervisor in a session of its own, killed with its child whatever the test does."""
    proc = subprocess.Popen([sys.executable, "-c", SUPERVISED], cwd=REPO_ROOT, text=True,
                            stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=REPO_ROOT),
                            start_new_session=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "waiting"
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def finish(proc: subprocess.Popen) -> str:
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        raise AssertionError("the supervisor did not stop within 20 s of SIGTERM") from None
    assert proc.returncode == 0
    return out.strip()


@pytest.mark.parametrize("to_thread", [False, True])
def test_a_flood_of_signals_then_sigterm_stops_every_child(to_thread: bool):
    """Signals arriving while the supervisor waits used to run a handler that took the lock of
    the very Event the main thread was waiting on: deadlock (or a RecursionError). Also when the
    kernel hands the signals to another thread (``to_thread``)."""
    if to_thread:
        skip_without_tgkill()
    with supervisor_process() as proc:
        tid = other_thread(proc.pid) if to_thread else proc.pid

        def send(sig: int) -> None:
            tgkill(proc.pid, tid, sig) if to_thread else os.kill(proc.pid, sig)

        deadline = time.monotonic() + 1.5
        sent = 0
        while time.monotonic() < deadline:
            send(signal.SIGCHLD)
            sent += 1
            if sent % 64 == 0:
                time.sleep(0.001)
        assert proc.poll() is None, "the supervisor died of a flood of SIGCHLD"
        send(signal.SIGTERM)
        assert finish(proc) == f"stopped None {int(signal.SIGTERM)} True"
