"""Multi-node tensor parallelism's flags (``--nnodes``, ``--node-rank``, ``--dist-init-addr``,
SGLang's): what is refused and why, which ranks each node runs and where they meet, and what
launch starts on a node other than 0 (its ranks, nothing else)."""

from __future__ import annotations

import argparse
import shutil

import pytest

import launch
from launcher import frontends
from protocol.config import InstanceAddrs, Mode, ServerArgs, WorkerConfig, split_host_port
from protocol.messages import Role
from tests.ports import free_tcp_port

NODE0 = "10.0.0.1:29500"


def parse(*argv: str) -> tuple[Mode, ServerArgs, argparse.Namespace]:
    return launch.parse_args(list(argv))


def worker_config(args: ServerArgs) -> WorkerConfig:
    return WorkerConfig(args, "unified0", Role.UNIFIED, InstanceAddrs("in", "step", "result"))


TWO_NODES = ["--tp-size", "2", "--nnodes", "2"]
FRONTEND = ["--mode", "frontend", "--prefill", "tcp://a:1", "--decode", "tcp://b:1", "--insecure",
            "--host", "10.0.0.2"]


def at(addr: str) -> list[str]:
    return [*TWO_NODES, "--dist-init-addr", addr]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (TWO_NODES, "--nnodes 2 needs --dist-init-addr HOST:PORT"),
        ([*at(NODE0), "--node-rank", "2"], "--node-rank must be in [0, --nnodes 2); got 2"),
        ([*at(NODE0), "--node-rank", "-1"], "--node-rank must be in [0, --nnodes 2); got -1"),
        (["--node-rank", "1"], "--node-rank must be in [0, --nnodes 1); got 1"),
        ([*at(NODE0), "--tp-size", "3"], "--tp-size 3 must be a multiple of --nnodes 2"),
        (["--nnodes", "0"], "--nnodes must be a positive integer; got 0"),
        (["--tp-size", "2", "--dist-init-addr", NODE0], "--dist-init-addr is a multi-node instance's"),
        (at("10.0.0.1"), "--dist-init-addr must be HOST:PORT"),
        (at("10.0.0.1:http"), "--dist-init-addr must be HOST:PORT"),
        (at(":29500"), "--dist-init-addr must be HOST:PORT"),
        (at("10.0.0.1:70000"), "--dist-init-addr must be HOST:PORT"),
        (at("0.0.0.0:29500"), "not a wildcard"),
        (at("[::]:29500"), "not a wildcard"),
        (at("fd00::1:29500"), "an IPv6 address goes in brackets"),
        ([*FRONTEND, *at(NODE0)], "--nnodes 2 is supported in --mode unified only"),
    ],
)
def test_bad_node_flags_are_refused_with_the_reason(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError) as refused:
        parse(*argv)
    assert message in str(refused.value)


def test_launch_exits_2_with_the_reason_on_bad_node_flags(capsys) -> None:
    assert launch.main(["--tp-size", "2", "--nnodes", "2"]) == 2
    assert "launch: --nnodes 2 needs --dist-init-addr HOST:PORT" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("tp", "nnodes", "node_rank", "ranks"),
    [(2, 2, 0, [0]), (2, 2, 1, [1]), (4, 2, 0, [0, 1]), (4, 2, 1, [2, 3]), (8, 4, 3, [6, 7]),
     (2, 1, 0, [0, 1])],
)
def test_node_r_runs_its_slice_of_the_ranks(tp: int, nnodes: int, node_rank: int, ranks: list[int]) -> None:
    addr = ["--dist-init-addr", NODE0] if nnodes > 1 else []
    mode, args, _ = parse("--tp-size", str(tp), "--nnodes", str(nnodes), "--node-rank", str(node_rank), *addr)
    assert mode is Mode.UNIFIED
    assert list(args.node_tp_ranks()) == ranks
    configs = worker_config(args).tensor_parallel_ranks("/d")
    assert [c.tp_rank for c in configs] == ranks
    (method,) = {c.dist_init_method for c in configs}  # the ranks of a start meet at one rendezvous
    assert method == f"tcp://{NODE0}" if nnodes > 1 else method.startswith("file:///d/")


def test_one_node_meets_at_a_new_file_each_start_several_at_rank_0s_fixed_store() -> None:
    _, one, _ = parse("--tp-size", "2")
    cfg = worker_config(one)
    first, again = cfg.tensor_parallel_ranks("/d")[0], cfg.tensor_parallel_ranks("/d")[0]
    assert first.dist_init_method.startswith("file:///d/unified0-tp-")
    assert first.dist_init_method != again.dist_init_method
    _, two, _ = parse("--tp-size", "2", "--nnodes", "2", "--dist-init-addr", "[fd00::1]:29500")
    cfg = worker_config(two)
    assert cfg.tensor_parallel_ranks("/d")[0].dist_init_method == "tcp://[fd00::1]:29500"


@pytest.mark.parametrize(
    ("addr", "host", "port"),
    [("10.0.0.1:29500", "10.0.0.1", 29500), ("[fd00::1]:1", "fd00::1", 1),
     ("node0.example:65535", "node0.example", 65535)],
)
def test_dist_init_addr_is_host_and_port(addr: str, host: str, port: int) -> None:
    assert split_host_port(addr) == (host, port)


def test_a_node_other_than_0_starts_its_ranks_only(monkeypatch) -> None:
    """No front end, no scheduler, no HTTP server: the ranks, supervised as an instance."""
    spawned: list[tuple[str, str, object]] = []

    class Started:
        def __init__(self, name: str) -> None:
            self.name = name

        def poll(self) -> None:
            return None

    def record(name: str, package: str, config: object, env: object = None) -> Started:
        spawned.append((name, package, config))
        return Started(name)

    monkeypatch.setattr(launch, "spawn", record)
    monkeypatch.setattr(frontends, "spawn", record)
    monkeypatch.setattr(frontends, "spawn_module", lambda name, *a, **k: record(name, "", None))
    mode, args, ns = parse("--tp-size", "4", "--nnodes", "2", "--node-rank", "1", "--dist-init-addr", NODE0)
    deployment = launch.start(mode, args, ns)
    shutil.rmtree(deployment.directory)  # type: ignore[arg-type]
    assert [(name, package) for name, package, _ in spawned] == [
        ("unified0-worker-tp2", "engine"), ("unified0-worker-tp3", "engine")
    ]
    assert [cfg.dist_init_method for _, _, cfg in spawned] == [f"tcp://{NODE0}"] * 2  # type: ignore[attr-defined]
    assert deployment.children == deployment.frontends == [] and deployment.probe()
    assert "node 1 of 2: tensor-parallel ranks 2..3 of unified0" in deployment.address
    spawned.clear()
    port = str(free_tcp_port(count=1))  # node 0 binds its HTTP port before it starts anything
    _, args0, ns0 = parse("--tp-size", "4", "--nnodes", "2", "--dist-init-addr", NODE0, "--port", port)
    shutil.rmtree(launch.start(mode, args0, ns0).directory)  # type: ignore[arg-type]
    assert [name for name, _, _ in spawned] == [
        "unified0-worker", "unified0-worker-tp1", "unified0-scheduler", "frontend", "http"
    ]
