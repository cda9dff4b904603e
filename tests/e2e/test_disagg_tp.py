"""Disaggregation between instances of different ``--tp-size``s (gloo ranks on the CPU), over the
zmq backend: 1P(TP 2)1D(TP 1) and 1P(TP 1)1D(TP 2) serve ≥ 32 concurrent greedy requests, with
small chunks and prefix-cache hits on both sides, token for token as one unified instance serves
them, and every page comes back. The embedded
model has 2 KV heads: each rank of a TP 2 instance holds one (``kvtransfer.tp_hub``).
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from protocol.config import EMBEDDED
from tests.e2e.server import Server, e2e_key_dir, running_server, wait_no_leak
from tests.oracles import greedy_reference

MAX_NEW = 6
FLAGS = ("--dtype", "float32", "--page-size", "4", "--chunked-prefill-size", "16",
         "--max-running-requests", "40", "--transfer-backend", "zmq", "--max-restarts", "0")


def byte_prompt(rng: random.Random, length: int, prefix: list[int] | None = None) -> list[int]:
    body = list(prefix or [EMBEDDED.bos_token_id])
    return body + [rng.randrange(256) for _ in range(length - len(body))]


def workload() -> tuple[list[list[int]], list[list[int]]]:
    """32 concurrent prompts (8 sharing two prefixes), then 4 extending first-wave prompts (hits
    on both sides)."""
    rng = random.Random(13)
    shared = [byte_prompt(rng, 40), byte_prompt(rng, 64)]
    first = [byte_prompt(rng, rng.randrange(2, 90)) for _ in range(24)]
    first += [byte_prompt(rng, rng.randrange(50, 100), prefix=shared[i % 2]) for i in range(8)]
    second = [first[-1 - i] + [rng.randrange(256) for _ in range(5 + i)] for i in range(4)]
    return first, second


@contextlib.contextmanager
def started_together(*servers: contextlib.AbstractContextManager[Server]) -> Iterator[list[Server]]:
    """Start ``servers`` at once (each on a thread), and stop them at once on exit."""
    e2e_key_dir()  # made once, before the threads: each would make its own (the cache is not locked)
    with ThreadPoolExecutor(len(servers)) as pool:
        started = [pool.submit(cm.__enter__) for cm in servers]
        try:
            yield [f.result() for f in started]
        finally:
            exc = sys.exc_info()  # each server logs its end on the way out of a failure
            running = [cm for cm, f in zip(servers, started, strict=True) if f.exception() is None]
            for stop in [pool.submit(cm.__exit__, *exc) for cm in running]:
                stop.result()


@contextlib.contextmanager
def deployment(prefill_tp: int, decode_tp: int) -> Iterator[Server]:
    """``--mode prefill`` and ``--mode decode`` instances of their own ``--tp-size``s, and a front end."""
    instances = (
        running_server(*FLAGS, "--tp-size", str(prefill_tp), mode="prefill"),
        running_server(*FLAGS, "--tp-size", str(decode_tp), mode="decode"),
    )
    with started_together(*instances) as (prefill, decode), running_server(
        *FLAGS, "--prefill", prefill.addr, "--decode", decode.addr, mode="frontend"
    ) as frontend:
        yield frontend


def serve_waves(server: Server, waves: list[list[list[int]]]) -> tuple[list[dict], dict]:
    """Each wave's requests at once, one wave after the other; the outputs, and the status once
    every request is done and every page back."""
    out = []
    with server.client() as c:
        for wave in waves:
            rids = [
                c.submit(input_ids=p, temperature=0, max_new_tokens=MAX_NEW, ignore_eos=True) for p in wave
            ]
            out += [c.result(rid) for rid in rids]
        return out, wait_no_leak(c)


@pytest.fixture(scope="module")
def unified_tokens() -> list[list[int]]:
    """What one unified instance serves for the workload (the disaggregated pairs must equal it)."""
    with running_server(*FLAGS) as s:
        out, _ = serve_waves(s, list(workload()))
    return [o["token_ids"] for o in out]


@pytest.mark.parametrize(("prefill_tp", "decode_tp"), [(2, 1), (1, 2)])
def test_tensor_parallel_sizes_differ_across_the_pair(
    unified_tokens: list[list[int]], prefill_tp: int, decode_tp: int
) -> None:
    first, second = workload()
    with deployment(prefill_tp, decode_tp) as frontend:
        out, status = serve_waves(frontend, [first, second])
    for i, (o, e) in enumerate(zip(out, unified_tokens, strict=True)):
        assert o["token_ids"] == e, f"request {i}: served {o['token_ids']} != unified {e}"
    assert all(o["finish_reason"] == "length" for o in out)
    hits = [o["usage"]["cached_tokens"] for o in out[len(first) :]]
    assert all(h >= 48 for h in hits), f"prefix misses on the decode side: {hits}"
    prefill = [i for i in status["instances"] if i["role"] == "prefill"]
    assert all(i["cached_pages"] > 0 for i in prefill), "the prefill side cached nothing"


def test_unified_mode_equals_the_reference_on_part_of_the_workload(unified_tokens) -> None:
    """The anchor of the comparison above (a few prompts: the oracle recomputes every prefix)."""
    first, _ = workload()
    picks = [0, 5, 30]
    expected = greedy_reference(None, [first[i] for i in picks], MAX_NEW)
    assert [unified_tokens[i] for i in picks] == expected
