"""Chat templates render exactly as transformers' ``apply_chat_template`` renders them."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tokenizer_proc.chat_template import (
    ChatTemplate,
    ChatTemplateError,
    load_chat_template,
    special_tokens_of,
)

# SmolLM2-135M-Instruct's template (its GGUF's tokenizer.chat_template)
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN2 = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Qwen, a helpful assistant.<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) "
    "or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
# alternation enforced with raise_exception, a namespace and tojson, the way Mistral-style templates do
STRICT = (
    "{{ bos_token }}{% set ns = namespace(turns=0) %}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set ns.turns = ns.turns + 1 %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
    "{{ {'turns': ns.turns, 'text': 'é'} | tojson }}"
)
TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "  Answer briefly.  "},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Name a prime — in Ελληνικά?"},
    ],
    [{"role": "user", "content": [{"type": "text", "text": "two "}, {"type": "text", "text": "parts"}]}],
]


def hf_render(template: str, messages: list[dict], add_generation_prompt: bool) -> str:
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=template, **TOKENS)
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def as_hf(messages: list[dict]) -> list[dict]:
    """Content parts flattened, which is what our renderer gives the template."""
    return [
        {**m, "content": "".join(p["text"] for p in m["content"])}
        if isinstance(m["content"], list)
        else m
        for m in messages
    ]


@pytest.mark.parametrize("template", [SMOLLM2, LLAMA3, QWEN2], ids=["smollm2", "llama3", "qwen2"])
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["one", "multi", "parts"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_rendering_equals_transformers(
    template: str, messages: list[dict], add_generation_prompt: bool
) -> None:
    ours = ChatTemplate(template, TOKENS).render(messages, add_generation_prompt=add_generation_prompt)
    assert ours == hf_render(template, as_hf(messages), add_generation_prompt)


def test_raise_exception_namespace_and_tojson_behave_as_in_transformers() -> None:
    good = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert ChatTemplate(STRICT, TOKENS).render(good) == hf_render(STRICT, good, True)
    bad = [{"role": "assistant", "content": "b"}]
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        ChatTemplate(STRICT, TOKENS).render(bad)


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([], "at least one message"),
        (["hi"], r"messages\[0\] must be an object"),
        ([{"role": "wizard", "content": "x"}], r"messages\[0\]\.role must be one of"),
        ([{"role": "user"}], r"messages\[0\]\.content must be"),
        ([{"role": "user", "content": 3}], r"messages\[0\]\.content must be"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
            "only parts of type 'text'",
        ),
    ],
)
def test_bad_conversations_are_refused_with_the_field_named(messages: list, error: str) -> None:
    with pytest.raises(ChatTemplateError, match=error):
        ChatTemplate(SMOLLM2, TOKENS).render(messages)


def test_the_sandbox_refuses_what_a_hostile_template_tries() -> None:
    hostile = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(ChatTemplateError):
        ChatTemplate(hostile).render([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate("{% for %}")


def test_templates_are_found_where_transformers_looks(tmp_path) -> None:
    assert load_chat_template(tmp_path) is None
    assert load_chat_template(tmp_path, gguf_template="gguf") == "gguf"
    config = {
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
        "bos_token": {"content": "<s>", "special": True},
        "eos_token": "</s>",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_chat_template(tmp_path, gguf_template="gguf") == "D"
    assert special_tokens_of(config) == {"bos_token": "<s>", "eos_token": "</s>"}
    (tmp_path / "chat_template.jinja").write_text("J")
    assert load_chat_template(tmp_path) == "J"
    override = tmp_path / "mine.jinja"
    override.write_text("M")
    assert load_chat_template(tmp_path, override) == "M"
