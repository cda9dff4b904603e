"""Fault isolation end to end (launch.py, real processes; docs/design.md, "Launcher and
supervision"): ``kill -9`` of one instance's worker in ``--mode pd`` fails only that instance's
requests (with a clear error) while the streams on the other instances complete with the greedy
reference's tokens; the launcher restarts the instance, which rejoins (status alive, ready, its
peers registered), serves correctly, and leaks no page. The same for a prefill worker. A
standalone ``--mode decode`` instance stopped and started again by hand at the same address
rejoins a running front end and prefill instance without restarting them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
from collections.abc import Iterator

import pytest

from protocol.config import EMBEDDED
from tests.e2e.server import Server, pid_alive, running_server, wait_no_leak
from tests.oracles import greedy_reference
from tokenizer_proc.client import Client, ServerError

FLAGS = ("--dtype", "float32", "--page-size", "4", "--heartbeat-interval", "0.2",
         "--heartbeat-timeout", "2")
LONG = 160  # tokens per stream in flight while an instance is killed
SHORT = 8
PROMPTS = [[EMBEDDED.bos_token_id, *b"stream number %d goes on" % i] for i in range(6)]
LOST_CODES = ("peer_unavailable", "internal", "shutting_down", "transfer_failed")
WORKER_MODULES = ("engine", "prefill_worker", "decode_worker")


@pytest.fixture(scope="module")
def expected() -> tuple[list[list[int]], list[list[int]]]:
    longs = greedy_reference(None, PROMPTS, LONG)
    return longs, [tokens[:SHORT] for tokens in longs]


def children_of(launcher_pid: int) -> dict[str, int]:
    """The launcher's instance processes now, named as launch names them (``decode1-worker``),
    from /proc: a child's command line is ``python -m <package> --config <json with its name>``."""
    found: dict[str, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid != launcher_pid or "-m" not in argv or "--config" not in argv:
            continue
        package = argv[argv.index("-m") + 1]
        name = json.loads(argv[argv.index("--config") + 1]).get("name")
        if name and package in (*WORKER_MODULES, "scheduler_proc"):
            found[f"{name}-{'scheduler' if package == 'scheduler_proc' else 'worker'}"] = int(entry)
    return found


def by_name(client: Client) -> dict[str, dict]:
    return {inst["name"]: inst for inst in client.status(timeout=5)["instances"]}


def wait_for(predicate, timeout: float, what: str) -> None:  # noqa: ANN001 - a test helper
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.1)


def rejoined(client: Client, name: str, prefills: list[str]) -> bool:
    """``name`` is alive and ready again, and (a decode instance) registered with every prefill
    instance; the front end can route over it."""
    inst = by_name(client).get(name)
    if inst is None or not (inst["alive"] and inst["ready"]):
        return False
    registered = [state for state in inst["peers"].values() if state == "registered"]
    return inst["role"] != "decode" or len(registered) == len(prefills)


def wait_taken_back(server: Server, name: str, registered_with: str | None = None) -> None:
    """The front end saw instance ``name``'s new incarnation and routes to it again: ready (from
    its second heartbeat on) and, for a decode instance, registered with ``registered_with``.
    The instances' own status may say so earlier; routing goes by the front end's view."""
    restart = rf"instance {re.escape(name)} \(\S+\) restarted: the requests it held are lost"
    wanted = [f"instance {name} is ready"]
    if registered_with is not None:
        wanted.append(f"{name} with {registered_with}: registered")

    def routable() -> bool:
        found = re.search(restart, server.log())
        return found is not None and all(w in server.log()[found.end():] for w in wanted)

    wait_for(routable, 120, f"the front end takes {name} back")


