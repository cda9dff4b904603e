"""Limits on what one client frame may cost, bounded quoting, identities and duplicates."""

from __future__ import annotations

import msgpack
import pytest
import zmq

from protocol.validation import preview
from tokenizer_proc.client import ServerError
from tokenizer_proc.connections import assigned_by_router, bind_client_socket
from tokenizer_proc.detokenizer import IncrementalDetokenizer
from tokenizer_proc.tokenizer import ByteTokenizer
from tokenizer_proc.validation import (
    InvalidRequest,
    ModelLimits,
    check_text_size,
    parse_command,
    unpack_frame,
)


def generate(**fields) -> dict:
    return {"type": "generate", "rid": "r", "input_ids": [1, 2], **fields}


@pytest.mark.parametrize(
    ("obj", "needle"),
    [
        (generate(rid="r" * 257), "rid of 257 characters"),
        (generate(sampling_params={"stop": ["a"] * 33}), "stop has 33 items"),
        (generate(sampling_params={"stop": ["a" * 257]}), "at most 256 characters"),
        (generate(sampling_params={"stop_token_ids": [1] * 1025}), "stop_token_ids has 1025 items"),
        (generate(priority=1 << 31), "priority must be in"),
        (generate(sampling_params={"top_k": 1 << 31}), "top_k must be"),
        ({"type": "x" * 100_000, "rid": "r"}, "unknown message type 'xxx"),
        (generate(**{"k" * 100_000: 1}), "unknown field(s) in generate: 'kkk"),
    ],
)
def test_limits_are_refused_with_short_messages(obj, needle):
    with pytest.raises(InvalidRequest) as err:
        parse_command(obj)
    assert needle in str(err.value) and len(str(err.value)) < 200
    assert err.value.rid is None or len(err.value.rid) <= 256


def test_deep_and_wide_frames_are_refused_when_unpacked():
    deep: object = 1
    for _ in range(1000):
        deep = [deep]
    with pytest.raises(InvalidRequest, match="nests more than 8"):
        unpack_frame(msgpack.packb({"type": deep}), 1 << 20)
    with pytest.raises(InvalidRequest, match="max_map_len"):
        unpack_frame(msgpack.packb({str(i): i for i in range(65)}), 1 << 20)
    assert unpack_frame(msgpack.packb(generate(sampling_params={"stop": ["a"]})), 1 << 20)


def test_text_is_measured_before_tokenizing():
    limits = ModelLimits(vocab_size=320, context_len=16)
    check_text_size("é" * 256, limits)  # 512 bytes = 16 * 32
    with pytest.raises(InvalidRequest, match="limit is 512 bytes"):
        check_text_size("é" * 257, limits)


def test_preview_is_short_whatever_the_value():
    assert preview("x" * 10**6).startswith("'xxx") and len(preview("x" * 10**6)) <= 40
    assert preview([[1]] * 10**6) == "a list of 1000000 item(s)"
    assert preview(None) == "None"


@pytest.mark.parametrize("stops", [["ab"], ["xyz", "yzz"], ["aaab"], ["a" * 256] * 32])
def test_stop_prefix_search_holds_back_what_could_start_a_stop(stops):
    tok = ByteTokenizer()
    detok = IncrementalDetokenizer(tok, stops)
    text = "".join(detok.step([b]) for b in b"zzaaaaaxyzzyaaa")
    held = detok._held
    assert text + held == "zzaaaaaxyzzyaaa"[: len(text) + len(held)]
    expected = max((n for n in range(1, len(held) + 1) for s in stops if s.startswith(held[-n:])), default=0)
    assert len(held) == expected


def test_identity_claimed_by_a_second_connection_gets_nothing():
    ctx = zmq.Context.instance()
    router = bind_client_socket(ctx, "tcp://127.0.0.1:*", 1 << 20)
    addr = router.getsockopt(zmq.LAST_ENDPOINT).decode()
    first, second = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    try:
        first.connect(addr)
        first.send(b"one")
        identity, _ = router.recv_multipart()
        assert assigned_by_router(identity) and identity != b"\x00k\x8bEg"  # not libc's unseeded rand
        second.setsockopt(zmq.ROUTING_ID, identity)
        second.connect(addr)
        second.send(b"two")
        assert not router.poll(300)  # ignored by the ROUTER
        router.send_multipart([identity, b"reply"])
        assert first.recv() == b"reply" and not second.poll(300)
    finally:
        for sock in (first, second, router):
            sock.close(linger=0)


def test_duplicate_rid_error_is_flagged_and_does_not_end_the_live_request(deployment, client):
    rid = client.submit("x", stream=True, max_new_tokens=5)
    client.submit("x", rid=rid, max_new_tokens=1)
    with pytest.raises(ServerError) as err:
        client.result(rid)
    assert err.value.duplicate and err.value.rid == rid
    assert client.result(rid)["finish_reason"] == "length"
