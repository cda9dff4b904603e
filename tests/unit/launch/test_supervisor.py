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

from launcher.supervisor import Backoff, InstanceSupervisor, Phase, RestartPolicy, Timing
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


# ---------------------------------------------------------------------------- instance restarts


class FakeProcess:
    """A child whose exit the test decides; ``terminate`` ends it unless it ignores SIGTERM."""

    def __init__(self, name: str, ignores_sigterm: bool = False) -> None:
        self.name = name
        self.code: int | None = None
        self.ignores_sigterm = ignores_sigterm
        self.signals: list[str] = []

    def poll(self) -> int | None:
        return self.code

    def terminate(self) -> None:
        self.signals.append("TERM")
        if not self.ignores_sigterm:
            self.code = -15

    def kill(self) -> None:
        self.signals.append("KILL")
        self.code = -9


class FakeInstance:
    """An instance's start function over a fake clock: each start makes a worker and a scheduler."""

    def __init__(self, scheduler_ignores_sigterm: bool = False) -> None:
        self.now = 0.0
        self.starts: list[tuple[bool, float]] = []
        self.procs: list[list[FakeProcess]] = []
        self.ignores = scheduler_ignores_sigterm

    def clock(self) -> float:
        return self.now

    def start(self, restart: bool) -> list[FakeProcess]:
        self.starts.append((restart, self.now))
        procs = [FakeProcess("x-worker"), FakeProcess("x-scheduler", self.ignores)]
        self.procs.append(procs)
        return procs

    def supervisor(self, policy: RestartPolicy, timing: Timing | None = None) -> InstanceSupervisor:
        return InstanceSupervisor("x", self.start, policy, timing or Timing(2.0, 10.0), self.clock)


def run_until(sup: InstanceSupervisor, fake: FakeInstance, until: float, dt: float = 0.25):
    """Step the supervisor on the fake clock up to ``until``; returns what it gave up on, if it did."""
    while fake.now < until:
        given_up = sup.step()
        if given_up is not None:
            return given_up
        fake.now += dt
    return None


def test_backoff_doubles_to_its_cap_resets_after_a_stable_run_and_gives_up():
    backoff = Backoff(RestartPolicy(max_restarts=7, first_delay_s=1, max_delay_s=30, stable_s=60))
    assert [backoff.after_death(up_for_s=5) for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff.after_death(up_for_s=5) is None  # the eighth quick failure in a row
    assert backoff.after_death(up_for_s=61) == 1  # a stable run starts over


def test_max_restarts_zero_never_restarts():
    assert Backoff(RestartPolicy(max_restarts=0)).after_death(up_for_s=1000) is None
    with pytest.raises(ValueError, match="max-restarts"):
        RestartPolicy(max_restarts=-1)


def test_a_dead_worker_stops_its_scheduler_then_the_instance_starts_again_after_the_backoff():
    fake = FakeInstance()
    sup = fake.supervisor(RestartPolicy(max_restarts=3, first_delay_s=1))
    assert run_until(sup, fake, 5.0) is None and len(fake.starts) == 1  # nothing dies: nothing happens
    worker, scheduler = fake.procs[0]
    worker.code = -9
    died = fake.now
    assert run_until(sup, fake, died + 1.9) is None
    assert scheduler.signals == [], "the scheduler first gets the grace to exit by itself"
    run_until(sup, fake, died + 2.1)
    assert scheduler.signals == ["TERM"] and scheduler.poll() is not None
    sup.step()  # sees it gone
    assert sup.phase is Phase.WAITING and len(fake.starts) == 1
    stopped = fake.now
    run_until(sup, fake, stopped + 1.1)
    assert fake.starts[1] == (True, pytest.approx(stopped + 1.0, abs=0.3)), fake.starts
    assert sup.phase is Phase.RUNNING and sup.children is not None and sup.children == fake.procs[1]
    assert sup.restarts == 1


def test_a_process_that_ignores_sigterm_is_killed():
    fake = FakeInstance(scheduler_ignores_sigterm=True)
    sup = fake.supervisor(RestartPolicy(max_restarts=1), Timing(exit_grace_s=1.0, stop_grace_s=3.0))
    fake.procs[0][0].code = 1
    run_until(sup, fake, 10.0)
    assert fake.procs[0][1].signals == ["TERM", "KILL"]
    assert len(fake.starts) == 2


def test_quick_failures_back_off_and_then_give_up_returning_the_dead_process():
    fake = FakeInstance()
    sup = fake.supervisor(RestartPolicy(max_restarts=2, first_delay_s=1, stable_s=60))
    for _ in range(3):
        fake.procs[-1][1].code = 1  # the scheduler fails soon after each start
        given_up = run_until(sup, fake, fake.now + 20)
    assert given_up is fake.procs[-1][1] and sup.phase is Phase.GIVEN_UP
    gaps = [b - a for (_, a), (_, b) in zip(fake.starts, fake.starts[1:], strict=False)]
    assert len(fake.starts) == 3 and gaps[1] > gaps[0], fake.starts  # 1 s, then 2 s of back-off


def test_an_instance_that_ran_stably_is_restarted_again_and_again():
    fake = FakeInstance()
    sup = fake.supervisor(RestartPolicy(max_restarts=1, stable_s=10))
    for _ in range(4):
        fake.now += 30  # up for longer than stable_s
        fake.procs[-1][0].code = -9
        assert run_until(sup, fake, fake.now + 5) is None
    assert len(fake.starts) == 5


RESTARTING = textwrap.dedent("""
    import subprocess, sys, time
    import launch
    from launcher.supervisor import InstanceSupervisor, RestartPolicy, Timing

    def start(restart):
        procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]) for _ in range(2)]
        children = [launch.Child(f"inst-{i}", p) for i, p in enumerate(procs)]
        print("started", restart, *[p.pid for p in procs], flush=True)
        return children

    instance = InstanceSupervisor("inst", start, RestartPolicy(max_restarts=1, first_delay_s=0.2),
                                  Timing(exit_grace_s=0.2, stop_grace_s=5))
    sleep = [sys.executable, "-c", "import time; time.sleep(120)"]
    frontend = launch.Child("frontend", subprocess.Popen(sleep))
    print("frontend", frontend.proc.pid, flush=True)
    deployment = launch.Deployment("test", "nowhere", [frontend], lambda: True, instances=[instance])
    supervisor = launch.Supervisor(deployment)
    supervisor.install_signal_handlers()
    dead = supervisor.wait_until_stopped()
    supervisor.stop_all()
    print("stopped", dead.name, all(c.proc.poll() is not None for c in deployment.all_children()), flush=True)
""")


def test_the_launch_supervisor_restarts_a_killed_instance_process_and_stops_when_the_front_end_dies():
    proc = subprocess.Popen([sys.executable, "-c", RESTARTING], cwd=REPO_ROOT, text=True,
                            stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=REPO_ROOT),
                            start_new_session=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().split()
        frontend_pid = int(proc.stdout.readline().split()[1])
        assert first[:2] == ["started", "False"]
        os.kill(int(first[2]), signal.SIGKILL)  # one process of the instance
        again = proc.stdout.readline().split()
        assert again[:2] == ["started", "True"], again
        for pid in first[2:]:
            assert not _alive(int(pid)), "the instance's other process was stopped before the restart"
        os.kill(frontend_pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        assert out.split() == ["stopped", "frontend", "True"]
        assert proc.returncode == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
