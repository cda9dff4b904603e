"""GGUF checkpoints (llama.cpp's one-file format): the config through transformers' GGUF
support, the weights through the ``gguf`` library, dequantized to float32 and renamed to the
Hugging Face names that ``weights.load_hf_weights`` maps onto our parameters.

Reading the file's metadata is most of a start-up (the tokenizer's fields): the config and the
layout of the tensors (type, array dtype and shape, file offset) are derived once per version of
the file and kept (``protocol.derived_cache``); the tensors are then mapped from the file.

llama.cpp's converter permutes the rows of the Q and K projections of ``llama`` models (its
rotary embedding pairs neighbouring dimensions, Hugging Face's pairs the two halves of a head);
``unpermute_rotary_rows`` undoes it exactly as transformers does
(``modeling_gguf_pytorch_utils.LlamaTensorProcessor``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from engine.models.config import ModelConfig
from protocol.derived_cache import derived_json

# transformers' model_type of a GGUF llama file → our architecture name (transformers calls a
# llama file whose general.name mentions mistral "mistral")
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
GGUF_FILE_ARCHITECTURES = ("llama",)  # general.architecture values we load
INSTALL_HINT = "loading a GGUF file needs the gguf and transformers packages (pip install 'pdserve[gguf]')"


def gguf_model_config(path: str) -> ModelConfig:
    """The model's config from the file's metadata, parsed by transformers' GGUF support."""
    hf = derived_json(path, "gguf-config", lambda: _read_config(path))
    model_type = hf.get("model_type")
    if model_type not in GGUF_ARCHITECTURES:
        supported = ", ".join(GGUF_ARCHITECTURES)
        raise ValueError(f"GGUF model type {model_type!r} is not supported (only {supported})")
    return ModelConfig.from_hf({**hf, "architectures": [GGUF_ARCHITECTURES[model_type]]})


def iter_gguf_weights(
    path: str, cfg: ModelConfig, hf_names: Iterable[str]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the file, dequantized to float32, under its Hugging Face name (one of
    ``hf_names``, the checkpoint names of ``cfg``)."""
    try:
        from gguf import GGMLQuantizationType, dequantize
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    layout = derived_json(path, "gguf-tensors", lambda: _read_tensor_layout(path))
    names = gguf_to_hf_names(layout["architecture"], cfg.num_layers, hf_names)
    for tensor in layout["tensors"]:
        hf_name = names.get(tensor["name"])
        if hf_name is None:  # e.g. Llama 3.1's rope_freqs: refused rather than served wrong
            raise ValueError(f"GGUF file has a tensor this engine does not load: {tensor['name']!r}")
        data = np.memmap(path, np.dtype(tensor["dtype"]), "r", tensor["offset"], tuple(tensor["shape"]))
        quant = GGMLQuantizationType(tensor["type"])
        # F32 tensors come back as read-only views of the mapped file: copy those
        weight = torch.from_numpy(np.require(dequantize(data, quant), np.float32, "W"))
        yield hf_name, _unpermuted(hf_name, weight, cfg)


def _read_config(path: str) -> dict[str, Any]:
    try:
        from transformers import AutoConfig
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    config = AutoConfig.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path))
    return json.loads(config.to_json_string(use_diff=False))


def _read_tensor_layout(path: str) -> dict[str, Any]:
    """The file's architecture, and per tensor its name, type, array dtype and shape (as
    ``gguf`` maps it) and offset in the file."""
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    reader = GGUFReader(path)
    tensors = [
        {"name": t.name, "type": int(t.tensor_type), "dtype": t.data.dtype.str, "shape": list(t.data.shape),
         "offset": int(t.data_offset)}
        for t in reader.tensors
    ]
    return {"architecture": _file_architecture(reader), "tensors": tensors}


def gguf_to_hf_names(architecture: str, num_layers: int, hf_names: Iterable[str]) -> dict[str, str]:
    """GGUF tensor name → Hugging Face name, from gguf's own table of the architecture. An
    untied ``lm_head`` is always mapped: a file may keep one that the model ties."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch = next(a for a, name in MODEL_ARCH_NAMES.items() if name == architecture)
    table = get_tensor_name_map(arch, num_layers)
    out = {}
    for hf_name in dict.fromkeys([*hf_names, "lm_head.weight"]):
        module, suffix = hf_name.rsplit(".", 1)
        gguf_module = table.get_name(module)
        if gguf_module is None:
            raise ValueError(f"gguf has no {architecture} name for {hf_name}")
        out[f"{gguf_module}.{suffix}"] = hf_name
    return out


def unpermute_rotary_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row permutation of a Q or K projection (weight or bias)."""
    rows = weight.shape[0]
    pairs = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
    return pairs.transpose(1, 2).reshape(weight.shape)


def _unpermuted(hf_name: str, weight: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    if ".q_proj." in hf_name:
        return unpermute_rotary_rows(weight, cfg.num_heads)
    if ".k_proj." in hf_name:
        return unpermute_rotary_rows(weight, cfg.num_kv_heads)
    return weight


def _file_architecture(reader: Any) -> str:
    field = reader.get_field("general.architecture")
    architecture = field.contents() if field is not None else None
    if architecture not in GGUF_FILE_ARCHITECTURES:
        supported = ", ".join(GGUF_FILE_ARCHITECTURES)
        raise ValueError(f"GGUF architecture {architecture!r} is not supported (only {supported})")
    return architecture
