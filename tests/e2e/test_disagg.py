"""Disaggregated serving end to end: launch.py starts real prefill and decode instances and a
front end; a client talks the wire protocol.

Greedy outputs of 1P1D, 1P2D and 2P1D deployments (``--mode pd``) equal the plain-torch
reference for ≥ 32 concurrent requests, with chunked prefill forced small and prefix-cache hits
on both sides; aborts at every stage leave nothing behind. Every KV send is delayed on purpose
(the ``kv_send_delay_s`` fault of ``PDSERVE_FAULTS``, ``protocol.faults``) so that a transfer
lasts long enough to abort or kill during it. Faults that end an instance and registration
refusals use standalone ``--mode prefill`` / ``--mode decode`` / ``--mode frontend``
processes (``--mode pd`` stops the whole deployment when one child dies).
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
import zmq

from kvtransfer.nixl_agent import nixl_available
from protocol import transport
from protocol.config import EMBEDDED
from protocol.faults import FAULTS_ENV, Faults
from protocol.messages import (
    AbortRequest,
    AttachFrontend,
    RequestFailed,
    SamplingParams,
    StatusQuery,
    StatusReport,
    TokenizedRequest,
)
from tests.e2e.server import (
    REPO_ROOT,
    Server,
    e2e_keys,
    launch_flags,
    pid_alive,
    running_server,
    started_together,
    wait_no_leak,
)
from tests.oracles import greedy_reference
from tokenizer_proc.client import Client, ServerError

T = TypeVar("T")
MAX_NEW = 10
SEND_DELAY_S = 0.4
HEARTBEAT_TIMEOUT_S = 2
FLAGS = ("--dtype", "float32", "--page-size", "4", "--chunked-prefill-size", "16",
         "--max-running-requests", "48", "--routing-policy", "round_robin",
         "--heartbeat-interval", "0.2", "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT_S))


@pytest.fixture(scope="module", autouse=True)
def slow_sends() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FAULTS_ENV, Faults(kv_send_delay_s=SEND_DELAY_S).to_setting())
        yield


# ------------------------------------------------------------------------------------ workload


def byte_prompt(rng: random.Random, length: int, prefix: list[int] | None = None) -> list[int]:
    body = list(prefix or [EMBEDDED.bos_token_id])
    return body + [rng.randrange(256) for _ in range(length - len(body))]


@functools.cache
def workload() -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """36 concurrent requests (some sharing prefixes), then 8 that hit what the first wave cached
    on both sides; with the reference outputs of both waves."""
    rng = random.Random(7)
    shared = [byte_prompt(rng, 48), byte_prompt(rng, 90)]
    first = [byte_prompt(rng, rng.randrange(1, 160)) for _ in range(28)]
    first += [byte_prompt(rng, rng.randrange(60, 150), prefix=shared[i % 2]) for i in range(8)]
    # Two extensions of each of 4 first-wave prompts, back to back: with round-robin routing over
    # two decode instances one of each pair lands where its prefix is cached.
    second = [first[-1 - i // 2] + [rng.randrange(256) for _ in range(5 + i)] for i in range(8)]
    return first, second, greedy_reference(None, first + second, MAX_NEW)


def run_concurrently(client: Client, prompts: list[list[int]]) -> list[dict]:
    rids = [
        client.submit(input_ids=p, temperature=0, max_new_tokens=MAX_NEW, ignore_eos=True) for p in prompts
    ]
    return [client.result(rid) for rid in rids]


def check_greedy(server: Server) -> None:
    first, second, expected = workload()
    with server.client() as c:
        out = run_concurrently(c, first) + run_concurrently(c, second)
        status = wait_no_leak(c)
    got = [o["token_ids"] for o in out]
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g == e, f"request {i}: served {g} != reference {e}"
    assert all(o["finish_reason"] == "length" for o in out)
    hits = [o["usage"]["cached_tokens"] for o in out[len(first) :]]
    pairs = zip(hits[::2], hits[1::2], strict=True)
    assert all(max(pair) >= 48 for pair in pairs), f"decode-side prefix misses: {hits}"
    prefill = [i for i in status["instances"] if i["role"] == "prefill"]
    assert all(i["cached_pages"] > 0 for i in prefill), "the prefill side cached nothing"


# ------------------------------------------------------------------------------------ pd mode


# The 1P1D equality, abort and kill tests run over every KV transfer backend that works on CPU.
NEEDS_NIXL = pytest.mark.skipif(
    not nixl_available(), reason="the nixl backend needs the nixl-cu12 package: pip install 'pdserve[nixl]'"
)
CPU_BACKENDS = ["zmq", pytest.param("nixl", marks=NEEDS_NIXL)]
KILL_BACKENDS = CPU_BACKENDS


# and over nixl with two ranks a side, each moving its own KV heads (kvtransfer.tp_parts)
PD_SETUPS = [*CPU_BACKENDS, pytest.param("nixl --tp-size 2", id="nixl-tp2", marks=NEEDS_NIXL)]


@pytest.fixture(scope="module", params=PD_SETUPS)
def pd_1p1d(request: pytest.FixtureRequest) -> Iterator[Server]:
    backend, *extra = request.param.split()
    flags = (*FLAGS, "--transfer-backend", backend, *extra, "--num-prefill", "1", "--num-decode", "1")
    with running_server(*flags, mode="pd") as s:
        yield s


def test_1p1d_greedy_matches_reference(pd_1p1d):
    check_greedy(pd_1p1d)


def test_logprobs_cover_the_first_token_too(pd_1p1d):
    with pd_1p1d.client() as c:
        out = c.generate(input_ids=[EMBEDDED.bos_token_id, *b"logprobs"], max_new_tokens=6, temperature=0,
                         ignore_eos=True, return_logprob=True)
    assert len(out["logprobs"]) == len(out["token_ids"]) == 6
    assert all(lp <= 0.0 for lp in out["logprobs"])


def test_1p2d_greedy_matches_reference():
    with running_server(*FLAGS, "--num-prefill", "1", "--num-decode", "2", mode="pd") as s:
        check_greedy(s)


def test_2p1d_greedy_matches_reference():
    with running_server(*FLAGS, "--num-prefill", "2", "--num-decode", "1", mode="pd") as s:
        check_greedy(s)


def instance(status: dict, role: str) -> dict:
    return next(i for i in status["instances"] if i["role"] == role)


def abort_when(c: Client, prompt: list[int], ready: Callable[[dict], bool], max_new: int = 400) -> dict:
    """Submit ``prompt``, abort it once ``ready(status)`` holds; returns its final output."""
    rid = c.submit(input_ids=prompt, temperature=0, max_new_tokens=max_new, ignore_eos=True)
    deadline = time.monotonic() + 30
    while not ready(c.status()):
        assert time.monotonic() < deadline, "the request never reached the stage to abort in"
    c.abort(rid)
    return c.result(rid)


@pytest.mark.parametrize("stage", ["prefill_queue", "between_chunks", "transfer", "decoding"])
def test_abort_at_every_stage(pd_1p1d, stage):
    rng = random.Random(stage)
    with pd_1p1d.client() as c:
        if stage == "prefill_queue":  # long prompts keep the prefill side busy, chunk by chunk
            busy = [
                c.submit(input_ids=byte_prompt(rng, 800), temperature=0, max_new_tokens=2) for _ in range(3)
            ]
            out = abort_when(c, byte_prompt(rng, 40), lambda s: instance(s, "prefill")["pending"] >= 3)
            assert all(c.result(r)["finish_reason"] == "length" for r in busy)
        elif stage == "between_chunks":
            out = abort_when(c, byte_prompt(rng, 1200), lambda s: instance(s, "prefill")["prefilling"] == 1)
        elif stage == "transfer":  # sends are delayed: the decode side waits for its pages
            out = abort_when(c, byte_prompt(rng, 30), lambda s: instance(s, "decode")["transferring"] == 1)
        else:
            out = abort_when(c, byte_prompt(rng, 30), lambda s: instance(s, "decode")["decoding"] == 1)
        assert out["finish_reason"] == "abort"
        wait_no_leak(c)
        assert c.generate(input_ids=byte_prompt(rng, 20), max_new_tokens=3)["finished"]


# ------------------------------------------------------------------------------------ standalone


@contextlib.contextmanager
def standalone(
    num_prefill: int, num_decode: int, backend: str = "zmq", extra: tuple[str, ...] = (),
    decode_extra: tuple[str, ...] | None = None,
) -> Iterator[tuple[list[Server], list[Server], Server]]:
    """Separate ``--mode prefill`` / ``--mode decode`` instances (over the KV transfer
    ``backend``, with the ``extra`` flags; the decode instances with ``decode_extra`` instead
    when given) and a ``--mode frontend``. An instance that dies stays dead (``--max-restarts
    0``): these tests are about its survivors (tests/e2e/test_restart.py: restarts)."""
    with contextlib.ExitStack() as stack:
        flags = (*FLAGS, "--transfer-backend", backend, "--max-restarts", "0")
        prefill_flags = (*flags, *extra)
        decode_flags = (*flags, *(extra if decode_extra is None else decode_extra))
        instances = stack.enter_context(started_together(
            *[running_server(*prefill_flags, mode="prefill") for _ in range(num_prefill)],
            *[running_server(*decode_flags, mode="decode") for _ in range(num_decode)],
        ))
        prefills, decodes = instances[:num_prefill], instances[num_prefill:]
        frontend = stack.enter_context(
            running_server(
                *FLAGS,
                "--prefill",
                *[p.addr for p in prefills],
                "--decode",
                *[d.addr for d in decodes],
                mode="frontend",
            )
        )
        yield prefills, decodes, frontend


def live_instances_clean(c: Client, timeout: float = 20.0) -> dict:
    """``wait_no_leak`` on the instances still alive."""
    deadline = time.monotonic() + timeout
    while True:
        status = c.status()
        alive = [i for i in status["instances"] if i["alive"]]
        if all(
            i["pending"] + i["prefilling"] + i["transferring"] + i["decoding"] == 0
            and i["free_pages"] + i["cached_pages"] == i["total_pages"]
            for i in alive
        ):
            return status
        assert time.monotonic() < deadline, f"requests or pages leaked: {status}"
        time.sleep(0.1)


def kill_instance(server: Server) -> None:
    """kill -9 of the instance's scheduler and worker (its launch.py then exits)."""
    for name, pid in server.child_pids.items():
        if name.endswith(("-worker", "-scheduler")):
            os.kill(pid, signal.SIGKILL)


