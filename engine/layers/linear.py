"""Linear layers whose matmul is the kernel backend's (``F.linear``, or a GEMV chosen at
start-up for small batches), and whose weight may stack several Hugging Face projections (one
matmul instead of two or three): q/k/v into ``qkv_proj``, gate/up into ``gate_up_proj``."""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.backend import KernelBackend


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor, kernels: KernelBackend) -> torch.Tensor:  # type: ignore[override]
        return kernels.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """A ``Linear`` whose output rows are the concatenation of ``output_sizes`` shards."""

    def __init__(self, in_features: int, output_sizes: tuple[int, ...], bias: bool) -> None:
        super().__init__(in_features, sum(output_sizes), bias=bias)
        self.output_sizes = output_sizes

    def shard(self, param_name: str, index: int) -> torch.Tensor:
        """The rows of ``weight`` or ``bias`` that belong to shard ``index`` (a view)."""
        start = sum(self.output_sizes[:index])
        return getattr(self, param_name).narrow(0, start, self.output_sizes[index])
