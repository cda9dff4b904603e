"""Weights: Hugging Face safetensors checkpoints, GGUF files (``engine.gguf``), dummy random
weights of a real shape, and the seeded embedded default model.

Checkpoint tensors keep their Hugging Face names; ``load_hf_weights`` maps them onto our
parameters (q/k/v into ``qkv_proj``, gate/up into ``gate_up_proj``) and refuses a checkpoint
that leaves any parameter unset. Under tensor parallelism every rank reads the full tensors and
keeps its part (``engine.parallel.layers.rank_part``). Random weights are *scaled*
(unit-variance activations and a wide logit spread) so that greedy decoding is decided by a
clear margin, never a near-tie.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from safetensors import safe_open
from torch import nn

from engine.gguf import gguf_model_config, iter_gguf_weights
from engine.layers.linear import MergedLinear
from engine.models.config import ModelConfig
from engine.models.registry import build_model
from engine.parallel.group import SINGLE_RANK, TensorParallel, rank_device
from engine.parallel.layers import full_shape, rank_part
from protocol.config import ServerArgs
from protocol.model_source import ModelFormat, ModelSource, resolve_model

logger = logging.getLogger("pdserve.worker")

LOGIT_STD = 8.0  # spread of random logits: top-1 wins by whole units, not by rounding noise
BIAS_STD = 0.1
# o_proj/down_proj gain: blocks outweigh the token's own embedding in the residual stream, or a
# tied-embedding model would mostly predict its input token again
RESIDUAL_GAIN = 16.0

# Hugging Face projection → (our fused projection, shard index)
STACKED_PARAMS = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LOAD_FORMATS = ("auto", "dummy")  # the --load-format values load_model knows


@dataclass
class LoadedModel:
    model: nn.Module
    config: ModelConfig
    name: str
    device: torch.device
    dtype: torch.dtype


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """``auto``: float32 on CPU; on CUDA the checkpoint's dtype (bfloat16 when it names none)."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    return _DTYPES.get(cfg.torch_dtype or "", torch.bfloat16)


def model_config(source: ModelSource) -> ModelConfig:
    if source.format is ModelFormat.EMBEDDED:
        return ModelConfig.embedded()
    if source.format is ModelFormat.GGUF:
        return gguf_model_config(_path(source))
    return ModelConfig.from_dir(_path(source))


def load_model(args: ServerArgs, tp: TensorParallel = SINGLE_RANK) -> LoadedModel:
    """The model ``args`` asks for (this rank's part of it), on its device, every parameter set."""
    started = time.monotonic()
    source = resolve_model(args.model_path)
    cfg = model_config(source)
    device = rank_device(resolve_device(args.device), tp)
    dtype = resolve_dtype(args.dtype, cfg, device)
    model = build_model(cfg, device, dtype, tp)
    if source.format is ModelFormat.EMBEDDED:
        load_hf_weights(model, random_hf_state_dict(cfg, args.seed).items())
    elif args.load_format == "dummy":
        fill_dummy_weights(model, args.seed)
    elif source.format is ModelFormat.GGUF:
        load_hf_weights(model, iter_gguf_weights(_path(source), cfg, hf_weight_shapes(cfg)))
    else:
        load_hf_weights(model, iter_safetensors(_path(source)))
    logger.info(
        "loaded %s (%s) on %s in %s in %.1f s",
        source.name, cfg.architecture, device, dtype, time.monotonic() - started,
    )
    return LoadedModel(model, cfg, args.served_model_name or source.name, device, dtype)


def _path(source: ModelSource) -> str:
    assert source.path is not None, "only the embedded model has no path"
    return source.path


# ---------------------------------------------------------------------------------- checkpoints


def safetensors_files(path: str) -> list[str]:
    """The checkpoint's files: those named by ``model.safetensors.index.json``, else every
    ``*.safetensors`` in the directory."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, n) for n in names]
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    return files


def iter_safetensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    for file in safetensors_files(path):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, f.get_tensor(name)


@torch.no_grad()
def load_hf_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy Hugging Face-named tensors into ``model``; raises if any parameter stays unset.

    An untied model whose checkpoint has no ``lm_head`` ties it to the embedding."""
    expected = _expected_keys(model)
    loaded: set[str] = set()
    for hf_name, tensor in weights:
        name = hf_name.removeprefix("model.")
        if name.endswith(IGNORED_SUFFIXES) or (name == "lm_head.weight" and model.lm_head is None):
            continue
        key, target, module, index = _target(model, name)
        tensor = rank_part(module, name.rsplit(".", 1)[1], tensor, index)
        if target.shape != tensor.shape:
            raise ValueError(
                f"{hf_name}: checkpoint shape {tuple(tensor.shape)}, model {tuple(target.shape)}"
            )
        target.copy_(tensor)
        loaded.add(key)
    if "lm_head.weight" in expected - loaded:
        model.lm_head = None
        expected.discard("lm_head.weight")
    missing = expected - loaded
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} weights, e.g. {sorted(missing)[:3]}")


