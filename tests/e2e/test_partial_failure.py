"""Partial failure end to end (launch.py, real processes): a hung worker (``--watchdog-timeout``),
a forward-pass exception (each fails its requests, then the launcher restarts the instance,
without the injected fault, and it serves again), drain on SIGTERM (``--drain-timeout``), and
``status.ready`` with a dead instance beside live ones. Faults come from ``PDSERVE_FAULTS``
(protocol/faults.py). Every deployment must leave no process and no ipc directory behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol.faults import FAULTS_ENV, Faults
from tests.e2e.server import Server, pid_alive, running_server, started_together
from tokenizer_proc.client import Client, ServerError

FLAGS = ("--dtype", "float32", "--page-size", "4", "--heartbeat-interval", "0.2")
PROMPT = "hello there"


@pytest.fixture()
def ipc_parent(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A TMPDIR of its own for launch (short: ipc paths are limited to ~100 bytes); after the
    test, launch must have removed its ipc directory from it."""
    parent = Path(tempfile.mkdtemp(prefix="pf-", dir="/tmp"))
    tempfile.gettempdir()  # this process's own temporary files stay where they were (it caches)
    monkeypatch.setenv("TMPDIR", str(parent))
    yield parent
    left = sorted(p.name for p in parent.glob("pdserve-*") if not p.name.startswith("pdserve-e2e-"))
    shutil.rmtree(parent, ignore_errors=True)
    assert not left, f"ipc directories left behind: {left}"


def fail_with(client: Client, rid: str, code: str, timeout: float = 30.0) -> ServerError:
    with pytest.raises(ServerError) as e:
        client.result(rid, timeout=timeout)
    assert e.value.code == code, e.value
    return e.value


def wait_for(predicate, timeout: float, what: str) -> None:  # noqa: ANN001 - a test helper
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.1)


def test_a_hung_worker_fails_its_requests_and_its_instance_exits(monkeypatch, ipc_parent):
    monkeypatch.setenv(FAULTS_ENV, Faults(step_delay_s=120, step_delay_at_step=3).to_setting())
    with running_server(*FLAGS, "--watchdog-timeout", "3") as server, server.client(timeout=30) as client:
        rids = [client.submit(PROMPT, max_new_tokens=64, ignore_eos=True) for _ in range(2)]
        wait_for(lambda: not client.status(timeout=5)["instances"][0]["ready"], 10,
                 "the stalled instance reports not ready")
        for rid in rids:
            assert "watchdog" in fail_with(client, rid, "internal").message
        wait_for(lambda: not pid_alive(server.child_pids["unified0-worker"]), 30, "the hung worker ended")
        serves_again(server, client)


def test_a_forward_error_fails_every_request_in_flight_at_once(monkeypatch, ipc_parent):
    monkeypatch.setenv(FAULTS_ENV, Faults(forward_error_at_step=3).to_setting())
    with running_server(*FLAGS) as server, server.client(timeout=30) as client:
        rids = [client.submit(PROMPT, max_new_tokens=64, ignore_eos=True) for _ in range(3)]
        start = time.monotonic()
        for rid in rids:
            assert "forward_error_at_step" in fail_with(client, rid, "internal").message
        assert time.monotonic() - start < 10
        wait_for(lambda: not pid_alive(server.child_pids["unified0-worker"]), 10, "the worker ended")
        serves_again(server, client)


def serves_again(server: Server, client: Client) -> None:
    """The launcher restarted the failed instance (the fault applies to its first incarnation
    only): it is ready again and serves, and the launcher kept running."""
    wait_for(lambda: "instance unified0 restarted" in server.log(), 60, "the launcher restarts it")
    wait_for(lambda: re.search(r"instance unified0 \(\S+\) restarted: the requests", server.log()), 120,
             "the front end takes the new incarnation")
    wait_for(lambda: client.status(timeout=5)["ready"], 120, "the restarted instance is ready")
    out = client.generate(PROMPT, max_new_tokens=8, ignore_eos=True)
    assert out["finish_reason"] == "length" and len(out["token_ids"]) == 8
    assert server.proc.poll() is None


