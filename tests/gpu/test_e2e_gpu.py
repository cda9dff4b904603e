"""The end-to-end greedy comparisons on CUDA (launch.py, real processes, the wire protocol):
float32 with CUDA graphs on and off against the plain-torch reference and against transformers,
and a bfloat16 smoke run."""

from __future__ import annotations

import random

import pytest
import torch

from tests.e2e.server import running_server, wait_no_leak
from tests.e2e.test_unified import MAX_NEW, byte_prompt, run_concurrently
from tests.oracles import greedy_reference, write_tiny_hf_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

FLAGS = ("--device", "cuda", "--page-size", "4", "--chunked-prefill-size", "32",
         "--max-running-requests", "24", "--cuda-graph-max-bs", "16")
GRAPH_MODES = {"cuda-graph": (), "eager": ("--disable-cuda-graph",)}


def prompts(seed: int) -> list[list[int]]:
    """Lengths that cross chunk and page boundaries; 20 requests, so decode batches pass through
    padded graph sizes and past the largest graph (16)."""
    rng = random.Random(seed)
    shared = byte_prompt(rng, 70)
    lengths = (1, 5, 31, 32, 33, 64, 97, 150, 220, 300, 3, 17, 40, 129, 8)
    sharing = [byte_prompt(rng, n, shared) for n in (90, 140, 75, 71, 200)]
    return [byte_prompt(rng, n) for n in lengths] + sharing


def serves_the_reference(flags: tuple[str, ...], batch: list[list[int]], label: str) -> str:
    """Serve ``batch`` at once (greedy) on a deployment of ``flags``, check every output against
    the plain-torch reference and that nothing leaked; the deployment's log."""
    with running_server(*flags) as server, server.client() as c:
        got = [o["token_ids"] for o in run_concurrently(c, batch)]
        wait_no_leak(c)
    expected = greedy_reference(None, batch, MAX_NEW)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert g == e, f"{label}, request {i}: served {g} != reference {e}"
    return server.log()


@pytest.mark.parametrize("mode", GRAPH_MODES)
def test_greedy_float32_matches_the_reference(mode: str) -> None:
    serves_the_reference((*FLAGS, "--dtype", "float32", *GRAPH_MODES[mode]), prompts(0), mode)


@pytest.mark.parametrize("mode", GRAPH_MODES)
def test_greedy_float32_matches_transformers(tmp_path, mode: str) -> None:
    import transformers

    write_tiny_hf_model(str(tmp_path), arch="llama", seed=3)
    rng = random.Random(7)
    batch = [[rng.randrange(1, 250) for _ in range(n)] for n in (3, 17, 40, 70, 129, 5, 9)]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    model.generation_config.eos_token_id = None  # like ignore_eos
    with torch.no_grad():
        expected = [
            model.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0)[
                0, len(p):
            ].tolist()
            for p in batch
        ]
    flags = (*FLAGS, "--model-path", str(tmp_path), "--dtype", "float32", *GRAPH_MODES[mode])
    with running_server(*flags) as server, server.client() as c:
        got = [o["token_ids"] for o in run_concurrently(c, batch)]
        wait_no_leak(c)
    assert got == expected


def test_bfloat16_smoke_with_cuda_graphs() -> None:
    """bf16 cannot match the float32 reference token for token; it must serve every request to
    its length, leak nothing, and agree with the reference on nearly every first token."""
    batch = prompts(1)
    with running_server(*FLAGS, "--dtype", "bfloat16") as server, server.client() as c:
        outputs = run_concurrently(c, batch)
        wait_no_leak(c)
    assert all(o["finish_reason"] == "length" and len(o["token_ids"]) == MAX_NEW for o in outputs)
    expected = greedy_reference(None, batch, 1)
    agree = sum(o["token_ids"][0] == e[0] for o, e in zip(outputs, expected, strict=True))
    assert agree >= 0.9 * len(batch), f"only {agree}/{len(batch)} first tokens match the reference"
