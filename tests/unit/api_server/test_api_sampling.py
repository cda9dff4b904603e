"""Penalties, min_p and top logprobs through the HTTP server and a real unified deployment."""

from __future__ import annotations

from tests.unit.api_server.conftest import MODEL


def test_completion_top_logprobs_and_penalties(http, zmq_client):
    body = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 4, "temperature": 0,
            "logprobs": 3, "repetition_penalty": 1.3, "frequency_penalty": 0.5, "min_p": 0.1}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    logprobs = r.json()["choices"][0]["logprobs"]
    assert len(logprobs["top_logprobs"]) == len(logprobs["tokens"]) == 4
    for top in logprobs["top_logprobs"]:
        assert len(top) == 3 and all(name.startswith("token_id:") for name in top)
        values = list(top.values())
        assert values == sorted(values, reverse=True)
