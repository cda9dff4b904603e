"""The CPU backend's matmuls on oneDNN-packed weights (engine.kernels.cpu_linear): the same
results as ``F.linear`` on fresh random inputs, and a model whose every matmul weight is packed
(an untied Llama, a tied Qwen2 with q/k/v biases) computing the same logits as before (whole
generations against transformers: test_cpu_kernels.py, the worker on the CPU kernels)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.kernels import cpu_linear
from engine.layers.backend import make_kernel_backend
from engine.layers.linear import Linear
from engine.weights import load_model
from tests.unit.engine.engine_driver import small_args

DTYPES = [d for d in (torch.float32, torch.bfloat16) if cpu_linear.can_pack(d)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [0, 1, 7, 70])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_equals_f_linear(dtype, rows, with_bias) -> None:
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 40, generator=gen).to(dtype)
    bias = torch.randn(96, generator=gen).to(dtype) if with_bias else None
    x = torch.randn(rows, 40, generator=gen).to(dtype)
    packed = cpu_linear.pack(weight)
    assert packed.is_mkldnn and packed.shape == weight.shape
    ours, ref = cpu_linear.linear_cpu(x, packed, bias), F.linear(x, weight, bias)
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # another summation order, or kernel
    torch.testing.assert_close(ours, ref, atol=tolerance, rtol=tolerance)
    assert torch.equal(cpu_linear.linear_cpu(x, weight, bias), ref)  # a plain weight: F.linear itself


def test_packed_linear_takes_batched_and_strided_inputs() -> None:
    weight = torch.randn(24, 16)
    packed = cpu_linear.pack(weight)
    batched = torch.randn(3, 5, 16)
    strided = torch.randn(6, 40)[:, 8:24]
    for x in (batched, strided):
        torch.testing.assert_close(cpu_linear.linear_cpu(x, packed), F.linear(x, weight))


def _logits(loaded, kernels) -> torch.Tensor:
    hidden = torch.randn(5, loaded.config.hidden_size, generator=torch.Generator().manual_seed(9))
    return loaded.model.compute_logits(hidden.to(loaded.dtype), kernels)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_pack_weights_packs_every_matmul_and_keeps_the_logits(fixture, request) -> None:
    loaded = load_model(small_args(model_path=request.getfixturevalue(fixture)))
    model, kernels = loaded.model, make_kernel_backend("cpu", loaded.device)
    embedding = model.embed_tokens.weight.clone()
    before = _logits(loaded, kernels)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    tied = model.lm_head is None
    assert tied == (fixture == "tiny_qwen2_dir")

    assert kernels.prepare_weights(model) == len(linears) + tied
    assert all(m.weight.is_mkldnn and not m.weight.requires_grad for m in linears)
    assert model.lm_head_weight.is_mkldnn  # a tied head: its own packed copy
    assert not model.embed_tokens.weight.is_mkldnn and torch.equal(model.embed_tokens.weight, embedding)
    torch.testing.assert_close(_logits(loaded, kernels), before, atol=1e-5, rtol=1e-5)


def test_pack_weights_leaves_a_dtype_onednn_cannot_run(tiny_llama_dir, monkeypatch) -> None:
    loaded = load_model(small_args(model_path=tiny_llama_dir))
    monkeypatch.setattr(cpu_linear, "can_pack", lambda dtype: False)
    assert cpu_linear.pack_weights(loaded.model) == 0
    assert not any(m.weight.is_mkldnn for m in loaded.model.modules() if isinstance(m, Linear))
