"""The Triton attention backend, in the order the engine's attention interface expects:
``(rotary_store_kv, extend_attention, decode_attention)``, each with its reference's signature."""

from __future__ import annotations

from engine.kernels.decode_attention import decode_attention
from engine.kernels.extend_attention import extend_attention
from engine.kernels.kv_store import rotary_store_kv

TRITON_FUNCTIONS = (rotary_store_kv, extend_attention, decode_attention)

__all__ = ["TRITON_FUNCTIONS", "decode_attention", "extend_attention", "rotary_store_kv"]
