"""The client-facing processes of a deployment: ``--tokenizer-worker-num`` front ends, each with
its HTTP server, all serving one HTTP port (SGLang's flag, vLLM's ``--api-server-count``).

The launcher binds the HTTP port itself, before any child starts (a port in use is a clear
error, not a child's death): one listening socket per HTTP server, in one ``SO_REUSEPORT`` group
when there are several, so that the kernel spreads new connections over them by address and
port (a server busy in Python still gets its share, and a burst of connections is not accepted
whole by whichever server woke first). Each server inherits its socket (``--fd``) and talks to
its own front end; front end ``i`` takes ZMQ clients on ``ServerArgs.frontend_ports(i)``. The
instances send each front end every output (each keeps the rows of its own requests) and a
status report to the front end that asked. The front ends publish their metrics to each other
(``tokenizer_proc/metrics_share.py``), so every scrape shows the whole deployment.
"""

from __future__ import annotations

import argparse
import socket
from collections.abc import Callable
from dataclasses import dataclass

from launcher.children import Child, frontend_probe, http_probe, spawn, spawn_module
from protocol.config import FrontendConfig, FrontendSiblings, Mode, ServerArgs, numbered
from protocol.transport import ipc_addr

HTTP_BACKLOG = 2048  # uvicorn's


@dataclass
class FrontEnds:
    frontends: list[Child]  # drained before the rest stop
    http_servers: list[Child]
    client_addrs: list[str]  # each front end's ZMQ client address
    http_url: str

    @property
    def children(self) -> list[Child]:
        return [*self.frontends, *self.http_servers]

    def probe(self) -> Callable[[], bool]:
        """Every front end ready, and the HTTP API answering."""
        probes = [*map(frontend_probe, self.client_addrs), http_probe(self.http_url)]
        return lambda: all(p() for p in probes)

    @property
    def address(self) -> str:
        return f"{self.http_url} (ZMQ clients: {', '.join(self.client_addrs)})"


def bind_http(args: ServerArgs) -> list[socket.socket]:
    """The HTTP port's listening sockets, one per front end; ValueError when the port is taken.

    With several, a plain bind first: a socket of a ``SO_REUSEPORT`` group would silently join
    another process's group on the same port (one of the same user's), where this one refuses."""
    count = args.tokenizer_worker_num
    address = (args.host, args.port)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    try:
        if count > 1:
            socket.create_server(address, family=family).close()
        return [
            socket.create_server(address, family=family, backlog=HTTP_BACKLOG, reuse_port=count > 1)
            for _ in range(count)
        ]
    except OSError as e:
        why = e.strerror or str(e)
        raise ValueError(f"--host {args.host} --port {args.port}: cannot listen there: {why}") from None


def start_frontends(
    mode: Mode,
    args: ServerArgs,
    ns: argparse.Namespace,
    directory: str,
    listeners: list[socket.socket],
    instances: dict[str, list[str]],
) -> FrontEnds:
    """Start the front ends (on ``instances``' addresses by role: unified, prefill, decode) and
    their HTTP servers, each on one of ``listeners`` (closed here once handed over)."""
    count = args.tokenizer_worker_num
    frontends, http_servers, client_addrs = [], [], []
    for i, listener in enumerate(listeners):
        client_port, output_port = args.frontend_ports(i)
        client_addr = f"tcp://{args.host}:{client_port}"
        # Instances on other hosts send their outputs back over TCP, beside the client ports;
        # a deployment that launch starts whole stays on this host and uses ipc.
        if mode == Mode.FRONTEND:
            output_addr = f"tcp://{args.host}:{output_port}"
        else:
            output_addr = ipc_addr(directory, f"{numbered('frontend', i)}-output")
        siblings = FrontendSiblings(index=i, count=count, metrics_dir=directory) if count > 1 else None
        cfg = FrontendConfig(args=args, client_addr=client_addr, output_addr=output_addr,
                             siblings=siblings, **instances)
        frontends.append(spawn(cfg.name, "tokenizer_proc", cfg))
        http_servers.append(start_http(args, ns, client_addr, numbered("http", i), listener))
        client_addrs.append(client_addr)
        listener.close()  # the server has its own copy: this one must not hold connections
    return FrontEnds(frontends, http_servers, client_addrs, f"http://{args.host}:{args.port}")


def start_http(
    args: ServerArgs, ns: argparse.Namespace, frontend_addr: str, name: str, listener: socket.socket
) -> Child:
    """An OpenAI-compatible HTTP server (api_server), a client of its front end. The API key
    travels in its environment, not on a command line that every user can read."""
    fd = listener.fileno()
    argv = ["--frontend-addr", frontend_addr, "--host", args.host, "--port", str(args.port), "--fd", str(fd)]
    for flag, value in (
        ("--model-path", args.model_path),
        ("--chat-template", ns.chat_template),
        ("--served-model-name", args.served_model_name),
    ):
        if value is not None:
            argv += [flag, value]
    env = {"PDSERVE_API_KEY": ns.api_key} if ns.api_key else {}
    return spawn_module(name, "api_server", argv, env, pass_fds=(fd,))
