"""The Triton kernel that splits fp32 values into three bf16 parts (host side and maths: ``split_matmul.py``).

Each program loads a ``[BLOCK_R, BLOCK_C]`` tile of the fp32 input and writes its ``lo``, ``mid`` and ``hi``
parts side by side into the ``[R, 3K]`` bf16 output (columns ``[0, K)``, ``[K, 2K)``, ``[2K, 3K)``). The parts
are cut by truncating the bit pattern, so every part is exactly representable in bf16 and the stores do not
round; a non-finite input keeps its value in ``hi`` and has zero ``mid`` and ``lo``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _split_bf16x3_kernel(
    x_ptr,
    out_ptr,
    R,
    K,
    stride_x,
    stride_out,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < R)[:, None] & (cols < K)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    c = cols[None, :]
    x = tl.load(x_ptr + (r64 * stride_x + c), mask=mask, other=0.0).to(tl.float32)
    finite = tl.abs(x) < float("inf")  # false for +-inf and NaN
    keep = 0xFFFF0000
    hi = (x.to(tl.uint32, bitcast=True) & keep).to(tl.float32, bitcast=True)
    rest = tl.where(finite, x - tl.where(finite, hi, 0.0), 0.0)  # exact: the low 16 bits of x's significand
    hi = tl.where(finite, hi, x)
    mid = (rest.to(tl.uint32, bitcast=True) & keep).to(tl.float32, bitcast=True)
    lo = rest - mid  # exact, at most 8 significant bits
    dst = out_ptr + (r64 * stride_out + c)
    tl.store(dst, lo.to(tl.bfloat16), mask=mask)
    tl.store(dst + K, mid.to(tl.bfloat16), mask=mask)
    tl.store(dst + 2 * K, hi.to(tl.bfloat16), mask=mask)
