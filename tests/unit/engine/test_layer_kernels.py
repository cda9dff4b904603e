"""The decode forward on the fused path is the matmuls plus the kernel backend's calls: no torch
op of the model's own runs between them (on CUDA each would be one more small kernel per layer,
the gap between a decode step and its matmuls alone). Checked with the torch profiler on CPU,
the backend's kernels replaced by op-free stand-ins that record their calls."""

from __future__ import annotations

import collections

import torch
from torch.profiler import ProfilerActivity, profile

from engine.layers.attention import ForwardContext
from engine.layers.backend import KernelBackend
from engine.worker import Worker

# Ops that move no data: views and allocation-free reshapes.
VIEW_OPS = {
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::narrow", "aten::slice", "aten::split",
    "aten::unsqueeze", "aten::squeeze", "aten::t", "aten::transpose", "aten::select", "aten::as_strided",
    "aten::detach", "aten::alias", "aten::expand", "aten::chunk", "aten::numpy_T", "aten::permute",
}
# Ops that are one device kernel (or one cuBLAS call) each, and may hold anything beneath them.
MATMULS = {"aten::linear", "aten::embedding"}


def counting_backend(calls: collections.Counter, head_dim: int) -> KernelBackend:
    """Stand-ins with the real kernels' signatures that run no torch op (views only)."""

    def rms_norm(x, weight, eps, residual):
        calls["rms_norm"] += 1
        return x, residual

    def silu_and_mul(gate_up):
        calls["silu_and_mul"] += 1
        return gate_up.narrow(-1, 0, gate_up.shape[-1] // 2)

    def rotary_store_kv(qkv, positions, cos_sin, k_cache, v_cache, out_loc, num_heads):
        calls["rotary_store_kv"] += 1
        return qkv.narrow(1, 0, num_heads * head_dim).view(-1, num_heads, head_dim)

    def attention(name):
        def run(q, *args, **kwargs):
            calls[name] += 1
            return q

        return run

    return KernelBackend(
        "counting", torch.nn.functional.linear, rms_norm, silu_and_mul, rotary_store_kv,
        attention("extend"), attention("decode"),
    )


def test_a_decode_step_is_matmuls_plus_the_backend_kernels(embedded_worker: Worker) -> None:
    runner = embedded_worker.runner
    cfg = embedded_worker.config
    runner.append_pages([(1, [1]), (2, [2, 3])])
    inputs = runner.prepare([], [1, 2], [3, 5])
    calls: collections.Counter = collections.Counter()
    kernels = counting_backend(calls, cfg.head_dim)
    ctx = ForwardContext(kernels, runner.kv_pool.k, runner.kv_pool.v, inputs.meta)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        runner.model(inputs.input_ids, inputs.positions, ctx)
    runner.release_slots([1, 2])

    layers = cfg.num_layers
    assert calls == {"rms_norm": 2 * layers + 1, "rotary_store_kv": layers, "decode": layers,
                     "silu_and_mul": layers}
    top_level = collections.Counter()
    stray = []
    for event in prof.events():
        parent = event.cpu_parent
        while parent is not None and parent.name not in MATMULS:
            parent = parent.cpu_parent
        if parent is not None or event.name in VIEW_OPS or not event.name.startswith("aten::"):
            continue
        if event.name in MATMULS:
            top_level[event.name] += 1
        else:
            stray.append(event.name)
    assert not stray, f"torch ops outside the matmuls and the backend's kernels: {collections.Counter(stray)}"
    # four projections per layer, and the embedding lookup
    assert top_level == {"aten::linear": 4 * layers, "aten::embedding": 1}
