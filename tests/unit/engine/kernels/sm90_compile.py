"""Compile every Triton kernel (the engine's, and kvtransfer's page copy) ahead of time for an
H100 (sm_90) with triton's bundled ptxas; no GPU needed. The interpreter proves the kernels
compute the right thing; this proves the real compiler accepts them, with the default configs
and the alignment the JIT would see.

Run as ``python -m tests.unit.engine.kernels.sm90_compile`` (prints one line per kernel, exits 1 on
the first failure). It must run without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

H100 = ("cuda", 90, 32)
H100_MAX_SHARED = 232448  # bytes of shared memory one block may use on sm_90
NOT_MULTIPLE_OF_16 = {"stride_pt", "stride_lb", "stride_lh", "group_size", "num_kv_heads", "head_dim"}
SCALARS = {"qk_scale": "fp32", "eps": "fp32"}


@dataclass
class Build:
    label: str
    kernel: object
    pointer_types: dict[str, str]  # anything else ending in _ptr is of ``element``
    constexprs: dict[str, int]
    num_warps: int
    num_stages: int
    expect_mma: bool = False
    enable_fp_fusion: bool = True  # as the kernel's launch passes it
    scalar_types: dict[str, str] | None = None  # non-pointer arguments that are not i32 / SCALARS
    divisible: tuple[str, ...] = ()  # integer arguments the JIT would see as multiples of 16
    element: str = "*bf16"  # the activations' and caches' pointer type


def builds() -> list[Build]:
    import triton

    from engine.kernels import activation as act
    from engine.kernels import decode_attention as da
    from engine.kernels import extend_attention as ea
    from engine.kernels import kv_store as ks
    from engine.kernels import norm

    dc, ec = da.DEFAULT_DECODE_CONFIG, ea.DEFAULT_EXTEND_CONFIG
    out: list[Build] = []
    for group, head_dim, page_size, splits in ((4, 128, 16, 8), (1, 64, 1, 1), (8, 128, 256, 32)):
        out.append(Build(
            f"decode split g={group} d={head_dim} page={page_size} splits={splits}",
            da._decode_split_kernel,
            {"page_table_ptr": "*i32", "seq_lens_ptr": "*i32", "lse_ptr": "*fp32",
             "o_ptr": "*fp32" if splits > 1 else "*bf16"},
            {"PAGE_SIZE": page_size, "HEAD_DIM": head_dim, "NUM_SPLITS": splits,
             "BLOCK_H": max(da.MIN_GROUP_ROWS, triton.next_power_of_2(group)), "BLOCK_N": dc.block_n,
             "BLOCK_D": triton.next_power_of_2(head_dim)},
            dc.num_warps, dc.num_stages, expect_mma=True,
        ))
        if splits > 1:
            out.append(Build(
                f"decode combine d={head_dim} splits={splits}",
                da._decode_combine_kernel,
                {"partial_ptr": "*fp32", "lse_ptr": "*fp32", "seq_lens_ptr": "*i32"},
                {"HEAD_DIM": head_dim, "NUM_SPLITS": splits, "BLOCK_N": dc.block_n,
                 "BLOCK_S": triton.next_power_of_2(splits), "BLOCK_D": triton.next_power_of_2(head_dim)},
                4, 2,
            ))
    for head_dim, page_size in ((128, 16), (64, 1), (128, 256)):
        out.append(Build(
            f"extend d={head_dim} page={page_size}",
            ea._extend_kernel,
            {"page_table_ptr": "*i32", "qo_indptr_ptr": "*i32", "prefix_lens_ptr": "*i32"},
            {"PAGE_SIZE": page_size, "HEAD_DIM": head_dim, "BLOCK_M": ec.block_m, "BLOCK_N": ec.block_n,
             "BLOCK_D": triton.next_power_of_2(head_dim)},
            ec.num_warps, ec.num_stages, expect_mma=True,
        ))
    for heads, kv_heads, head_dim in ((32, 8, 128), (16, 16, 64), (12, 3, 80)):
        out.append(Build(
            f"rotary_store_kv hq={heads} hkv={kv_heads} d={head_dim}",
            ks._rotary_store_kv_kernel,
            {"positions_ptr": "*i64", "cos_sin_ptr": "*fp32", "out_loc_ptr": "*i64"},
            {"NUM_HEADS": heads, "NUM_KV_HEADS": kv_heads, "HEAD_DIM": head_dim,
             "BLOCK_HQ": triton.next_power_of_2(heads), "BLOCK_HKV": triton.next_power_of_2(kv_heads),
             "BLOCK_HALF": triton.next_power_of_2(head_dim // 2)},
            ks.num_warps_for(heads, kv_heads, head_dim), 1, enable_fp_fusion=False,
        ))
    for hidden, residual in ((4096, True), (8192, False)):
        block = triton.next_power_of_2(hidden)
        out.append(Build(
            f"rms_norm hidden={hidden} residual={residual}", norm._rms_norm_kernel, {},
            {"HAS_RESIDUAL": residual, "BLOCK": block}, norm.num_warps_for(block), 1,
        ))
    out.append(Build("silu_and_mul", act._silu_and_mul_kernel, {}, {"BLOCK": act.BLOCK}, 4, 1))
    out += float32_builds(out)
    out += gemv_builds()
    out += page_copy_builds()
    return out


def gemv_builds() -> list[Build]:
    """Every GEMV candidate on Llama shapes (N, K multiples of 16, no bias, whole K steps) in
    bf16 and in float32 (twice the shared memory: the engine may time every config in either);
    the default again with a bias and K a multiple of 16 but not of ``block_k`` (Qwen2's qkv),
    and with an odd K (unaligned rows: plain loads, no pipelining)."""
    from engine.kernels import gemv as gm

    def build(config, label: str, bias: bool = False, even_k: bool = True, k16: bool = True, element="*bf16"):
        return Build(
            f"gemv {label} n={config.block_n} k={config.block_k} warps={config.num_warps} "
            f"stages={config.num_stages}",
            gm._gemv_kernel, {},
            {"HAS_BIAS": bias, "EVEN_K": even_k, "BLOCK_M": gm.MAX_GEMV_ROWS,
             "BLOCK_N": config.block_n, "BLOCK_K": config.block_k},
            config.num_warps, config.num_stages, expect_mma=element != "*fp32",
            divisible=("N", "K") if k16 else ("N",), element=element,
        )

    default = gm.DEFAULT_GEMV_CONFIG
    return [build(config, "bf16") for config in gm.GEMV_CONFIGS] + [
        build(config, "float32", element="*fp32") for config in gm.GEMV_CONFIGS
    ] + [
        build(default, "bf16 bias ragged-K", bias=True, even_k=False),
        build(default, "bf16 odd-K", even_k=False, k16=False),
    ]


def float32_builds(bf16: list[Build]) -> list[Build]:
    """The attention kernels again in float32 (the GPU tests' exact comparisons run them): twice
    the shared memory and registers of bf16 at the same blocks, and IEEE float32 dots (FMA, not
    tensor cores)."""
    return [
        Build(f"{b.label} float32", b.kernel, b.pointer_types, b.constexprs, b.num_warps, b.num_stages,
              False, b.enable_fp_fusion, b.scalar_types, b.divisible, element="*fp32")
        for b in bf16
        if b.label.startswith(("decode split", "extend"))
    ]


def page_copy_builds() -> list[Build]:
    """kvtransfer's gather / scatter / pool-to-pool page copy, on bf16 pools seen as int16."""
    from kvtransfer import kernels as kv

    tables = {"base_ptr": "*i16", "src_table_ptr": "*i64", "src_pages_ptr": "*i64",
              "dst_table_ptr": "*i64", "dst_pages_ptr": "*i64"}
    shifts = {"src_shift": "i64", "dst_shift": "i64"}
    return [
        Build(
            f"kv page copy {'pool' if src else 'staging'} -> {'pool' if dst else 'staging'} align={align}",
            kv._copy_pages_kernel, tables,
            {"SRC_POOL": src, "DST_POOL": dst, "ALIGN": align, "BLOCK": kv._BLOCK}, 4, 1,
            scalar_types=shifts, divisible=("page_elems",),
        )
        for src, dst, align in ((True, False, 8), (False, True, 8), (True, True, 1))
    ]


def compile_for_h100(build: Build):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs = {}, {}
    for index, name in enumerate(build.kernel.arg_names):
        if name in build.constexprs:
            signature[name] = "constexpr"
            continue
        if name.endswith("_ptr"):
            signature[name] = build.pointer_types.get(name, build.element)
        else:
            signature[name] = (build.scalar_types or {}).get(name) or SCALARS.get(name, "i32")
        # What the JIT would specialise on: 16-byte aligned pointers, strides that are multiples of 16.
        strided = name.startswith("stride") and name not in NOT_MULTIPLE_OF_16
        if name.endswith("_ptr") or strided or name in build.divisible:
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=build.kernel, signature=signature, constexprs=build.constexprs, attrs=attrs)
    options = {"num_warps": build.num_warps, "num_stages": build.num_stages,
               "enable_fp_fusion": build.enable_fp_fusion}
    return triton.compile(source, target=GPUTarget(*H100), options=options)


def main() -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter cannot compile", file=sys.stderr)
        return 2
    for build in builds():
        compiled = compile_for_h100(build)
        ptx = compiled.asm["ptx"]
        mma = "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else "none"
        if build.expect_mma and mma == "none":
            print(f"FAIL {build.label}: no tensor-core instruction in the PTX")
            return 1
        if compiled.metadata.shared > H100_MAX_SHARED:
            print(f"FAIL {build.label}: {compiled.metadata.shared} B of shared memory > {H100_MAX_SHARED}")
            return 1
        print(f"ok {build.label}: shared memory {compiled.metadata.shared} B, tensor cores: {mma}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
