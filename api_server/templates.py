"""The chat template a served model's conversations are rendered with, and the BOS rule.

Where the template comes from: ``--chat-template FILE``; else a model directory's own
(``tokenizer_proc.chat_template.load_chat_template``), or a GGUF file's metadata; the embedded
default model has none, so chat requests need ``--chat-template`` there.

BOS: the rendered prompt goes to the front end as ``text``, and the front end's tokenizer adds
the BOS token itself when its tokenizer adds special tokens. A template that also writes the
BOS token string would give the prompt two BOS tokens (the model was trained on one), so when
the tokenizer adds BOS, a leading BOS string is stripped from the rendered prompt.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.model_source import ModelFormat, resolve_model
from tokenizer_proc.chat_template import ChatTemplate, load_chat_template, special_tokens_of


@dataclass(frozen=True)
class ChatFormat:
    """A compiled template, and the BOS string to strip from its output (None: strip nothing)."""

    template: ChatTemplate
    strip_bos: str | None = None

    def prompt(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """The prompt text of ``messages``; ``ChatTemplateError`` when they cannot be rendered."""
        text = self.template.render(messages, add_generation_prompt=True)
        if self.strip_bos and text.startswith(self.strip_bos):
            text = text[len(self.strip_bos):]
        return text


def load_chat_format(model_path: str, override: str | None) -> ChatFormat | None:
    """The chat format of the model ``model_path`` names (``protocol.model_source``), or None
    when it has no template."""
    override_path = Path(override) if override else None
    model = resolve_model(model_path)
    path = Path(model.path) if model.path else None
    if model.format is ModelFormat.GGUF:
        assert path is not None
        meta = gguf_chat_metadata(path)
        template = load_chat_template(None, override_path, meta.template)
        tokens, adds_bos = meta.special_tokens, meta.adds_bos
    else:
        template = load_chat_template(path, override_path)
        config = _read_json(path / "tokenizer_config.json") if path is not None else {}
        tokens, adds_bos = special_tokens_of(config), _dir_tokenizer_adds_bos(path, config)
    if template is None:
        return None
    bos = tokens.get("bos_token")
    return ChatFormat(ChatTemplate(template, tokens), bos if adds_bos else None)


@dataclass(frozen=True)
class GgufChatMetadata:
    template: str | None
    special_tokens: dict[str, str]
    adds_bos: bool


def gguf_chat_metadata(path: Path) -> GgufChatMetadata:
    """``tokenizer.chat_template``, the BOS/EOS token strings and whether the tokenizer adds BOS
    (llama.cpp's default: it does), read from a GGUF file's metadata."""
    from gguf import GGUFReader  # only GGUF models need it

    fields = GGUFReader(str(path), "r").fields

    def value(key: str) -> Any:
        field = fields.get(key)
        return None if field is None else field.contents()

    tokens = value("tokenizer.ggml.tokens") or []
    special = {}
    for name in ("bos", "eos"):
        token_id = value(f"tokenizer.ggml.{name}_token_id")
        if isinstance(token_id, int) and 0 <= token_id < len(tokens):
            special[f"{name}_token"] = tokens[token_id]
    adds_bos = value("tokenizer.ggml.add_bos_token")
    adds_bos = True if adds_bos is None else bool(adds_bos)
    return GgufChatMetadata(value("tokenizer.chat_template"), special, adds_bos)


def _dir_tokenizer_adds_bos(model_dir: Path | None, config: Mapping[str, Any]) -> bool:
    """Whether the front end's tokenizer of ``model_dir`` puts BOS first: ``add_bos_token`` in
    ``tokenizer_config.json``, or a ``tokenizer.json`` post-processor that starts with it."""
    if model_dir is None:
        return False  # the embedded byte tokenizer adds BOS, but BOS has no text to strip
    if config.get("add_bos_token"):
        return True
    bos = special_tokens_of(config).get("bos_token")
    processor = _read_json(model_dir / "tokenizer.json").get("post_processor") or {}
    is_sequence = processor.get("type") == "Sequence"
    processors = processor.get("processors", []) if is_sequence else [processor]
    for p in processors:
        single = p.get("single") if p.get("type") == "TemplateProcessing" else None
        if single and single[0].get("SpecialToken", {}).get("id") == bos:
            return True
    return False


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
