"""fp32-exact products of an fp32 activation and a bf16 weight on bf16 tensor cores (the bf16x3 split).

An fp32 value splits exactly into three bf16 parts, ``x = hi + mid + lo``: each part holds the next 8 bits of
x's 24-bit significand (cut by truncating the bit pattern, so ``hi`` never rounds up into an overflow and
each residual is exact). A product of a bf16 part and a bf16 weight has at most 16 significant bits, exact
in fp32, so with fp32 accumulation

    x @ W^T  =  [x_lo | x_mid | x_hi] @ [W | W | W]^T

holds with exact products: one bf16 GEMM with ``K`` tripled (cuBLAS, ``torch.mm(..., out_dtype=float32)``)
replaces an fp32 GEMM, which runs on the CUDA cores at a small fraction of the tensor-core rate (three
times the FLOPs at ~15x the rate). Why one GEMM over the concatenated parts and not three: one launch, one
fp32 output written once, and no fp32 accumulation across calls (``addmm``'s fp32 ``out_dtype`` wants its
addend in the input dtype on current PyTorch, so three GEMMs would cost two fp32 temporaries and two
passes over them); the price is the tripled weight, materialized per column chunk. The small parts come
first along ``K``, so the accumulator has summed them before the large terms arrive: the result carries
the rounding of one fp32 sum over ``K`` terms, as an fp32 GEMM does.

Where it is used: PEFT's dropout path with its default dtypes (bf16 base weight, fp32 adapters, so an fp32
dropped-out input) recomputes ``base = x W^T`` and the input gradient ``d_base W`` with it
(``autograd/recompute_base.py``; ``dispatch/rules.py::split_matmul_ok`` decides). Two parts would not do:
PEFT's dropout multiplies by the fp32 ``1 / (1 - p)``, which fills the whole 24-bit significand, so a
two-part split leaves a 2^-17 relative residual per element, two orders of magnitude above fp32's own
rounding and visible in the fp32 magnitude gradient. fp16 weights are not split (fp16 parts of an fp32
value overflow above 65504 and lose the low part to fp16's small exponent range): they keep the fp32 GEMM.

On the CPU (tests) the parts are multiplied as fp32 upcasts: the same exact products, fp32 accumulation.
"""

from __future__ import annotations

from collections import Counter

import torch

from ..dispatch import rules

__all__ = [
    "linear_on_parts",
    "matmul_split",
    "mm_exact_products",
    "split_bf16x3",
    "split_bf16x3_reference",
    "split_counts",
]

#: Calls per entry point (``split`` = inputs split, ``linear`` / ``matmul`` = GEMMs); for tests and benchmarks.
split_counts: Counter[str] = Counter()

_KEEP_HIGH_16 = -65536  # 0xFFFF0000 as int32: the sign, exponent and top 7 significand bits


def split_bf16x3_reference(x: torch.Tensor) -> torch.Tensor:
    """``[R, K]`` fp32 -> ``[R, 3K]`` bf16 ``[lo | mid | hi]`` with ``lo + mid + hi == x`` exactly.

    Non-finite entries keep their value in ``hi`` (``mid = lo = 0``). Exact for every finite ``|x| >= 2^-103``;
    below, a part can be subnormal, exact where the conversion keeps subnormals (an absolute error < 2^-126
    where it does not).
    """
    finite = torch.isfinite(x)
    hi = torch.where(finite, (x.view(torch.int32) & _KEEP_HIGH_16).view(torch.float32), x)
    rest = torch.where(finite, x - hi, 0.0)
    mid = (rest.view(torch.int32) & _KEEP_HIGH_16).view(torch.float32)
    lo = rest - mid
    return torch.cat([lo, mid, hi], dim=-1).to(torch.bfloat16)


def split_bf16x3(x: torch.Tensor) -> torch.Tensor:
    """:func:`split_bf16x3_reference` of the 2-D fp32 ``x`` (any row stride): one Triton launch (read 4, write
    6 bytes per element) where the kernels may run, the reference otherwise."""
    split_counts["split"] += 1
    if x.stride(-1) != 1:
        x = x.contiguous()
    if not rules.kernels_enabled(x.device)[0] or x.numel() == 0:
        return split_bf16x3_reference(x)
    from ._triton_utils import cdiv, is_interpreted
    from .launch import launch
    from .split_matmul_kernel import _split_bf16x3_kernel

    R, K = x.shape
    out = torch.empty((R, 3 * K), dtype=torch.bfloat16, device=x.device)
    block_r, block_c = (16, 64) if is_interpreted(_split_bf16x3_kernel) else (4, 1024)
    grid = (cdiv(R, block_r), cdiv(K, block_c))
    index = x.get_device()
    if index >= 0 and index != torch.cuda.current_device():
        with torch.cuda.device(index):
            launch(_split_bf16x3_kernel, grid, x, out, R, K, x.stride(0), 3 * K, BLOCK_R=block_r, BLOCK_C=block_c)
    else:
        launch(_split_bf16x3_kernel, grid, x, out, R, K, x.stride(0), 3 * K, BLOCK_R=block_r, BLOCK_C=block_c)
    return out


def mm_exact_products(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` of bf16 operands with fp32 accumulation and an fp32 result (into ``out`` when given)."""
    if a.device.type == "cuda":
        if out is None:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    product = torch.mm(a.float(), b.float())
    if out is None:
        return product
    return out.copy_(product)


def linear_on_parts(parts: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight^T`` in fp32 from ``parts = split_bf16x3(x)`` (``[R, 3K]``) and a bf16 ``weight`` ``[n, K]``.

    Materializes ``[W | W | W]`` (``6 n K`` bytes): callers pass row chunks of a large weight. Writes into
    ``out`` (an ``[R, n]`` fp32 tensor with unit column stride, e.g. a column slice of a larger output) when
    given.
    """
    split_counts["linear"] += 1
    tripled = torch.cat([weight, weight, weight], dim=1)  # [n, 3K]
    return mm_exact_products(parts, tripled.t(), out)


def matmul_split(d: torch.Tensor, weight: torch.Tensor, *, budget_bytes: int) -> torch.Tensor:
    """``d @ weight`` in fp32 for an fp32 ``d`` ``[R, n]`` and a bf16 ``weight`` ``[n, K]``: ``[R, K]``.

    ``d`` is split once (``6 R n`` bytes); the tripled weight ``[W; W; W]`` is built per chunk of output
    columns, each chunk at most ``budget_bytes`` (at least one column).
    """
    split_counts["matmul"] += 1
    parts = split_bf16x3(d)  # [R, 3n]
    n, K = weight.shape
    out = torch.empty((d.shape[0], K), dtype=torch.float32, device=d.device)
    step = int(max(1, min(K, budget_bytes // max(1, 6 * n))))
    for j0 in range(0, K, step):
        j1 = min(K, j0 + step)
        columns = weight[:, j0:j1]
        tripled = torch.cat([columns, columns, columns], dim=0)  # [3n, j1 - j0]
        if step >= K:
            mm_exact_products(parts, tripled, out)
        else:
            out[:, j0:j1] = mm_exact_products(parts, tripled)
    return out