def serve_once(client: Client, i: int, want: list[int], within_s: float = 30.0) -> None:
    """One short request served with the reference's tokens; while a restarted peer's data-plane
    link registers again a request may fail cleanly first (retried)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            out = client.generate(input_ids=PROMPTS[i], max_new_tokens=SHORT, temperature=0, ignore_eos=True)
        except ServerError as e:
            assert e.code in ("transfer_failed", "peer_unavailable"), e
            assert time.monotonic() < deadline, f"no request served within {within_s} s: {e}"
            time.sleep(0.1)
            continue
        assert out["token_ids"] == want
        return


@pytest.fixture(scope="module")
def pd() -> Iterator[tuple[Server, list[int]]]:
    """A 1P2D deployment, and every instance pid it ever had (all must be gone after it stops)."""
    pids: list[int] = []
    with running_server(*FLAGS, "--num-prefill", "1", "--num-decode", "2", mode="pd") as server:
        yield server, pids
        pids += children_of(server.proc.pid).values()
    wait_for(lambda: not any(pid_alive(p) for p in pids), 10, "every instance process ever started ended")


def streams_on_both_decodes(server: Server, expected_long: list[list[int]], kill: str) -> None:
    """Long streams on both decode instances; ``kill`` (a process name) is killed meanwhile. The
    streams of the untouched decode instance finish with the reference's tokens; those of the
    killed instance (if a decode one) fail with a clear error naming it."""
    with server.client(timeout=60) as client:
        rids = [client.submit(input_ids=p, max_new_tokens=LONG, temperature=0, ignore_eos=True)
                for p in PROMPTS[:4]]
        wait_for(lambda: all(by_name(client)[d]["decoding"] > 0 for d in ("decode0", "decode1")), 30,
                 "streams decoding on both decode instances")
        os.kill(children_of(server.proc.pid)[kill], signal.SIGKILL)
        done, failed = [], []
        for i, rid in enumerate(rids):
            try:
                out = client.result(rid, timeout=60)
            except ServerError as e:
                assert e.code in LOST_CODES, e
                assert kill.split("-")[0] in e.message, e.message
                failed.append(i)
                continue
            assert out["token_ids"] == expected_long[i], f"stream {i} differs from the reference"
            done.append(i)
        assert done, "no stream survived"
        if kill.startswith("decode"):
            assert failed, "the killed decode instance held none of the streams"


def test_a_killed_decode_worker_is_restarted_and_the_other_streams_are_untouched(pd, expected):
    server, pids = pd
    before = children_of(server.proc.pid)
    pids += before.values()
    streams_on_both_decodes(server, expected[0], kill="decode1-worker")
    with server.client(timeout=60) as client:
        wait_taken_back(server, "decode1", registered_with="prefill0")
        wait_for(lambda: rejoined(client, "decode1", ["prefill0"]), 120, "decode1 back and registered")
        after = children_of(server.proc.pid)
        assert after["decode1-worker"] != before["decode1-worker"]
        assert after["decode1-scheduler"] != before["decode1-scheduler"]
        for name in ("decode0-worker", "decode0-scheduler", "prefill0-worker", "prefill0-scheduler"):
            assert after[name] == before[name], f"{name} was restarted too"
        assert "instance decode1 restarted" in server.log()
        serve_on(client, "decode1", expected[0])
        wait_no_leak(client)


def serve_on(client: Client, name: str, expected_short: list[list[int]]) -> None:
    """Every prompt at once, so that instance ``name`` takes some (seen in its status); each
    answer must match the reference."""
    rids = [client.submit(input_ids=p, max_new_tokens=LONG, temperature=0, ignore_eos=True) for p in PROMPTS]
    seen, deadline = False, time.monotonic() + 30
    while not seen and time.monotonic() < deadline:
        inst = by_name(client)[name]
        seen = inst["decoding"] + inst["transferring"] + inst["prefilling"] + inst["pending"] > 0
    for j, rid in enumerate(rids):
        assert client.result(rid, timeout=120)["token_ids"] == expected_short[j], f"request {j} differs"
    assert seen, f"{name} took none of {len(rids)} requests"


def test_a_killed_prefill_worker_is_restarted_and_streaming_requests_finish(pd, expected):
    server, pids = pd
    with server.client(timeout=60) as client:
        wait_no_leak(client)
    before = children_of(server.proc.pid)
    pids += before.values()
    streams_on_both_decodes(server, expected[0], kill="prefill0-worker")
    with server.client(timeout=60) as client:
        wait_taken_back(server, "prefill0")
        wait_for(lambda: rejoined(client, "prefill0", ["prefill0"]), 120, "prefill0 back")
        wait_for(lambda: all(rejoined(client, d, ["prefill0"]) for d in ("decode0", "decode1")), 60,
                 "both decode instances registered with the restarted prefill instance")
        after = children_of(server.proc.pid)
        assert after["prefill0-worker"] != before["prefill0-worker"]
        for name in ("decode0-worker", "decode1-worker", "decode0-scheduler", "decode1-scheduler"):
            assert after[name] == before[name], f"{name} was restarted too"
        serve_once(client, 5, expected[1][5])
        wait_no_leak(client)


def test_a_standalone_decode_instance_restarted_at_its_address_rejoins(expected):
    """No launcher restarts it (``--max-restarts 0``): the operator starts it again."""
    flags = (*FLAGS, "--insecure")
    with contextlib.ExitStack() as stack:
        prefill = stack.enter_context(running_server(*flags, mode="prefill"))
        decode = running_server(*flags, "--max-restarts", "0", mode="decode")
        first = decode.__enter__()
        port = first.addr.rsplit(":", 1)[1]
        links = ("--prefill", prefill.addr, "--decode", first.addr)
        front = stack.enter_context(running_server(*flags, *links, mode="frontend"))
        client = stack.enter_context(front.client(timeout=60))
        name = f"decode@{first.addr.removeprefix('tcp://')}"
        serve_once(client, 0, expected[1][0])
        try:
            os.kill(first.child_pids[f"{name}-worker"], signal.SIGKILL)
            assert first.proc.wait(60) != 0, "with --max-restarts 0 its launcher gives up"
        finally:
            decode.__exit__(None, None, None)
        wait_for(lambda: not by_name(client)[name]["alive"], 15, "the front end counts it dead")
        again = stack.enter_context(running_server(*flags, "--port", port, mode="decode"))
        assert again.addr == first.addr
        wait_taken_back(front, name, registered_with=f"prefill@{prefill.addr.removeprefix('tcp://')}")
        wait_for(lambda: rejoined(client, name, [prefill.addr]), 120, "the new decode instance rejoined")
        serve_once(client, 1, expected[1][1])
        assert prefill.proc.poll() is None and front.proc.poll() is None
        wait_no_leak(client)
