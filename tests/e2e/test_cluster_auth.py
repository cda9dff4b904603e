"""A cluster deployment over tcp://127.0.0.1 with CURVE keys (separate ``launch.py --mode
prefill``, ``--mode decode`` and ``--mode frontend`` processes, one key directory each) serves
the reference output, and refuses an attacker without a key: a forged ``AttachFrontend`` gets no
tokens, a forged ``Shutdown`` / ``AbortRequest`` / ``RegisterDecode`` is not obeyed, and each
refusal is logged. A ``Shutdown`` from a key holder over the network is ignored too (only the
launcher stops an instance). docs/design.md, "Security"."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator

import pytest
import zmq

from protocol import transport
from protocol.config import EMBEDDED
from protocol.dataplane import KVLayout
from protocol.messages import (
    AbortRequest,
    AttachFrontend,
    PeerInfo,
    RegisterDecode,
    Shutdown,
    TransferEndpoint,
)
from protocol.security import ClusterKeys, generate
from tests.e2e.server import Server, running_server, started_together
from tests.oracles import greedy_reference
from tests.ports import free_tcp_port

MAX_NEW = 8
FLAGS = ("--dtype", "float32", "--page-size", "4", "--heartbeat-interval", "0.2", "--heartbeat-timeout", "2")
PROMPT = [EMBEDDED.bos_token_id, *b"secret user prompt"]
LOG_WAIT_S = 10.0
NO_TOKENS_WAIT_S = 3.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[tuple[Server, Server, Server, dict[str, str]]]:
    dirs = {d.name: str(d) for d in generate(str(tmp_path_factory.mktemp("keys")), ["frontend", "p0", "d0"])}
    with contextlib.ExitStack() as stack:
        p, d = stack.enter_context(started_together(
            running_server(*FLAGS, "--cluster-key-dir", dirs["p0"], mode="prefill"),
            running_server(*FLAGS, "--cluster-key-dir", dirs["d0"], mode="decode"),
        ))
        links = ("--prefill", p.addr, "--decode", d.addr, "--cluster-key-dir", dirs["frontend"])
        # two front ends (sharing the "frontend" keys): ZMQ clients on zmq and zmq + 1, their
        # instances' outputs on zmq + 2 and zmq + 3, all CURVE
        fronts = ("--tokenizer-worker-num", "2", "--zmq-port", str(free_tcp_port(count=4)))
        f = stack.enter_context(running_server(*FLAGS, *links, *fronts, mode="frontend"))
        yield p, d, f, dirs


@pytest.fixture(scope="module")
def expected() -> list[int]:
    return greedy_reference(None, [PROMPT], MAX_NEW)[0]


def serve(front: Server) -> list[int]:
    with front.client(timeout=60) as c:
        out = c.generate(input_ids=PROMPT, temperature=0, max_new_tokens=MAX_NEW, ignore_eos=True)
    return out["token_ids"]


def wait_for_log(server: Server, text: str) -> None:
    deadline = time.monotonic() + LOG_WAIT_S
    while text not in server.log():
        assert time.monotonic() < deadline, f"{text!r} not in the log: {server.log()[-3000:]}"
        time.sleep(0.2)


@contextlib.contextmanager
def attacker(addr: str, keys: ClusterKeys | None = None) -> Iterator[zmq.Socket]:
    ctx = zmq.Context()
    sock = transport.connect(ctx, zmq.PUSH, addr, keys=keys)
    try:
        yield sock
    finally:
        sock.close(linger=0)
        ctx.term()


def forge(sock: zmq.Socket, *msgs) -> None:
    """Queue ``msgs``; a refused connection never takes them (sent without blocking, dropped)."""
    for msg in msgs:
        with contextlib.suppress(zmq.Again):
            transport.send(sock, msg, zmq.NOBLOCK)


def test_serves_the_reference_output(cluster, expected):
    _, _, front, _ = cluster
    assert serve(front) == expected


def test_the_second_front_end_serves_over_its_own_ports(cluster, expected):
    _, _, front, _ = cluster
    host, port = front.addr.rsplit(":", 1)
    second = dataclasses.replace(front, addr=f"{host}:{int(port) + 1}")
    assert serve(second) == expected


def test_forged_attach_gets_no_tokens(cluster, expected):
    _, decode, front, _ = cluster
    ctx = zmq.Context()
    inbox = transport.bind(ctx, zmq.PULL, "tcp://127.0.0.1:*")
    spy = inbox.getsockopt_string(zmq.LAST_ENDPOINT)
    try:
        with attacker(decode.addr) as sock:
            forge(sock, AttachFrontend(output_addr=spy, rid_prefix="spy"))
            assert serve(front) == expected
            assert not inbox.poll(int(NO_TOKENS_WAIT_S * 1000)), "the keyless spy received a frame"
    finally:
        inbox.close(linger=0)
        ctx.term()


def test_forged_shutdown_and_abort_are_not_obeyed(cluster, expected):
    prefill, decode, front, _ = cluster
    with front.client(timeout=60) as c, attacker(decode.addr) as to_d, attacker(prefill.addr) as to_p:
        rid = c.submit(input_ids=PROMPT, temperature=0, max_new_tokens=MAX_NEW, ignore_eos=True)
        for sock in (to_d, to_p):
            forge(sock, AbortRequest(rid=rid), Shutdown(reason="forged"))
        assert c.result(rid)["token_ids"] == expected
    assert serve(front) == expected  # both instances keep serving


def test_forged_register_decode_is_refused(cluster):
    prefill, _, _, _ = cluster
    layout = KVLayout("m", 1, 4, 1, 1, "float32", "zmq")
    info = PeerInfo("mallory", "tcp://127.0.0.1:1", TransferEndpoint(layout))
    with attacker(prefill.addr) as sock:
        forge(sock, RegisterDecode(info))
        time.sleep(NO_TOKENS_WAIT_S)  # what the refused connection could have delivered by now
    assert "mallory" not in prefill.log()  # a registration it read would be logged, refused or not


def test_a_key_outside_the_allow_list_is_refused(cluster, tmp_path, expected):
    _, decode, front, dirs = cluster
    (other,) = generate(str(tmp_path / "other"), ["mallory"])
    cluster_public = ClusterKeys.load(dirs["d0"]).cluster_public  # public: an attacker may know it
    stranger = dataclasses.replace(ClusterKeys.load(str(other)), cluster_public=cluster_public)
    with attacker(decode.addr, stranger) as sock:
        forge(sock, Shutdown(reason="forged"))
        wait_for_log(decode, "is not in the allow list")
    assert serve(front) == expected


def test_a_shutdown_over_the_network_is_ignored_even_with_a_key(cluster, expected):
    _, decode, front, dirs = cluster
    with attacker(decode.addr, ClusterKeys.load(dirs["frontend"])) as sock:
        transport.send(sock, Shutdown(reason="not from the launcher"))
        wait_for_log(decode, "ignored a shutdown on the network input")
    assert serve(front) == expected
