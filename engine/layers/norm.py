"""RMSNorm with the residual add fused into the same kernel (one read of the residual stream)."""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.backend import KernelBackend


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, kernels: KernelBackend
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``residual += x`` then normalize it: returns (normalized, new residual). A residual of
        None (the first layer's input) starts the residual stream at ``x``."""
        normed, new_residual = kernels.rms_norm(x, self.weight, self.eps, residual)
        return normed, x if new_residual is None else new_residual