def outcomes(c: Client, rids: list[str]) -> list[str]:
    out = []
    for rid in rids:
        try:
            out.append(c.result(rid, timeout=20)["finish_reason"])
        except ServerError as e:
            out.append(e.code)
    return out


KILL_FAILURES = frozenset({"peer_unavailable", "transfer_failed"})


def kill_during_transfer(
    c: Client, victim: Server, role: str, rng: random.Random, frontend: Server,
    kill: Callable[[Server], None] = kill_instance, failures: frozenset[str] = KILL_FAILURES,
) -> None:
    """Start requests on every pair, ``kill`` ``victim`` while its transfers are under way: its
    requests fail with a clear error (of ``failures``) within the heartbeat window, the rest
    finish, the live instances get every page back, and new requests are served by the live
    instances."""
    rids = [
        c.submit(input_ids=byte_prompt(rng, 40), temperature=0, max_new_tokens=30, ignore_eos=True)
        for _ in range(8)
    ]
    deadline = time.monotonic() + 30
    while sum(i["transferring"] for i in c.status()["instances"] if i["role"] == role) < 2:
        assert time.monotonic() < deadline, "no transfer under way"
        time.sleep(0.02)  # transfers last SEND_DELAY_S per chunk: no need to flood the front end
    kill(victim)
    killed_at = time.monotonic()
    got = outcomes(c, rids)
    assert time.monotonic() - killed_at < HEARTBEAT_TIMEOUT_S + 4, "errors came after the heartbeat window"
    assert set(got) <= {"length", *failures}, got
    assert failures & set(got), got
    status = live_instances_clean(c)
    assert sum(not i["alive"] for i in status["instances"]) >= 1
    wait_marked_dead(frontend, victim)
    fresh = [
        c.submit(input_ids=byte_prompt(rng, 30), temperature=0, max_new_tokens=5, ignore_eos=True)
        for _ in range(6)
    ]
    assert outcomes(c, fresh) == ["length"] * 6


