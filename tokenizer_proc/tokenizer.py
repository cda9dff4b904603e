"""The front end's tokenizers, behind one small interface picked once at start-up.

- no model path: the embedded default's byte-level tokenizer (ids 0..255 are bytes);
- a model directory with ``tokenizer.json``: Hugging Face ``tokenizers``;
- a GGUF file: the same, built from the file's metadata by transformers' GGUF support;
- a model directory without one: no text support (requests must carry ``input_ids``).

``protocol.model_source.resolve_model`` decides which from ``--model-path``.

Decoding goes through bytes: each token id maps to the exact bytes it stands for, so the
incremental detokenizer can split and join UTF-8 itself (``detokenizer.py``) instead of
guessing from replacement characters. Special tokens map to no bytes (they are skipped).
"""

from __future__ import annotations

import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

from protocol.config import EMBEDDED, EmbeddedModel
from protocol.derived_cache import derived_json
from protocol.model_source import ModelFormat, resolve_model
from tokenizer_proc.chat_template import TOKEN_KEYS


class Tokenizer(ABC):
    """``encode`` text to ids and ``decode_bytes`` ids back; ``eos_token_ids`` end a generation."""

    has_text: bool = True
    vocab_size: int
    eos_token_ids: list[int]
    # what a GGUF file's metadata says for chat templates (chat_template.load_chat_template's
    # gguf_template, rendered with these special tokens); a directory's are read from its files
    chat_template: str | None = None
    special_tokens: Mapping[str, str] = MappingProxyType({})

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The bytes of ``ids`` (special tokens and unknown ids contribute nothing)."""

    def decode(self, ids: Sequence[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


class ByteTokenizer(Tokenizer):
    """The embedded default's tokenizer: one token per UTF-8 byte, BOS prepended on encode."""

    def __init__(self, model: EmbeddedModel = EMBEDDED) -> None:
        self.vocab_size = model.vocab_size
        self.bos_token_id = model.bos_token_id
        self.eos_token_ids = [model.eos_token_id]

    def encode(self, text: str) -> list[int]:
        return [self.bos_token_id, *text.encode("utf-8")]

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return bytes(i for i in ids if 0 <= i < 256)


class NoTextTokenizer(Tokenizer):
    """A model without ``tokenizer.json``: token ids in, token ids out, no text."""

    has_text = False

    def __init__(self, vocab_size: int, eos_token_ids: list[int]) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids

    def encode(self, text: str) -> list[int]:
        raise ValueError("this model has no tokenizer.json: send input_ids instead of text")

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return b""


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers.Tokenizer`` with its bytes-per-token table built once."""

    def __init__(
        self,
        tok: Any,
        bos_token_id: int | None,
        add_bos: bool,
        eos_token_ids: list[int],
        chat_template: str | None = None,
        special_tokens: Mapping[str, str] | None = None,
    ) -> None:
        self._tok = tok
        self._token_bytes = _token_bytes_table(tok, json.loads(tok.to_str()))
        self.vocab_size = len(self._token_bytes)
        self.bos_token_id = bos_token_id
        self._add_bos = add_bos and bos_token_id is not None
        self.eos_token_ids = eos_token_ids
        self.chat_template = chat_template
        self.special_tokens = MappingProxyType(dict(special_tokens or {}))

    @classmethod
    def from_dir(cls, model_dir: Path) -> HFTokenizer:
        """``tokenizer.json``, with the special tokens of ``tokenizer_config.json`` and the EOS
        ids of the model's configs."""
        from tokenizers import Tokenizer as HFTokenizerImpl

        tok = HFTokenizerImpl.from_file(str(model_dir / "tokenizer.json"))
        tok_config = _read_json(model_dir / "tokenizer_config.json")
        eos_from_tokenizer = _special_id(tok, tok_config.get("eos_token"))
        return cls(
            tok,
            bos_token_id=_special_id(tok, tok_config.get("bos_token")),
            add_bos=bool(tok_config.get("add_bos_token")),
            eos_token_ids=_unique(
                [*_model_eos_ids(model_dir), *([] if eos_from_tokenizer is None else [eos_from_tokenizer])]
            ),
        )

    @classmethod
    def from_gguf(cls, path: str) -> HFTokenizer:
        """The tokenizer transformers builds from a GGUF file's metadata (its fast tokenizer's
        ``tokenizers.Tokenizer``), with the file's BOS/EOS ids and chat template; built once
        per version of the file and kept (``protocol.derived_cache``: the build takes seconds)."""
        from tokenizers import Tokenizer as BackendTokenizer

        kept = derived_json(path, "gguf-tokenizer", lambda: _gguf_tokenizer_parts(path))
        return cls(
            BackendTokenizer.from_str(kept["tokenizer"]),
            bos_token_id=kept["bos_token_id"],
            add_bos=kept["add_bos"],
            eos_token_ids=kept["eos_token_ids"],
            chat_template=kept["chat_template"],
            special_tokens=kept["special_tokens"],
        )

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=True).ids
        if self._add_bos and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)
        return ids

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        table, size = self._token_bytes, len(self._token_bytes)
        return b"".join(table[i] for i in ids if 0 <= i < size)


