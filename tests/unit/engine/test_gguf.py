"""GGUF loading. A small file written here checks the name mapping and llama.cpp's Q/K row
permutation; the packaged SmolLM2-135M-Instruct (Q4_1; 9 query heads over 3 KV heads) is checked
against transformers' GGUF support: config, every dequantized weight, the tokenizer, and greedy
generation token for token (skipped when the package is not installed). The transformers
objects load once for the module."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest
import torch

from engine.gguf import gguf_model_config, gguf_to_hf_names, iter_gguf_weights, unpermute_rotary_rows
from engine.models.config import ModelConfig
from engine.weights import hf_weight_shapes, random_hf_state_dict
from engine.worker import Worker
from protocol import derived_cache
from protocol.model_source import PACKAGED_MODELS, ModelFormat, resolve_model
from tests.unit.engine.engine_driver import driver_for, greedy, small_args
from tokenizer_proc.chat_template import ChatTemplate, load_chat_template
from tokenizer_proc.tokenizer import HFTokenizer, Tokenizer, load_tokenizer

SHORT_NAME = "smollm2-135m-instruct"
MAX_NEW = 24
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences what a CPU does.",
    "List three primary colors.",
]

gguf = pytest.importorskip("gguf", reason="GGUF loading needs the gguf package (scripts/setup.sh has it)")


def packaged_path() -> str:
    try:
        return PACKAGED_MODELS[SHORT_NAME].locate()
    except FileNotFoundError as e:
        pytest.skip(f"the packaged GGUF model is not installed: {e}")


def from_pretrained(auto_class: str, **kwargs: object) -> object:
    """transformers' ``Auto*`` class of that name, loaded from the packaged GGUF file."""
    import transformers

    path = packaged_path()
    cls = getattr(transformers, auto_class)
    return cls.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), **kwargs)


# ------------------------------------------------------------------ a small file written here


def llama_cpp_permute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf.py ``LlamaModel.permute``, the inverse of ours."""
    halves = weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
    return halves.swapaxes(1, 2).reshape(weight.shape)


def write_gguf(path: Path, tensors: dict[str, torch.Tensor], arch: str = "llama") -> None:
    writer = gguf.GGUFWriter(str(path), arch)
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_small_file_round_trips_to_hugging_face_names_and_layout(tmp_path: Path, monkeypatch) -> None:
    """Hugging Face weights written as llama.cpp writes them (GGUF names, Q/K rows permuted)
    load back as they were; 8 query heads over 2 KV heads. Twice: read from the file's
    metadata, then through the kept layout (protocol.derived_cache)."""
    monkeypatch.setenv(derived_cache.CACHE_DIR_ENV, str(tmp_path / "cache"))
    cfg = dataclasses.replace(ModelConfig.embedded(), num_layers=2)
    hf = random_hf_state_dict(cfg, seed=3)
    names = {h: g for g, h in gguf_to_hf_names("llama", cfg.num_layers, hf).items()}
    on_disk = {}
    for name, tensor in hf.items():
        if ".q_proj." in name:
            tensor = llama_cpp_permute(tensor, cfg.num_heads)
        elif ".k_proj." in name:
            tensor = llama_cpp_permute(tensor, cfg.num_kv_heads)
        on_disk[names[name]] = tensor
    assert names["model.layers.1.self_attn.k_proj.weight"] == "blk.1.attn_k.weight"
    write_gguf(tmp_path / "tiny.gguf", on_disk)
    for _ in range(2):
        loaded = dict(iter_gguf_weights(str(tmp_path / "tiny.gguf"), cfg, hf_weight_shapes(cfg)))
        assert sorted(loaded) == sorted(hf)
        for name, tensor in hf.items():
            assert torch.equal(loaded[name], tensor), name
    assert len(list((tmp_path / "cache").glob("gguf-tensors-*.json"))) == 1


def test_unknown_tensors_and_architectures_are_refused(tmp_path: Path) -> None:
    cfg = dataclasses.replace(ModelConfig.embedded(), num_layers=1)
    write_gguf(tmp_path / "rope.gguf", {"rope_freqs.weight": torch.ones(16)})
    with pytest.raises(ValueError, match="does not load: 'rope_freqs.weight'"):
        list(iter_gguf_weights(str(tmp_path / "rope.gguf"), cfg, hf_weight_shapes(cfg)))
    write_gguf(tmp_path / "gpt2.gguf", {"token_embd.weight": torch.ones(4, 4)}, arch="gpt2")
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        list(iter_gguf_weights(str(tmp_path / "gpt2.gguf"), cfg, hf_weight_shapes(cfg)))


# ------------------------------------------------------- the packaged SmolLM2-135M-Instruct


@pytest.fixture(scope="module")
def config() -> ModelConfig:
    return gguf_model_config(packaged_path())


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_tokenizer(SHORT_NAME)


@pytest.fixture(scope="module")
def hf_config():
    return from_pretrained("AutoConfig")


@pytest.fixture(scope="module")
def hf_tokenizer():
    return from_pretrained("AutoTokenizer")


@pytest.fixture(scope="module")
def hf_model():
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF model")
    return from_pretrained("AutoModelForCausalLM", dtype=torch.float32)


@pytest.fixture(scope="module")
def chat_prompts(hf_tokenizer) -> list[str]:
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    return [hf_tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]


def test_short_name_resolves_to_the_packaged_file() -> None:
    path = packaged_path()
    source = resolve_model(SHORT_NAME)
    assert source.format is ModelFormat.GGUF and source.path == path and source.name == SHORT_NAME
    assert resolve_model(path).format is ModelFormat.GGUF
    assert resolve_model("pdserve-embedded-llama").format is ModelFormat.EMBEDDED


def test_config_equals_transformers(config: ModelConfig, hf_config) -> None:
    cfg, hf = config, hf_config
    rope_theta = getattr(hf, "rope_theta", None) or hf.rope_parameters["rope_theta"]
    assert (cfg.architecture, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        "LlamaForCausalLM", 30, 9, 3, 64,
    )
    assert cfg.vocab_size == hf.vocab_size == 49152
    assert cfg.hidden_size == hf.hidden_size
    assert cfg.intermediate_size == hf.intermediate_size
    assert cfg.num_layers == hf.num_hidden_layers
    assert cfg.num_heads == hf.num_attention_heads
    assert cfg.num_kv_heads == hf.num_key_value_heads
    assert cfg.head_dim == hf.head_dim
    assert cfg.rms_norm_eps == hf.rms_norm_eps
    assert cfg.rope_theta == rope_theta
    assert cfg.rope_scaling.rope_type == "default"
    assert cfg.max_position_embeddings == hf.max_position_embeddings
    assert cfg.tie_word_embeddings is hf.tie_word_embeddings is True
    assert cfg.bos_token_id == hf.bos_token_id
    assert cfg.eos_token_ids == (hf.eos_token_id,)


def test_unpermute_restores_the_rotary_halves() -> None:
    """One head of 4 rows: llama.cpp stores rows (0, 2, 1, 3) of Hugging Face's (0, 1, 2, 3)."""
    hf = torch.arange(8.0).reshape(4, 2)
    llama_cpp = hf[[0, 2, 1, 3]]
    assert torch.equal(unpermute_rotary_rows(llama_cpp, num_heads=1), hf)


