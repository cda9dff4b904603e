"""``/health``, ``/v1/models`` and SGLang's native ``/generate``, streaming and not."""

from __future__ import annotations

import json

from tests.unit.api_server.conftest import MODEL

PROMPT = "Native prompt"
SAMPLING = {"max_new_tokens": 6, "temperature": 0}


def test_health_and_models(http):
    r = http.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ready"}
    models = http.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [MODEL] and models["data"][0]["object"] == "model"
    assert http.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    assert http.get("/v1/models/other").status_code == 404


def test_generate_matches_zmq_client(http, zmq_client):
    want = zmq_client.generate(PROMPT, return_logprob=True, **SAMPLING)
    body = {"text": PROMPT, "sampling_params": SAMPLING, "return_logprob": True}
    got = http.post("/generate", json=body).json()
    assert got["text"] == want["text"] and got["output_ids"] == want["token_ids"]
    meta = got["meta_info"]
    assert meta["finish_reason"] == {"type": "length"}
    assert meta["prompt_tokens"] == want["usage"]["prompt_tokens"] and meta["completion_tokens"] == 6
    assert [t for _, t, _ in meta["output_token_logprobs"]] == want["token_ids"]
    ids = [256, *PROMPT.encode()]
    by_ids = http.post("/generate", json={"input_ids": ids, "sampling_params": SAMPLING}).json()
    assert by_ids["text"] == want["text"]


def test_generate_streams_cumulative_text(http, zmq_client):
    want = zmq_client.generate(PROMPT, **SAMPLING)
    r = http.post("/generate", json={"text": PROMPT, "sampling_params": SAMPLING, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    texts = [c["text"] for c in chunks]
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:], strict=False))
    assert texts[-1] == want["text"] and chunks[-1]["output_ids"] == want["token_ids"]
    assert chunks[-1]["meta_info"]["finish_reason"] == {"type": "length"}
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
