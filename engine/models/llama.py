"""The Llama-family decoder: Llama 2/3 (GQA, llama3 rope scaling, tied or untied embeddings),
Qwen2 (q/k/v bias) and Mistral (same graph; its sliding window equals full attention while the
context fits in the window, so the worker caps the context length there).

Inputs are flat ragged tokens (``input_ids`` [T], ``positions`` [T]) of every request of a
step; attention reads and writes the paged KV pool through ``ForwardContext``. The forward
returns hidden states; logits are computed by ``compute_logits`` only for sampling rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from engine.layers.attention import ForwardContext, PagedAttention
from engine.layers.backend import KernelBackend
from engine.layers.linear import Linear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding
from engine.models.config import ModelConfig
from engine.parallel.group import SINGLE_RANK, ModelSplit, TensorParallel
from engine.parallel.layers import (
    RowRange,
    lm_head,
    logit_gather,
    merged_column_linear,
    row_linear,
    vocab_embedding,
)


class LlamaAttention(nn.Module):
    """Under tensor parallelism each rank holds ``split``'s query and KV heads (q/k/v fused,
    column-parallel) and its columns of ``o_proj`` (row-parallel)."""

    def __init__(self, cfg: ModelConfig, layer_id: int, tp: TensorParallel, split: ModelSplit) -> None:
        super().__init__()
        self.num_heads = split.num_heads
        self.num_kv_heads = split.num_kv_heads
        self.head_dim = d = cfg.head_dim
        q = RowRange(cfg.num_heads * d, split.head_start * d, split.num_heads * d)
        kv = RowRange(cfg.num_kv_heads * d, split.kv_head_start * d, split.num_kv_heads * d)
        self.qkv_proj = merged_column_linear(tp, cfg.hidden_size, (q, kv, kv), bias=cfg.qkv_bias)
        self.o_proj = row_linear(tp, q, cfg.hidden_size, bias=cfg.o_bias)
        self.attn = PagedAttention(layer_id, split.num_heads, split.num_kv_heads, d)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x, ctx.kernels)
        return self.o_proj(self.attn(qkv, positions, cos_sin, ctx), ctx.kernels)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel, split: ModelSplit) -> None:
        super().__init__()
        size = split.intermediate_size
        inter = RowRange(cfg.intermediate_size, split.tp_rank * size, size)
        self.gate_up_proj = merged_column_linear(tp, cfg.hidden_size, (inter, inter), bias=False)
        self.down_proj = row_linear(tp, inter, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, kernels: KernelBackend) -> torch.Tensor:
        return self.down_proj(kernels.silu_and_mul(self.gate_up_proj(x, kernels)), kernels)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, tp: TensorParallel, split: ModelSplit) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer_id, tp, split)
        self.mlp = LlamaMLP(cfg, tp, split)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        cos_sin: torch.Tensor,
        ctx: ForwardContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm block; the residual add is fused into the norms (``hidden`` is the
        previous block's output, not yet added to ``residual``; None before the first block)."""
        x, residual = self.input_layernorm(hidden, residual, ctx.kernels)
        x = self.self_attn(x, positions, cos_sin, ctx)
        x, residual = self.post_attention_layernorm(x, residual, ctx.kernels)
        return self.mlp(x, ctx.kernels), residual


class LlamaForCausalLM(nn.Module):
    """Parameter names are the Hugging Face ones without the ``model.`` prefix, except the
    fused ``qkv_proj`` and ``gate_up_proj`` (see ``engine.weights``). ``tp``: this rank's
    share of the model under tensor parallelism (``engine.parallel``)."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel = SINGLE_RANK) -> None:
        super().__init__()
        self.cfg = cfg
        split = tp.split(cfg)
        vocab = (cfg.vocab_size, cfg.hidden_size, split.vocab_start, split.vocab_shard)
        self.embed_tokens = vocab_embedding(tp, *vocab)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i, tp, split) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(
            cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling
        )
        # a tied LM head's own copy of the table in a backend's matmul layout (pack_matmul_weights)
        self.tied_lm_head: torch.Tensor | None = None
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = lm_head(tp, *vocab)
        self.gather_logits = logit_gather(tp, cfg.vocab_size)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        if self.lm_head is not None:
            return self.lm_head.weight
        return self.embed_tokens.weight if self.tied_lm_head is None else self.tied_lm_head

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Hidden states [T, hidden] after the final norm."""
        cos_sin = self.rotary_emb.cos_sin
        hidden = self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual, positions, cos_sin, ctx)
        hidden, _ = self.norm(hidden, residual, ctx.kernels)
        return hidden

    def compute_logits(self, hidden: torch.Tensor, kernels: KernelBackend) -> torch.Tensor:
        """Float32 logits [N, vocab] of the rows that sample (the same on every rank)."""
        logits = kernels.linear(hidden, self.lm_head_weight).float()
        return logits if self.gather_logits is None else self.gather_logits(logits)

    def pack_matmul_weights(self, pack: Callable[[torch.Tensor], torch.Tensor]) -> int:
        """Replace every matmul weight by ``pack(weight)`` (a kernel backend's layout, once at
        start-up); a tied LM head gets a packed copy, the embedding keeps the plain table.
        Returns how many were packed."""
        linears = self._linears()
        for module in linears:
            module.weight = nn.Parameter(pack(module.weight), requires_grad=False)
        if self.lm_head is None:
            self.tied_lm_head = pack(self.embed_tokens.weight)
        return len(linears) + (self.lm_head is None)

    def matmul_weights(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(weight, bias) of every matmul of a forward and its logits, the lm_head included."""
        linears = [(m.weight, m.bias) for m in self._linears()]
        return linears if self.lm_head is not None else [*linears, (self.lm_head_weight, None)]

    def _linears(self) -> list[Linear]:
        return [m for m in self.modules() if isinstance(m, Linear)]
