"""``batch_outputs``: the outputs of one instance step for a connection's requests that asked
for it arrive as one ``outputs`` frame; requests that did not ask get one ``output`` each."""

from __future__ import annotations

import time

import msgpack
import pytest
import zmq

from tokenizer_proc.client import Client

SCRIPT = list(b"Hello, world!")


@pytest.fixture
def raw(deployment):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(deployment.cfg.client_addr)
    yield sock
    sock.close()


def generate(rid: str, batch_outputs: object = None) -> bytes:
    msg = {"type": "generate", "rid": rid, "input_ids": [1, 2, 3], "stream": True,
           "sampling_params": {"max_new_tokens": 5, "ignore_eos": True}}
    if batch_outputs is not None:
        msg["batch_outputs"] = batch_outputs
    return msgpack.packb(msg)


def start_together(deployment, raw, frames: list[bytes]) -> None:
    """Send ``frames`` while the fake instance holds its steps, so they share every step."""
    fake = deployment.fake
    fake.generating.clear()
    for frame in frames:
        raw.send(frame)
    deadline = time.monotonic() + 10
    while len(fake.requests()) < len(frames):
        assert time.monotonic() < deadline, "the requests did not reach the instance"
        time.sleep(0.01)
    fake.generating.set()


def collect(raw, rids: set[str]) -> list[dict]:
    frames, finished = [], set()
    while finished != rids:
        assert raw.poll(10_000), f"no reply; finished {finished}"
        msg = msgpack.unpackb(raw.recv())
        frames.append(msg)
        for out in msg["outputs"] if msg["type"] == "outputs" else [msg]:
            assert out["type"] == "output", out
            if out["finished"]:
                finished.add(out["rid"])
    return frames


def tokens_by_rid(frames: list[dict]) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    for msg in frames:
        for out in msg["outputs"] if msg["type"] == "outputs" else [msg]:
            tokens.setdefault(out["rid"], []).extend(out["token_ids"])
    return tokens


def test_requests_that_ask_share_one_frame_per_step(deployment, raw):
    start_together(deployment, raw, [generate("a", True), generate("b", True)])
    frames = collect(raw, {"a", "b"})
    batched = [m for m in frames if m["type"] == "outputs"]
    assert batched, frames
    assert all({o["rid"] for o in m["outputs"]} == {"a", "b"} for m in batched)
    assert tokens_by_rid(frames) == {"a": SCRIPT[:5], "b": SCRIPT[:5]}
    finals = [o for m in frames for o in (m["outputs"] if m["type"] == "outputs" else [m]) if o["finished"]]
    assert all(o["usage"]["completion_tokens"] == 5 and o["finish_reason"] == "length" for o in finals)


def test_requests_that_do_not_ask_get_one_frame_per_output(deployment, raw):
    start_together(deployment, raw, [generate("a"), generate("b", False), generate("c", True)])
    frames = collect(raw, {"a", "b", "c"})
    assert all(m["type"] == "output" for m in frames)  # "c" alone asked: nothing to group it with
    assert tokens_by_rid(frames) == {"a": SCRIPT[:5], "b": SCRIPT[:5], "c": SCRIPT[:5]}


def test_a_batch_outputs_that_is_not_a_boolean_is_refused(deployment, raw):
    raw.send(generate("x", "yes"))
    assert raw.poll(5000)
    reply = msgpack.unpackb(raw.recv())
    assert reply["type"] == "error" and reply["rid"] == "x" and "batch_outputs" in reply["message"]
    raw.send(msgpack.packb({"type": "status", "rid": "s"}))  # and the service goes on
    assert raw.poll(5000) and msgpack.unpackb(raw.recv())["rid"] == "s"


def test_the_python_client_unpacks_batched_outputs(deployment):
    fake = deployment.fake
    with Client(deployment.cfg.client_addr, timeout=10) as client:
        fake.generating.clear()
        rids = [client.submit(input_ids=[1, 2, 3], stream=True, max_new_tokens=4, ignore_eos=True)
                for _ in range(3)]
        deadline = time.monotonic() + 10
        while len(fake.requests()) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        fake.generating.set()
        for rid in rids:
            assert client.result(rid)["token_ids"] == SCRIPT[:4]
