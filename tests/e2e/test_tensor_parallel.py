"""``--tp-size 2`` on the CPU (gloo, two worker processes): the same greedy tokens as one rank,
for the embedded model and the transformers checkpoints; models and modes it cannot serve are
refused with the reason."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.server import launch_to_exit, running_server, wait_no_leak
from tests.oracles import TINY_SHAPE, greedy_reference, write_tiny_hf_model

MAX_NEW = 8
TP2 = ("--tp-size", "2", "--dtype", "float32", "--page-size", "8", "--chunked-prefill-size", "32",
       "--max-total-tokens", "2048")


def prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 250) for _ in range(n)] for n in (3, 17, 40)]


def served_greedy(flags: tuple[str, ...], prompt_ids: list[list[int]]) -> tuple[list[list[int]], dict]:
    """Greedy tokens of every prompt (sent at once, so they share steps) and the server's pids."""
    with running_server(*flags) as server, server.client() as c:
        params = dict(max_new_tokens=MAX_NEW, temperature=0, ignore_eos=True)
        rids = [c.submit(input_ids=p, **params) for p in prompt_ids]
        got = [c.result(r)["token_ids"] for r in rids]
        wait_no_leak(c)
        return got, dict(server.child_pids)


def test_embedded_model_two_ranks_equal_one_rank() -> None:
    prompt_ids = prompts(1)
    two, pids = served_greedy(TP2, prompt_ids)
    assert "unified0-worker-tp1" in pids, pids  # one worker process per rank
    one, _ = served_greedy(("--tp-size", "1", *TP2[2:]), prompt_ids)
    assert two == one
    assert two == greedy_reference(None, prompt_ids, MAX_NEW)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_transformers_checkpoints_two_ranks_equal_the_reference(tmp_path: Path, arch: str) -> None:
    """The llama checkpoint (GQA, untied head) and the qwen2 one (q/k/v bias, tied embeddings),
    against the plain-torch reference that one rank already equals (tests/e2e/test_transformers.py)."""
    write_tiny_hf_model(str(tmp_path), arch=arch, seed=3)
    prompt_ids = prompts(7)
    got, _ = served_greedy((*TP2, "--model-path", str(tmp_path)), prompt_ids)
    assert got == greedy_reference(str(tmp_path), prompt_ids, MAX_NEW)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.1)


def test_a_killed_rank_restarts_its_instance_which_serves_again() -> None:
    """Any rank's death is its instance's: rank 0's collectives fail, the launcher restarts the
    instance (every rank, at a new rendezvous) and it serves the same tokens."""
    prompt_ids = prompts(3)[1]
    with running_server(*TP2, "--heartbeat-interval", "0.2") as server, server.client(timeout=60) as c:
        params = dict(max_new_tokens=MAX_NEW, temperature=0, ignore_eos=True)
        before = c.generate(input_ids=prompt_ids, **params)["token_ids"]
        os.kill(server.child_pids["unified0-worker-tp1"], signal.SIGKILL)
        wait_for(lambda: "instance unified0 restarted" in server.log(), 60, "the launcher restarts it")
        wait_for(lambda: re.search(r"instance unified0 \(\S+\) restarted: the requests", server.log()), 120,
                 "the front end takes the new incarnation")
        wait_for(lambda: c.status(timeout=5)["ready"], 120, "the restarted instance is ready")
        assert c.generate(input_ids=prompt_ids, **params)["token_ids"] == before
        wait_no_leak(c)
        assert server.log().count("unified0 rank 1 of 2 ready") == 2  # a new rank 1 joined
    assert before == greedy_reference(None, [prompt_ids], MAX_NEW)[0]


def test_a_model_whose_heads_do_not_split_is_refused(tmp_path: Path) -> None:
    """Fewer KV heads than ranks, and the ranks not a multiple of them: no rank could hold whole
    KV heads, nor replicas of one."""
    config = dict(TINY_SHAPE, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  architectures=["LlamaForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    done = launch_to_exit("--tp-size", "3", "--model-path", str(tmp_path), "--load-format", "dummy")
    assert done.returncode != 0
    assert "--tp-size 3 and the model's 2 KV heads" in done.stderr, done.stderr[-3000:]
