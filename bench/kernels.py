"""Benchmark our Triton kernels against their peers on the same inputs, in one run.

- decode attention (paged, page 16, scattered pages) vs SDPA (and FlexAttention when the torch
  has it) on the same K/V laid out contiguously; batch {1, 16, 64} x context {512, 4096};
- extend attention vs SDPA causal (bottom-right aligned when part of the context is a cached
  prefix) for 512 and 4096 tokens, without and with half the context as a cached prefix;
- the rotary + KV store (one kernel per layer and step) vs torch eager doing the same work (the
  reference: split, two rotaries, indexed stores) for decode (T = 1, 64, 128) and prefill
  (T = 4096) token counts; fused RMSNorm(+residual) and SiLU-and-mul vs torch eager
  (``bench/kernels_pointwise.py``);
- the small-batch GEMV (decode's linear layers, M = 1 and 8, Llama-3-8B's five weight shapes),
  its fastest config vs cuBLAS (``bench/kernels_gemv.py``).

Each row gives the median time, the effective bandwidth (bytes that must move / time) or
TFLOP/s, and the ratio to the peer and to the ceiling measured in the same run (a large
device-to-device copy; a large bf16 matmul). JSON goes to ``--output``.

``python -m bench.kernels --output bench/results/kernels.json``            (GPU)
``python -m bench.kernels --tiny --output /tmp/kernels.json``              (CPU smoke test)

On CPU the kernels run under the Triton interpreter at tiny shapes: that only proves the
script works; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.kernels_base import FULL_SHAPES, TINY_SHAPES, Case, KernelShapes, rel_err, write_report
from bench.kernels_gemv import gemv_case
from bench.kernels_pointwise import rms_norm_case, rotary_store_kv_case, silu_and_mul_case


@dataclass
class Row:
    kernel: str
    shape: str
    impl: str
    ms: float
    metric: str  # "GB/s" or "TFLOP/s"
    value: float
    vs_peer: float | None = None  # our speed / the best peer's speed (>1: we are faster)
    vs_ceiling: float | None = None
    max_rel_err: float | None = None  # our output against the peer's


@dataclass
class Report:
    device: str
    meaningful: bool
    torch_version: str
    triton_version: str
    ceilings: dict[str, float] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- timing


def make_timer(device: str) -> Callable[[Callable[[], object]], float]:
    """Median milliseconds: triton's do_bench (CUDA events, L2 flushed) on GPU, wall clock on CPU."""
    if device == "cuda":
        import triton.testing

        return lambda fn: float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))

    def cpu_timer(fn: Callable[[], object]) -> float:
        fn()
        samples = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return statistics.median(samples)

    return cpu_timer


