"""The CPU backend's matmuls on weights packed once at start-up into oneDNN's blocked layout,
as vLLM's CPU build and torch.compile's CPU freezing do.

``F.linear`` reaches oneDNN too (bf16) or MKL (float32), but lays the plain [N, K] weight out
for the kernel again on every call. Packed once (``torch.ops.mkldnn._reorder_linear_weight``),
SmolLM2-135M's matmuls on the 2-core Zen 4 VM (one thread, CPU time) ran, against ``F.linear``:
float32 1.1–1.2× as fast at 64–512 rows, 1.2–1.5× at 16, the 49,152-row LM head 1.6× at 64 rows;
at one row the small projections 5–20 % slower and the LM head 1.3× faster; bfloat16 1.0–1.1× at
64–512 rows, 1.25–1.3× at 16, 1.6–2.3× at one row, the LM head 1.2× at 64 rows
(``python -m bench.cpu_linear``). bf16 results are bit-identical to ``F.linear``'s; float32 ones
differ in the last bits (another summation order).

``pack_weights`` replaces each matmul weight of the model by its packed form (the plain one is
freed; a tied LM head gets a packed copy, the embedding keeps the plain table) where oneDNN
supports the dtype on this CPU; ``linear_cpu`` sends a packed weight to oneDNN's linear and any
other to ``F.linear``.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("pdserve.worker")

PACK_ROWS_HINT = 64  # the rows oneDNN tunes the layout for: 1 to 512 rows measured alike with it


def can_pack(dtype: torch.dtype) -> bool:
    """Whether oneDNN's packed linear runs ``dtype`` on this CPU."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if dtype == torch.float16:
        return torch.ops.mkldnn._is_mkldnn_fp16_supported()
    return False


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [N, K] in oneDNN's layout for ``linear_cpu`` (an opaque tensor of that shape)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS_HINT)


def linear_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``'s contract; a packed ``weight`` goes to oneDNN."""
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def pack_weights(model: nn.Module) -> int:
    """Pack every matmul weight of ``model`` (a model with ``pack_matmul_weights``, on the CPU)
    where oneDNN runs its dtype; returns how many were packed (0: all stay ``F.linear``'s)."""
    dtype = model.lm_head_weight.dtype
    if not can_pack(dtype):
        logger.info("CPU matmuls: F.linear (oneDNN has no packed %s linear on this CPU)", dtype)
        return 0
    packed = model.pack_matmul_weights(pack)
    logger.info("CPU matmuls: %d weights packed for oneDNN", packed)
    return packed
