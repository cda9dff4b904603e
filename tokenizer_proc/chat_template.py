"""Chat templates: a model's Jinja template rendered exactly as ``transformers``'
``apply_chat_template`` renders it (same sandbox, options, filters and globals), so that a chat
request becomes the prompt the model was trained on.

Where a template comes from, first found wins: ``--chat-template FILE``; the model directory's
``chat_template.jinja``; ``tokenizer_config.json``'s ``chat_template`` (a string, or a list of
named templates of which ``default`` is used); a GGUF file's ``tokenizer.chat_template``.
Templates are untrusted code: they run in Jinja's immutable sandbox, and one that fails is an
invalid request, never a crash.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant", "tool", "developer")
# the special tokens a template sees (transformers' SPECIAL_TOKENS_ATTRIBUTES)
TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class ChatTemplateError(ValueError):
    """A conversation the template cannot render (bad messages, or the template refused it)."""


class ChatTemplate:
    """One compiled template and the special tokens it is rendered with."""

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None) -> None:
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        try:
            self._compiled = _environment().from_string(source)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template does not compile: {e}") from None

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        documents: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text of ``messages`` (``[{"role", "content"}, ...]``)."""
        chat = [_checked_message(i, m) for i, m in enumerate(messages)]
        if not chat:
            raise ChatTemplateError("messages: at least one message is required")
        try:
            return self._compiled.render(
                messages=chat,
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
                **kwargs,
            )
        except jinja2.TemplateError as e:  # raise_exception() in the template, or a sandbox refusal
            raise ChatTemplateError(f"the chat template refused the conversation: {e}") from None
        except (TypeError, ValueError, LookupError, ArithmeticError) as e:
            raise ChatTemplateError(f"the chat template failed on the conversation: {e}") from None


def load_chat_template(
    model_dir: Path | None, override: Path | None = None, gguf_template: str | None = None
) -> str | None:
    """The template text for a model, or None when it has none (see the module docstring)."""
    if override is not None:
        return override.read_text(encoding="utf-8")
    if model_dir is not None and model_dir.is_dir():
        jinja_file = model_dir / "chat_template.jinja"
        if jinja_file.is_file():
            return jinja_file.read_text(encoding="utf-8")
        config_file = model_dir / "tokenizer_config.json"
        if config_file.is_file():
            template = _template_of(json.loads(config_file.read_text(encoding="utf-8")).get("chat_template"))
            if template is not None:
                return template
    return gguf_template


def special_tokens_of(tokenizer_config: Mapping[str, Any]) -> dict[str, str]:
    """``bos_token`` etc. from a ``tokenizer_config.json`` map (a token is a string or an
    ``AddedToken``-style map with ``content``)."""
    tokens = {}
    for key in TOKEN_KEYS:
        value = tokenizer_config.get(key)
        if isinstance(value, Mapping):
            value = value.get("content")
        if isinstance(value, str):
            tokens[key] = value
    return tokens


def _template_of(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        template = named.get("default")
        return template if isinstance(template, str) else None
    return None


def _checked_message(index: int, message: Any) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, Mapping):
        raise ChatTemplateError(f"{where} must be an object with 'role' and 'content'")
    role = message.get("role")
    if role not in ROLES:
        raise ChatTemplateError(f"{where}.role must be one of {', '.join(ROLES)}")
    content = message.get("content")
    if content is None and role == "assistant" and message.get("tool_calls"):
        return {k: v for k, v in message.items() if v is not None}
    if isinstance(content, list):  # OpenAI content parts: only text parts are supported
        if not all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
            raise ChatTemplateError(f"{where}.content: only parts of type 'text' are supported")
        content = "".join(str(p.get("text", "")) for p in content)
    if not isinstance(content, str):
        raise ChatTemplateError(f"{where}.content must be a string or a list of text parts")
    # as transformers does: keys whose value is None are left out, so `is defined` tests hold
    return {k: v for k, v in {**message, "content": content}.items() if v is not None}


def _environment() -> ImmutableSandboxedEnvironment:
    """Jinja as ``transformers`` configures it for chat templates."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = dict
    env.globals["namespace"] = _Namespace
    return env


class _Namespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore attributes (no way to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature trick: `namespace(self=...)` works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set the attribute {name!r}")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters, which no chat template wants
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)
