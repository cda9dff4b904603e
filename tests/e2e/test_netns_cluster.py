"""A 1P2D cluster across hosts: the front end and each instance in a Linux network namespace of
its own with its own address (veth pairs on a bridge), deployed with nothing but the README's
cluster commands (`launch.py keys`, then `--mode prefill|decode|frontend` with `--host`, `--port`,
`--cluster-key-dir`): outputs equal the reference, both decode instances serve, the HTTP API
answers; then one decode host's link is removed and the survivors keep serving. Skipped where
namespaces cannot be made (not root)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from protocol.config import EMBEDDED
from tests import REPO_ROOT
from tests.e2e.netns import NetnsUnavailable, Network
from tests.e2e.server import Server, running_server, started_together
from tests.oracles import greedy_reference

INSTANCE_PORT, HTTP_PORT = "31000", "30000"  # the README's
MAX_NEW = 6
FLAGS = ("--page-size", "4", "--heartbeat-interval", "0.2", "--heartbeat-timeout", "2",
         "--drain-timeout", "2")
PROMPTS = [[EMBEDDED.bos_token_id, *f"request {i} across hosts".encode()] for i in range(12)]
DEAD_WAIT_S = 20.0


@dataclass
class Cluster:
    net: Network
    prefill: Server
    decodes: list[Server]
    front: Server


def make_keys(directory: str) -> str:
    """The README's key command, as written there."""
    subprocess.run(
        [sys.executable, "launch.py", "keys", "--out", directory, "--names", "prefill0", "decode0", "decode1",
         "frontend"],
        cwd=REPO_ROOT, check=True, capture_output=True, timeout=60,
    )
    return directory


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    keys = make_keys(str(tmp_path_factory.mktemp("cluster") / "keys"))
    try:
        network = Network.make(["prefill0", "decode0", "decode1", "frontend"])
        net = network.__enter__()
    except NetnsUnavailable as e:
        pytest.skip(f"no network namespaces here: {e}")
    try:
        with contextlib.ExitStack() as stack:
            def instance(name: str, mode: str) -> contextlib.AbstractContextManager[Server]:
                host = net.hosts[name]
                flags = ("--host", host.address, "--port", INSTANCE_PORT,
                         "--cluster-key-dir", f"{keys}/{name}")
                return running_server(*flags, *FLAGS, mode=mode, prefix=host.prefix)

            prefill, *decodes = stack.enter_context(started_together(
                instance("prefill0", "prefill"), instance("decode0", "decode"), instance("decode1", "decode")
            ))
            fe = net.hosts["frontend"]
            links = ("--prefill", prefill.addr, "--decode", *(d.addr for d in decodes))
            front = stack.enter_context(running_server(
                "--host", fe.address, "--port", HTTP_PORT, "--cluster-key-dir", f"{keys}/frontend", *links,
                *FLAGS, mode="frontend", prefix=fe.prefix,
            ))
            yield Cluster(net, prefill, decodes, front)
    finally:
        network.__exit__(None, None, None)


@pytest.fixture(scope="module")
def expected() -> list[list[int]]:
    return greedy_reference(None, PROMPTS, MAX_NEW)


def generate(front: Server, prompt: list[int]) -> list[int]:
    with front.client(timeout=60) as c:
        out = c.generate(input_ids=prompt, temperature=0, max_new_tokens=MAX_NEW, ignore_eos=True)
    return out["token_ids"]


def generate_all(front: Server) -> list[list[int]]:
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(lambda p: generate(front, p), PROMPTS))


def instances(front: Server) -> dict[str, dict]:
    with front.client(timeout=30) as c:
        return {inst["name"]: inst for inst in c.status()["instances"]}


def test_the_cluster_serves_the_reference_across_hosts(cluster: Cluster, expected) -> None:
    assert generate_all(cluster.front) == expected
    decoding = [inst for inst in instances(cluster.front).values() if inst["role"] == "decode"]
    assert len(decoding) == 2 and all(inst["alive"] and inst["ready"] for inst in decoding)
    assert all(inst["free_pages"] + inst["cached_pages"] == inst["total_pages"] for inst in decoding)
    assert cluster.front.http_url is not None
    with urllib.request.urlopen(f"{cluster.front.http_url}/v1/models", timeout=30) as reply:
        assert json.load(reply)["data"][0]["id"] == EMBEDDED.name


def test_the_survivors_keep_serving_when_a_host_is_cut_off(cluster: Cluster, expected) -> None:
    cluster.net.cut("decode1")
    cut_name = f"decode@{cluster.decodes[1].addr.removeprefix('tcp://')}"
    deadline = time.monotonic() + DEAD_WAIT_S
    while instances(cluster.front)[cut_name]["alive"]:
        assert time.monotonic() < deadline, f"{cut_name} still counts as alive: {instances(cluster.front)}"
        time.sleep(0.2)
    with cluster.front.client(timeout=30) as c:
        assert c.status()["ready"]
    assert generate_all(cluster.front) == expected
