"""Greedy generation through the worker (paged KV, chunked prefill, batched decode, overlap)
against the dense reference and Hugging Face ``generate``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import transformers

from engine.worker import Worker
from tests import REPO_ROOT
from tests.oracles import greedy_reference
from tests.unit.engine.engine_driver import driver_for, greedy, small_args

PROMPTS = [
    [256, 72, 101, 108, 108, 111],
    [256, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
    [256, 200],
    [256, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42],
    [256, 99, 98, 97, 96, 95, 94, 93, 92],
]


def hf_generate(path: str, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # exactly max_new_tokens, like ignore_eos
    outs = []
    for prompt in prompts:
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0
        )
        outs.append(out[0, len(prompt) :].tolist())
    return outs


@pytest.mark.parametrize("overlap", [True, False])
def test_embedded_batch_equals_dense_reference(embedded_worker: Worker, overlap: bool) -> None:
    """Five requests, at most two running: slots and pages are released and reused."""
    driver = driver_for(embedded_worker, overlap=overlap, max_running=2)
    reqs = driver.generate(PROMPTS, [greedy(10)] * len(PROMPTS))
    assert [r.outputs for r in reqs] == greedy_reference(None, PROMPTS, 10)
    assert len({r.slot for r in reqs}) < len(reqs)
    assert (driver.discarded > 0) == overlap


@pytest.mark.parametrize("arch_dir", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_checkpoint_batch_equals_transformers_generate(arch_dir: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(arch_dir)
    worker = Worker.create(small_args(model_path=path))
    reqs = driver_for(worker, chunk_size=5).generate(PROMPTS[:3], [greedy(8)] * 3)
    expected = hf_generate(path, PROMPTS[:3], 8)
    assert [r.outputs for r in reqs] == expected
    assert expected == greedy_reference(path, PROMPTS[:3], 8)


def test_stop_token_ends_a_request_and_the_extra_token_is_discarded(embedded_worker: Worker) -> None:
    full = greedy_reference(None, [PROMPTS[0]], 6)[0]
    stop_at = full[2]
    driver = driver_for(embedded_worker)
    (req,) = driver.generate([PROMPTS[0]], [greedy(6, stop_token_ids=[stop_at])])
    assert req.outputs == full[: full.index(stop_at) + 1]


TRITON_SCRIPT = """
import torch
torch.set_num_threads(1)
from tests.unit.engine.kernels.interpreter_worker import interpreter_unusable
why = interpreter_unusable()
if why is not None:
    print("SKIP " + why)
    raise SystemExit(0)
from engine.worker import Worker
from tests.oracles import greedy_reference
from tests.unit.engine.engine_driver import driver_for, greedy, small_args
from engine.kernels.gemv import DEFAULT_GEMV_CONFIG
from engine.kernels.small_batch_linear import ROW_BUCKETS
worker = Worker.create(small_args(attention_backend="triton"))
# every small-batch matmul through our GEMV, as if it had measured faster than cuBLAS
linear = worker.runner.kernels.linear
for weight, _ in worker.runner.model.matmul_weights():
    for rows in ROW_BUCKETS:
        linear.choices[(rows, *weight.shape)] = DEFAULT_GEMV_CONFIG
prompts = [[256, 1, 2, 3, 4, 5, 6, 7, 8, 9], [256, 50, 60]]
reqs = driver_for(worker).generate(prompts, [greedy(4)] * 2)
assert [r.outputs for r in reqs] == greedy_reference(None, prompts, 4), [r.outputs for r in reqs]
"""


def test_triton_backend_in_the_interpreter_equals_the_reference() -> None:
    """The Triton kernels behind the engine's kernel backend, the GEMV for every small-batch
    matmul included (interpreter mode is chosen when triton is first imported, hence a fresh
    process)."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PDSERVE_TORCH_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", TRITON_SCRIPT],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    if proc.stdout.startswith("SKIP "):
        pytest.skip(proc.stdout.removeprefix("SKIP ").strip())
