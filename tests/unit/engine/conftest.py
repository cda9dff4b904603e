"""Fixtures of the engine tests: tiny checkpoints on disk and small CPU workers."""

from __future__ import annotations

import pytest
import torch

from engine.worker import Worker
from tests.oracles import write_tiny_hf_model
from tests.unit.engine.engine_driver import small_args


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("tiny-llama"))
    write_tiny_hf_model(path, "llama", seed=1)
    return path


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("tiny-qwen2"))
    write_tiny_hf_model(path, "qwen2", seed=2)
    return path


@pytest.fixture(scope="session")
def embedded_worker() -> Worker:
    """Shared by tests that leave every slot released when they finish."""
    return Worker.create(small_args())
