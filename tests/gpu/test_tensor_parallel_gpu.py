"""Tensor parallelism on CUDA (NCCL, one GPU per rank): ``--tp-size 2`` serves the tokens of one
rank, with each rank's decode CUDA graphs (the collectives captured inside) and without them.
Needs two GPUs."""

from __future__ import annotations

import random

import pytest
import torch

from tests.e2e.test_unified import byte_prompt
from tests.gpu.test_e2e_gpu import FLAGS as E2E_FLAGS
from tests.gpu.test_e2e_gpu import GRAPH_MODES, serves_the_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (one per rank)"),
]

FLAGS = (*E2E_FLAGS, "--dtype", "float32")
CAPTURED = "decode CUDA graphs"  # each rank logs its capture
LENGTHS = (1, 5, 31, 32, 33, 64, 97, 150, 3, 17, 40, 129, 8, 9, 2, 70, 88, 4, 6, 7)


def prompts(seed: int) -> list[list[int]]:
    """20 requests of mixed lengths: decode batches pass through padded graph sizes and past
    the largest graph (16)."""
    rng = random.Random(seed)
    return [byte_prompt(rng, n) for n in LENGTHS]


@pytest.mark.parametrize("mode", GRAPH_MODES)
def test_two_ranks_serve_the_reference_tokens(mode: str) -> None:
    log = serves_the_reference((*FLAGS, "--tp-size", "2", *GRAPH_MODES[mode]), prompts(3), mode)
    captures = log.count(CAPTURED)
    assert captures == (2 if mode == "cuda-graph" else 0), f"{mode}: {captures} ranks captured graphs"
