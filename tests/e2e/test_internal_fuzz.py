"""A fuzz of every internal socket, as an authenticated but buggy peer (it holds the cluster keys)
would send: random bytes, random msgpack (deep nesting included), multipart frames, and every
internal message type of ``protocol.messages`` / ``protocol.dataplane`` with each field (nested
ones too) of the wrong type or out of range. Sockets: the input of a standalone prefill and a
standalone decode instance, the output socket of a ``--mode frontend`` front end (port + 1), and
the prefill worker's KV sender (ROUTER), both unregistered and registered. Afterwards every
process is alive, a request is served with the greedy reference's tokens and nothing leaked.

The ipc sockets between a scheduler and its worker are not fuzzed: they live in the launcher's
private 0700 directory (``transport.ipc_dir``), so only the deployment's own processes reach
them (docs/design.md, "Security"); a peer there is the instance itself.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import enum
import random
import re
import time
import types
import typing
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import zmq

from kvtransfer import link
from protocol import transport
from protocol.codec import PROTOCOL_VERSION, Message
from protocol.config import EMBEDDED
from protocol.dataplane import KVLayout, KVRegister, KVRegistered
from protocol.messages import AbortRequest, StatusQuery, StatusReport
from tests.e2e.server import (
    Server,
    e2e_keys,
    frontend_output_addr,
    kv_sender_addr,
    pid_alive,
    running_server,
    wait_no_leak,
)
from tests.oracles import greedy_reference
from tests.ports import free_tcp_port

FLAGS = ("--dtype", "float32", "--page-size", "4", "--chunked-prefill-size", "16",
         "--heartbeat-interval", "0.2", "--heartbeat-timeout", "2")
DEAD_ADDR = "tcp://127.0.0.1:9"  # an address nothing listens on: replies there go nowhere
FUZZ_ROOM = (1 << 40) + 7  # far from the rooms the front end mints
BAD_VALUES = (None, -1, 0, 1 << 63, -(1 << 63), 1.5, float("nan"), float("inf"), "", "x" * 300,
              "tcp://*:1", [], [1, "a"], [-1], {"a": 1}, b"\0", True)
BAD_PER_FIELD = 5  # bad values tried per field (sampled from BAD_VALUES)
PROMPT = [EMBEDDED.bos_token_id, *b"fuzzed and still serving"]
MAX_NEW = 6

INSTANCE_TYPES = ("tokenized_request", "abort_request", "status_query", "attach_frontend", "connect_prefill",
                  "register_decode", "register_reply", "peer_heartbeat", "peer_unknown", "room_dest",
                  "room_abort", "shutdown")
FRONTEND_TYPES = ("batch_output", "request_failed", "status_report", "heartbeat")


# ------------------------------------------------------------------------------------ frames


def message_types() -> dict[str, type[Message]]:
    """Every internal message class, by its type tag (the codec's registry)."""
    found: dict[str, type[Message]] = {}
    pending = list(Message.__subclasses__())
    while pending:
        cls = pending.pop()
        pending += cls.__subclasses__()
        if cls.TYPE and cls.INTERNAL:
            found[cls.TYPE] = cls
    return found


class Sampler:
    """Well-typed values for type hints; ids and addresses chosen to touch nothing real."""

    def __init__(self) -> None:
        self.rids: set[str] = set()

    def value(self, hint: Any, name: str) -> Any:
        if name == "rid" or name == "rid_prefix":
            rid = f"fuzz-{len(self.rids)}"
            self.rids.add(rid)
            return rid
        if name.endswith(("addr", "address", "reply_to")):
            return DEAD_ADDR
        if name == "room":
            return FUZZ_ROOM
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if origin in (typing.Union, types.UnionType):
            return self.value(next(a for a in args if a is not type(None)), name)
        if origin is list:
            return [self.value(args[0], name.removesuffix("s"))]
        if origin is dict or hint is Any:
            return {}
        if dataclasses.is_dataclass(hint):
            return self.fields(hint)
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            return next(iter(hint)).value
        return {int: 3, float: 0.5, str: "fuzz", bool: True, bytes: b"x"}[hint]

    def fields(self, cls: type) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        return {f.name: self.value(hints[f.name], f.name) for f in dataclasses.fields(cls)}

    def message(self, cls: type[Message]) -> dict[str, Any]:
        return {**self.fields(cls), "type": cls.TYPE, "v": PROTOCOL_VERSION}


def paths(obj: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a message map a value sits (into nested maps and the first list item)."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield (*prefix, key)
            yield from paths(value, (*prefix, key))
    elif isinstance(obj, list) and obj:
        yield from paths(obj[0], (*prefix, 0))


def replaced(obj: Any, path: tuple[Any, ...], value: Any) -> Any:
    copy = msgpack.unpackb(msgpack.packb(obj), strict_map_key=False)
    target = copy
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return copy


def nested(depth: int) -> object:
    leaf: object = 1
    for i in range(depth):
        leaf = [leaf] if i % 2 else {"k": leaf}
    return leaf


def random_value(rng: random.Random, depth: int = 0) -> object:
    makers = [
        lambda: None, lambda: rng.random() < 0.5, lambda: rng.randrange(-(1 << 63), 1 << 64),
        lambda: rng.random() * 1e300, lambda: "x" * rng.randrange(50),
        lambda: rng.randbytes(rng.randrange(20)),
        lambda: [random_value(rng, depth + 1) for _ in range(rng.randrange(4))],
        lambda: {str(rng.randrange(9)): random_value(rng, depth + 1) for _ in range(rng.randrange(4))},
        lambda: nested(rng.randrange(400)),  # msgpack packs at most 511 levels
    ]
    return rng.choice(makers if depth < 6 else makers[:6])()


def fuzz_frames(rng: random.Random, sampler: Sampler, focus: tuple[str, ...]) -> list[list[bytes]]:
    """Frames for one socket: each field of each ``focus`` type made bad, a few mutations of
    every other internal type, random bytes, random msgpack and multipart messages."""
    frames: list[list[bytes]] = []
    for tag, cls in message_types().items():
        base = sampler.message(cls)
        mutations = [(p, bad) for p in paths(base) for bad in rng.sample(BAD_VALUES, BAD_PER_FIELD)]
        if tag not in focus:
            mutations = rng.sample(mutations, min(4, len(mutations)))
        frames += [[msgpack.packb(replaced(base, p, bad))] for p, bad in mutations]
        frames += [[msgpack.packb({k: v for k, v in base.items() if k != key})] for key in list(base)[:2]]
    frames += [[rng.randbytes(rng.randrange(1, 300))] for _ in range(40)]
    frames += [[msgpack.packb(random_value(rng))] for _ in range(40)]
    tags = list(message_types())
    frames += [[msgpack.packb({"type": rng.choice(tags), "v": PROTOCOL_VERSION, "x": random_value(rng)})]
               for _ in range(30)]
    frames += [[msgpack.packb({"type": tag, "v": 0})] for tag in focus]
    frames += [[rng.randbytes(8)] * rng.randrange(2, 5) for _ in range(5)]
    frames += [[b""], [b"", b""], [b"\x91" * 100_000 + b"\x01"]]  # the last: 100,000 nested lists
    rng.shuffle(frames)
    return frames


# ------------------------------------------------------------------------------------ deployment


@dataclasses.dataclass
class Deployment:
    prefill: Server
    decode: Server
    frontend: Server

    @property
    def servers(self) -> tuple[Server, ...]:
        return (self.prefill, self.decode, self.frontend)

    def pids(self) -> list[int]:
        return [pid for s in self.servers for pid in [s.proc.pid, *s.child_pids.values()]]


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    with contextlib.ExitStack() as stack:
        prefill = stack.enter_context(running_server(*FLAGS, mode="prefill"))
        decode = stack.enter_context(running_server(*FLAGS, mode="decode"))
        links = ("--prefill", prefill.addr, "--decode", decode.addr)
        frontend = stack.enter_context(running_server(*FLAGS, *links, mode="frontend"))
        yield Deployment(prefill, decode, frontend)


@pytest.fixture(scope="module")
def expected() -> list[int]:
    return greedy_reference(None, [PROMPT], MAX_NEW)[0]


def assert_serves(d: Deployment, expected: list[int]) -> None:
    dead = [pid for pid in d.pids() if not pid_alive(pid)]
    assert not dead, f"processes died: {dead}"
    with d.frontend.client(timeout=30) as c:
        out = c.generate(input_ids=PROMPT, max_new_tokens=MAX_NEW, temperature=0, ignore_eos=True)
        assert out["token_ids"] == expected
        wait_no_leak(c)


# ------------------------------------------------------------------------------------ sockets


def push(addr: str) -> zmq.Socket:
    return transport.connect(zmq.Context.instance(), zmq.PUSH, addr, keys=e2e_keys())


def send_all(sock: zmq.Socket, frames: list[list[bytes]], deadline: float) -> None:
    for parts in frames:
        assert time.monotonic() < deadline, "the fuzz ran out of its time budget"
        sock.send_multipart(parts)


@contextlib.contextmanager
def inbox() -> Iterator[tuple[zmq.Socket, str]]:
    """A CURVE PULL of the test's own, for an instance's replies (``reply_to``)."""
    addr = f"tcp://127.0.0.1:{free_tcp_port()}"
    sock = transport.bind(zmq.Context.instance(), zmq.PULL, addr, keys=e2e_keys())
    try:
        yield sock, addr
    finally:
        sock.close(linger=0)


def barrier(to_instance: zmq.Socket, replies: zmq.Socket, reply_addr: str) -> None:
    """Returns once the instance has read everything sent before: its input is in order."""
    transport.send(to_instance, StatusQuery(qid=424242, reply_to=reply_addr))
    deadline = time.monotonic() + 30
    while replies.poll(max(deadline - time.monotonic(), 0) * 1000):
        msg = transport.recv(replies)
        if isinstance(msg, StatusReport) and msg.qid == 424242:
            return
    raise AssertionError("the instance did not answer a status query after the fuzz")


def test_fuzz_every_internal_socket(deployment, expected):
    d = deployment
    assert_serves(d, expected)
    rng, sampler = random.Random(20240611), Sampler()
    deadline = time.monotonic() + 60
    counts: dict[str, int] = {}
    with inbox() as (replies, reply_addr):
        for name, server in (("prefill input", d.prefill), ("decode input", d.decode)):
            sock = push(server.addr)
            frames = fuzz_frames(rng, sampler, INSTANCE_TYPES)
            send_all(sock, frames, deadline)
            barrier(sock, replies, reply_addr)
            counts[name] = len(frames)
            sock.close()
        out_sock = push(frontend_output_addr(d.frontend))
        frames = fuzz_frames(rng, sampler, FRONTEND_TYPES)
        send_all(out_sock, frames, deadline)
        counts["front-end output"] = len(frames)
        out_sock.close(linger=5000)
        counts |= fuzz_kv_sender(kv_sender_addr(d.prefill), rng, sampler, deadline)
        abort_fuzz_requests(d, sampler.rids, replies, reply_addr)
    print(f"fuzz: frames per socket {counts}, {time.monotonic() - deadline + 60:.1f} s")
    assert_serves(d, expected)


def abort_fuzz_requests(d: Deployment, rids: set[str], replies: zmq.Socket, reply_addr: str) -> None:
    """A fuzzed request may be well-formed and live on: as its sender would, abort it."""
    for server in (d.prefill, d.decode):
        sock = push(server.addr)
        for rid in sorted(rids):
            transport.send(sock, AbortRequest(rid=rid))
        barrier(sock, replies, reply_addr)
        sock.close()


# ------------------------------------------------------------------------------------ KV sender


def kv_dealer(addr: str, identity: bytes) -> zmq.Socket:
    """A decode-side DEALER to the KV sender, with the cluster keys (``kvtransfer.link.socket``)."""
    sock = link.socket(zmq.Context.instance(), zmq.DEALER, identity=identity, keys=e2e_keys())
    sock.connect(addr)
    return sock


def kv_registered(sock: zmq.Socket, layout: KVLayout, epoch: int) -> KVRegistered:
    sock.send(link.header(KVRegister(layout, session="fuzz", epoch=epoch)))
    deadline = time.monotonic() + 20
    while sock.poll(max(deadline - time.monotonic(), 0) * 1000):
        msg = link.read(sock.recv_multipart()[0])
        if isinstance(msg, KVRegistered) and msg.epoch == epoch:
            return msg
    raise AssertionError("the KV sender did not answer a registration")


def register_with(sock: zmq.Socket) -> None:
    """Register as a decode peer, learning the sender's layout field by field from its refusals
    (each names the first field that differs and the sender's value)."""
    layout = KVLayout(EMBEDDED.name, EMBEDDED.num_layers, 4, EMBEDDED.num_kv_heads, EMBEDDED.head_dim,
                      "float32", "zmq")
    for epoch in range(12):
        reply = kv_registered(sock, layout, epoch)
        if reply.ok:
            return
        found = re.match(r"(\w+) mismatch: this side has (.*), the peer has", reply.error or "")
        assert found, reply.error
        layout = dataclasses.replace(layout, **{found[1]: ast.literal_eval(found[2])})
    raise AssertionError("could not register with the KV sender")


def fuzz_kv_sender(addr: str, rng: random.Random, sampler: Sampler, deadline: float) -> dict[str, int]:
    kv_types = tuple(tag for tag in message_types() if tag.startswith("kv_"))
    counts = {}
    for name, registered in (("KV sender (unregistered)", False), ("KV sender (registered)", True)):
        sock = kv_dealer(addr, f"fuzz-{name[-11:-1]}".encode())
        if registered:
            register_with(sock)
        frames = fuzz_frames(rng, sampler, kv_types)
        send_all(sock, frames, deadline)
        kv_registered(sock, KVLayout("x", 1, 1, 1, 1, "x", "x"), 99)  # answered in order: all were read
        counts[name] = len(frames)
        sock.close()
    return counts
