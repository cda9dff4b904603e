"""Unified mode end to end: launch.py starts real processes; a client talks the wire protocol.

One deployment (embedded default model, float32, chunked prefill forced small) serves every
test of this module; each test ends with nothing leaked (free + cached pages == total)."""

from __future__ import annotations

import random

import pytest

from protocol.config import EMBEDDED
from tests.e2e.server import running_server, wait_no_leak
from tests.oracles import greedy_reference

MAX_NEW = 12
FLAGS = ("--dtype", "float32", "--page-size", "4", "--chunked-prefill-size", "32",
         "--max-running-requests", "24")


@pytest.fixture(scope="module")
def server():
    with running_server(*FLAGS) as s:
        yield s


@pytest.fixture()
def client(server):
    with server.client() as c:
        yield c
        wait_no_leak(c)


def byte_prompt(rng: random.Random, length: int, prefix: list[int] | None = None) -> list[int]:
    body = prefix or [EMBEDDED.bos_token_id]
    return body + [rng.randrange(256) for _ in range(length - len(body))]


def run_concurrently(client, prompts: list[list[int]], **params) -> list[dict]:
    rids = [client.submit(input_ids=p, temperature=0, max_new_tokens=MAX_NEW, ignore_eos=True, **params)
            for p in prompts]
    return [client.result(rid) for rid in rids]


def test_greedy_matches_single_request_reference(client):
    rng = random.Random(0)
    shared = [byte_prompt(rng, 70), byte_prompt(rng, 130)]
    # First wave: distinct lengths, misses plus prefixes that the second wave will hit.
    first = [byte_prompt(rng, n) for n in (1, 5, 31, 32, 33, 64, 97, 150, 220, 300)]
    first += [byte_prompt(rng, n, prefix=shared[i % 2]) for i, n in enumerate((90, 140, 200))]
    second = [byte_prompt(rng, n, prefix=shared[i % 2]) for i, n in enumerate((100, 150, 180, 260, 75))]
    second += [first[9], byte_prompt(rng, 45)]
    out_first = run_concurrently(client, first)
    out_second = run_concurrently(client, second)
    expected = greedy_reference(None, first + second, MAX_NEW)
    got = [o["token_ids"] for o in out_first + out_second]
    assert len(got) >= 16
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g == e, f"request {i}: served {g} != reference {e}"
    for o in out_first + out_second:
        assert o["finish_reason"] == "length"
        assert o["usage"]["completion_tokens"] == MAX_NEW
    assert out_second[5]["usage"]["cached_tokens"] == 296  # same 300-token prompt: all but its last page
    assert all(o["usage"]["cached_tokens"] >= 64 for o in out_second[:5])


def test_streaming_text_usage_and_metrics(client):
    pieces = list(client.stream("Hello, pdserve!", max_new_tokens=10, temperature=0, ignore_eos=True))
    final = pieces[-1]
    assert final["finished"] and final["finish_reason"] == "length"
    assert sum(len(p["token_ids"]) for p in pieces) == 10
    whole = client.generate("Hello, pdserve!", max_new_tokens=10, temperature=0, ignore_eos=True)
    assert "".join(p["text"] for p in pieces) == whole["text"]
    assert [t for p in pieces for t in p["token_ids"]] == whole["token_ids"]
    assert final["usage"]["prompt_tokens"] == len("Hello, pdserve!") + 1  # bytes + BOS
    assert final["usage"]["completion_tokens"] == 10
    metrics = final["metrics"]
    assert 0 <= metrics["queue_ms"] <= metrics["ttft_ms"] <= metrics["latency_ms"]


def test_seeded_sampling_is_independent_of_the_batch(client):
    params = dict(max_new_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    alone = client.generate(input_ids=[EMBEDDED.bos_token_id, 10, 20, 30], **params)
    rng = random.Random(5)
    others = [client.submit(input_ids=byte_prompt(rng, 40 + 7 * i), max_new_tokens=16, temperature=1.0)
              for i in range(6)]
    again = client.submit(input_ids=[EMBEDDED.bos_token_id, 10, 20, 30], **params)
    assert client.result(again)["token_ids"] == alone["token_ids"]
    for rid in others:
        client.result(rid)


def test_logprobs_of_sampled_tokens(client):
    out = client.generate(input_ids=[EMBEDDED.bos_token_id, 1, 2, 3], max_new_tokens=5, temperature=0,
                          ignore_eos=True, return_logprob=True)
    assert len(out["logprobs"]) == len(out["token_ids"]) == 5
    assert all(lp <= 0.0 for lp in out["logprobs"])
    assert max(out["logprobs"]) > -1.0  # greedy tokens of a model with clear margins


def test_stop_token_and_stop_string(client):
    prompt = [EMBEDDED.bos_token_id, *b"stop here"]
    full = client.generate(input_ids=prompt, max_new_tokens=24, temperature=0, ignore_eos=True)
    stop_token = full["token_ids"][5]
    cut = client.generate(input_ids=prompt, max_new_tokens=24, temperature=0, ignore_eos=True,
                          stop_token_ids=[stop_token])
    first = full["token_ids"].index(stop_token)
    assert cut["finish_reason"] == "stop"
    assert cut["token_ids"] == full["token_ids"][: first + 1]
    text = full["text"]
    start = next(i for i in range(2, len(text) - 2) if text[i : i + 2].isprintable()
                 and "\ufffd" not in text[i : i + 2])
    stop = text[start : start + 2]
    cut = client.generate(input_ids=prompt, max_new_tokens=24, temperature=0, ignore_eos=True, stop=[stop])
    assert cut["finish_reason"] == "stop"
    assert cut["text"] == text[: text.index(stop)]


def test_abort_mid_stream_frees_everything(client):
    rid = client.submit(input_ids=[EMBEDDED.bos_token_id] * 200, max_new_tokens=2000, temperature=0,
                        ignore_eos=True, stream=True)
    received = 0
    while received < 3:
        msg = client.next_message(timeout=60)
        assert msg is not None and msg["rid"] == rid, msg
        received += len(msg["token_ids"])
        assert not msg["finished"]
    client.abort(rid)
    final = client.result(rid)
    assert final["finished"] and final["finish_reason"] == "abort"
    wait_no_leak(client)


def test_abort_of_unknown_rid_is_ignored(client):
    client.abort("never-sent")
    assert client.generate(input_ids=[EMBEDDED.bos_token_id, 65], max_new_tokens=2)["finished"]
