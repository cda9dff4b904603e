"""A client that leaves mid-request has its front-end requests aborted: the front end's status
then shows no live request and every page free or cached."""

from __future__ import annotations

import json
import signal

import httpx
import pytest

from tests.e2e.server import wait_no_leak
from tests.unit.api_server.conftest import MODEL, running_api

LONG = {"max_tokens": 4000, "temperature": 0, "ignore_eos": True}  # ~20 s of decoding on CPU
CASES = {
    "completions": ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 2, **LONG}),
    "chat": ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                      **LONG}),
    "generate": ("/generate", {"text": "x", "sampling_params": {"max_new_tokens": 4000, "ignore_eos": True}}),
}


def live_requests(status: dict) -> int:
    return sum(i["pending"] + i["prefilling"] + i["decoding"] for i in status["instances"])


@pytest.mark.parametrize("case", sorted(CASES))
def test_disconnect_mid_stream_aborts(api, zmq_client, case):
    path, body = CASES[case]
    with httpx.Client(base_url=api.base_url, timeout=30) as c, \
            c.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        events = r.iter_lines()
        for _ in range(3):
            line = next(line for line in events if line)
            assert line.startswith("data: {") and "error" not in json.loads(line[6:])
        assert live_requests(zmq_client.status()) >= 1
    # leaving the block dropped the connection with the answers unfinished
    wait_no_leak(zmq_client, timeout=5)


def test_disconnect_while_waiting_for_a_whole_answer_aborts(api, zmq_client):
    path, body = CASES["completions"]
    with httpx.Client(base_url=api.base_url, timeout=httpx.Timeout(30, read=1.0)) as c, \
            pytest.raises(httpx.ReadTimeout):
        c.post(path, json=body)
    wait_no_leak(zmq_client, timeout=5)
    r = httpx.post(api.base_url + path, json={**body, "max_tokens": 2})
    assert r.status_code == 200


def test_stopping_the_server_aborts_its_open_streams(deployment, zmq_client):
    path, body = CASES["completions"]
    with running_api(deployment.addr) as api, httpx.Client(base_url=api.base_url, timeout=30) as c, \
            c.stream("POST", path, json={**body, "stream": True}) as r:
        # held in a name: a dropped iter_lines() generator, once collected, closes the connection
        events = r.iter_lines()
        for _ in range(3):
            line = next(line for line in events if line)
            assert line.startswith("data: {") and "error" not in json.loads(line[6:]), line
        assert live_requests(zmq_client.status()) >= 1
        api.proc.send_signal(signal.SIGTERM)
        api.proc.wait(15)  # the open stream is given a few seconds, then cut
        wait_no_leak(zmq_client, timeout=5)
