"""A short soak: a unified deployment (and a ``--mode pd`` 1P1D one, shorter) served mixed traffic
from several client threads for half a minute: streaming and not, varied lengths, greedy
(checked against the plain-torch reference) and sampled, 10% aborted mid-way, 5% invalid, many
sharing prefixes. At the end nothing leaked (``wait_no_leak``), and each pdserve process holds as
many file descriptors as after the first third (the warm-up) and at most 15% more memory.

``PDSERVE_SOAK_S`` scales the traffic's duration (seconds for the unified deployment; default 30).
"""

from __future__ import annotations

import os
import random
import threading
import time
from dataclasses import dataclass, field

import pytest

from protocol.config import EMBEDDED
from tests.e2e.server import ProcUsage, Server, proc_usage, running_server, wait_no_leak
from tests.oracles import greedy_reference
from tokenizer_proc.client import Client, ServerError

SOAK_S = float(os.environ.get("PDSERVE_SOAK_S", "30"))
THREADS = 5
MAX_REQUESTS_PER_THREAD = 5000  # a bound besides the time
GREEDY_NEW = 8
FD_SLACK = 3
RSS_GROWTH = 0.15
# A small KV pool: the warm-up third touches all of it, so later growth of VmRSS is not the
# first touch of pool pages that were allocated but never written.
FLAGS = ("--dtype", "float32", "--page-size", "4", "--chunked-prefill-size", "64",
         "--max-total-tokens", "4096", "--heartbeat-interval", "0.2", "--heartbeat-timeout", "5")
BAD_PARAMS = ({"temperature": -1.0}, {"top_p": 2.0}, {"max_new_tokens": -3}, {"top_k": 1 << 40},
              {"seed": -5}, {"stop_token_ids": [-1]})


def prompt(rng: random.Random, prefix: list[int], length: int) -> list[int]:
    return prefix + [rng.randrange(256) for _ in range(max(length - len(prefix), 1))]


@dataclass
class Workload:
    """Prompts sharing a few prefixes; the greedy ones with their reference tokens."""

    prefixes: list[list[int]]
    greedy_prompts: list[list[int]]
    greedy_expected: list[list[int]]

    @classmethod
    def make(cls) -> Workload:
        rng = random.Random(11)
        bos = [EMBEDDED.bos_token_id]
        prefixes = [bos, prompt(rng, bos, 40), prompt(rng, bos, 96)]
        greedy = [prompt(rng, prefixes[i % 3], rng.randrange(8, 160)) for i in range(12)]
        return cls(prefixes, greedy, greedy_reference(None, greedy, GREEDY_NEW))


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    counts: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def add(self, kind: str) -> None:
        with self.lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1

    def fail(self, why: str) -> None:
        with self.lock:
            self.failures.append(why)


def one_request(c: Client, rng: random.Random, work: Workload, tally: Tally) -> None:
    roll, stream = rng.random(), rng.random() < 0.5
    if roll < 0.05:
        try:
            c.generate(input_ids=work.greedy_prompts[0], **rng.choice(BAD_PARAMS))
            tally.fail("an invalid request was served")
        except ServerError as e:
            if e.code != "invalid_request":
                tally.fail(f"an invalid request failed with {e.code}: {e}")
        tally.add("invalid")
    elif roll < 0.15:
        abort_midway(c, rng, work, stream, tally)
    elif roll < 0.55:
        i = rng.randrange(len(work.greedy_prompts))
        params = {"max_new_tokens": GREEDY_NEW, "temperature": 0, "ignore_eos": True}
        out = collect(c, work.greedy_prompts[i], stream, params)
        if out != work.greedy_expected[i]:
            tally.fail(f"greedy prompt {i} (stream={stream}): {out} != {work.greedy_expected[i]}")
        tally.add("greedy")
    else:
        params = {"max_new_tokens": rng.randrange(1, 40), "temperature": 0.8, "top_p": 0.9, "top_k": 40,
                  "seed": rng.randrange(1 << 32)}
        out = collect(c, prompt(rng, rng.choice(work.prefixes), rng.randrange(2, 300)), stream, params)
        if not 1 <= len(out) <= params["max_new_tokens"]:
            tally.fail(f"sampled request gave {len(out)} tokens for max {params['max_new_tokens']}")
        tally.add("sampled")


