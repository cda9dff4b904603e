"""What ``bench.one_batch`` compares the engine with: the work a step must do (for the
roofline), the decode step's matmuls alone in a CUDA graph, and Hugging Face transformers."""

from __future__ import annotations

import inspect
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels.cpu_linear import linear_cpu
from engine.models.config import ModelConfig
from engine.models.registry import default_dtype

if TYPE_CHECKING:
    from bench.one_batch import Plan


@dataclass(frozen=True)
class Work:
    bytes: float  # that must move between memory and the chip
    flops: float


def _linears(model: nn.Module) -> list[torch.Tensor]:
    """Every projection weight and the lm_head (the tied embedding when there is no lm_head), in
    the layout the model's backend runs them (``matmul_weights``)."""
    return [weight for weight, _ in model.matmul_weights()]


def _attention_dims(model: nn.Module) -> tuple[int, int]:
    cfg: ModelConfig = model.cfg
    return cfg.num_layers, cfg.num_heads * cfg.head_dim


def _read_bytes(model: nn.Module, rows: int) -> float:
    """Every parameter once, except the embedding table, of which only ``rows`` rows are read
    (all of it when tied: then it is the lm_head too)."""
    embed = model.embed_tokens.weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if getattr(model, "lm_head", None) is not None:
        total -= embed.numel() * embed.element_size() - rows * embed.shape[1] * embed.element_size()
    return float(total)


def decode_work(model: nn.Module, batch: int, context: int, kv_bytes_per_token: int) -> Work:
    """One decode step of ``batch`` sequences of ``context`` tokens (the new one included)."""
    layers, q_width = _attention_dims(model)
    kv = batch * context * kv_bytes_per_token  # read; the new tokens' writes are in it
    matmul = 2 * batch * sum(w.numel() for w in _linears(model))
    attention = 4 * batch * context * q_width * layers
    return Work(_read_bytes(model, batch) + kv, matmul + attention)


def prefill_work(model: nn.Module, tokens: int, kv_bytes_per_token: int) -> Work:
    """One prompt of ``tokens`` tokens, causal, sampling one row."""
    layers, q_width = _attention_dims(model)
    weights = _linears(model)
    lm_head = weights[-1].numel()
    matmul = 2 * tokens * (sum(w.numel() for w in weights) - lm_head) + 2 * lm_head
    attention = 4 * q_width * layers * tokens * (tokens + 1) / 2
    return Work(_read_bytes(model, tokens) + tokens * kv_bytes_per_token, matmul + attention)


# ----------------------------------------------------------------------------- matmuls alone


def decode_matmuls(model: nn.Module, batch: int) -> Callable[[], None]:
    """The decode step's matmuls alone (every projection of every layer, then the lm_head) on
    ``batch`` rows, through cuBLAS: replaying one CUDA graph on CUDA, eagerly on CPU (through
    oneDNN on the weights the CPU backend packed: ``linear_cpu``)."""
    weights = _linears(model)
    param = weights[0]
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1], device=param.device, dtype=param.dtype)
              for w in weights}
    linear = F.linear if param.device.type == "cuda" else linear_cpu

    def run() -> None:
        for w in weights:
            linear(inputs[w.shape[1]], w)

    if param.device.type != "cuda":
        return run
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph.replay


# ----------------------------------------------------------------------------- transformers


@dataclass
class PeerTimes:
    prefill_ms: dict[int, float] = field(default_factory=dict)  # prompt length → ms
    decode_ms: dict[tuple[int, int], float] = field(default_factory=dict)  # (batch, context) → ms


def measure_transformers(cfg: ModelConfig, plan: Plan, device: str, skipped: list[str]) -> PeerTimes:
    """transformers' forward with random weights: prefill with its KV cache, then decode steps
    over that cache (the cache grows by one token per timed step, as in ``generate``)."""
    times = PeerTimes()
    try:
        model = _hf_model(cfg, getattr(torch, plan.dtype), device)
    except Exception as exc:  # noqa: BLE001 - a peer that cannot load is reported, not fatal
        skipped.append(f"transformers: {type(exc).__name__}: {exc}"[:300])
        return times
    try:
        with torch.inference_mode():
            prompt = _ids(cfg, 1, plan.peer_prefill_len, device)
            times.prefill_ms[plan.peer_prefill_len] = _timed(lambda: _forward(model, prompt), device, plan)
            for batch in plan.peer_decode_batches:
                times.decode_ms[(batch, plan.peer_decode_context)] = _decode_step_ms(
                    model, cfg, batch, plan.peer_decode_context, device, plan)
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory at the largest batch: keep the rest
        skipped.append(f"transformers: {type(exc).__name__}: {exc}"[:300])
    return times


def _hf_model(cfg: ModelConfig, dtype: torch.dtype, device: str) -> nn.Module:
    import transformers

    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=cfg.tie_word_embeddings,
    )
    with torch.device(device), default_dtype(dtype):
        model = transformers.LlamaForCausalLM(hf_cfg)
    return model.to(device=device, dtype=dtype).eval()


def _decode_step_ms(model: nn.Module, cfg: ModelConfig, batch: int, context: int, device: str,
                    plan: Plan) -> float:
    cache_name = _cache_argument(model)
    cache = _forward(model, _ids(cfg, batch, context - 1, device))[cache_name]
    step_ids = _ids(cfg, batch, 1, device)
    return _timed(lambda: _forward(model, step_ids, **{cache_name: cache}), device, plan)


def _forward(model: nn.Module, ids: torch.Tensor, **cache: object):
    return model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache)


def _cache_argument(model: nn.Module) -> str:
    """What this transformers calls the KV cache, in ``forward`` and its output: ``cache`` from
    5.x (``past_key_values`` deprecated), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _ids(cfg: ModelConfig, batch: int, length: int, device: str) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, length), device=device)


def _timed(fn: Callable[[], object], device: str, plan: Plan) -> float:
    """Median ms of ``fn`` followed by a device sync (what a step of ``generate`` costs)."""
    samples = []
    for i in range(plan.warmup + plan.reps):
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= plan.warmup:
            samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)