@pytest.mark.parametrize("backend", KILL_BACKENDS)
def test_kill_of_a_decode_then_of_a_prefill_instance_during_transfers(backend):
    rng = random.Random(3)
    with standalone(2, 2, backend) as (prefills, decodes, frontend), frontend.client() as c:
        kill_during_transfer(c, decodes[0], "decode", rng, frontend)
        kill_during_transfer(c, prefills[0], "prefill", rng, frontend)


def wait_marked_dead(frontend: Server, victim: Server, timeout: float = 30.0) -> None:
    """Until the front end has marked ``victim`` dead, so that it routes nothing there any more.
    A status reply cannot tell (an instance that did not answer it in time is reported not
    alive too), and the victim's requests may all have failed before the heartbeat timeout ran
    out: nixl's sender learns of a dead peer at once (UCX reports its disconnect)."""
    deadline, needle = time.monotonic() + timeout, f"({victim.addr}): no heartbeat"
    while needle not in frontend.log():
        assert time.monotonic() < deadline, f"the front end never marked {victim.addr} dead"
        time.sleep(0.05)


def test_requests_of_a_killed_front_end_are_aborted_by_the_instances():
    """kill -9 of a standalone front end mid-decode: its instances stop hearing its beat, abort
    its requests (instead of decoding 1500 tokens for nobody) and give every page back."""
    rng = random.Random(5)
    with running_server(*FLAGS, mode="prefill") as prefill, running_server(*FLAGS, mode="decode") as decode:
        links = ("--prefill", prefill.addr, "--decode", decode.addr)
        with running_server(*FLAGS, *links, mode="frontend") as first, first.client() as c:
            for _ in range(3):
                c.submit(input_ids=byte_prompt(rng, 20), temperature=0, max_new_tokens=1500, ignore_eos=True)
            deadline = time.monotonic() + 30
            while instance(c.status(), "decode")["decoding"] == 0:
                assert time.monotonic() < deadline, "nothing reached the decode instance"
                time.sleep(0.05)
            os.kill(first.child_pids["frontend"], signal.SIGKILL)
        with running_server(*FLAGS, *links, mode="frontend") as second, second.client() as c:
            live_instances_clean(c)
        assert "request(s) of departed front ends" in decode.log()


