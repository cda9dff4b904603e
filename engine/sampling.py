"""Batched sampling: penalties, greedy, temperature, top-k, top-p, min-p (every limit applies),
seeded per request; the sampled token's logprob and the top logprobs of the raw distribution.

Randomness is counter-based: the noise of row ``i`` at vocabulary entry ``j`` is a hash of
(request seed, position of the token being sampled, ``j``). A request therefore draws the same
token whatever batch it runs in, on any device, and again after it was retracted and
re-prefilled; there is no generator state to carry, no per-row host loop, no host sync. The
draw is the exponential race: ``argmax(p / E)`` with ``E ~ Exp(1)`` samples from ``p``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.penalties import PenaltyRows, apply_penalties
from protocol.messages import SamplingParams

_MASK32 = 0xFFFFFFFF
# multipliers below 2**31 keep every product of 32-bit values inside int64 (no overflow)
_MUL1 = 0x45D9F3B
_MUL2 = 0x2C1B3C6D
_GOLDEN = 0x1E3779B9
# Temperatures below this sample greedily: dividing logits by a denormal temperature overflows
# to inf and the softmax to NaN (SGLang and vLLM use the same cut-off).
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass
class SamplingBatch:
    """Per-row parameters of one step's sampling rows, on the device; the path flags are
    decided once per step on the host."""

    temperatures: torch.Tensor  # [N] float32, below GREEDY_BELOW_TEMPERATURE = greedy
    top_ks: torch.Tensor  # [N] int64, vocab size = no limit
    top_ps: torch.Tensor  # [N] float32
    min_ps: torch.Tensor  # [N] float32
    keys: torch.Tensor  # [N] int64, hash of (seed, position)
    all_greedy: bool
    use_top_k: bool
    use_top_p: bool
    use_min_p: bool
    want_logprobs: bool
    penalties: PenaltyRows | None = None  # None: no row has a penalty

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        positions: Sequence[int],
        vocab_size: int,
        device: torch.device,
        penalties: PenaltyRows | None = None,
    ) -> SamplingBatch:
        """``positions[i]``: the position the sampled token of row ``i`` will occupy."""
        top_ks = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        sampled = [p for p in params if p.temperature >= GREEDY_BELOW_TEMPERATURE]
        seeds = torch.tensor([p.seed & 0xFFFFFFFFFFFF for p in params], dtype=torch.int64)
        keys = row_keys(seeds, torch.tensor(positions, dtype=torch.int64))
        # two host-to-device copies per step: the float and the integer parameters
        floats = torch.tensor(
            [[p.temperature for p in params], [p.top_p for p in params], [p.min_p for p in params]],
            dtype=torch.float32,
        )
        ints = torch.stack([torch.tensor(top_ks, dtype=torch.int64), keys])
        temperatures, top_ps, min_ps = floats.to(device, non_blocking=True)
        top_ks_t, keys_t = ints.to(device, non_blocking=True)
        return cls(
            temperatures=temperatures,
            top_ks=top_ks_t,
            top_ps=top_ps,
            min_ps=min_ps,
            keys=keys_t,
            all_greedy=not sampled,
            use_top_k=any(0 < p.top_k < vocab_size for p in sampled),
            use_top_p=any(p.top_p < 1.0 for p in sampled),
            use_min_p=any(p.min_p > 0.0 for p in sampled),
            want_logprobs=any(p.return_logprob for p in params),
            penalties=penalties,
        )


def sample(logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids [N] int64 and, when any row asked, the log-probability [N] float32 of each
    sampled token under the raw (unpenalized, untempered) distribution."""
    raw = logits
    if batch.penalties is not None:
        logits = apply_penalties(logits, batch.penalties)
    greedy_tokens = logits.argmax(dim=-1)
    tokens = greedy_tokens if batch.all_greedy else _sample_random(logits, batch, greedy_tokens)
    logprobs = None
    if batch.want_logprobs:
        logprobs = torch.log_softmax(raw, dim=-1).gather(1, tokens.unsqueeze(1)).squeeze(1)
    return tokens, logprobs


def top_logprobs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most likely token ids [N, k] and their logprobs [N, k] under the raw
    distribution (most likely first)."""
    values, ids = torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)
    return ids, values


def _sample_random(logits: torch.Tensor, batch: SamplingBatch, greedy_tokens: torch.Tensor) -> torch.Tensor:
    greedy = batch.temperatures < GREEDY_BELOW_TEMPERATURE
    temperatures = torch.where(greedy, torch.ones_like(batch.temperatures), batch.temperatures)
    probs = torch.softmax(logits / temperatures.unsqueeze(1), dim=-1)
    if batch.use_top_k or batch.use_top_p:
        probs = _filter_top_k_top_p(probs, batch)
    if batch.use_min_p:
        probs = _filter_min_p(probs, batch.min_ps)
    noise = exponential_noise(batch.keys, logits.shape[1])
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(greedy, greedy_tokens, sampled)


def _filter_top_k_top_p(probs: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Zero the probabilities outside the top-k and outside the top-p nucleus (the most
    probable token always stays); no renormalization is needed for the race."""
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    ranks = torch.arange(probs.shape[1], device=probs.device).unsqueeze(0)
    drop = ranks >= batch.top_ks.unsqueeze(1)
    if batch.use_top_p:
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop |= mass_before > batch.top_ps.unsqueeze(1)
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(1, order, sorted_probs)


def _filter_min_p(probs: torch.Tensor, min_ps: torch.Tensor) -> torch.Tensor:
    """Zero the probabilities below ``min_p`` times the row's largest (SGLang's min-p)."""
    threshold = probs.max(dim=-1, keepdim=True).values * min_ps.unsqueeze(1)
    return probs.masked_fill(probs < threshold, 0.0)


def row_keys(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per row from (seed, position)."""
    key = _mix32((seeds & _MASK32) ^ _mix32(seeds >> 32))
    return _mix32(key ^ _mix32(positions & _MASK32))


def exponential_noise(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Exp(1) noise [N, vocab] float32, a pure function of (key, vocabulary index)."""
    index = torch.arange(vocab_size, device=keys.device, dtype=torch.int64)
    bits = _mix32((keys.unsqueeze(1) + index.unsqueeze(0) * _GOLDEN) & _MASK32)
    uniform = ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))  # in (0, 1)
    return -torch.log(uniform)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding 32-bit values."""
    x = x & _MASK32
    x = ((x >> 16) ^ x) * _MUL1 & _MASK32
    x = ((x >> 16) ^ x) * _MUL2 & _MASK32
    return (x >> 16) ^ x
