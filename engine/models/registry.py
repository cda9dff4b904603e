"""Architecture name (``config.json`` ``architectures[0]``) → model class, and model building."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from engine.layers.rotary import RotaryEmbedding
from engine.models.config import ModelConfig
from engine.models.llama import LlamaForCausalLM
from engine.parallel.group import SINGLE_RANK, TensorParallel

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
}


def model_class(architecture: str) -> type[nn.Module]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        supported = ", ".join(sorted(MODEL_REGISTRY))
        raise ValueError(f"architecture {architecture!r} is not supported (supported: {supported})") from None


def build_model(
    cfg: ModelConfig, device: torch.device, dtype: torch.dtype, tp: TensorParallel = SINGLE_RANK
) -> nn.Module:
    """The model with *uninitialized* parameters on ``device`` in ``dtype``: it is built on the
    meta device and materialized without any CPU-side init, so the weight loader (or the dummy
    initializer) must fill every parameter. Buffers (the rotary table) are filled here. ``tp``:
    this rank's share only (``engine.parallel``)."""
    cls = model_class(cfg.architecture)
    with torch.device("meta"), default_dtype(dtype):
        model = cls(cfg, tp)
    model = model.to_empty(device=device)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.reset_cache()
    return model.eval().requires_grad_(False)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create tensors in ``dtype`` inside the block (so weights are never made in fp32 first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
