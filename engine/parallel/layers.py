"""Megatron-style parallel layers: column-parallel (output rows split; q/k/v and gate/up stay
fused, one matmul per rank), row-parallel (input columns split, the partial sums all-reduced),
the vocabulary-parallel embedding (each rank looks up its rows, zeros elsewhere, all-reduced) and
LM head (each rank's logit columns all-gathered).

Each layer knows its part of the full, unsharded checkpoint tensor (``rank_part``) and that
tensor's shape (``full_shape``): the weight loader hands every rank the full tensors and each
keeps its part, so safetensors, GGUF, the embedded and the dummy weights all split the same way.

The factories (``merged_column_linear``, ``row_linear``, ``vocab_embedding``, ``lm_head``) return
the plain layers for a single rank: the path is picked once, when the model is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.backend import KernelBackend
from engine.layers.linear import Linear, MergedLinear
from engine.parallel.group import TensorParallel


@dataclass(frozen=True)
class RowRange:
    """The rows ``[start, start + size)`` of a projection of ``full`` output rows that one rank
    holds (of a row-parallel layer: its input columns)."""

    full: int
    start: int
    size: int


class ColumnParallelLinear(MergedLinear):
    """A fused projection whose output rows are split over the ranks: part ``i`` of the fused
    weight holds ``parts[i]`` of the checkpoint's projection ``i``. No communication."""

    def __init__(self, in_features: int, parts: tuple[RowRange, ...], bias: bool) -> None:
        super().__init__(in_features, tuple(p.size for p in parts), bias=bias)
        self.parts = parts

    def full_shape(self, param_name: str) -> tuple[int, ...]:
        rows = sum(p.full for p in self.parts)
        return (rows, self.in_features) if param_name == "weight" else (rows,)

    def rank_part(self, param_name: str, full: torch.Tensor, index: int | None) -> torch.Tensor:
        """This rank's rows of checkpoint projection ``index``, or of the whole fused tensor
        (``index`` None: the projections stacked, as the dummy weights are made)."""
        if index is not None:
            part = self.parts[index]
            return full.narrow(0, part.start, part.size)
        pieces = full.split([p.full for p in self.parts])
        mine = [piece.narrow(0, p.start, p.size) for piece, p in zip(pieces, self.parts, strict=True)]
        return torch.cat(mine)


class RowParallelLinear(Linear):
    """``y = x W^T + b`` with ``W``'s input columns split: each rank multiplies its slice of
    ``x`` (the column-parallel layer's output; ``columns`` of the checkpoint's), the partial sums
    are all-reduced, then the bias (whole on every rank) is added once."""

    def __init__(self, columns: RowRange, out_features: int, bias: bool, tp: TensorParallel) -> None:
        super().__init__(columns.size, out_features, bias=bias)
        self.columns = columns
        self.tp = tp

    def full_shape(self, param_name: str) -> tuple[int, ...]:
        if param_name == "weight":
            return (self.out_features, self.columns.full)
        return (self.out_features,)

    def rank_part(self, param_name: str, full: torch.Tensor, index: int | None) -> torch.Tensor:
        if param_name != "weight":
            return full
        return full.narrow(1, self.columns.start, self.columns.size)

    def forward(self, x: torch.Tensor, kernels: KernelBackend) -> torch.Tensor:  # type: ignore[override]
        y = self.tp.all_reduce(kernels.linear(x, self.weight))
        return y if self.bias is None else y + self.bias


def _vocab_rows(full: torch.Tensor, start: int, shard: int) -> torch.Tensor:
    """Rows ``[start, start + shard)`` of ``full``, zero-padded past its end."""
    rows = full[start : start + shard]
    if rows.shape[0] == shard:
        return rows
    return torch.cat([rows, rows.new_zeros((shard - rows.shape[0], *full.shape[1:]))])


