"""Test oracles shared by the unit and end-to-end tests.

``greedy_reference`` is the plain-torch reference of docs/design.md "Testing": one request at a
time, the whole sequence recomputed every step with dense causal attention (no KV pool, no
batching, no paging), float32 on CPU, on exactly the weights a server loads. It shares only
the weights and the config parsing with the engine, not its model code.

``write_tiny_hf_model`` writes a tiny random Hugging Face checkpoint whose logits are far from
flat, so that greedy outputs are decided by clear margins.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from engine.models.config import ModelConfig, RopeScaling
from engine.weights import iter_safetensors, random_hf_state_dict
from protocol.config import EMBEDDED

TINY_SHAPE = dict(
    vocab_size=EMBEDDED.vocab_size,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
    bos_token_id=EMBEDDED.bos_token_id,
    eos_token_id=EMBEDDED.eos_token_id,
    rms_norm_eps=1e-5,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
    "rope_theta": 500000.0,
}


def write_tiny_hf_model(
    path: str, arch: str = "llama", seed: int = 0, max_shard_size: str | None = None
) -> None:
    """A tiny random-weight transformers model saved as safetensors in ``path``.

    ``llama``: GQA, untied lm_head, llama3 rope scaling. ``qwen2``: q/k/v bias, tied
    embeddings. Vocabulary: the embedded model's (bytes, BOS 256, EOS 257 in config.json but
    not in generation_config.json). ``max_shard_size`` (e.g. ``"100KB"``) writes a sharded
    checkpoint with an index."""
    import transformers

    if arch == "llama":
        config = transformers.LlamaConfig(**TINY_SHAPE, tie_word_embeddings=False, rope_scaling=LLAMA3_ROPE)
        model_cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":
        config = transformers.Qwen2Config(**TINY_SHAPE, tie_word_embeddings=True)
        model_cls = transformers.Qwen2ForCausalLM
    else:
        raise ValueError(f"unknown tiny architecture {arch!r} (llama or qwen2)")
    config.architectures = [model_cls.__name__]
    model = model_cls(config)
    weights = random_hf_state_dict(ModelConfig.from_hf(config.to_dict()), seed)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    # no EOS in generation_config.json: transformers ``generate`` then makes exactly
    # ``max_new_tokens`` tokens and never masks EOS (as ``min_new_tokens`` would), like a
    # server request with ``ignore_eos``; config.json keeps EOS 257 for the server
    model.generation_config.eos_token_id = None
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, safe_serialization=True, **kwargs)


def greedy_reference(
    model_path: str | None, prompts: list[list[int]], max_new_tokens: int, seed: int = 0,
    repetition_penalty: float = 1.0,
) -> list[list[int]]:
    """Exactly ``max_new_tokens`` greedy tokens per prompt (EOS does not stop it: compare with
    requests that set ``ignore_eos``, or cut at the first stop token yourself).

    ``model_path`` None: the embedded default model with weights from ``seed`` (the server's
    ``--seed``); otherwise the safetensors checkpoint in that directory. ``repetition_penalty``:
    each logit of a token already in the sequence is divided by it if positive, else multiplied."""
    if model_path is None:
        cfg = ModelConfig.embedded()
        weights = random_hf_state_dict(cfg, seed)
    else:
        cfg = ModelConfig.from_dir(model_path)
        weights = {name: t.float() for name, t in iter_safetensors(model_path)}
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(max_new_tokens):
                logits = dense_logits(cfg, weights, ids)[-1]
                for token in set(ids):
                    value = float(logits[token])
                    logits[token] = value / repetition_penalty if value > 0 else value * repetition_penalty
                ids.append(int(logits.argmax()))
            outputs.append(ids[len(prompt) :])
    return outputs


def dense_logits(cfg: ModelConfig, w: dict[str, torch.Tensor], ids: list[int]) -> torch.Tensor:
    """Float32 logits [T, vocab] of one sequence, full causal attention."""
    x = w["model.embed_tokens.weight"][torch.tensor(ids)]
    cos, sin = _rope_tables(cfg, len(ids))
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        h = _rms_norm(x, w[p + "input_layernorm.weight"], cfg.rms_norm_eps)
        x = x + _dense_attention(cfg, w, p + "self_attn.", h, cos, sin)
        h = _rms_norm(x, w[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        gate = h @ w[p + "mlp.gate_proj.weight"].t()
        up = h @ w[p + "mlp.up_proj.weight"].t()
        x = x + (F.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].t()
    x = _rms_norm(x, w["model.norm.weight"], cfg.rms_norm_eps)
    return x @ w.get("lm_head.weight", w["model.embed_tokens.weight"]).t()


def _dense_attention(
    cfg: ModelConfig,
    w: dict[str, torch.Tensor],
    p: str,
    h: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> torch.Tensor:
    def proj(name: str, heads: int) -> torch.Tensor:
        out = h @ w[f"{p}{name}.weight"].t()
        if f"{p}{name}.bias" in w:
            out = out + w[f"{p}{name}.bias"]
        return out.view(len(h), heads, cfg.head_dim).transpose(0, 1)  # [heads, T, D]

    q = _rotate(proj("q_proj", cfg.num_heads), cos, sin)
    k = _rotate(proj("k_proj", cfg.num_kv_heads), cos, sin)
    v = proj("v_proj", cfg.num_kv_heads)
    group = cfg.num_heads // cfg.num_kv_heads
    k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)
    scores = q @ k.transpose(1, 2) / math.sqrt(cfg.head_dim)
    causal = torch.ones(len(h), len(h), dtype=torch.bool).triu(1)
    attn = scores.masked_fill(causal, float("-inf")).softmax(-1) @ v
    out = attn.transpose(0, 1).reshape(len(h), -1) @ w[f"{p}o_proj.weight"].t()
    return out + w[f"{p}o_proj.bias"] if f"{p}o_proj.bias" in w else out


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope_tables(cfg: ModelConfig, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    dims = torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim
    freqs = [_scaled_freq(f, cfg.rope_scaling) for f in (cfg.rope_theta**-dims).tolist()]
    angles = torch.outer(torch.arange(n, dtype=torch.float64), torch.tensor(freqs, dtype=torch.float64))
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def _scaled_freq(freq: float, s: RopeScaling) -> float:
    """One rotary frequency after Llama 3.1 / linear scaling (written per scalar, on purpose
    differently from the engine's vectorized version)."""
    if s.rope_type == "linear":
        return freq / s.factor
    if s.rope_type != "llama3":
        return freq
    wavelen = 2 * math.pi / freq
    if wavelen < s.original_max_position_embeddings / s.high_freq_factor:
        return freq
    if wavelen > s.original_max_position_embeddings / s.low_freq_factor:
        return freq / s.factor
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    return (1 - smooth) * freq / s.factor + smooth * freq


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
