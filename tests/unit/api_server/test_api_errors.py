"""Every bad HTTP input gets its documented status and an OpenAI error object, and the server
keeps serving; front end errors map onto HTTP statuses."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.unit.api_server.conftest import MODEL, running_api

GOOD = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "temperature": 0}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def assert_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None,
                 says: str = "") -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    assert says in error["message"], error
    return error


BAD_COMPLETIONS = [
    # (body change, status, param, a phrase of the message)
    ({"temperature": "hot"}, 400, "temperature", "valid number"),
    ({"temperature": 2.5}, 400, "temperature", "less than or equal to 2"),
    ({"top_p": 0}, 400, "top_p", "greater than 0"),
    ({"max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ({"n": 17}, 400, "n", "less than or equal to 16"),
    ({"n": "2"}, 400, "n", "valid integer"),
    ({"seed": -1}, 400, "seed", "greater than or equal to 0"),
    ({"seed": 2**63 - 1, "n": 2}, 400, "seed", "2**63"),
    ({"prompt": 5}, 400, "prompt", "must be a string"),
    ({"prompt": []}, 400, "prompt", "must be a string"),
    ({"prompt": ["a"] * 65}, 400, "prompt", "at most 64"),
    ({"prompt": ["a"] * 9, "n": 15}, 400, "n", "at most 128"),
    ({"stop": [""]}, 400, "stop", "must not be empty"),
    ({"stop": ["x"] * 17}, 400, "stop", "at most 16"),
    ({"logprobs": 6}, 400, "logprobs", "less than or equal to 5"),
    ({"echo": True, "prompt": [1, 2]}, 400, "echo", "not supported yet"),
    ({"frequency_penalty": 2.5}, 400, "frequency_penalty", "less than or equal to 2"),
    ({"presence_penalty": -2.5}, 400, "presence_penalty", "greater than or equal to -2"),
    ({"repetition_penalty": 2.5}, 400, None, "repetition_penalty must be in (0, 2]"),  # the front end's
    ({"min_p": 1.5}, 400, "min_p", "less than or equal to 1"),
    ({"logit_bias": {"5": 1}}, 400, "logit_bias", "not supported yet"),
    ({"best_of": 3}, 400, "best_of", "not supported yet"),
    ({"stream_options": {"include_usage": True}}, 400, "stream_options", "only allowed when stream"),
    ({"no_such_field": 1}, 400, "no_such_field", "unrecognized request argument"),
    ({"prompt": [5000]}, 400, None, "outside the vocabulary"),  # refused by the front end
    ({"prompt": [1] * 5000}, 400, None, "context length"),  # refused by the front end
    ({"model": "gpt-4"}, 404, "model", "does not exist"),
]


@pytest.mark.parametrize(("change", "status", "param", "says"), BAD_COMPLETIONS)
def test_bad_completion_requests(http, change, status, param, says):
    assert_error(http.post("/v1/completions", json={**GOOD, **change}), status, param, says=says)


BAD_CHATS = [
    ({"messages": []}, 400, "messages", "at least 1 item"),
    ({"messages": None}, 400, "messages", "valid array"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages", "role must be one of"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages", "content must be"),
    ({"top_logprobs": 21, "logprobs": True}, 400, "top_logprobs", "less than or equal to 20"),
    ({"top_logprobs": 2}, 400, "top_logprobs", "logprobs must be true"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", "not supported yet"),
    ({"response_format": {"type": "json_object"}}, 400, "response_format", "not supported yet"),
    ({"max_completion_tokens": -3}, 400, "max_completion_tokens", "greater than or equal to 1"),
]


@pytest.mark.parametrize(("change", "status", "param", "says"), BAD_CHATS)
def test_bad_chat_requests(http, change, status, param, says):
    assert_error(http.post("/v1/chat/completions", json={**CHAT, **change}), status, param, says=says)


def test_missing_messages_and_malformed_bodies(http, zmq_client):
    assert_error(http.post("/v1/chat/completions", json={"model": MODEL}), 400, "messages", says="required")
    headers = {"content-type": "application/json"}
    r = http.post("/v1/completions", content=b"{not json", headers=headers)
    assert_error(r, 400, says="not valid JSON")
    assert_error(http.post("/v1/completions", content=b"[1, 2]", headers=headers), 400, says="request body")
    assert_error(http.post("/v1/completions", content=b"", headers=headers), 400, says="JSON")
    assert_error(http.post("/generate", json={"sampling_params": {}}), 400, "text", says="exactly one")
    assert_error(http.post("/generate", json={"text": "x", "sampling_params": {"foo": 1}}), 400,
                 "sampling_params.foo")
    bad_min_p = {"text": "x", "sampling_params": {"min_p": 1.5}}
    assert_error(http.post("/generate", json=bad_min_p), 400, "sampling_params.min_p")
    assert_error(http.get("/v1/nothing"), 404)
    assert_error(http.get("/v1/completions"), 405)
    # and the service keeps serving
    r = http.post("/v1/completions", json=GOOD)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


def test_body_size_is_bounded(deployment):
    with running_api(deployment.addr, "--max-body-bytes", "1000") as api, \
            httpx.Client(base_url=api.base_url) as c:
        r = c.post("/v1/completions", json={**GOOD, "prompt": "x" * 2000})
        assert_error(r, 413, says="exceeds the limit")

        def chunked():  # no content-length: counted as it arrives
            yield b'{"model": "' + MODEL.encode() + b'", "prompt": "'
            yield b"x" * 2000
            yield b'"}'

        assert_error(c.post("/v1/completions", content=chunked()), 413, says="exceeds the limit")
        assert c.post("/v1/completions", json=GOOD).status_code == 200


def test_api_key_is_required_when_set(deployment):
    with running_api(deployment.addr, "--api-key", "sesame") as api, httpx.Client(base_url=api.base_url) as c:
        assert_error(c.post("/v1/completions", json=GOOD), 401, code="invalid_api_key")
        assert_error(c.post("/v1/completions", json=GOOD, headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(c.get("/v1/models"), 401)
        assert_error(c.post("/generate", json={"text": "x"}), 401)
        assert c.get("/health").status_code == 200  # health checks need no key
        ok = {"Authorization": "Bearer sesame"}
        assert c.post("/v1/completions", json=GOOD, headers=ok).status_code == 200
        assert c.get("/v1/models", headers=ok).json()["data"][0]["id"] == MODEL


def test_chat_without_a_template_is_refused(deployment):
    with running_api(deployment.addr) as api, httpx.Client(base_url=api.base_url) as c:
        error = assert_error(c.post("/v1/chat/completions", json=CHAT), 400, "messages", "no_chat_template")
        assert "no chat template" in error["message"] and "--chat-template" in error["message"]
        assert c.post("/v1/completions", json=GOOD).status_code == 200


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


FRONTEND_ERRORS = [
    ("queue_full", 429, "rate_limit_error"),
    ("shutting_down", 503, "service_unavailable_error"),
    ("peer_unavailable", 503, "service_unavailable_error"),
    ("transfer_failed", 503, "service_unavailable_error"),
    ("internal", 500, "server_error"),
    ("invalid_request", 400, "invalid_request_error"),
]


def test_frontend_errors_map_to_statuses(fake_frontend):
    with running_api(fake_frontend.addr, "--response-timeout", "1") as api, \
            httpx.Client(base_url=api.base_url, timeout=30) as c:
        for code, status, kind in FRONTEND_ERRORS:
            for stream in (False, True):
                body = {**GOOD, "prompt": f"error:{code}", "stream": stream}
                assert assert_error(c.post("/v1/completions", json=body), status, code=code)["type"] == kind
        # n > 1 where one sample fails: the error, and the other samples aborted
        r = c.post("/v1/completions", json={**GOOD, "prompt": ["fine", "error:queue_full"]})
        assert_error(r, 429, code="queue_full")
        # an error after the stream started: an error event, then [DONE]
        r = c.post("/v1/completions", json={**GOOD, "prompt": "fail-mid:transfer_failed", "stream": True})
        assert r.status_code == 200
        events = [line for line in r.text.split("\n\n") if line]
        assert '"code":"transfer_failed"' in events[-2] and events[-1] == "data: [DONE]"
        # a front end that does not answer
        r = c.post("/v1/completions", json={**GOOD, "prompt": "silent"})
        assert_error(r, 503, code="frontend_timeout")
        [rid] = [m["rid"] for m in fake_frontend.of_type("generate") if m.get("text") == "silent"]
        wait_until(lambda: rid in {m["rid"] for m in fake_frontend.of_type("abort")})
        # still serving
        r = c.post("/v1/completions", json={**GOOD, "prompt": "fine"})
        assert r.json()["choices"][0]["text"] == "aaa"


def test_health_follows_frontend_readiness(fake_frontend):
    with running_api(fake_frontend.addr) as api, httpx.Client(base_url=api.base_url) as c:
        assert c.get("/health").status_code == 200
        fake_frontend.ready = False
        assert_error(c.get("/health"), 503, code="not_ready")