def _target(model: nn.Module, name: str) -> tuple[str, torch.Tensor, nn.Module, int | None]:
    """(bookkeeping key, the tensor to fill, its module, its shard index in a fused projection)
    for one of our parameter names (HF spelling)."""
    module_path, param_name = name.rsplit(".", 1)
    parent, _, leaf = module_path.rpartition(".")
    if leaf in STACKED_PARAMS:
        fused, index = STACKED_PARAMS[leaf]
        fused_path = f"{parent}.{fused}"
        module = model.get_submodule(fused_path)
        return f"{fused_path}.{param_name}#{index}", module.shard(param_name, index), module, index
    try:
        return name, model.get_parameter(name), model.get_submodule(module_path), None
    except AttributeError:
        raise ValueError(f"checkpoint has an unexpected weight {name!r}") from None


def _expected_keys(model: nn.Module) -> set[str]:
    keys = set()
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            key = f"{module_name}.{param_name}" if module_name else param_name
            if isinstance(module, MergedLinear):
                keys.update(f"{key}#{i}" for i in range(len(module.output_sizes)))
            else:
                keys.add(key)
    return keys


# ---------------------------------------------------------------------------------- random weights


def init_std(name: str, shape: torch.Size | tuple[int, ...]) -> float | None:
    """Standard deviation of the scaled random init of one weight (None: a norm, set to 1)."""
    if name.endswith("norm.weight"):
        return None
    if name.endswith("embed_tokens.weight"):
        return 1.0
    if name.endswith(".bias"):
        return BIAS_STD
    if name.endswith("lm_head.weight"):
        return LOGIT_STD / math.sqrt(shape[1])
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return RESIDUAL_GAIN / math.sqrt(shape[1])
    return 1.0 / math.sqrt(shape[1])


def hf_weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight of the Hugging Face checkpoint of ``cfg``, in checkpoint order."""
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        for proj, out in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            shapes[f"{p}self_attn.{proj}.weight"] = (out, h)
            if cfg.qkv_bias:
                shapes[f"{p}self_attn.{proj}.bias"] = (out,)
        shapes[f"{p}self_attn.o_proj.weight"] = (h, q)
        if cfg.o_bias:
            shapes[f"{p}self_attn.o_proj.bias"] = (h,)
        shapes[f"{p}mlp.gate_proj.weight"] = (cfg.intermediate_size, h)
        shapes[f"{p}mlp.up_proj.weight"] = (cfg.intermediate_size, h)
        shapes[f"{p}mlp.down_proj.weight"] = (h, cfg.intermediate_size)
        shapes[f"{p}input_layernorm.weight"] = (h,)
        shapes[f"{p}post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def random_hf_state_dict(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Seeded, scaled random weights with Hugging Face names (CPU, float32). The same seed
    gives the same weights on every machine: the embedded model and the test oracles use it."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in hf_weight_shapes(cfg).items():
        std = init_std(name, shape)
        out[name] = torch.ones(shape) if std is None else torch.randn(shape, generator=gen) * std
    return out


@torch.no_grad()
def fill_dummy_weights(model: nn.Module, seed: int) -> None:
    """Scaled random weights generated on the model's device in its dtype (no host work per
    element, so an 8B model fills in about a second on a GPU). A tensor-parallel rank draws each
    parameter's full tensor and keeps its part: every ``--tp-size`` serves the same weights."""
    device = next(model.parameters()).device
    gen = torch.Generator(device).manual_seed(seed)
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{param_name}" if module_name else param_name
            shape = full_shape(module, param_name, param.shape)
            std = init_std(name, shape)
            if std is None:
                param.fill_(1.0)
            elif shape == tuple(param.shape):
                param.normal_(0.0, std, generator=gen)
            else:
                full = torch.empty(shape, dtype=param.dtype, device=device).normal_(0.0, std, generator=gen)
                param.copy_(rank_part(module, param_name, full, None))