def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(monkeypatch, ipc_parent):
    # A 4 s pause in step 3 keeps the request in flight while the drain starts.
    monkeypatch.setenv(FAULTS_ENV, Faults(step_delay_s=4, step_delay_at_step=3).to_setting())
    with running_server(*FLAGS, "--drain-timeout", "30") as server, server.client(timeout=60) as client:
        rid = client.submit(PROMPT, max_new_tokens=16, ignore_eos=True)
        time.sleep(1.0)
        server.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: not client.status(timeout=5)["ready"], 10, "the front end drains")
        late = client.submit(PROMPT, max_new_tokens=4)
        fail_with(client, late, "shutting_down")
        out = client.result(rid, timeout=60)
        assert out["finish_reason"] == "length" and len(out["token_ids"]) == 16
        assert server.proc.wait(30) == 0


def test_drain_timeout_fails_what_is_left_and_exits_zero(monkeypatch, ipc_parent):
    monkeypatch.setenv(FAULTS_ENV, Faults(step_delay_s=120, step_delay_at_step=3).to_setting())
    with running_server(*FLAGS, "--drain-timeout", "3") as server, server.client(timeout=60) as client:
        rid = client.submit(PROMPT, max_new_tokens=64, ignore_eos=True)
        time.sleep(1.0)  # the worker is asleep in step 3 by now
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        fail_with(client, rid, "shutting_down")
        assert 2.0 < time.monotonic() - start < 15.0
        assert server.proc.wait(30) == 0


def test_a_second_sigterm_stops_at_once(monkeypatch, ipc_parent):
    monkeypatch.setenv(FAULTS_ENV, Faults(step_delay_s=120, step_delay_at_step=3).to_setting())
    with running_server(*FLAGS, "--drain-timeout", "60") as server, server.client(timeout=60) as client:
        rid = client.submit(PROMPT, max_new_tokens=64, ignore_eos=True)
        time.sleep(1.0)
        start = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        server.proc.send_signal(signal.SIGTERM)
        fail_with(client, rid, "shutting_down")
        assert server.proc.wait(30) == 0
        assert time.monotonic() - start < 20.0


def kill_instance(server: Server) -> None:
    """kill -9 of a standalone instance's scheduler and worker (its launch.py then exits)."""
    for name, pid in server.child_pids.items():
        if name.endswith(("-worker", "-scheduler")):
            os.kill(pid, signal.SIGKILL)


def alive_by_name(client: Client) -> dict[str, bool]:
    return {inst["name"]: inst["alive"] for inst in client.status(timeout=5)["instances"]}


def test_status_ready_while_a_usable_pair_is_left(ipc_parent):
    """Standalone instances over tcp whose launchers do not restart them (``--max-restarts 0``)."""
    flags = (*FLAGS, "--insecure", "--heartbeat-timeout", "2")
    with contextlib.ExitStack() as stack:
        prefill, *decodes = stack.enter_context(started_together(
            running_server(*flags, mode="prefill"),
            *[running_server(*flags, "--max-restarts", "0", mode="decode") for _ in range(2)],
        ))
        links = ("--prefill", prefill.addr, "--decode", *[d.addr for d in decodes])
        frontend = stack.enter_context(running_server(*flags, *links, mode="frontend"))
        client = stack.enter_context(frontend.client(timeout=30))
        names = [f"decode@{d.addr.removeprefix('tcp://')}" for d in decodes]
        assert client.status()["ready"] and all(alive_by_name(client).values())

        kill_instance(decodes[0])
        wait_for(lambda: not alive_by_name(client)[names[0]], 15, "the killed instance counts as dead")
        status = client.status()
        assert status["ready"], status
        assert alive_by_name(client)[names[1]]
        assert client.generate(PROMPT, max_new_tokens=4, ignore_eos=True)["finish_reason"] == "length"

        kill_instance(decodes[1])
        wait_for(lambda: not alive_by_name(client)[names[1]], 15, "the second one counts as dead")
        assert client.status()["ready"] is False
