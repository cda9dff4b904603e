"""Checkpoints served through --model-path give the same greedy tokens as transformers."""

from __future__ import annotations

import random

import pytest
import torch

from tests.e2e.server import running_server, wait_no_leak
from tests.oracles import write_tiny_hf_model

MAX_NEW = 16


@pytest.mark.parametrize("arch,shard", [("llama", None), ("qwen2", "200KB")])
def test_greedy_matches_transformers_generate(tmp_path, arch, shard):
    import transformers

    write_tiny_hf_model(str(tmp_path), arch=arch, seed=3, max_shard_size=shard)
    rng = random.Random(7)
    prompts = [[rng.randrange(1, 250) for _ in range(n)] for n in (3, 17, 40, 70, 129)]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    model.generation_config.eos_token_id = None  # like ignore_eos: never stop, never mask EOS
    expected = []
    with torch.no_grad():
        for p in prompts:
            out = model.generate(torch.tensor([p]), max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=0)
            expected.append(out[0, len(p):].tolist())
    with running_server("--model-path", str(tmp_path), "--dtype", "float32", "--page-size", "8",
                        "--chunked-prefill-size", "32") as server, server.client() as c:
        params = dict(max_new_tokens=MAX_NEW, temperature=0, ignore_eos=True)
        rids = [c.submit(input_ids=p, **params) for p in prompts]
        got = [c.result(r)["token_ids"] for r in rids]
        with pytest.raises(Exception, match="input_ids"):
            c.generate("text needs a tokenizer.json", max_new_tokens=2)
        wait_no_leak(c)
    assert got == expected
