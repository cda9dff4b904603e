"""A real unified deployment of the packaged GGUF model by its short name
(``--model-path smollm2-135m-instruct``): chat prompts sent as text give transformers' greedy
tokens. Skipped when the model package (or gguf) is not installed."""

from __future__ import annotations

import os

import pytest
import torch

from protocol.model_source import PACKAGED_MODELS
from tests.e2e.server import running_server, wait_no_leak

SHORT_NAME = "smollm2-135m-instruct"
MAX_NEW = 20
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea."]
EOS = 2  # <|im_end|>

pytest.importorskip("gguf", reason="GGUF loading needs the gguf package (scripts/setup.sh installs it)")
pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF model")
try:
    GGUF_PATH = PACKAGED_MODELS[SHORT_NAME].locate()
except FileNotFoundError as e:
    pytest.skip(f"the packaged GGUF model is not installed: {e}", allow_module_level=True)


def transformers_reference() -> tuple[list[str], list[list[int]], list[int]]:
    """The rendered chat prompts, transformers' greedy tokens ignoring EOS, and the first
    prompt's greedy answer up to and including EOS."""
    import transformers

    folder, file = os.path.split(GGUF_PATH)
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=file)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    prompts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]

    def generate(text: str, eos: int | None) -> list[int]:
        ids = torch.tensor([tok(text).input_ids])
        with torch.inference_mode():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                eos_token_id=eos, pad_token_id=EOS,
            )
        return out[0, ids.shape[1]:].tolist()

    return prompts, [generate(p, None) for p in prompts], generate(prompts[0], EOS)


def test_packaged_gguf_serves_transformers_greedy_tokens():
    prompts, expected, expected_to_eos = transformers_reference()
    assert expected_to_eos[-1] == EOS
    with running_server("--model-path", SHORT_NAME, "--dtype", "float32") as server, server.client() as c:
        rids = [c.submit(p, max_new_tokens=MAX_NEW, temperature=0, ignore_eos=True) for p in prompts]
        got = [c.result(r) for r in rids]
        stopped = c.generate(prompts[0], max_new_tokens=MAX_NEW, temperature=0)
        wait_no_leak(c)
    for question, out in zip(QUESTIONS, got, strict=True):
        print(f"\n{question!r} -> {out['text']!r}")
    assert [out["token_ids"] for out in got] == expected
    assert stopped["token_ids"] == expected_to_eos
    assert "Paris" in stopped["text"]
