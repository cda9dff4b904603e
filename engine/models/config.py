"""The model hyperparameters the engine needs, parsed from a Hugging Face ``config.json``.

Both spellings that transformers has used are accepted: ``rope_theta`` / ``rope_scaling`` /
``torch_dtype`` (4.x) and ``rope_parameters`` / ``dtype`` (5.x).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from protocol.config import EMBEDDED

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    torch_dtype: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Parse a config.json dict; raises ValueError for what this engine cannot run."""
        architecture = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
        if hf.get("mlp_bias"):
            raise ValueError("mlp_bias=true is not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (only silu)")
        num_heads = hf["num_attention_heads"]
        rope = hf.get("rope_parameters") or {}
        qwen2 = architecture == "Qwen2ForCausalLM"
        attention_bias = bool(hf.get("attention_bias", False))
        return cls(
            architecture=architecture,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(hf.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rope_scaling=_parse_rope_scaling(hf.get("rope_scaling") or rope),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qwen2 or attention_bias,
            o_bias=attention_bias and not qwen2,
            torch_dtype=hf.get("torch_dtype") or hf.get("dtype"),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=_as_tuple(hf.get("eos_token_id")),
            sliding_window=_sliding_window(hf),
        )

    @classmethod
    def from_dir(cls, path: str) -> ModelConfig:
        """``config.json``, plus the EOS ids of ``generation_config.json`` when there is one
        (instruct checkpoints list their end-of-turn token only there)."""
        with open(os.path.join(path, "config.json")) as f:
            cfg = cls.from_hf(json.load(f))
        generation = os.path.join(path, "generation_config.json")
        if not os.path.exists(generation):
            return cfg
        with open(generation) as f:
            extra = _as_tuple(json.load(f).get("eos_token_id"))
        eos = cfg.eos_token_ids + tuple(e for e in extra if e not in cfg.eos_token_ids)
        return dataclasses.replace(cfg, eos_token_ids=eos)

    @classmethod
    def embedded(cls) -> ModelConfig:
        e = EMBEDDED
        return cls(
            architecture="LlamaForCausalLM",
            vocab_size=e.vocab_size,
            hidden_size=e.hidden_size,
            intermediate_size=e.intermediate_size,
            num_layers=e.num_layers,
            num_heads=e.num_heads,
            num_kv_heads=e.num_kv_heads,
            head_dim=e.head_dim,
            rms_norm_eps=e.rms_norm_eps,
            rope_theta=e.rope_theta,
            max_position_embeddings=e.context_len,
            bos_token_id=e.bos_token_id,
            eos_token_ids=(e.eos_token_id,),
        )


def _parse_rope_scaling(d: dict[str, Any]) -> RopeScaling:
    rope_type = d.get("rope_type") or d.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope type {rope_type!r} is not supported (only {', '.join(SUPPORTED_ROPE_TYPES)})")
    if rope_type == "default":
        return RopeScaling()
    defaults = RopeScaling()
    return RopeScaling(
        rope_type=rope_type,
        factor=float(d.get("factor", 1.0)),
        low_freq_factor=float(d.get("low_freq_factor", defaults.low_freq_factor)),
        high_freq_factor=float(d.get("high_freq_factor", defaults.high_freq_factor)),
        original_max_position_embeddings=int(
            d.get("original_max_position_embeddings", defaults.original_max_position_embeddings)
        ),
    )


def _sliding_window(hf: dict[str, Any]) -> int | None:
    """Mistral's window (Qwen2 only when ``use_sliding_window``). The engine runs full
    attention, which equals sliding-window attention while the context fits in the window."""
    if hf.get("model_type") == "qwen2" and not hf.get("use_sliding_window", False):
        return None
    return hf.get("sliding_window")


def _as_tuple(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (value,)
