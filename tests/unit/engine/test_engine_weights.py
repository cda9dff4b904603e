"""Config parsing, checkpoint mapping, dummy and embedded weights, KV pool sizing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine import cpu_env
from engine.kv_pool import PoolSizing, kv_bytes_per_token
from engine.models.config import ModelConfig
from engine.weights import (
    hf_weight_shapes,
    iter_safetensors,
    load_model,
    random_hf_state_dict,
    resolve_dtype,
)
from engine.worker import Worker
from tests.oracles import dense_logits
from tests.unit.engine.engine_driver import driver_for, greedy, small_args

SHARED_CONFIGS = "/work/shared/model-configs"


def test_embedded_logits_win_by_a_clear_margin() -> None:
    cfg = ModelConfig.embedded()
    weights = random_hf_state_dict(cfg, seed=0)
    gen = torch.Generator().manual_seed(0)
    gaps = []
    for _ in range(8):
        ids = torch.randint(0, 256, (32,), generator=gen).tolist()
        top2 = dense_logits(cfg, weights, ids).topk(2, dim=-1).values
        gaps.append(top2[:, 0] - top2[:, 1])
    gaps = torch.cat(gaps)
    assert gaps.median() > 1.0  # float32 batching noise is ~1e-5
    assert (gaps < 0.01).float().mean() < 0.02


def test_embedded_weights_depend_only_on_the_seed() -> None:
    cfg = ModelConfig.embedded()
    a, b, c = (random_hf_state_dict(cfg, s) for s in (5, 5, 6))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def write_config_only(path: str, **overrides: object) -> None:
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "vocab_size": 300,
        "max_position_embeddings": 256,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "eos_token_id": 7,
    }
    config.update(overrides)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


def test_dummy_load_fills_every_parameter_and_serves(tmp_path: Path) -> None:
    write_config_only(str(tmp_path))
    worker = Worker.create(small_args(model_path=str(tmp_path), load_format="dummy"))
    for name, param in worker.runner.model.named_parameters():
        assert torch.isfinite(param).all(), name
        if name.endswith("norm.weight"):
            assert torch.equal(param, torch.ones_like(param))
    assert worker.runner.model.layers[0].self_attn.qkv_proj.bias.abs().sum() > 0
    (req,) = driver_for(worker).generate([[1, 2, 3, 4, 5]], [greedy(4)])
    assert len(req.outputs) == 4 and all(0 <= t < 300 for t in req.outputs)
    assert worker.model_info().eos_token_ids == [7]


def save_checkpoint(
    path: str, cfg_overrides: dict, drop: str | None = None, extra: str | None = None
) -> None:
    write_config_only(path, **cfg_overrides)
    weights = random_hf_state_dict(ModelConfig.from_dir(path), seed=0)
    if drop:
        del weights[drop]
    if extra:
        weights[extra] = torch.zeros(3)
    save_file(weights, os.path.join(path, "model.safetensors"))


def test_untied_checkpoint_without_lm_head_ties_it(tmp_path: Path) -> None:
    save_checkpoint(str(tmp_path), {"tie_word_embeddings": False}, drop="lm_head.weight")
    model = load_model(small_args(model_path=str(tmp_path))).model
    assert model.lm_head is None


@pytest.mark.parametrize(
    ("drop", "extra", "message"),
    [
        ("model.layers.1.self_attn.k_proj.weight", None, "missing"),
        (None, "model.layers.0.mlp.extra.weight", "unexpected"),
    ],
)
def test_incomplete_or_foreign_checkpoints_are_refused(tmp_path: Path, drop, extra, message) -> None:
    save_checkpoint(str(tmp_path), {}, drop=drop, extra=extra)
    with pytest.raises(ValueError, match=message):
        load_model(small_args(model_path=str(tmp_path)))


def test_checkpoint_with_a_wrong_shape_is_refused(tmp_path: Path) -> None:
    save_checkpoint(str(tmp_path), {})
    write_config_only(str(tmp_path), intermediate_size=48)
    with pytest.raises(ValueError, match="shape"):
        load_model(small_args(model_path=str(tmp_path)))


def test_fused_projections_hold_the_hf_shards_in_order(tmp_path: Path) -> None:
    save_checkpoint(str(tmp_path), {})
    model = load_model(small_args(model_path=str(tmp_path))).model
    weights = dict(iter_safetensors(str(tmp_path)))
    attn = model.layers[1].self_attn
    hf = "model.layers.1.self_attn."
    for index, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        assert torch.equal(attn.qkv_proj.shard("weight", index), weights[hf + proj + ".weight"])
        assert torch.equal(attn.qkv_proj.shard("bias", index), weights[hf + proj + ".bias"])
    gate_up = model.layers[1].mlp.gate_up_proj
    assert torch.equal(gate_up.shard("weight", 1), weights["model.layers.1.mlp.up_proj.weight"])


def shared_config_names() -> list[str]:
    if not os.path.isdir(SHARED_CONFIGS):
        return []
    return sorted(n for n in os.listdir(SHARED_CONFIGS) if os.path.isdir(os.path.join(SHARED_CONFIGS, n)))


@pytest.mark.parametrize("name", shared_config_names())
def test_real_configs_parse(name: str) -> None:
    cfg = ModelConfig.from_dir(os.path.join(SHARED_CONFIGS, name))
    assert cfg.head_dim * cfg.num_heads == cfg.hidden_size
    assert sum(1 for n in hf_weight_shapes(cfg) if "layers.0." in n) in (9, 12)
    if name == "llama-3.1-8b":
        assert cfg.rope_scaling.rope_type == "llama3" and cfg.eos_token_ids == (128001, 128008, 128009)
    if name == "qwen2.5-0.5b":
        assert cfg.qkv_bias and cfg.tie_word_embeddings and cfg.sliding_window is None
    if name == "mistral-7b-v0.1":
        assert cfg.sliding_window == 4096 and not cfg.qkv_bias


def test_config_spellings_of_transformers_4_and_5() -> None:
    base = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 2,
        "num_hidden_layers": 1,
        "vocab_size": 10,
        "head_dim": 16,
    }
    v4 = ModelConfig.from_hf(
        {
            **base,
            "rope_theta": 5e5,
            "rope_scaling": {"type": "linear", "factor": 2.0},
            "torch_dtype": "float16",
        }
    )
    v5 = ModelConfig.from_hf(
        {
            **base,
            "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5},
            "dtype": "float16",
        }
    )
    assert v4 == v5
    assert v4.head_dim == 16 and v4.num_kv_heads == 2 and v4.rope_theta == 5e5
    with pytest.raises(ValueError, match="yarn"):
        ModelConfig.from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_mistral_context_is_capped_at_its_sliding_window(tmp_path: Path) -> None:
    write_config_only(
        str(tmp_path), architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=64
    )
    worker = Worker.create(small_args(model_path=str(tmp_path), load_format="dummy"))
    assert worker.max_context_len == 64
    assert worker.runner.max_pages_per_req == 64 // 4


def test_unknown_architecture_is_refused(tmp_path: Path) -> None:
    write_config_only(str(tmp_path), architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        load_model(small_args(model_path=str(tmp_path), load_format="dummy"))


def test_dtype_auto() -> None:
    cfg = ModelConfig.embedded()
    assert resolve_dtype("auto", cfg, torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", cfg, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", cfg, torch.device("cpu")) == torch.float16


def test_pool_sizing(monkeypatch) -> None:
    monkeypatch.setattr(cpu_env, "available_memory_bytes", lambda: 1 << 30)
    per_token = kv_bytes_per_token(num_layers=4, num_kv_heads=2, head_dim=32, dtype=torch.float32)
    assert per_token == 2 * 4 * 2 * 32 * 4
    explicit = PoolSizing(
        16, per_token, max_total_tokens=1000, mem_fraction_static=0.5, max_useful_tokens=10**9
    )
    assert explicit.num_pages(torch.device("cpu")) == 1000 // 16 + 1
    budget = PoolSizing(
        16, per_token, max_total_tokens=None, mem_fraction_static=0.5, max_useful_tokens=10**9
    )
    expected_bytes = int((1 << 30) * 0.5 * cpu_env.CPU_MEMORY_SHARE)
    assert budget.num_pages(torch.device("cpu")) == expected_bytes // per_token // 16 + 1
    capped = PoolSizing(16, per_token, max_total_tokens=None, mem_fraction_static=0.5, max_useful_tokens=640)
    assert capped.num_pages(torch.device("cpu")) == 640 // 16 + 1


def test_generation_config_adds_its_eos_ids(tmp_path: Path) -> None:
    write_config_only(str(tmp_path), eos_token_id=7)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    assert ModelConfig.from_dir(str(tmp_path)).eos_token_ids == (7, 9)