def load_tokenizer(model_path: str) -> Tokenizer:
    source = resolve_model(model_path)
    if source.format is ModelFormat.EMBEDDED:
        return ByteTokenizer()
    assert source.path is not None
    if source.format is ModelFormat.GGUF:
        return HFTokenizer.from_gguf(source.path)
    model_dir = Path(source.path)
    if (model_dir / "tokenizer.json").is_file():
        return HFTokenizer.from_dir(model_dir)
    config = _read_json(model_dir / "config.json")
    return NoTextTokenizer(int(config.get("vocab_size", 0)), _model_eos_ids(model_dir))


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _gguf_tokenizer_parts(path: str) -> dict[str, Any]:
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise ImportError("a GGUF model's tokenizer needs transformers and gguf (pdserve[gguf])") from e
    hf = AutoTokenizer.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path))
    return {
        "tokenizer": hf.backend_tokenizer.to_str(),
        "bos_token_id": hf.bos_token_id,
        "add_bos": bool(getattr(hf, "add_bos_token", False)),
        "eos_token_ids": _as_ids(hf.eos_token_id),
        "chat_template": hf.chat_template if isinstance(hf.chat_template, str) else None,
        "special_tokens": {k: v for k in TOKEN_KEYS if isinstance(v := getattr(hf, k, None), str)},
    }


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _as_ids(value: int | list[int] | None) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def _special_id(tok: Any, entry: str | dict[str, Any] | None) -> int | None:
    """tokenizer_config.json names special tokens as a string or an AddedToken map."""
    content = entry.get("content") if isinstance(entry, dict) else entry
    return tok.token_to_id(content) if isinstance(content, str) else None


def _unique(ids: list[int]) -> list[int]:
    return list(dict.fromkeys(ids))


def _model_eos_ids(model_dir: Path) -> list[int]:
    """EOS ids of generation_config.json, then config.json (either may give a list)."""
    ids = _as_ids(_read_json(model_dir / "generation_config.json").get("eos_token_id"))
    ids += _as_ids(_read_json(model_dir / "config.json").get("eos_token_id"))
    return _unique(ids)


@cache
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's byte-level alphabet: printable bytes map to themselves, the rest to
    the code points from 256 on, in byte order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            mapping[chr(256 + extra)] = b
            extra += 1
    return mapping


def _byte_level_bytes(token: str) -> bytes:
    table = _unicode_to_byte()
    return b"".join(bytes([table[c]]) if c in table else c.encode("utf-8") for c in token)


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _sentencepiece_bytes(token: str) -> bytes:
    match = _BYTE_FALLBACK.fullmatch(token)
    if match:
        return bytes([int(match.group(1), 16)])
    return token.replace("▁", " ").encode("utf-8")


def _decoder_types(decoder: dict[str, Any] | None) -> set[str]:
    if not decoder:
        return set()
    if decoder.get("type") == "Sequence":
        return set().union(*(_decoder_types(d) for d in decoder.get("decoders", [])))
    return {decoder.get("type", "")}


def _piece_decoder(tok: Any, spec: dict[str, Any]) -> Callable[[str, int], bytes]:
    """How one vocabulary token becomes bytes, from the kind of decoder the model declares.

    Byte-level BPE (GPT-2, Llama 3, Qwen) and SentencePiece-style (Llama 2, Mistral: ``▁`` is
    a space, ``<0xNN>`` a byte) are exact; other decoders fall back to decoding each token
    alone, which is right for tokens that hold whole characters.
    """
    kinds = _decoder_types(spec.get("decoder"))
    if "ByteLevel" in kinds:
        return lambda token, _id: _byte_level_bytes(token)
    if kinds & {"ByteFallback", "Metaspace", "Replace"}:
        return lambda token, _id: _sentencepiece_bytes(token)
    return lambda _token, token_id: tok.decode([token_id], skip_special_tokens=False).encode("utf-8")


def _token_bytes_table(tok: Any, spec: dict[str, Any]) -> list[bytes]:
    vocab: dict[str, int] = tok.get_vocab(with_added_tokens=True)
    added = tok.get_added_tokens_decoder()  # id -> AddedToken
    piece = _piece_decoder(tok, spec)
    table = [b""] * (max(vocab.values()) + 1)
    for token, token_id in vocab.items():
        added_token = added.get(token_id)
        if added_token is None:
            table[token_id] = piece(token, token_id)
        elif not added_token.special:
            table[token_id] = added_token.content.encode("utf-8")
    return table
