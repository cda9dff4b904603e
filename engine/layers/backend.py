"""The kernels of a decoder layer, matmuls included, picked once at start-up.

``--attention-backend cpu`` runs ``engine.kernels.cpu``: paged attention that reads only the
pages each request owns (decode by our C kernel, or Numba's without a C compiler:
``engine.kernels.cpu_decode``; the rotary embedding and KV store in one Numba pass:
``engine.kernels.cpu_rotary``), planned once per step (``plan_attention``), our C RMSNorm with
the residual add (torch's ops without a C compiler), and oneDNN's linear on weights
packed once at start-up (``engine.kernels.cpu_linear``: AVX-512 / AVX512-BF16 / AMX where the CPU
has them).
``torch`` runs the plain-torch references of ``engine.kernels.reference``
(the CPU path, and the oracle) and ``F.linear``; ``triton`` runs our Triton kernels: RMSNorm
with the residual add fused in, SiLU-and-mul, rotary embedding fused into the KV store, paged
extend / decode attention, and the small-batch matmuls by our GEMV where it measured faster than
cuBLAS at start-up (``engine.kernels.small_batch_linear``). On CUDA a layer is then four
matmuls and six of our kernels (two norms, the rotary store, one or two attention kernels, the
activation), where plain torch launches ~40.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

import torch

ATTENTION_BACKENDS = ("auto", "torch", "cpu", "triton")  # the names make_kernel_backend takes

# (x [N, H], weight [H], eps, residual [N, H] | None) -> (normalized, x + residual | None)
RMSNormFn = Callable[
    [torch.Tensor, torch.Tensor, float, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]
]
# (x [M, K], weight [N, K], bias [N] | None) -> [M, N]
LinearFn = Callable[..., torch.Tensor]
# gate_up [..., 2 * I] -> [..., I]
SiluAndMulFn = Callable[[torch.Tensor], torch.Tensor]
# (qkv, positions, cos_sin, k_cache, v_cache, out_loc, num_heads) -> rotated q [T, Hq, D]
RotaryStoreKVFn = Callable[..., torch.Tensor]
ExtendAttentionFn = Callable[..., torch.Tensor]
DecodeAttentionFn = Callable[..., torch.Tensor]
# (AttentionMetadata, page_size) -> a plan the attention functions take as ``plan=``
PlanAttentionFn = Callable[..., object]


@dataclass(frozen=True)
class KernelBackend:
    name: str
    linear: LinearFn
    rms_norm: RMSNormFn
    silu_and_mul: SiluAndMulFn
    rotary_store_kv: RotaryStoreKVFn
    extend_attention: ExtendAttentionFn
    decode_attention: DecodeAttentionFn
    # the once-per-step part of attention (the runner stores it in AttentionMetadata.plan)
    plan_attention: PlanAttentionFn | None = None
    # (KV pool dtype, the model's attention shapes: (query heads, KV heads, head dim) on this
    # rank, whether it decodes) -> None: builds what attention needs, at start-up
    warm_up: Callable[[torch.dtype, Iterable[tuple[int, int, int]], bool], None] | None = None
    # (model) -> how many weights it converted: the matmul weights in the layout ``linear`` runs
    # best, once after loading
    prepare_weights: Callable[[torch.nn.Module], int] | None = None


def make_kernel_backend(name: str, device: torch.device) -> KernelBackend:
    """``torch``: the references; ``cpu``: the CPU kernels; ``triton``: our kernels; ``auto``:
    Triton on CUDA, the CPU kernels elsewhere."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "cpu"
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(f"--attention-backend cpu runs on the CPU, not on {device}")
        from engine.kernels import cpu, cpu_decode, cpu_linear, cpu_native, cpu_rotary

        threads = torch.get_num_threads()  # the worker set it at start-up (engine.cpu_env)
        rms_norm, extend = cpu.rms_norm_cpu, cpu.extend_attention_cpu
        if cpu_native.available() is None:  # which built (or loaded) the RMSNorm kernel
            rms_norm, extend = cpu.rms_norm_native, partial(cpu.extend_attention_native, threads=threads)

        return KernelBackend(
            "cpu",
            cpu_linear.linear_cpu,
            rms_norm,
            cpu.silu_and_mul_cpu,
            cpu_rotary.rotary_store_kv_cpu,
            extend,
            cpu_decode.choose(threads),
            cpu.plan_attention,
            partial(cpu.warm_up, threads=threads),
            cpu_linear.pack_weights,
        )
    if name == "torch":
        from engine.kernels import reference as ref

        return KernelBackend(
            "torch",
            torch.nn.functional.linear,
            ref.rms_norm_ref,
            ref.silu_and_mul_ref,
            ref.rotary_store_kv_ref,
            ref.extend_attention_ref,
            ref.decode_attention_ref,
        )
    if name == "triton":
        from engine.kernels.activation import silu_and_mul
        from engine.kernels.norm import rms_norm
        from engine.kernels.small_batch_linear import SmallBatchLinear
        from engine.kernels.triton_backend import TRITON_FUNCTIONS

        rotary_store_kv, extend_attention, decode_attention = TRITON_FUNCTIONS
        return KernelBackend(
            "triton", SmallBatchLinear(), rms_norm, silu_and_mul, rotary_store_kv, extend_attention,
            decode_attention,
        )
    raise ValueError(f"unknown attention backend {name!r} (expected {', '.join(ATTENTION_BACKENDS)})")