def test_weights_equal_transformers(config: ModelConfig, hf_model) -> None:
    ours = dict(iter_gguf_weights(packaged_path(), config, hf_weight_shapes(config)))
    theirs = {k: v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}  # tied
    assert hf_model.config.tie_word_embeddings
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert ours[name].dtype == torch.float32, name
        assert torch.equal(ours[name], tensor), name


def test_tokenizer_encodes_as_transformers(tokenizer: Tokenizer, hf_tokenizer, chat_prompts) -> None:
    tok = tokenizer
    assert isinstance(tok, HFTokenizer) and tok.has_text
    assert (tok.bos_token_id, tok.eos_token_ids) == (1, [2])  # <|im_start|>, <|im_end|>
    assert tok.vocab_size == 49152
    assert tok.chat_template == hf_tokenizer.chat_template and "<|im_start|>" in tok.chat_template
    special = tok.special_tokens
    assert (special["bos_token"], special["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    template = ChatTemplate(load_chat_template(None, gguf_template=tok.chat_template), tok.special_tokens)
    assert [template.render([{"role": "user", "content": q}]) for q in QUESTIONS] == chat_prompts
    plain = ["Hello world!", "héllo 日本語 🎉 naïve café", "  two spaces\tand a tab\n", ""]
    for text in [*plain, *chat_prompts]:
        assert tok.encode(text) == hf_tokenizer(text).input_ids, text
    for text in plain:
        assert tok.decode(tok.encode(text)) == text
    (chat,) = chat_prompts[:1]
    assert tok.decode(tok.encode(chat)) == chat.replace("<|im_start|>", "").replace("<|im_end|>", "")


def test_greedy_generation_equals_transformers(
    tokenizer: Tokenizer, hf_model, hf_tokenizer, chat_prompts
) -> None:
    """Chunked prefill of four chat prompts at once, then batched decode with the torch
    reference attention (GQA ratio 3), against transformers' one-prompt-at-a-time generate."""
    prompts = [tokenizer.encode(p) for p in chat_prompts]
    expected = []
    with torch.no_grad():
        for ids in prompts:
            out = hf_model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None, pad_token_id=2,
            )
            expected.append(out[0, len(ids):].tolist())
    started = time.monotonic()
    worker = Worker.create(small_args(model_path=SHORT_NAME, max_total_tokens=2048))
    print(f"\nworker with {SHORT_NAME} ready in {time.monotonic() - started:.1f} s")
    assert worker.model_info().eos_token_ids == [2] and worker.runner.model.lm_head is None
    sampling = [greedy(MAX_NEW) for _ in prompts]  # ignore_eos, like eos_token_id=None above
    got = [r.outputs for r in driver_for(worker, chunk_size=16).generate(prompts, sampling)]
    for question, ids in zip(QUESTIONS, got, strict=True):
        answer = ids[: ids.index(2) + 1] if 2 in ids else ids  # up to <|im_end|>
        print(f"{question!r} -> {hf_tokenizer.decode(answer, skip_special_tokens=False)!r}")
    assert got == expected
    assert "Paris" in hf_tokenizer.decode(got[0])

