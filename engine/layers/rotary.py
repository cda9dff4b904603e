"""Rotary position embedding tables (neox / Hugging Face ``rotate_half`` layout), with the
"linear" and "llama3" frequency scalings. The rotation itself is fused into the KV store
(``rotary_store_kv`` of the kernel backend)."""

from __future__ import annotations

import math

import torch
from torch import nn

from engine.models.config import RopeScaling


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """Per-pair inverse frequencies [head_dim // 2], float32, on CPU."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    return inv_freq


def _llama3_inv_freq(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Long wavelengths are divided by ``factor``, short ones kept, the band between blended."""
    old_len = s.original_max_position_embeddings
    low_freq_wavelen = old_len / s.low_freq_factor
    high_freq_wavelen = old_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin table of every position (``cos_sin`` [max_positions, head_dim]: the
    cosines of the head_dim / 2 frequencies, then their sines), shared by all layers; the
    attention's fused rotary-and-store kernel looks positions up in it."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: RopeScaling) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.theta = theta
        self.scaling = scaling
        self.register_buffer(
            "cos_sin", torch.empty(max_positions, head_dim, dtype=torch.float32), persistent=False
        )

    @torch.no_grad()
    def reset_cache(self) -> None:
        """Fill the table on the buffer's device (the model is built on ``meta`` first)."""
        inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling).to(self.cos_sin.device)
        positions = torch.arange(self.max_positions, device=inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        self.cos_sin.copy_(torch.cat([freqs.cos(), freqs.sin()], dim=-1))
