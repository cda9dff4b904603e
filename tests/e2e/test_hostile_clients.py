"""The front end against hostile clients: frames that used to kill it, requests that used to
stall everyone, clients that stop reading or leave, identities claimed by others, and a fuzz
of the client socket. Each case ends with the service still serving and nothing leaked."""

from __future__ import annotations

import os
import random
import time

import msgpack
import pytest
import zmq

from protocol.config import EMBEDDED
from tests.e2e.server import pid_alive, running_server, wait_no_leak

BOS = EMBEDDED.bos_token_id


@pytest.fixture(scope="module")
def server():
    with running_server("--dtype", "float32") as s:
        yield s


def dealer(server, identity: bytes | None = None, **options: int) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 30_000)
    if identity is not None:
        sock.setsockopt(zmq.ROUTING_ID, identity)
    for name, value in options.items():
        sock.setsockopt(getattr(zmq, name), value)
    sock.connect(server.addr)
    return sock


@pytest.fixture()
def raw(server):
    sock = dealer(server)
    yield sock
    sock.close()


def gen(rid: str = "good", **sampling) -> dict:
    return {"type": "generate", "rid": rid, "input_ids": [BOS, 72, 105], "stream": False,
            "sampling_params": {"max_new_tokens": 2, "temperature": 0, **sampling}}


def reply(sock: zmq.Socket) -> dict:
    return msgpack.unpackb(sock.recv(), raw=False)


def assert_serves(server) -> None:
    with server.client(timeout=30) as c:
        assert c.generate(input_ids=[BOS, 72, 105], max_new_tokens=2, temperature=0)["finished"]
        wait_no_leak(c)
    assert server.proc.poll() is None and all(pid_alive(p) for p in server.child_pids.values())


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def nested(depth: int, leaf: object = 1) -> object:
    for i in range(depth):
        leaf = [leaf] if i % 2 else {"k": leaf}
    return leaf


@pytest.mark.parametrize("depth", [20, 1000])
def test_deep_nesting_is_an_invalid_request(server, raw, depth):
    raw.send(msgpack.packb({"type": nested(depth)}))
    err = reply(raw)
    assert err["type"] == "error" and err["code"] == "invalid_request" and "nests" in err["message"], err
    assert_serves(server)


