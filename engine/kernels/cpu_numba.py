"""What the Numba CPU kernels share: bf16 held as its uint16 bit pattern (numpy has no
bfloat16), widened to float32 and narrowed back in registers, and tensors handed to Numba as
numpy arrays without a copy."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import FunctionType

import llvmlite.ir as llvm_ir
import numba
import numpy as np
import torch
from numba import types
from numba.extending import intrinsic

_BF16_NAN = 0x7FC0  # a quiet NaN
_SOURCE_TAG = hashlib.sha1(Path(__file__).read_bytes()).hexdigest()[:8]


@intrinsic
def widen(typingctx, value):
    """An element as float32: bf16 bits (uint16) are zero-extended and shifted into the high
    half of a float32; a float32 is itself."""
    if value == types.float32:
        return types.float32(value), lambda context, builder, sig, args: args[0]
    if value != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        i32 = llvm_ir.IntType(32)
        high = builder.shl(builder.zext(args[0], i32), llvm_ir.Constant(i32, 16))
        return builder.bitcast(high, llvm_ir.FloatType())

    return types.float32(value), codegen


@intrinsic
def narrow(typingctx, value, like):
    """float32 ``value`` as an element of ``like``'s type: a float32 itself, or bf16 bits rounded
    to nearest even, what ``tensor.to(torch.bfloat16)`` gives (a NaN stays a NaN: the rounding
    add alone could carry a NaN's low payload into infinity)."""
    if value != types.float32:
        return None
    if like == types.float32:
        return types.float32(value, like), lambda context, builder, sig, args: args[0]
    if like != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        i32, i16 = llvm_ir.IntType(32), llvm_ir.IntType(16)
        bits = builder.bitcast(args[0], i32)
        odd = builder.and_(builder.lshr(bits, llvm_ir.Constant(i32, 16)), llvm_ir.Constant(i32, 1))
        rounded = builder.add(builder.add(bits, llvm_ir.Constant(i32, 0x7FFF)), odd)
        high = builder.trunc(builder.lshr(rounded, llvm_ir.Constant(i32, 16)), i16)
        is_nan = builder.fcmp_unordered("uno", args[0], args[0])
        return builder.select(is_nan, llvm_ir.Constant(i16, _BF16_NAN), high)

    return types.uint16(value, like), codegen


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """``t`` as a numpy array on the same memory (bf16 as its uint16 bits)."""
    return t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def jit(fn, parallel: bool = False, fastmath: bool = True):
    """Compiled on first use and cached on disk. Numba's cache names an entry by the function's
    qualified name and signature, and sees only the function's own file change: the name carries
    ``parallel`` and a hash of this module, whose intrinsics are compiled into the kernels."""
    name = f"{fn.__name__}_{_SOURCE_TAG}" + ("_parallel" if parallel else "")
    fn = FunctionType(fn.__code__, fn.__globals__, name)
    fn.__qualname__ = name
    return numba.njit(fastmath=fastmath, nogil=True, cache=True, parallel=parallel)(fn)
