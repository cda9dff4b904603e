"""launch.py's OpenAI-compatible HTTP API (on --port) in front of a whole deployment (unified
and pd), greedy output equal to the ZMQ client's, the API key enforced, every process stopped."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from tests.e2e.server import running_server, wait_no_leak

PROMPT = "The capital of France is"


def post(url: str, body: dict, key: str | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url, json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("mode", ["unified", "pd"])
def test_http_api_serves_what_the_zmq_client_gets(mode: str) -> None:
    flags = ["--api-key", "sesame", "--heartbeat-interval", "0.2"]
    with running_server(*flags, mode=mode) as server, server.client() as client:
        url = f"{server.http_url}/v1/completions"
        body = {"model": "pdserve-embedded-llama", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
        status, refused = post(url, body)
        assert status == 401 and refused["error"]["message"], refused
        status, reply = post(url, body, key="sesame")
        assert status == 200, reply
        expected = client.generate(PROMPT, max_new_tokens=12, temperature=0)
        assert reply["choices"][0]["text"] == expected["text"]
        assert reply["usage"]["completion_tokens"] == len(expected["token_ids"]) == 12
        wait_no_leak(client)
