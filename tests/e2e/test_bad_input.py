"""Every bad input gets an ``invalid_request`` error naming the problem; the service keeps
serving (each case is followed by a good request) and nothing leaks."""

from __future__ import annotations

import math

import msgpack
import pytest
import zmq

from protocol.config import EMBEDDED
from tests.e2e.server import running_server, wait_no_leak

MAX_MESSAGE_BYTES = 1 << 16


@pytest.fixture(scope="module")
def server():
    with running_server("--dtype", "float32", "--max-message-bytes", str(MAX_MESSAGE_BYTES)) as s:
        yield s


@pytest.fixture()
def raw(server):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 30_000)
    sock.connect(server.addr)
    yield sock
    sock.close()


def gen(**overrides) -> dict:
    msg = {"type": "generate", "rid": "r", "input_ids": [EMBEDDED.bos_token_id, 72, 105], "stream": False,
           "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
    for key, value in overrides.items():
        if key.startswith("sp_"):
            msg["sampling_params"][key[3:]] = value
        elif value is _DELETE:
            msg.pop(key)
        else:
            msg[key] = value
    return msg


_DELETE = object()

BAD = {
    "empty text": (gen(input_ids=_DELETE, text=""), "empty"),
    "empty ids": (gen(input_ids=[]), "empty"),
    "too long": (gen(sp_max_new_tokens=EMBEDDED.context_len), "context"),
    "negative id": (gen(input_ids=[1, -1]), "input_ids"),
    "id beyond vocab": (gen(input_ids=[1, EMBEDDED.vocab_size]), "input_ids"),
    "max_new_tokens 0": (gen(sp_max_new_tokens=0), "max_new_tokens"),
    "max_new_tokens float": (gen(sp_max_new_tokens=2.5), "max_new_tokens"),
    "max_new_tokens bool": (gen(sp_max_new_tokens=True), "max_new_tokens"),
    "negative temperature": (gen(sp_temperature=-0.5), "temperature"),
    "nan temperature": (gen(sp_temperature=math.nan), "temperature"),
    "inf temperature": (gen(sp_temperature=math.inf), "temperature"),
    "top_p zero": (gen(sp_top_p=0.0), "top_p"),
    "top_p above one": (gen(sp_top_p=1.5), "top_p"),
    "top_k below -1": (gen(sp_top_k=-2), "top_k"),
    "unknown type": ({"type": "launch_missiles", "rid": "r"}, "type"),
    "missing rid": (gen(rid=_DELETE), "rid"),
    "rid not a string": (gen(rid=7), "rid"),
    "text not a string": (gen(input_ids=_DELETE, text=5), "text"),
    "ids not a list": (gen(input_ids="abc"), "input_ids"),
    "stream not a bool": (gen(stream="yes"), "stream"),
    "stop not strings": (gen(sp_stop=[1]), "stop"),
    "text and ids": (gen(text="hi"), "text"),
}


def exchange(sock, payload: bytes) -> dict:
    sock.send(payload)
    return msgpack.unpackb(sock.recv(), raw=False)


def assert_serves(sock) -> None:
    reply = exchange(sock, msgpack.packb(gen(rid="good")))
    assert reply["type"] == "output" and reply["finished"] and len(reply["token_ids"]) == 4, reply


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_is_refused_and_service_continues(raw, case):
    message, word = BAD[case]
    reply = exchange(raw, msgpack.packb(message))
    assert reply["type"] == "error" and reply["code"] == "invalid_request", reply
    assert word in reply["message"].lower(), reply["message"]
    assert_serves(raw)


def test_bytes_that_are_not_msgpack(raw):
    reply = exchange(raw, b"\xc1\xc1 definitely not msgpack")
    assert reply["type"] == "error" and reply["code"] == "invalid_request" and reply["rid"] is None
    assert_serves(raw)


def test_frame_over_the_size_limit(raw):
    reply = exchange(raw, msgpack.packb(gen(input_ids=[65] * MAX_MESSAGE_BYTES)))
    assert reply["type"] == "error" and reply["code"] == "invalid_request"
    assert "exceeds the limit" in reply["message"]
    assert_serves(raw)


def test_second_live_request_with_the_same_rid(raw, server):
    long = gen(rid="dup", sp_max_new_tokens=400, sp_ignore_eos=True)
    raw.send(msgpack.packb(long))
    reply = exchange(raw, msgpack.packb(gen(rid="dup")))
    assert reply["type"] == "error" and reply["code"] == "invalid_request" and reply["rid"] == "dup"
    first = msgpack.unpackb(raw.recv(), raw=False)
    assert first["type"] == "output" and first["rid"] == "dup" and len(first["token_ids"]) == 400
    assert_serves(raw)


def test_abort_of_unknown_rid_then_serves(raw, server):
    raw.send(msgpack.packb({"type": "abort", "rid": "nobody"}))
    assert_serves(raw)
    with server.client() as c:
        wait_no_leak(c)
