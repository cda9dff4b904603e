from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from protocol.config import EMBEDDED
from tokenizer_proc.tokenizer import ByteTokenizer, HFTokenizer, NoTextTokenizer, load_tokenizer

TEXTS = ["Hello world, hello tokenizers!", "héllo 日本語 🙂 naïve café", "a\nb\tc  d"]


def test_byte_tokenizer_round_trip():
    tok = load_tokenizer(EMBEDDED.name)
    assert isinstance(tok, ByteTokenizer) and tok.has_text
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == [EMBEDDED.bos_token_id, *text.encode()]
        assert tok.decode(ids) == text
    assert tok.eos_token_ids == [EMBEDDED.eos_token_id]
    assert tok.vocab_size == EMBEDDED.vocab_size
    assert tok.decode_bytes([104, EMBEDDED.eos_token_id, 300, 105]) == b"hi"


def write_json(path, obj) -> None:
    path.write_text(json.dumps(obj), encoding="utf-8")


@pytest.fixture
def byte_level_model(tmp_path):
    """A byte-level BPE model directory (GPT-2 / Llama 3 / Qwen style) trained on the spot."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>", "<eot>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXTS * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(tmp_path / "tokenizer.json"))
    write_json(tmp_path / "tokenizer_config.json", {"bos_token": "<s>", "eos_token": {"content": "</s>"}})
    write_json(tmp_path / "generation_config.json", {"eos_token_id": [2, 1]})
    return tmp_path


def test_hf_byte_level_round_trip_and_special_ids(byte_level_model):
    tok = load_tokenizer(str(byte_level_model))
    assert isinstance(tok, HFTokenizer) and tok.has_text
    assert tok.eos_token_ids == [2, 1]  # generation_config first, then tokenizer_config's
    assert tok.bos_token_id == 0
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids[0] == 0 and ids.count(0) == 1
        assert tok.decode(ids) == text  # BOS is special: no bytes
        assert b"".join(tok.decode_bytes([i]) for i in ids) == text.encode()
    assert tok.decode_bytes([1, 2]) == b""


def test_bos_added_when_config_asks_and_template_does_not(byte_level_model):
    spec = json.loads((byte_level_model / "tokenizer.json").read_text())
    spec["post_processor"] = None
    write_json(byte_level_model / "tokenizer.json", spec)
    write_json(byte_level_model / "tokenizer_config.json", {"bos_token": "<s>", "add_bos_token": True})
    tok = load_tokenizer(str(byte_level_model))
    assert tok.encode("hello")[0] == 0
    assert tok.eos_token_ids == [2, 1]


def test_hf_sentencepiece_style_with_byte_fallback(tmp_path):
    """Llama 2 / Mistral style: ``▁`` is a space, ``<0xNN>`` tokens are raw bytes."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    vocab.update({"▁": 259, "h": 260, "i": 261, "▁h": 262, "▁hi": 263})
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=[("▁", "h"), ("▁h", "i")], byte_fallback=True, unk_token="<unk>")
    )
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.save(str(tmp_path / "tokenizer.json"))
    write_json(tmp_path / "config.json", {"eos_token_id": 2})
    hf = load_tokenizer(str(tmp_path))
    ids = hf.encode("hi 日")
    assert ids == [263, 259, 3 + 0xE6, 3 + 0x97, 3 + 0xA5]
    assert hf.decode_bytes(ids) == " hi 日".encode()
    assert hf.decode_bytes([3 + 0xE6]) == b"\xe6"
    assert hf.eos_token_ids == [2]


def test_model_without_tokenizer_json_has_no_text(tmp_path):
    write_json(tmp_path / "config.json", {"vocab_size": 1000, "eos_token_id": [7, 8]})
    write_json(tmp_path / "generation_config.json", {"eos_token_id": 8})
    tok = load_tokenizer(str(tmp_path))
    assert isinstance(tok, NoTextTokenizer) and not tok.has_text
    assert tok.vocab_size == 1000 and tok.eos_token_ids == [8, 7]
    assert tok.decode_bytes([1, 2, 3]) == b""
    with pytest.raises(ValueError, match="input_ids"):
        tok.encode("hello")
