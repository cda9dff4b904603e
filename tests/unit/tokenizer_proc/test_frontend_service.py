"""The front end in a thread, against fake instance threads, through the real client."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import msgpack
import pytest
import zmq

from protocol.config import EMBEDDED, config_to_json
from protocol.messages import StatusQuery, TokenizedRequest
from tests.fakes.frontend import FakeInstance, frontend_config
from tokenizer_proc.client import Client, ServerError
from tokenizer_proc.tokenizer import ByteTokenizer

BOS, EOS = EMBEDDED.bos_token_id, EMBEDDED.eos_token_id


def test_generate_returns_whole_answer_with_usage_and_metrics(deployment, client):
    out = client.generate("hi", max_new_tokens=5, temperature=0)
    assert out["type"] == "output" and out["finished"]
    assert out["text"] == "Hello"
    assert out["token_ids"] == list(b"Hello")
    assert out["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "cached_tokens": 0}
    assert set(out["metrics"]) == {"queue_ms", "ttft_ms", "latency_ms"}
    assert 0 <= out["metrics"]["ttft_ms"] <= out["metrics"]["latency_ms"]
    assert "logprobs" not in out

    (req,) = deployment.fake.requests()
    assert isinstance(req, TokenizedRequest)
    assert req.input_ids == [BOS, *b"hi"]
    assert req.sampling.stop_token_ids == [EOS]
    assert req.sampling.temperature == 0.0 and req.sampling.max_new_tokens == 5
    assert 0 <= req.sampling.seed < 2**63
    assert req.arrival_time > 0


def test_stream_ends_at_eos_which_is_not_in_the_text(deployment, client):
    chunks = list(client.stream(input_ids=[BOS, 1, 2], max_new_tokens=50, seed=7))
    assert len(chunks) == len(b"Hello, world!") + 1
    assert all(not c["finished"] for c in chunks[:-1]) and chunks[-1]["finished"]
    assert "".join(c["text"] for c in chunks) == "Hello, world!"
    assert [t for c in chunks for t in c["token_ids"]] == [*b"Hello, world!", EOS]
    assert chunks[-1]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == 14
    assert "usage" not in chunks[0]
    assert deployment.fake.requests()[0].sampling.seed == 7


def test_ignore_eos_leaves_eos_out_of_stop_tokens(deployment, client):
    out = client.generate("x", max_new_tokens=20, ignore_eos=True, stop_token_ids=[5])
    assert out["finish_reason"] == "length" and len(out["token_ids"]) == 20
    assert deployment.fake.requests()[0].sampling.stop_token_ids == [5]


def test_multibyte_characters_split_over_tokens_stream_whole(make_deployment):
    text = "héllo 日本 🙂"
    dep = make_deployment({"script": list(text.encode())})
    with dep.client() as client:
        chunks = list(client.stream("x", max_new_tokens=100))
    assert "".join(c["text"] for c in chunks) == text
    assert all("\ufffd" not in c["text"] for c in chunks)
    assert any(c["text"] == "" and c["token_ids"] for c in chunks)  # a held partial character


def test_stop_string_cuts_text_and_aborts_at_the_instance(deployment, client):
    rid = client.submit("x", stream=True, max_new_tokens=100, stop=["o, w"])
    out = client.result(rid)
    assert out["text"] == "Hell"
    assert out["finish_reason"] == "stop"
    assert client.next_message(timeout=0.1) is None  # the instance's abort answer is dropped
    (abort,) = deployment.fake.aborts()
    assert abort.reason == "stop"
    assert abort.rid == deployment.fake.requests()[0].rid


def test_logprobs_when_asked(client):
    out = client.generate("x", max_new_tokens=4, return_logprob=True)
    assert out["logprobs"] == [-0.25] * 4


def test_client_abort_ends_with_abort_reason(deployment, client):
    rid = client.submit("x", stream=True, max_new_tokens=200, ignore_eos=True)
    first = client.next_message(timeout=5)
    assert first["rid"] == rid and not first["finished"]
    client.abort(rid)
    out = client.result(rid)
    assert out["finish_reason"] == "abort"
    assert out["usage"]["completion_tokens"] < 200
    status = client.status()
    assert status["instances"][0]["decoding"] == 0


def test_abort_of_unknown_rid_is_ignored(client):
    client.abort("no-such-request")
    assert client.generate("x", max_new_tokens=2)["text"] == "He"


def test_status_reports_every_instance(make_deployment):
    dep = make_deployment({}, {})
    with dep.client() as client:
        status = client.status()
    assert status["type"] == "status" and status["ready"] is True
    assert [i["name"] for i in status["instances"]] == ["fake-0", "fake-1"]
    for inst in status["instances"]:
        assert inst["alive"] and inst["role"] == "unified"
        assert inst["free_pages"] + inst["cached_pages"] == inst["total_pages"]
    for fake in dep.fakes:  # answered to this front end only, where it runs beside others
        queries = [m for m in fake.received if isinstance(m, StatusQuery)]
        assert queries and {q.reply_to for q in queries} == {dep.cfg.output_addr}


def test_requests_are_spread_over_instances(make_deployment):
    dep = make_deployment({}, {}, routing_policy="round_robin")
    with dep.client() as client:
        rids = [client.submit("x", max_new_tokens=1) for _ in range(4)]
        for rid in rids:
            client.result(rid)
    assert [len(f.requests()) for f in dep.fakes] == [2, 2]


def test_many_concurrent_requests_are_kept_apart(client):
    rids = [client.submit(input_ids=[BOS, i], max_new_tokens=1 + i) for i in range(8)]
    for i, rid in reversed(list(enumerate(rids))):
        out = client.result(rid)
        assert out["rid"] == rid and len(out["token_ids"]) == 1 + i


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"input_ids": [BOS, EMBEDDED.vocab_size]}, "outside the vocabulary"),
        ({"input_ids": [-1]}, "outside the vocabulary"),
        ({"text": "x", "max_new_tokens": 300}, "context length"),
        ({"text": "x", "stop_token_ids": [999]}, "stop_token_ids"),
        ({"text": "x", "max_new_tokens": 0}, "max_new_tokens"),
        ({"text": ""}, "empty"),
        ({"text": "x", "temperature": float("nan")}, "temperature"),
        ({"text": "x", "max_tokens": 3}, "max_tokens"),
    ],
)
def test_invalid_requests_get_an_error_and_service_continues(client, kwargs, needle):
    with pytest.raises(ServerError) as err:
        client.generate(**kwargs)
    assert err.value.code == "invalid_request" and needle in err.value.message
    assert err.value.rid is not None
    assert client.generate("x", max_new_tokens=1)["finished"]


def test_duplicate_live_rid_is_refused(deployment, client):
    client.submit("x", rid="same", max_new_tokens=200, ignore_eos=True)
    client.submit("x", rid="same", max_new_tokens=1)
    with pytest.raises(ServerError) as err:
        client.result("same")
    assert err.value.code == "invalid_request" and "already in use" in err.value.message
    client.abort("same")
    assert client.result("same")["finish_reason"] == "abort"
    assert len(deployment.fake.requests()) == 1


@pytest.fixture
def raw(deployment):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(deployment.cfg.client_addr)
    yield sock
    sock.close()


def _exchange(sock: zmq.Socket, *frames: bytes) -> dict:
    sock.send_multipart(list(frames))
    assert sock.poll(5000), "no reply"
    return msgpack.unpackb(sock.recv())


@pytest.mark.parametrize(
    ("frames", "needle"),
    [
        ((b"\xc1 not msgpack",), "not msgpack"),
        ((msgpack.packb([1, 2]),), "must be a map"),
        ((msgpack.packb({"type": "generate", "rid": "r", "text": "x" * 5000}),), "exceeds the limit"),
        ((msgpack.packb({"type": "a"}), msgpack.packb({"type": "b"})), "one frame"),
    ],
)
def test_unreadable_frames_get_an_error_without_rid(raw, frames, needle):
    reply = _exchange(raw, *frames)
    assert reply == {"type": "error", "rid": None, "code": "invalid_request", "message": reply["message"]}
    assert needle in reply["message"]
    status = _exchange(raw, msgpack.packb({"type": "status", "rid": "s"}))
    assert status["type"] == "status" and status["ready"]


def test_unknown_type_names_the_type(raw):
    reply = _exchange(raw, msgpack.packb({"type": "frobnicate", "rid": "r"}))
    assert reply["code"] == "invalid_request" and "frobnicate" in reply["message"]
    assert reply["rid"] == "r"


def test_departed_client_has_its_requests_aborted(deployment):
    leaving = deployment.client()
    leaving.submit("x", stream=True, max_new_tokens=200, ignore_eos=True)
    assert deployment.fake.got_request.wait(5)
    leaving.close()
    assert deployment.fake.got_abort.wait(5)
    (abort,) = deployment.fake.aborts()
    assert abort.rid == deployment.fake.requests()[0].rid
    with deployment.client() as client:
        assert client.generate("x", max_new_tokens=2)["text"] == "He"
        assert client.status()["instances"][0]["decoding"] == 0


def test_dead_instance_fails_its_requests_and_recovers(deployment, client):
    fake = deployment.fake
    fake.generating.clear()
    rid = client.submit("x", max_new_tokens=5)
    assert fake.got_request.wait(5)
    fake.heartbeats.clear()
    with pytest.raises(ServerError) as err:
        client.result(rid)
    assert err.value.code == "peer_unavailable" and err.value.rid == rid
    status = client.status()
    assert status["ready"] is False and status["instances"][0]["alive"] is False
    with pytest.raises(ServerError) as err:
        client.generate("x", max_new_tokens=1)
    assert err.value.code == "peer_unavailable"

    fake.generating.set()
    fake.heartbeats.set()
    client.wait_ready(timeout=5)
    assert client.generate("x", max_new_tokens=2)["text"] == "He"


def test_not_ready_instance_refuses_requests_at_once(make_deployment):
    dep = make_deployment({"ready": False}, wait_ready=False)
    with dep.client() as client:
        with pytest.raises(ServerError) as err:
            client.generate("x", max_new_tokens=1)
        assert err.value.code == "peer_unavailable" and "not ready" in err.value.message
        assert client.status()["ready"] is False


def test_model_without_tokenizer_json_serves_input_ids_only(make_deployment, tmp_path):
    (tmp_path / "config.json").write_text('{"vocab_size": 320, "eos_token_id": 257}')
    dep = make_deployment(model_path=str(tmp_path))
    with dep.client() as client:
        with pytest.raises(ServerError) as err:
            client.generate("hello", max_new_tokens=1)
        assert err.value.code == "invalid_request" and "input_ids" in err.value.message
        out = client.generate(input_ids=[1, 2], max_new_tokens=3)
    assert out["text"] == "" and out["token_ids"] == list(b"Hel")


def test_client_timeout(make_deployment):
    dep = make_deployment()
    dep.fake.generating.clear()
    with Client(dep.cfg.client_addr, timeout=0.1) as client, pytest.raises(TimeoutError):
        client.generate("x", max_new_tokens=1)


def test_process_entry_point_serves_and_exits_on_sigterm(ipc_dir):
    cfg = frontend_config(ipc_dir)
    fake = FakeInstance(cfg.unified[0]).start()
    proc = subprocess.Popen([sys.executable, "-m", "tokenizer_proc", "--config", config_to_json(cfg)])
    try:
        with Client(cfg.client_addr, timeout=10) as client:
            client.wait_ready(timeout=10)
            assert client.generate("x", max_new_tokens=3)["text"] == "Hel"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()
        fake.stop()


def test_status_answers_in_time_when_an_instance_does_not(make_deployment):
    dep = make_deployment({}, {"answers_status": False})
    with dep.client() as client:
        start = time.monotonic()
        status = client.status()
        assert time.monotonic() - start < 2.0
    alive = [(i["name"], i["alive"]) for i in status["instances"]]
    assert alive == [("fake-0", True), ("fake-1", False)]


def test_leaving_a_stream_early_aborts_the_request(deployment, client):
    for chunk in client.stream("x", max_new_tokens=200, ignore_eos=True):
        assert not chunk["finished"]
        break
    assert deployment.fake.got_abort.wait(5)
    assert client.generate("x", max_new_tokens=2)["text"] == "He"  # the abort's answer is dropped
    assert client.next_message(timeout=0.05) is None


def test_shutdown_fails_live_requests(make_deployment):
    dep = make_deployment()
    dep.fake.generating.clear()
    with dep.client() as client:
        rid = client.submit("x", max_new_tokens=5)
        assert dep.fake.got_request.wait(5)
        dep.stop.set()
        with pytest.raises(ServerError) as err:
            client.result(rid)
    assert err.value.code == "shutting_down" and err.value.rid == rid
    dep.thread.join(timeout=5)
    assert dep.fake.got_abort.wait(5)


def test_a_bug_costs_one_request_not_the_service(monkeypatch, client):
    encode = ByteTokenizer.encode

    def encode_or_fail(self, text):
        if text == "boom":
            raise RuntimeError("kaput")
        return encode(self, text)

    monkeypatch.setattr(ByteTokenizer, "encode", encode_or_fail)
    with pytest.raises(ServerError) as err:
        client.generate("boom", max_new_tokens=1)
    assert err.value.code == "internal" and "kaput" in err.value.message
    assert client.generate("x", max_new_tokens=2)["text"] == "He"


def test_restarted_instance_is_attached_again(deployment, client):
    deployment.fake.stop()
    replacement = FakeInstance(deployment.cfg.unified[0], name="fake-0-restarted")
    deployment.fakes[0] = replacement.start()  # stopped by the fixture
    assert replacement.attached.wait(5)
    status = client.wait_ready(timeout=5)
    assert status["instances"][0]["name"] == "fake-0-restarted"
    assert client.generate("x", max_new_tokens=2)["text"] == "He"


def test_instance_refusal_reaches_the_client_with_its_code(client):
    with pytest.raises(ServerError) as err:
        client.generate(input_ids=[BOS] * 101, max_new_tokens=1)
    assert err.value.code == "queue_full" and "queue is full" in err.value.message
    assert client.generate(input_ids=[BOS] * 100, max_new_tokens=1)["finished"]
    assert client.status()["instances"][0]["decoding"] == 0