class VocabParallelEmbedding(nn.Embedding):
    """This rank's ``vocab_shard`` rows of the embedding (from ``vocab_start``; rows past the
    vocabulary are zero); a token outside them looks up zeros, and the ranks' lookups are summed."""

    def __init__(self, vocab_size: int, hidden: int, tp: TensorParallel, start: int, shard: int) -> None:
        super().__init__(shard, hidden)
        self.tp = tp
        self.vocab_size = vocab_size
        self.vocab_start = start

    def full_shape(self, param_name: str) -> tuple[int, ...]:
        return (self.vocab_size, self.embedding_dim)

    def rank_part(self, param_name: str, full: torch.Tensor, index: int | None) -> torch.Tensor:
        return _vocab_rows(full, self.vocab_start, self.num_embeddings)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.vocab_start
        mine = (local >= 0) & (local < self.num_embeddings)
        out = F.embedding(torch.where(mine, local, 0), self.weight)
        out.masked_fill_(~mine.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(out)


class ParallelLMHead(Linear):
    """The LM head's rows split like ``VocabParallelEmbedding`` (so a tied head is the embedding's
    shard); ``gather_logits`` joins the ranks' columns and drops the padding."""

    def __init__(self, vocab_size: int, hidden: int, tp: TensorParallel, start: int, shard: int) -> None:
        super().__init__(hidden, shard, bias=False)
        self.vocab_size = vocab_size
        self.vocab_start = start

    def full_shape(self, param_name: str) -> tuple[int, ...]:
        return (self.vocab_size, self.in_features)

    def rank_part(self, param_name: str, full: torch.Tensor, index: int | None) -> torch.Tensor:
        return _vocab_rows(full, self.vocab_start, self.out_features)


@dataclass(frozen=True)
class LogitGather:
    """[N, vocab_shard] logits of each rank → the [N, vocab] logits, the same on every rank."""

    tp: TensorParallel
    vocab_size: int

    def __call__(self, shard_logits: torch.Tensor) -> torch.Tensor:
        return self.tp.all_gather_columns(shard_logits)[:, : self.vocab_size]


# ---------------------------------------------------------------------------------- factories


def merged_column_linear(
    tp: TensorParallel, in_features: int, parts: tuple[RowRange, ...], bias: bool
) -> MergedLinear:
    """Fused projections split by rows; the plain ``MergedLinear`` for one rank."""
    if tp.size == 1:
        return MergedLinear(in_features, tuple(p.full for p in parts), bias=bias)
    return ColumnParallelLinear(in_features, parts, bias=bias)


def row_linear(tp: TensorParallel, columns: RowRange, out_features: int, bias: bool) -> Linear:
    """A projection whose input comes split by a column-parallel one (this rank's ``columns``);
    the plain ``Linear`` for one rank."""
    if tp.size == 1:
        return Linear(columns.full, out_features, bias=bias)
    return RowParallelLinear(columns, out_features, bias, tp)


def vocab_embedding(tp: TensorParallel, vocab_size: int, hidden: int, start: int, shard: int) -> nn.Embedding:
    if tp.size == 1:
        return nn.Embedding(vocab_size, hidden)
    return VocabParallelEmbedding(vocab_size, hidden, tp, start, shard)


def lm_head(tp: TensorParallel, vocab_size: int, hidden: int, start: int, shard: int) -> Linear:
    if tp.size == 1:
        return Linear(hidden, vocab_size, bias=False)
    return ParallelLMHead(vocab_size, hidden, tp, start, shard)


def logit_gather(tp: TensorParallel, vocab_size: int) -> LogitGather | None:
    """None for one rank: its logits are whole already."""
    return None if tp.size == 1 else LogitGather(tp, vocab_size)


def rank_part(module: nn.Module, param_name: str, full: torch.Tensor, index: int | None) -> torch.Tensor:
    """This rank's part of a checkpoint tensor of ``module`` (a parallel layer), else ``full``."""
    take = getattr(module, "rank_part", None)
    return full if take is None else take(param_name, full, index)


def full_shape(module: nn.Module, param_name: str, shape: torch.Size) -> tuple[int, ...]:
    """The checkpoint (unsharded) shape of a parameter of ``module``."""
    of = getattr(module, "full_shape", None)
    return tuple(shape) if of is None else of(param_name)