def measure_ceilings(shapes: KernelShapes, device: str, timer) -> dict[str, float]:
    src = torch.empty(shapes.copy_bytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    copy_ms = timer(lambda: dst.copy_(src))
    n = shapes.matmul_n
    a = torch.randn(n, n, device=device, dtype=shapes.dtype)
    b = torch.randn(n, n, device=device, dtype=shapes.dtype)
    mm_ms = timer(lambda: a @ b)
    return {"copy_GBps": 2 * src.numel() * 2 / copy_ms / 1e6, "matmul_TFLOPs": 2 * n**3 / mm_ms / 1e9}


# ----------------------------------------------------------------------------- inputs


@dataclass
class PagedBatch:
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    page_table: torch.Tensor
    k_dense: torch.Tensor  # [B, Hkv, L, D]: the same values, contiguous, for the peers
    v_dense: torch.Tensor


def paged_batch(batch: int, context: int, shapes: KernelShapes, device: str) -> PagedBatch:
    """Every request ``context`` tokens long, its pages scattered over a shuffled pool."""
    ps = shapes.page_size
    pages_per_req = -(-context // ps)
    num_pages = 1 + batch * pages_per_req
    cache_shape = (num_pages, ps, shapes.num_kv_heads, shapes.head_dim)
    k_cache = torch.randn(cache_shape, device=device, dtype=shapes.dtype)
    v_cache = torch.randn(cache_shape, device=device, dtype=shapes.dtype)
    perm = torch.randperm(num_pages - 1, device=device) + 1
    page_table = perm.view(batch, pages_per_req).to(torch.int32)

    def dense(cache: torch.Tensor) -> torch.Tensor:
        tokens = cache[page_table.long()].flatten(1, 2)[:, :context]  # [B, L, Hkv, D]
        return tokens.transpose(1, 2).contiguous()

    return PagedBatch(k_cache, v_cache, page_table, dense(k_cache), dense(v_cache))


# ----------------------------------------------------------------------------- benchmarks


def decode_case(shapes: KernelShapes, batch: int, context: int, flex, device: str) -> Case:
    from engine.kernels.decode_attention import decode_attention

    hq, hkv, d = shapes.num_heads, shapes.num_kv_heads, shapes.head_dim
    scale = d**-0.5
    data = paged_batch(batch, context, shapes, device)
    q = torch.randn(batch, hq, d, device=device, dtype=shapes.dtype)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    q4 = q.unsqueeze(2)  # [B, Hq, 1, D]
    peers = {"sdpa": lambda: _sdpa(q4, data.k_dense, data.v_dense, scale=scale, enable_gqa=True)}
    if flex is not None:
        peers["flex"] = lambda: flex(q4, data.k_dense, data.v_dense, scale=scale, enable_gqa=True)
    return Case(
        "decode", f"B={batch} L={context}",
        ours=lambda: decode_attention(q, data.k_cache, data.v_cache, data.page_table, lens, scale),
        peers=peers, metric="GB/s", work=2 * batch * context * hkv * d * q.element_size(),
        reference=lambda: peers["sdpa"]().squeeze(2),
    )


def extend_case(shapes: KernelShapes, context: int, prefix: int, flex, device: str) -> Case:
    from torch.nn.attention.bias import causal_lower_right

    from engine.kernels.extend_attention import extend_attention

    hq, d = shapes.num_heads, shapes.head_dim
    scale = d**-0.5
    new = context - prefix
    data = paged_batch(1, context, shapes, device)
    q = torch.randn(new, hq, d, device=device, dtype=shapes.dtype)
    indptr = torch.tensor([0, new], dtype=torch.int32, device=device)
    prefix_lens = torch.tensor([prefix], dtype=torch.int32, device=device)
    qd = q.transpose(0, 1).unsqueeze(0)  # [1, Hq, new, D]
    mask = causal_lower_right(new, context)  # query i sits at position prefix + i
    peers = {
        "sdpa": lambda: _sdpa(qd, data.k_dense, data.v_dense, attn_mask=mask, scale=scale, enable_gqa=True)
    }
    if flex is not None:
        peers["flex"] = flex_causal(flex, qd, data, prefix, scale)
    return Case(
        "extend", f"L={context} prefix={prefix}",
        ours=lambda: extend_attention(
            q, data.k_cache, data.v_cache, data.page_table, indptr, prefix_lens, scale
        ),
        peers=peers, metric="TFLOP/s", work=4 * hq * d * (new * prefix + new * (new + 1) / 2),
        reference=lambda: peers["sdpa"]()[0].transpose(0, 1),
    )


def flex_causal(flex, qd: torch.Tensor, data: PagedBatch, prefix: int, scale: float):
    """FlexAttention with a bottom-right causal block mask, built on the first call (so a failure
    lands in the report's skipped list, not in the run)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + prefix

    @functools.cache
    def block_mask():
        return create_block_mask(causal, None, None, qd.shape[2], data.k_dense.shape[2], device=qd.device)

    return lambda: flex(qd, data.k_dense, data.v_dense, block_mask=block_mask(), scale=scale, enable_gqa=True)


def _sdpa(*args, **kwargs) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(*args, **kwargs)


def run_case(case: Case, timer, report: Report) -> None:
    err = None
    if case.reference is not None:
        try:
            err = rel_err(case.ours(), case.reference())
        except Exception as exc:  # noqa: BLE001 - a peer that cannot run this shape is reported
            report.skipped.append(_skip_note(case, "reference", exc))
    our_ms = timer(case.ours)
    peer_ms = {}
    for name, fn in case.peers.items():
        try:
            peer_ms[name] = timer(fn)
        except Exception as exc:  # noqa: BLE001 - a peer that cannot run this shape is reported
            report.skipped.append(_skip_note(case, name, exc))
    ceiling = report.ceilings["copy_GBps" if case.metric == "GB/s" else "matmul_TFLOPs"]
    best = min(peer_ms.values(), default=None)
    report.rows.append(Row(
        case.kernel, case.shape, "triton", our_ms, case.metric, case.speed(our_ms),
        vs_peer=None if best is None else best / our_ms,
        vs_ceiling=case.speed(our_ms) / ceiling, max_rel_err=err,
    ))
    for name, ms in peer_ms.items():
        report.rows.append(Row(case.kernel, case.shape, name, ms, case.metric, case.speed(ms),
                               vs_ceiling=case.speed(ms) / ceiling))


def _skip_note(case: Case, what: str, exc: Exception) -> str:
    return f"{case.kernel} {case.shape} {what}: {type(exc).__name__}: {exc}"[:300]


def all_cases(shapes: KernelShapes, flex, device: str, timer):
    """Built lazily, one at a time, so only one shape's tensors are alive."""
    for batch in shapes.decode_batches:
        for context in shapes.decode_contexts:
            yield decode_case(shapes, batch, context, flex, device)
    for context in shapes.extend_contexts:
        for prefix in (0, context // 2):
            yield extend_case(shapes, context, prefix, flex, device)
    for tokens in shapes.rotary_tokens:
        yield rotary_store_kv_case(shapes, tokens, device)
    for rows in shapes.pointwise_rows:
        yield rms_norm_case(shapes, rows, device)
        yield silu_and_mul_case(shapes, rows, device)
    for name, n, k in shapes.gemv_linears:
        for rows in shapes.gemv_rows:
            yield gemv_case(shapes, name, n, k, rows, device, timer)


# ----------------------------------------------------------------------------- main


def load_flex(device: str):
    """Compiled FlexAttention on CUDA when this torch has it, else None."""
    if device != "cuda":
        return None
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return None
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # one compile per shape; keep them all
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 64))
    return torch.compile(flex_attention, dynamic=False)


def print_table(report: Report) -> None:
    if not report.meaningful:
        print("NOTE: CPU smoke test (Triton interpreter, tiny shapes): these numbers mean nothing.")
    ceilings = ", ".join(f"{name}={value:.4g}" for name, value in report.ceilings.items())
    print(f"device: {report.device}  ceilings: {ceilings}")
    print(f"{'kernel':29} {'shape':32} {'impl':7} {'ms':>9} {'value':>9} {'metric':8} {'vs peer':>8} "
          f"{'vs ceil':>8} {'rel err':>8}")
    for r in report.rows:
        peer = f"{r.vs_peer:.2f}" if r.vs_peer is not None else ""
        err = f"{r.max_rel_err:.1e}" if r.max_rel_err is not None else ""
        print(f"{r.kernel:29} {r.shape:32} {r.impl:7} {r.ms:9.4f} {r.value:9.4g} {r.metric:8} {peer:>8} "
              f"{r.vs_ceiling:8.2f} {err:>8}")
    for line in report.skipped:
        print("skipped:", line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke test)")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (saves compile time)")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        if not args.tiny:
            parser.error("without CUDA only --tiny runs (the Triton interpreter is far too slow otherwise)")
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("triton was imported before the interpreter could be enabled")
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    import triton

    shapes = TINY_SHAPES if args.tiny else FULL_SHAPES
    timer = make_timer(device)
    report = Report(device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
                    meaningful=device == "cuda", torch_version=torch.__version__,
                    triton_version=triton.__version__)
    torch.manual_seed(0)
    report.ceilings = measure_ceilings(shapes, device, timer)
    flex = None if args.no_flex else load_flex(device)
    for case in all_cases(shapes, flex, device, timer):
        run_case(case, timer, report)
        print(f"measured {case.kernel} {case.shape}", flush=True)
        write_report(args.output, report)  # a run cut short by a time limit keeps what it measured

    print_table(report)
    write_report(args.output, report)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
