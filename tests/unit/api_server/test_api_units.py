"""The HTTP server's pieces on their own: where chat templates come from and the BOS rule,
usage over samples, and the configuration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from api_server.config import ApiServerConfig, parse_args
from api_server.generation import Output
from api_server.responses import usage
from api_server.templates import ChatFormat, gguf_chat_metadata, load_chat_format
from protocol.config import DEFAULT_MODEL_PATH, EMBEDDED
from tokenizer_proc.chat_template import ChatTemplate, ChatTemplateError

TEMPLATE = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
MESSAGES = [{"role": "user", "content": "hi"}]


def model_dir(tmp_path: Path, add_bos_token: bool | None, post_processor: dict | None = None) -> Path:
    config = {"chat_template": TEMPLATE, "bos_token": {"content": "<s>"}, "eos_token": "</s>"}
    if add_bos_token is not None:
        config["add_bos_token"] = add_bos_token
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "tokenizer.json").write_text(json.dumps({"post_processor": post_processor}))
    return tmp_path


def test_bos_is_stripped_only_when_the_tokenizer_adds_it(tmp_path):
    assert ChatFormat(ChatTemplate(TEMPLATE, {"bos_token": "<s>"}), "<s>").prompt(MESSAGES) == "[user]hi"
    assert ChatFormat(ChatTemplate(TEMPLATE, {"bos_token": "<s>"})).prompt(MESSAGES) == "<s>[user]hi"
    assert load_chat_format(str(model_dir(tmp_path, True)), None).prompt(MESSAGES) == "[user]hi"
    assert load_chat_format(str(model_dir(tmp_path, False)), None).prompt(MESSAGES) == "<s>[user]hi"
    llama3_style = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                                                              {"Sequence": {"id": "A", "type_id": 0}}]}
    sequence = {"type": "Sequence", "processors": [llama3_style]}
    assert load_chat_format(str(model_dir(tmp_path, None, sequence)), None).prompt(MESSAGES) == "[user]hi"


def test_template_sources(tmp_path):
    assert load_chat_format(EMBEDDED.name, None) is None  # the embedded model has none
    override = tmp_path / "mine.jinja"
    override.write_text("{% for m in messages %}{{ m['content'] }}!{% endfor %}")
    assert load_chat_format(EMBEDDED.name, str(override)).prompt(MESSAGES) == "hi!"
    assert load_chat_format(str(model_dir(tmp_path, True)), str(override)).prompt(MESSAGES) == "hi!"
    with pytest.raises(ChatTemplateError, match="role"):
        load_chat_format(EMBEDDED.name, str(override)).prompt([{"role": "robot", "content": "x"}])


def test_gguf_metadata(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_chat_template(TEMPLATE)
    writer.add_token_list(["<unk>", "<s>", "</s>", "a"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    meta = gguf_chat_metadata(path)
    assert meta.template == TEMPLATE and meta.adds_bos
    assert meta.special_tokens == {"bos_token": "<s>", "eos_token": "</s>"}
    assert load_chat_format(str(path), None).prompt(MESSAGES) == "[user]hi"


def test_usage_counts_each_prompt_once():
    def out(prompt: int, completion: int, cached: int) -> Output:
        return Output(usage={"prompt_tokens": prompt, "completion_tokens": completion,
                             "cached_tokens": cached})

    outputs = [out(10, 3, 0), out(10, 4, 8), out(5, 1, 0), out(5, 2, 0)]  # 2 prompts x n=2
    assert usage(outputs, 2) == {"prompt_tokens": 15, "completion_tokens": 10, "total_tokens": 25,
                                 "prompt_tokens_details": {"cached_tokens": 8}}


def test_config_names_and_flags():
    assert ApiServerConfig().model_name == DEFAULT_MODEL_PATH  # launch.py's default model
    assert ApiServerConfig(model_path="/models/Llama-3.2-1B/").model_name == "Llama-3.2-1B"
    config = ApiServerConfig(model_path="/models/m.gguf", served_model_name="mine")
    assert config.model_name == "mine" and config.accepted_model_names == {"mine", "/models/m.gguf"}
    args = parse_args(["--frontend-addr", "tcp://h:1", "--port", "9", "--model-path", "p", "--api-key", "k",
                       "--chat-template", "t.jinja", "--served-model-name", "s", "--host", "0.0.0.0"])
    assert args == ApiServerConfig(frontend_addr="tcp://h:1", host="0.0.0.0", port=9, model_path="p",
                                   chat_template="t.jinja", api_key="k", served_model_name="s")
