"""A KV pool small enough to force retraction, and a bounded waiting queue."""

from __future__ import annotations

import random

import pytest

from protocol.config import EMBEDDED
from tests.e2e.server import running_server, wait_no_leak
from tests.oracles import greedy_reference

PAGE = 4
POOL_TOKENS = 96 * PAGE
MAX_NEW = 48


@pytest.fixture(scope="module")
def server():
    flags = ("--dtype", "float32", "--page-size", str(PAGE), "--max-total-tokens", str(POOL_TOKENS),
             "--chunked-prefill-size", "64", "--max-queued-requests", "12", "--max-running-requests", "8",
             "--init-new-token-ratio", "0.1")
    with running_server(*flags) as s:
        yield s


def prompts(seed: int, count: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[EMBEDDED.bos_token_id] + [rng.randrange(256) for _ in range(rng.randrange(20, 60))]
            for _ in range(count)]


def test_retraction_keeps_outputs_identical(server):
    batch = prompts(1, 8)
    with server.client() as c:
        rids = [c.submit(input_ids=p, max_new_tokens=MAX_NEW, temperature=0, ignore_eos=True) for p in batch]
        got = [c.result(r)["token_ids"] for r in rids]
        wait_no_leak(c)
    assert got == greedy_reference(None, batch, MAX_NEW)
    assert "retract" in server.log().lower(), "the pool was meant to be too small: no retraction happened"


def test_queue_full_is_a_clear_error(server):
    with server.client() as c:
        rids = [c.submit(input_ids=p, max_new_tokens=MAX_NEW, temperature=0, ignore_eos=True)
                for p in prompts(2, 40)]
        outcomes = []
        for rid in rids:
            try:
                outcomes.append(c.result(rid)["finish_reason"])
            except Exception as e:  # ServerError
                outcomes.append(getattr(e, "code", repr(e)))
        wait_no_leak(c)
        assert "queue_full" in outcomes
        assert set(outcomes) <= {"length", "queue_full"}
        assert c.generate(input_ids=[EMBEDDED.bos_token_id, 66], max_new_tokens=3)["finished"]