HOSTILE = {
    "1,000,000 stop strings": lambda: gen("h", stop=["ab"] * 1_000_000),
    "63 MiB text": lambda: {**gen("h"), "input_ids": None, "text": "x" * (63 << 20)},
    "256 KiB rid": lambda: gen("r" * (256 << 10)),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_request_stalls_others_briefly(server, raw, case):
    frame = msgpack.packb(HOSTILE[case]())
    with server.client(timeout=30) as good:
        good.generate(input_ids=[BOS, 72], max_new_tokens=1)  # warm
        t0 = time.perf_counter()
        good.generate(input_ids=[BOS, 72], max_new_tokens=1)
        alone = time.perf_counter() - t0
        raw.send(frame)
        t0 = time.perf_counter()
        good.generate(input_ids=[BOS, 72], max_new_tokens=1)
        stalled = time.perf_counter() - t0
    err = reply(raw)
    print(f"{case}: a good request took {alone * 1e3:.0f} ms alone, {stalled * 1e3:.0f} ms after it")
    assert err["type"] == "error" and err["code"] == "invalid_request", err
    assert len(err["message"]) < 300 and (err["rid"] is None or len(err["rid"]) <= 256), err["message"][:300]
    assert stalled < 1.5, f"{case}: stalled {stalled:.2f} s"
    assert_serves(server)


def test_client_that_stops_reading_is_bounded_and_aborted(server):
    pid = server.child_pids["frontend"]
    before = rss_kib(pid)
    slow = dealer(server, RCVHWM=1, RCVBUF=4096)
    for i in range(64):
        slow.send(msgpack.packb(gen(f"s{i}", max_new_tokens=1500, ignore_eos=True) | {"stream": True}))
    with server.client(timeout=30) as c:
        wait_no_leak(c, timeout=60)  # aborted once its queue was full (or finished)
    after = rss_kib(pid)
    print(f"front end VmRSS: {before} KiB before, {after} KiB after a client that stopped reading")
    slow.close()
    assert after - before < 100 << 10
    assert_serves(server)


def test_non_streaming_client_that_leaves_is_aborted(server):
    leaver = dealer(server)
    for i in range(4):
        leaver.send(msgpack.packb(gen(f"l{i}", max_new_tokens=3000, ignore_eos=True)))
    time.sleep(0.5)
    with server.client(timeout=30) as c:
        busy = c.status()["instances"][0]
        assert busy["pending"] + busy["prefilling"] + busy["decoding"] > 0, busy
        leaver.close()
        t0 = time.monotonic()
        wait_no_leak(c, timeout=5)
        print(f"requests of a departed client aborted within {time.monotonic() - t0:.2f} s")
    assert_serves(server)


def test_client_chosen_identity_is_refused(server):
    claimant = dealer(server, b"mallory")
    claimant.send(msgpack.packb(gen("x")))
    err = reply(claimant)
    assert err["type"] == "error" and err["code"] == "invalid_request" and "identity" in err["message"]
    claimant.close()
    assert_serves(server)


def test_identity_taken_over_gets_nothing(server):
    """libzmq ignores a connection that claims an identity in use (handover is off): whatever
    identity a second connection claims, it receives nothing of another's stream."""
    with server.client(timeout=30) as victim:
        rid = victim.submit(input_ids=[BOS, 72], max_new_tokens=200, ignore_eos=True, stream=True)
        thieves = []
        for guess in range(16):  # identities of the shape the ROUTER assigns
            t = dealer(server, b"\x00" + guess.to_bytes(4, "big"), RCVTIMEO=200)
            t.send(msgpack.packb({"type": "abort", "rid": rid}))
            thieves.append(t)
        out = victim.result(rid)
        assert out["finish_reason"] == "length" and len(out["token_ids"]) == 200
        for t in thieves:
            with pytest.raises(zmq.Again):
                while True:
                    assert reply(t)["type"] == "error"  # refused, never an output
            t.close()
    assert_serves(server)


BAD_VALUES = (None, -1, 1 << 63, -(1 << 63), 1.5, float("nan"), "", "x" * 300, [1, "a"], {"a": 1}, b"\0")


def fuzz_frames(rng: random.Random) -> list[list[bytes]]:
    def value(depth: int = 0) -> object:
        makers = [
            lambda: None, lambda: True, lambda: rng.randrange(-(1 << 63), 1 << 64),
            lambda: rng.random() * 1e300,
            lambda: "x" * rng.randrange(50), lambda: bytes(rng.randrange(20)),
            lambda: [value(depth + 1) for _ in range(rng.randrange(4))],
            lambda: {str(rng.randrange(9)): value(depth + 1) for _ in range(rng.randrange(4))},
            lambda: nested(rng.randrange(900)),
        ]
        return rng.choice(makers if depth < 6 else makers[:6])()

    good = gen("f", stop=["!"], stop_token_ids=[5], top_p=0.5, top_k=3, seed=1) | {"priority": 1}
    frames: list[list[bytes]] = []
    for key in [*good, *(f"sp.{k}" for k in good["sampling_params"])]:
        for bad in BAD_VALUES:
            msg = msgpack.unpackb(msgpack.packb(good))
            if key.startswith("sp."):
                msg["sampling_params"][key[3:]] = bad
            else:
                msg[key] = bad
            frames.append([msgpack.packb(msg)])
    frames += [[rng.randbytes(rng.randrange(1, 200))] for _ in range(60)]
    frames += [[msgpack.packb(value())] for _ in range(60)]
    kinds = ["generate", "abort", "status"]
    frames += [[msgpack.packb({"type": rng.choice(kinds), "rid": "z", "x": value()})] for _ in range(30)]
    frames += [[msgpack.packb(good)] * rng.randrange(2, 5) for _ in range(10)]
    frames += [[b""], [b"", b""]]
    return frames


def test_fuzz_the_client_socket(server, raw):
    frames = fuzz_frames(random.Random(1234))
    for parts in frames:
        raw.send_multipart(parts)
    replies = 0
    raw.setsockopt(zmq.RCVTIMEO, 3000)
    try:
        while True:
            reply(raw)
            replies += 1
    except zmq.Again:
        pass
    print(f"fuzz: {len(frames)} frames, {replies} replies")
    assert replies > 0
    assert_serves(server)
    assert os.path.exists(f"/proc/{server.child_pids['frontend']}")
