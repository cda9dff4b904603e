"""``--tp-size 2 --nnodes 2``: one unified instance over two hosts, each a ``launch.py`` of its
own (node 0: front end, scheduler, HTTP, rank 0; node 1: rank 1 only), started with the README's
multi-node commands (addresses, ports and model replaced), each host a network namespace with
its own address (tests/e2e/netns.py; where namespaces cannot be made, both nodes run on
127.0.0.1). Greedy outputs equal one rank's token for token; when node 0's rank 0 dies, node 0
restarts its instance and node 1's rank, gone with it, is started again and rejoins at the same
``--dist-init-addr``."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from protocol.config import EMBEDDED
from tests.e2e.netns import NetnsUnavailable, Network
from tests.e2e.server import Server, launch_to_exit, running_server, wait_no_leak
from tests.e2e.test_readme_examples import readme_example
from tests.oracles import greedy_reference
from tests.ports import free_tcp_port

MAX_NEW = 8
PROMPTS = [[1 + (7 * i + j) % 250 for j in range(n)] for i, n in enumerate((3, 17, 40))]
# Beside the README's flags: a small pool and prompt chunks, quick heartbeats (restart test).
FLAGS = ("--page-size", "8", "--chunked-prefill-size", "32", "--max-total-tokens", "2048",
         "--heartbeat-interval", "0.2")
README_NODE0, README_NODE1, README_MODEL = "10.0.0.1", "10.0.0.2", "/models/llama"
README_PORTS = ("29500", "30000")  # the rendezvous, node 0's HTTP API
RESTART_S = 120.0


@dataclass
class Nodes:
    node0: Server
    node1: Server
    node0_address: str
    across_hosts: bool  # two network namespaces (False: both on 127.0.0.1)


@contextlib.contextmanager
def two_hosts() -> Iterator[tuple[str, tuple[str, ...], str, tuple[str, ...], bool]]:
    """(node 0's address, its command prefix, node 1's, its prefix, across hosts)."""
    try:
        network = Network.make(["node0", "node1"])
        net = network.__enter__()
    except NetnsUnavailable:
        yield "127.0.0.1", (), "127.0.0.1", (), False
        return
    try:
        a, b = net.hosts["node0"], net.hosts["node1"]
        yield a.address, a.prefix, b.address, b.prefix, True
    finally:
        network.__exit__(None, None, None)


def readme_nodes(addr0: str, addr1: str) -> list[list[str]]:
    """The flags of each ``python launch.py`` line of the README's multi-node block, node 0's
    first, on these addresses, free ports and the embedded model."""
    block = readme_example("multinode").replace("\\\n", " ")
    ports = {port: str(free_tcp_port()) for port in README_PORTS}
    nodes = []
    for line in block.splitlines():
        argv = shlex.split(line, comments=True)
        if not argv:
            continue
        assert argv[:2] == ["python", "launch.py"], argv
        flags = [_replace(flag, {README_NODE0: addr0, README_NODE1: addr1, **ports}) for flag in argv[2:]]
        nodes.append([EMBEDDED.name if flag == README_MODEL else flag for flag in flags])
    assert len(nodes) == 2 and "--node-rank" in nodes[1], nodes
    return nodes


def _replace(flag: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        flag = re.sub(rf"(?<![\d.]){re.escape(old)}(?![\d.])", new, flag)
    return flag


@pytest.fixture(scope="module")
def nodes() -> Iterator[Nodes]:
    with two_hosts() as (addr0, prefix0, addr1, prefix1, across), contextlib.ExitStack() as stack:
        flags0, flags1 = readme_nodes(addr0, addr1)
        # Node 1 first: its launcher is ready once its rank runs (which waits for rank 0).
        node1 = stack.enter_context(running_server(*flags1, *FLAGS, prefix=prefix1))
        node0 = stack.enter_context(running_server(*flags0, *FLAGS, prefix=prefix0))
        yield Nodes(node0, node1, addr0, across)


def greedy(server: Server) -> list[list[int]]:
    """Every prompt at once (they share steps)."""
    with server.client(timeout=60) as c:
        params = dict(max_new_tokens=MAX_NEW, temperature=0, ignore_eos=True)
        rids = [c.submit(input_ids=p, **params) for p in PROMPTS]
        got = [c.result(r)["token_ids"] for r in rids]
        wait_no_leak(c)
        return got


def wait_for(predicate: Callable[[], object], what: str, timeout: float = RESTART_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.1)


def test_two_nodes_serve_the_tokens_of_one_rank(nodes: Nodes) -> None:
    # The one-rank server's tokens: tests/e2e/test_tensor_parallel.py checks that it equals this reference.
    assert greedy(nodes.node0) == greedy_reference(None, PROMPTS, MAX_NEW)
    assert set(nodes.node1.child_pids) == {"unified0-worker-tp1"}  # node 1: its rank, nothing else
    assert "unified0-worker-tp1" not in nodes.node0.child_pids
    assert "unified0 rank 1 of 2 ready" in nodes.node1.log()
    if nodes.across_hosts:  # gloo on the interface towards node 0, not loopback
        assert f"gloo on eth0 (towards {nodes.node0_address})" in nodes.node1.log()


def test_node_1_rejoins_when_node_0_restarts_its_instance(nodes: Nodes) -> None:
    os.kill(nodes.node0.child_pids["unified0-worker"], signal.SIGKILL)
    wait_for(lambda: "instance unified0 restarted" in nodes.node0.log(), "node 0 restarts its instance")
    wait_for(lambda: "instance unified0 restarted" in nodes.node1.log(), "node 1 starts its rank again")
    wait_for(lambda: nodes.node1.log().count("unified0 rank 1 of 2 ready") == 2, "node 1's rank rejoins")
    wait_for(lambda: re.search(r"instance unified0 \(\S+\) restarted: the requests", nodes.node0.log()),
             "the front end takes the new incarnation")
    with nodes.node0.client(timeout=30) as c:
        wait_for(lambda: c.status(timeout=5)["ready"], "the restarted instance is ready")
    assert greedy(nodes.node0) == greedy_reference(None, PROMPTS, MAX_NEW)


def test_a_node_started_with_other_flags_is_refused_naming_them() -> None:
    """Node 1 with another ``--max-running-requests`` (its ranks would capture and warm up other
    batch sizes, and their collectives would never meet rank 0's): both sides refuse, naming the
    flag, instead of hanging. On one host: no namespaces needed."""
    flags0, flags1 = readme_nodes("127.0.0.1", "127.0.0.1")
    once = ("--max-restarts", "0")
    with running_server(*flags1, *FLAGS, *once, "--max-running-requests", "8") as node1:
        node0 = launch_to_exit(*flags0, *FLAGS, *once, timeout=RESTART_S)
        wait_for(lambda: "rank 1 differs from rank 0" in node1.log(), "node 1 refuses too", 30)
    assert node0.returncode != 0
    assert "ranks differ from rank 0: rank 1: --max-running-requests: 8 (rank 0: 256)" in node0.stderr, (
        node0.stderr[-3000:])
    assert "Start launch.py on every node with the same model and the same flags" in node0.stderr
