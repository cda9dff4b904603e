"""Disaggregation between tensor-parallel instances (gloo ranks on the CPU): over zmq,
1P(TP 2)1D(TP 1) and 1P(TP 1)1D(TP 2) (through each instance's rank 0: ``kvtransfer.tp_hub``);
over nixl, the same and 1P(TP 2)1D(TP 2), rank to rank (``kvtransfer.tp_parts``,
``tp_slices``). Each serves ≥ 32 concurrent greedy requests, with small chunks and
prefix-cache hits on both sides, token for token as one unified instance serves them, and
every page comes back. The embedded model has 2
KV heads: each rank of a TP 2 instance holds one. Over nixl, the death of a rank other than 0
fails its instance's rooms while the others serve on.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
from collections.abc import Iterator

import pytest

from kvtransfer.nixl_agent import nixl_available
from protocol.config import EMBEDDED
from tests.e2e.server import Server, running_server, started_together, wait_no_leak
from tests.oracles import greedy_reference

MAX_NEW = 6
NEEDS_NIXL = pytest.mark.skipif(
    not nixl_available(), reason="the nixl backend needs the nixl-cu12 package: pip install 'pdserve[nixl]'"
)
NIXL_SIZES = [(2, 2), (2, 1), (1, 2)]  # prefill, decode --tp-size
FLAGS = ("--dtype", "float32", "--page-size", "4", "--chunked-prefill-size", "16",
         "--max-running-requests", "40", "--max-restarts", "0")


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
def deployment(prefill_tp: int, decode_tp: int, backend: str = "zmq") -> Iterator[Server]:
    """``--mode prefill`` and ``--mode decode`` instances of their own ``--tp-size``s, and a front end."""
    flags = (*FLAGS, "--transfer-backend", backend)
    instances = (
        running_server(*flags, "--tp-size", str(prefill_tp), mode="prefill"),
        running_server(*flags, "--tp-size", str(decode_tp), mode="decode"),
    )
    with started_together(*instances) as (prefill, decode), running_server(
        *flags, "--prefill", prefill.addr, "--decode", decode.addr, mode="frontend"
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


@pytest.mark.parametrize(
    ("prefill_tp", "decode_tp", "backend"),
    [(2, 1, "zmq"), (1, 2, "zmq"), *(pytest.param(*sizes, "nixl", marks=NEEDS_NIXL) for sizes in NIXL_SIZES)],
)
def test_tensor_parallel_pairs_serve_what_unified_mode_does(
    unified_tokens: list[list[int]], prefill_tp: int, decode_tp: int, backend: str
) -> None:
    """zmq maps any two sizes through rank 0; over nixl each prefill rank writes its heads
    straight into the pools of the decode ranks that hold them (a room in parts: whole pages
    rank to rank for equal sizes, head slices of each token slot otherwise)."""
    first, second = workload()
    with deployment(prefill_tp, decode_tp, backend) as frontend:
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


def kill_rank_1(server: Server) -> None:
    """kill -9 of the instance's tensor-parallel rank 1 (not rank 0, which talks to the scheduler)."""
    (pid,) = [pid for name, pid in server.child_pids.items() if name.endswith("-worker-tp1")]
    os.kill(pid, signal.SIGKILL)


@NEEDS_NIXL
@pytest.mark.parametrize("role", ["decode", "prefill"])
def test_kill_of_a_rank_other_than_0_during_nixl_transfers(role: str, monkeypatch: pytest.MonkeyPatch):
    """Each rank writes its own heads, here between instances of different sizes (TP 2 victims,
    TP 1 peers: head slices): the death of a decode or prefill rank 1 mid-transfer fails its
    instance's rooms as an instance's death does (``peer_unavailable`` or ``transfer_failed``),
    and the other instances serve on. Rank 0 learns of it in a step's collective or a relay:
    "another rank of this instance is gone"."""
    from protocol.faults import FAULTS_ENV, Faults
    from tests.e2e.test_disagg import SEND_DELAY_S, kill_during_transfer, standalone

    monkeypatch.setenv(FAULTS_ENV, Faults(kv_send_delay_s=SEND_DELAY_S).to_setting())
    sizes = (1, 2) if role == "decode" else (2, 1)
    rng = random.Random(role)
    two = ("--tp-size", "2")
    deployed = standalone(*sizes, "nixl", () if role == "decode" else two, two if role == "decode" else ())
    with deployed as (prefills, decodes, frontend), frontend.client() as c:
        victim = decodes[0] if role == "decode" else prefills[0]
        kill_during_transfer(c, victim, role, rng, frontend, kill=kill_rank_1)
        assert "another rank of this instance is gone" in victim.log()
