"""Several front ends behind one HTTP port (``--tokenizer-worker-num``, launcher/frontends.py): the
ports each takes, the flags refused, and the HTTP port bound once by the launcher."""

from __future__ import annotations

import socket

import pytest

import launch
from launcher.frontends import bind_http
from protocol.config import ServerArgs
from tests.ports import free_tcp_port

FRONTEND = ["--mode", "frontend", "--prefill", "tcp://a:1", "--decode", "tcp://b:1", "--insecure",
            "--host", "10.0.0.2"]


def test_each_front_end_has_a_client_port_and_an_output_port_after_all_client_ports() -> None:
    args = ServerArgs(port=8000, zmq_port=9000, tokenizer_worker_num=3)
    assert [args.frontend_ports(i) for i in range(3)] == [(9000, 9003), (9001, 9004), (9002, 9005)]
    one = ServerArgs(port=8000)
    assert one.frontend_ports(0) == (8001, 8002)  # one front end: as before, --port + 1 and + 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mode", "prefill", "--insecure", "--host", "10.0.0.2", "--tokenizer-worker-num", "2"],
         "--tokenizer-worker-num counts front ends"),
        (["--tokenizer-worker-num", "0"], "--tokenizer-worker-num must be"),
        (["--tokenizer-worker-num", "3", "--port", "9002", "--zmq-port", "9000"],
         "--port 9002 is also a ZMQ port of the front end"),
        ([*FRONTEND, "--tokenizer-worker-num", "2", "--port", "9003", "--zmq-port", "9000"],
         "--port 9003 is also a ZMQ port of the front end"),  # front end 1's output port
    ],
)
def test_refused(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        launch.parse_args(argv)


def test_several_http_servers_listen_on_one_port_each_with_its_own_socket() -> None:
    port = free_tcp_port(count=1)
    listeners = bind_http(ServerArgs(port=port, tokenizer_worker_num=3))
    try:
        assert len({s.fileno() for s in listeners}) == 3
        assert {s.getsockname()[1] for s in listeners} == {port}
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # one of them holds it in its backlog
    finally:
        for s in listeners:
            s.close()


@pytest.mark.parametrize("reuse_port", [False, True])
def test_a_port_in_use_is_refused_before_anything_starts(
    reuse_port: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    """Also where the holder is in a SO_REUSEPORT group of its own (another deployment of the
    same user), which a socket of ours would otherwise silently join."""
    port = free_tcp_port(count=3)
    holder = socket.create_server(("127.0.0.1", port), reuse_port=reuse_port)
    try:
        for count in (1, 2):
            with pytest.raises(ValueError, match=f"--port {port}: cannot listen there"):
                bind_http(ServerArgs(port=port, tokenizer_worker_num=count))
        argv = ["--port", str(port), "--zmq-port", str(port + 1), "--tokenizer-worker-num", "2"]
        assert launch.main(argv) == 2  # before any process starts
    finally:
        holder.close()
    assert f"launch: --host 127.0.0.1 --port {port}: cannot listen there" in capsys.readouterr().err
