"""The KV data plane heals by itself: with ``--mode pd`` (1P1D), the prefill worker (only the
worker, not its scheduler) is stopped with SIGSTOP past the heartbeat timeout, so that both
workers drop their data-plane link while the schedulers stay connected; once it runs again
(SIGCONT) a request is served, with the greedy reference's tokens, within a heartbeat timeout
and a small margin. Then the same with the decode worker.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from protocol.config import EMBEDDED
from tests.e2e.server import Server, running_server
from tests.oracles import greedy_reference
from tokenizer_proc.client import ServerError

HEARTBEAT_TIMEOUT_S = 1.0
HEAL_MARGIN_S = 2.0  # a heartbeat interval to notice, one to register again, and slack for 2 CPUs
MAX_NEW = 6
FLAGS = ("--dtype", "float32", "--page-size", "4", "--chunked-prefill-size", "16",
         "--heartbeat-interval", "0.2", "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT_S))
PROMPTS = [[EMBEDDED.bos_token_id, *b"the link heals by itself, %d" % i] for i in range(8)]


@pytest.fixture(scope="module")
def pd() -> Iterator[Server]:
    with running_server(*FLAGS, "--num-prefill", "1", "--num-decode", "1", mode="pd") as s:
        yield s


@pytest.fixture(scope="module")
def expected() -> list[list[int]]:
    return greedy_reference(None, PROMPTS, MAX_NEW)


def worker_pid(server: Server, role: str) -> int:
    (pid,) = [p for n, p in server.child_pids.items() if n.startswith(role) and n.endswith("-worker")]
    return pid


def generate(server: Server, i: int) -> list[int]:
    with server.client(timeout=20.0) as c:
        out = c.generate(input_ids=PROMPTS[i], max_new_tokens=MAX_NEW, temperature=0, ignore_eos=True)
    return out["token_ids"]


def stop_past_the_heartbeat_timeout(pid: int) -> float:
    """SIGSTOP ``pid`` for twice the heartbeat timeout; returns when it ran again (SIGCONT)."""
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(2 * HEARTBEAT_TIMEOUT_S + 0.5)
    finally:
        os.kill(pid, signal.SIGCONT)
    return time.monotonic()


def first_success_after(server: Server, resumed: float, i: int, expected: list[int]) -> float:
    """Send requests one after another until one is served; returns how long after ``resumed``
    it was. Each must either fail cleanly (the link is still down) or match the reference."""
    errors: list[str] = []
    while time.monotonic() - resumed < 30.0:
        try:
            tokens = generate(server, i)
        except ServerError as e:
            errors.append(e.code)
            assert e.code in ("transfer_failed", "peer_unavailable"), e
            time.sleep(0.05)
            continue
        assert tokens == expected
        return time.monotonic() - resumed
    raise AssertionError(f"no request was served within 30 s of SIGCONT; errors: {errors}")


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_the_data_plane_heals_after_a_worker_stopped_past_the_heartbeat_timeout(pd, expected, role):
    i = 0 if role == "prefill" else 4
    assert generate(pd, i) == expected[i]  # the link is up
    resumed = stop_past_the_heartbeat_timeout(worker_pid(pd, role))
    took = first_success_after(pd, resumed, i + 1, expected[i + 1])
    assert took < HEARTBEAT_TIMEOUT_S + HEAL_MARGIN_S, f"the link healed only {took:.1f} s after SIGCONT"
    assert generate(pd, i + 2) == expected[i + 2]  # and stays up
    assert "stopped answering" in pd.log()  # the link was in fact lost


def scheduler_pid(server: Server, role: str) -> int:
    (pid,) = [p for n, p in server.child_pids.items() if n.startswith(role) and n.endswith("-scheduler")]
    return pid


def decode_peer_states(server: Server) -> list[str]:
    """The decode instance's view of its prefill peer, as the client ``status`` reports it."""
    with server.client(timeout=20.0) as c:
        (decode,) = [inst for inst in c.status(timeout=5)["instances"] if inst["role"] == "decode"]
    return list(decode["peers"].values())


def test_status_shows_a_lost_peer_until_it_is_registered_again(pd, expected):
    """The prefill scheduler stopped past the heartbeat timeout: the decode instance's status
    lists its peer as lost (registering again: ``connecting``), then ``registered`` once it runs."""
    assert decode_peer_states(pd) == ["registered"]
    pid = scheduler_pid(pd, "prefill")
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 10 * HEARTBEAT_TIMEOUT_S
        while (states := decode_peer_states(pd)) == ["registered"]:
            assert time.monotonic() < deadline, "the silent peer still shows as registered"
            time.sleep(0.1)
        assert states in (["lost"], ["connecting"]), states
    finally:
        os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 30
    while decode_peer_states(pd) != ["registered"]:
        assert time.monotonic() < deadline, "the peer was not registered again"
        time.sleep(0.1)
    first_success_after(pd, time.monotonic(), 7, expected[7])


def link_states(server: Server, role: str) -> list[str]:
    """The data-plane link states of the ``role`` instance's worker, as ``status`` reports them."""
    with server.client(timeout=20.0) as c:
        (inst,) = [inst for inst in c.status(timeout=5)["instances"] if inst["role"] == role]
    return list(inst["links"].values())


def test_status_shows_a_lost_data_plane_link_until_it_heals(pd, expected):
    """The prefill worker stopped past the heartbeat timeout: the decode worker's link to it shows
    as lost (or registering again) in ``status``, then ``registered`` on both sides once it runs."""
    assert link_states(pd, "decode") == link_states(pd, "prefill") == ["registered"]
    pid = worker_pid(pd, "prefill")
    os.kill(pid, signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 10 * HEARTBEAT_TIMEOUT_S
        while (states := link_states(pd, "decode")) == ["registered"]:
            assert time.monotonic() < deadline, "the silent link still shows as registered"
            time.sleep(0.1)
        assert states in (["lost"], ["re_registering"], ["connecting"]), states
    finally:
        os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 30
    while not link_states(pd, "decode") == link_states(pd, "prefill") == ["registered"]:
        assert time.monotonic() < deadline, "the link was not registered again"
        time.sleep(0.1)
    first_success_after(pd, time.monotonic(), 6, expected[6])