def collect(c: Client, ids: list[int], stream: bool, params: dict) -> list[int]:
    if not stream:
        return c.generate(input_ids=ids, **params)["token_ids"]
    return [t for msg in c.stream(input_ids=ids, **params) for t in msg["token_ids"]]


def abort_midway(c: Client, rng: random.Random, work: Workload, stream: bool, tally: Tally) -> None:
    ids = prompt(rng, rng.choice(work.prefixes), rng.randrange(2, 200))
    params = {"max_new_tokens": 200, "ignore_eos": True, "temperature": 0.5, "seed": 3}
    if stream:  # leaving the loop after the first output aborts the request
        for _ in c.stream(input_ids=ids, **params):
            break
    else:
        rid = c.submit(input_ids=ids, **params)
        time.sleep(rng.random() * 0.05)
        c.abort(rid)
        reason = c.result(rid)["finish_reason"]
        if reason not in ("abort", "length"):
            tally.fail(f"an aborted request ended with {reason}")
    tally.add("aborted")


def client_thread(server: Server, seed: int, deadline: float, work: Workload, tally: Tally,
                  done: threading.Barrier, sampled: threading.Event) -> None:
    """Requests until ``deadline``; the connection stays open until the end's usage is
    ``sampled``, so that the front end holds as many client sockets as at the warm-up's."""
    rng = random.Random(seed)
    with server.client(timeout=60) as c:
        for _ in range(MAX_REQUESTS_PER_THREAD):
            if time.monotonic() >= deadline:
                break
            try:
                one_request(c, rng, work, tally)
            except Exception as e:  # noqa: BLE001 - reported by the test, with the others
                tally.fail(f"{type(e).__name__}: {e}")
                break
        done.wait(timeout=180)
        sampled.wait(timeout=180)


def usage(server: Server) -> dict[str, ProcUsage]:
    pids = {"launch": server.proc.pid, **server.child_pids}
    return {name: proc_usage(pid) for name, pid in pids.items()}


@pytest.fixture(scope="module")
def work() -> Workload:
    return Workload.make()


@pytest.mark.parametrize(("mode", "share"), [("unified", 1.0), ("pd", 0.5)])
def test_soak(work, mode, share):
    extra = ("--num-prefill", "1", "--num-decode", "1") if mode == "pd" else ()
    duration = SOAK_S * share
    with running_server(*FLAGS, *extra, mode=mode) as server:
        tally, done, sampled = Tally(), threading.Barrier(THREADS + 1), threading.Event()
        start = time.monotonic()
        threads = [
            threading.Thread(
                target=client_thread, args=(server, i, start + duration, work, tally, done, sampled)
            )
            for i in range(THREADS)
        ]
        for t in threads:
            t.start()
        time.sleep(duration / 3)
        warm = usage(server)
        done.wait(timeout=duration + 120)  # every thread's traffic is over; its connection open
        with server.client(timeout=30) as c:
            wait_no_leak(c, timeout=60)
            end = usage(server)
        sampled.set()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "a client thread did not finish"
    print(f"\nsoak {mode}: {time.monotonic() - start:.0f} s, requests {tally.counts}")
    for name in warm:
        w, e = warm[name], end[name]
        print(f"  {name}: VmRSS {w.rss_kib} -> {e.rss_kib} KiB ({(e.rss_kib / w.rss_kib - 1) * 100:+.1f}%), "
              f"fds {w.fds} -> {e.fds}")
    assert not tally.failures, tally.failures[:10]
    assert sum(tally.counts.values()) >= 20 * share, tally.counts
    for name in warm:
        w, e = warm[name], end[name]
        assert abs(e.fds - w.fds) <= FD_SLACK, f"{name}: fds {w.fds} -> {e.fds}"
        assert e.rss_kib <= w.rss_kib * (1 + RSS_GROWTH), f"{name}: VmRSS {w.rss_kib} -> {e.rss_kib} KiB"
