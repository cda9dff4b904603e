"""``GET /metrics``: the front end's Prometheus text, served as is, open without the API key;
a front end that answers wrongly is a 500, not a crash."""

from __future__ import annotations

import httpx
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.api_server.conftest import running_api

MAX_NEW = 5


def generated_tokens(text: str) -> float:
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return families["pdserve:generation_tokens"].samples[0].value


def test_metrics_are_served_and_move(http):
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"] == CONTENT_TYPE_LATEST
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    up = families["pdserve:instance_up"].samples
    assert [(s.labels, s.value) for s in up] == [({"instance_name": "unified0", "role": "unified"}, 1.0)]
    before = generated_tokens(r.text)
    sampling = {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True}
    body = {"text": "Count", "sampling_params": sampling}
    assert http.post("/generate", json=body).status_code == 200
    assert generated_tokens(http.get("/metrics").text) - before == MAX_NEW


def test_metrics_need_no_api_key(deployment):
    with running_api(deployment.addr, "--api-key", "sesame") as api, httpx.Client(base_url=api.base_url) as c:
        assert c.get("/v1/models").status_code == 401
        r = c.get("/metrics")
        assert r.status_code == 200 and "pdserve:instance_up" in r.text


def test_a_wrong_reply_is_an_internal_error(fake_frontend):
    # the fake front end answers any request it does not know as a generate request (an output)
    with running_api(fake_frontend.addr) as api, httpx.Client(base_url=api.base_url) as c:
        r = c.get("/metrics")
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal"
        assert "'output'" in r.json()["error"]["message"]
        assert c.get("/health").status_code == 200  # the server goes on