def test_registration_refused_for_another_page_size_and_duplicate_room_refused(tmp_path):
    with (
        running_server(*FLAGS, mode="prefill") as p,
        running_server(*FLAGS, "--page-size", "8", mode="decode") as d,
        launched("--mode", "frontend", "--prefill", p.addr, "--decode", d.addr, *FLAGS) as client_addr,
    ):
        with Client(client_addr, timeout=5) as c:
            error = wait_for_error(c, "refused")
        assert "page_size mismatch" in error and "4" in error and "8" in error
        check_duplicate_room(p, str(tmp_path))
        for server in (p, d):
            assert all(pid_alive(pid) for pid in server.child_pids.values())


def wait_for_error(c: Client, needle: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            c.generate(input_ids=[EMBEDDED.bos_token_id, 65], max_new_tokens=2)
        except (ServerError, TimeoutError) as e:
            if needle in str(e):
                return str(e)
        assert time.monotonic() < deadline, f"no error mentioning {needle!r}"
        time.sleep(0.2)


def check_duplicate_room(prefill: Server, directory: str) -> None:
    """Acting as a front end of the prefill instance: a second request with a live room is
    refused, nothing leaks."""
    ctx = zmq.Context.instance()
    inbox = transport.bind(ctx, zmq.PULL, transport.ipc_addr(directory, "fake-frontend"), keys=e2e_keys())
    to_p = transport.connect(ctx, zmq.PUSH, prefill.addr, keys=e2e_keys())
    try:
        transport.send(to_p, AttachFrontend(output_addr=transport.ipc_addr(directory, "fake-frontend")))
        params = SamplingParams(max_new_tokens=4, temperature=0.0)
        transport.send(to_p, TokenizedRequest("first", [EMBEDDED.bos_token_id, 1, 2], params, room=77))
        transport.send(to_p, TokenizedRequest("second", [EMBEDDED.bos_token_id, 3], params, room=77))
        failed = next_of(inbox, RequestFailed)
        assert (
            failed.rid == "second" and failed.code == "invalid_request" and "duplicate room" in failed.message
        )
        transport.send(to_p, AbortRequest("first"))
        transport.send(to_p, StatusQuery(qid=987654))  # not a qid the real front end uses
        # replies go to every attached front end: the real one's status reports come here too
        report = next_of(inbox, StatusReport, where=lambda r: r.qid == 987654)
        assert report.status.pending == 0 and report.status.free_pages == report.status.total_pages
    finally:
        inbox.close()
        to_p.close()


def next_of(
    sock: zmq.Socket, kind: type[T], timeout_s: float = 10.0, where: Callable[[T], bool] = lambda _: True
) -> T:
    deadline = time.monotonic() + timeout_s
    while sock.poll(max(deadline - time.monotonic(), 0) * 1000):
        msg = transport.recv(sock)
        if isinstance(msg, kind) and where(msg):
            return msg
    raise AssertionError(f"no {kind.__name__} within {timeout_s} s")


@contextlib.contextmanager
def launched(*argv: str) -> Iterator[str]:
    """launch.py without waiting for readiness (a front end whose pairs are refused never is)."""
    mode = argv[argv.index("--mode") + 1]
    flags = argv[: argv.index("--mode")] + argv[argv.index("--mode") + 2 :]
    launch_argv, client_addr, _ = launch_flags(mode, flags)
    fd, log_path = tempfile.mkstemp(prefix="pdserve-e2e-", suffix=".log")
    proc = subprocess.Popen(
        [sys.executable, "launch.py", *launch_argv],
        cwd=REPO_ROOT,
        stdout=fd,
        stderr=fd,
        start_new_session=True,
    )
    os.close(fd)
    try:
        yield client_addr
        assert proc.poll() is None, "the front end died"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        os.unlink(log_path)
