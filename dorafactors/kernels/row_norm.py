"""Tensor-core factored row norm: ``||W + s*B@A||^2_row`` in one kernel launch, fp32 throughout.

    ||W + s B A||^2_row = ||W||^2_row + 2s * rowsum(B * (W A^T)) + s^2 * rowsum((B (A A^T)) * B)

The PyTorch reference of the same maths is :func:`dorafactors.norm.factored.factored_row_norm_sq`.

Design (one launch, ``_weight_norm_sq_kernel``; a 1-D grid of two kinds of programs):

* **Gram programs** (the first ``NT * S_G`` program ids). ``G = A A^T`` is needed only as its lower block
  triangle (``NT = NR (NR + 1) / 2`` tiles of ``BN x BN``, ``NR = ceil(r / BN)``), each tile split over
  ``S_G`` ranges of ``d_in``. Each program writes an fp32 partial tile; the last of a tile's ``S_G`` programs
  to arrive (an integer ticket) sums the partials in a fixed order, scales the tile by ``s/2`` (diagonal
  tiles) or ``s`` (below the diagonal), splits it into three bf16 parts ``hi + mid + lo`` (24 significant
  bits: fp32's own precision) and bumps a "gram done" counter.
* **Main programs** (the rest), one per (row tile ``m`` of ``d_out``, rank tile ``n``, ``d_in`` split ``s``),
  ``n`` fastest so the ``NR`` programs reading the same W tiles run side by side and share them in L2.
  Each accumulates ``acc = W_tile A_tile^T`` over its ``d_in`` range on tensor cores with fp32 accumulation
  (half-precision W goes from global to shared memory to the MMA as is: it is never upcast in memory).
  It then waits for the gram counter (gram programs have lower ids, so they were dispatched first, and they
  wait on nothing) and adds its share of ``sum_{k >= n} B[:, k] G''[k, n]`` (``G''`` being the scaled
  lower block triangle), so that ``rowsum(B[:, n] * acc)`` summed over ``n`` and the splits is
  ``c + (s/2) b`` with ``c = rowsum(B * (W A^T))`` and ``b = rowsum((B G) * B)``: the symmetric gram term
  costs ``NR (NR + 1) / 2`` instead of ``NR^2`` tile products. The epilogue multiplies by the fp32 B tile,
  reduces the rows and stores one fp32 partial per (n, s): no atomics on data. The last program of a row
  tile to arrive sums those partials in a fixed order and writes ``||W||^2 + 2s (c + (s/2) b)``. Without
  ``cached_sumsq`` the ``n == 0`` programs also square the W tiles they already hold in shared memory
  ("one pass over W"); with it, no work at all is spent on ``||W||^2``.

``U_GIVEN`` mode (:func:`gemm_weight_norm_sq`): ``W A^T`` comes from an fp32-output GEMM (cuBLAS); the
main programs load their U tile instead of looping over ``d_in`` and run longest first (``n == 0``). With
``G_GIVEN`` as well (the default there), ``G = A A^T`` comes from a second GEMM: no gram programs (none
compiled in), and every tile loads, scales and splits its chunks of the fp32 G in registers; without it the
gram programs run as above.

Precision: products of half-precision operands are exact and accumulate in fp32. fp32 operands are split in
registers into bf16 parts and multiplied part by part, keeping every product whose part orders sum to < 3
(the "bf16x3 / bf16x6" schemes): fp32 A against bf16 W is ``hi + mid + lo`` (3 dots), fp32 A against fp16
W is fp16 ``hi + 2^-11 lo`` (2 dots, 22 bits), ``A A^T`` of fp32 A takes 6 dots, ``B G''`` takes 3 (bf16 B),
5 (fp16 B, exact in two bf16 parts) or 6 (fp32 B) dots. Everything therefore carries ~24 bits, so the
result is as good as an fp32 computation (measured ~1e-7 relative to fp64 truth). A two-part split (16 bits)
was tried first and misses the 1e-5 target by up to ~3x on small, cancellation-prone shapes with large
``s`` (see ``tests/kernels/test_row_norm_kernel.py::test_gram_term_is_fp32_precise``). Known limit: fp32
adapter entries beyond fp16's range (|a| > 65504) on an fp16 W overflow the fp16 ``hi`` part (inf/NaN
result, never a silently wrong finite one).

Determinism: every sum has a fixed order (no floating-point atomics; the integer tickets only decide who
does the final, ordered sum), the launch configuration is a pure function of shapes, dtypes and the SM
count (:func:`pick_config`, no timing), and the cross and gram terms are computed by the same code whether or
not ``cached_sumsq`` is given: ``triton_weight_norm_sq(..., out_sumsq=w)`` followed by
``triton_weight_norm_sq(..., cached_sumsq=w)`` returns bitwise the same result.

Working set: the kernel allocates nothing proportional to ``d_in``: fp32 partials
``(NR * S + S) * d_out`` (``S`` <= 16 splits), the gram partials ``S_G * NT * BN^2`` fp32 (capped at 8 MiB
by the heuristic) and the three ``r_pad x r_pad`` bf16 parts of ``G''``, plus the ``[d_out]`` result
(:meth:`NormPlan.workspace_bytes`). There is therefore no ``d_in`` chunking to do:
``PEFT_DORA_NORM_CHUNK_MB`` bounds the PyTorch reference only.

Synchronization uses a small int32 ticket buffer per (device, stream) that the kernel itself resets to zero
before it finishes, so consecutive launches (CUDA graphs included) reuse it without a memset. The gram wait
relies on the hardware dispatching blocks of a 1-D grid in increasing order (as CUB's decoupled look-back
does); the interpreter runs programs in order, so CPU tests exercise the same protocol sequentially.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from ..dispatch import config
from ._triton_utils import ticket_buffer

__all__ = [
    "NormKernelConfig",
    "NormPlan",
    "gemm_supported",
    "gemm_weight_norm_sq",
    "matmul_fp32",
    "pick_config",
    "pick_finish_config",
    "plan_for",
    "triton_row_sumsq",
    "triton_weight_norm_sq",
]

_HALF = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation; ``a`` and ``b`` share a 16-bit dtype.

    ``UPCAST`` (set only under ``TRITON_INTERPRET``): the interpreter's bf16 ``tl.dot`` returns garbage, so
    both operands go to fp32 (exact) and the product runs in IEEE fp32; on a GPU the tensor-core dot runs.
    """
    if UPCAST:  # noqa: SIM108 (constexpr branch: one of the two dots is compiled)
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _split2(x, DT: tl.constexpr):
    """fp32 ``x`` -> ``(hi, lo)`` in ``DT`` with ``hi + lo == x`` to ~16 bits (bf16) / ~22 bits (fp16)."""
    hi = x.to(DT, fp_downcast_rounding="rtne")
    lo = (x - hi.to(tl.float32)).to(DT, fp_downcast_rounding="rtne")
    return hi, lo


@triton.jit
def _split3(x):
    """fp32 ``x`` -> bf16 ``(hi, mid, lo)`` with ``hi + mid + lo == x`` to ~24 bits (fp32's own precision).

    bf16 has fp32's exponent range, so no part overflows or lands in a subnormal range fp32 does not.
    """
    hi = x.to(tl.bfloat16, fp_downcast_rounding="rtne")
    r = x - hi.to(tl.float32)
    mid = r.to(tl.bfloat16, fp_downcast_rounding="rtne")
    lo = (r - mid.to(tl.float32)).to(tl.bfloat16, fp_downcast_rounding="rtne")
    return hi, mid, lo


@triton.jit
def _gemm_part(
    w_ptr,
    a_ptr,
    rows64,
    row_ok,
    rn64,
    rn_ok,
    d_in,
    stride_wm,
    stride_wk,
    stride_ar,
    stride_ak,
    it0,
    it1,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    A_MODE: tl.constexpr,
    SQ: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_MN: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """``W[rows, K] @ A[rn, K]^T`` over k-tiles ``[it0, it1)`` (fp32 [BM, BN]) and, if ``SQ``, ``||W[rows, K]||^2``.

    ``A_MODE``: 0 = A in W's dtype (exact products); 1 = bf16 W, fp32 A split into bf16 hi + mid + lo
    (three dots into one accumulator, ~24 bits); 2 = fp16 W, fp32 A split into fp16 hi + lo * 2^11 (two
    dots, ~22 bits; the 2^11 keeps lo clear of fp16 subnormals; second accumulator, rescaled at the end).
    """
    offs_k = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc2 = tl.zeros((BM, BN), dtype=tl.float32)
    sq = tl.zeros((BM, BK), dtype=tl.float32)
    k0 = (it0 * BK + offs_k).to(tl.int64)
    w_ptrs = w_ptr + rows64[:, None] * stride_wm + k0[None, :] * stride_wk
    a_ptrs = a_ptr + rn64[None, :] * stride_ar + k0[:, None] * stride_ak
    for it in range(it0, it1):
        if EVEN_K and EVEN_MN:  # no tails anywhere: unmasked loads
            w = tl.load(w_ptrs)
            a = tl.load(a_ptrs)
        elif EVEN_K:
            w = tl.load(w_ptrs, mask=row_ok[:, None], other=0.0)
            a = tl.load(a_ptrs, mask=rn_ok[None, :], other=0.0)
        else:
            k_ok = (it * BK + offs_k) < d_in
            w = tl.load(w_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            a = tl.load(a_ptrs, mask=rn_ok[None, :] & k_ok[:, None], other=0.0)
        if SQ:
            wf = w.to(tl.float32)
            sq += wf * wf
        if A_MODE == 0:
            acc = _mma(w, a, acc, UPCAST)
        elif A_MODE == 1:
            a_hi, a_mid, a_lo = _split3(a)
            acc = _mma(w, a_hi, acc, UPCAST)
            acc = _mma(w, a_mid, acc, UPCAST)
            acc = _mma(w, a_lo, acc, UPCAST)
        else:
            a_hi = a.to(tl.float16, fp_downcast_rounding="rtne")
            a_lo = ((a - a_hi.to(tl.float32)) * 2048.0).to(tl.float16, fp_downcast_rounding="rtne")
            acc = _mma(w, a_hi, acc, UPCAST)
            acc2 = _mma(w, a_lo, acc2, UPCAST)
        w_ptrs += BK * stride_wk
        a_ptrs += BK * stride_ak
    if A_MODE == 2:
        acc += acc2 * (1.0 / 2048.0)
    return acc, tl.sum(sq, axis=1)


@triton.jit
def _round32(n):
    return (n + 31) // 32 * 32


@triton.jit
def _gram_program(
    t,
    sg,
    a_ptr,
    gpart_ptr,
    g3_ptr,
    cnt_ptr,
    d_in,
    rank,
    r_pad,
    stride_ar,
    stride_ak,
    scaling,
    NT,
    S_G,
    KT,
    BN: tl.constexpr,
    BK: tl.constexpr,
    A_GRAM_MODE: tl.constexpr,
    EVEN_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Gram tile ``t`` (lower block triangle, row-major), ``d_in`` split ``sg``; the last arrival finalizes it."""
    kb = 0
    while (kb + 1) * (kb + 2) // 2 <= t:
        kb += 1
    nb = t - kb * (kb + 1) // 2
    offs = tl.arange(0, BN)
    ra = kb * BN + offs
    rb = nb * BN + offs
    ra_ok = ra < rank
    rb_ok = rb < rank
    it0 = sg * KT // S_G
    it1 = (sg + 1) * KT // S_G
    offs_k = tl.arange(0, BK)
    k0 = (it0 * BK + offs_k).to(tl.int64)
    p1 = a_ptr + ra.to(tl.int64)[:, None] * stride_ar + k0[None, :] * stride_ak
    p2 = a_ptr + rb.to(tl.int64)[None, :] * stride_ar + k0[:, None] * stride_ak
    acc = tl.zeros((BN, BN), dtype=tl.float32)
    for it in range(it0, it1):
        if EVEN_K:
            x1 = tl.load(p1, mask=ra_ok[:, None], other=0.0)
            x2 = tl.load(p2, mask=rb_ok[None, :], other=0.0)
        else:
            k_ok = (it * BK + offs_k) < d_in
            x1 = tl.load(p1, mask=ra_ok[:, None] & k_ok[None, :], other=0.0)
            x2 = tl.load(p2, mask=rb_ok[None, :] & k_ok[:, None], other=0.0)
        if A_GRAM_MODE == 0:
            acc = _mma(x1, x2, acc, UPCAST)
        else:
            # fp32 A: every product of parts whose orders sum to < 3 (the "bf16x6" scheme, ~24 bits)
            h1, m1, l1 = _split3(x1)
            h2, m2, l2 = _split3(x2)
            acc = _mma(h1, h2, acc, UPCAST)
            acc = _mma(h1, m2, acc, UPCAST)
            acc = _mma(m1, h2, acc, UPCAST)
            acc = _mma(h1, l2, acc, UPCAST)
            acc = _mma(m1, m2, acc, UPCAST)
            acc = _mma(l1, h2, acc, UPCAST)
        p1 += BK * stride_ak
        p2 += BK * stride_ak
    tile = offs[:, None] * BN + offs[None, :]
    tl.store(gpart_ptr + (sg * NT + t).to(tl.int64) * (BN * BN) + tile, acc)
    tl.debug_barrier()
    ticket = tl.atomic_add(cnt_ptr + 2 + t, 1, sem="acq_rel", scope="gpu")
    if ticket == S_G - 1:
        g = tl.zeros((BN, BN), dtype=tl.float32)
        for j in range(S_G):
            g += tl.load(gpart_ptr + (j * NT + t).to(tl.int64) * (BN * BN) + tile, cache_modifier=".cg")
        g = g * tl.where(kb == nb, scaling * 0.5, scaling)
        g_hi, g_mid, g_lo = _split3(g)
        dst = ra.to(tl.int64)[:, None] * r_pad + rb[None, :]
        tl.store(g3_ptr + dst, g_hi)
        tl.store(g3_ptr + r_pad * r_pad + dst, g_mid)
        tl.store(g3_ptr + 2 * r_pad * r_pad + dst, g_lo)
        tl.atomic_xchg(cnt_ptr + 2 + t, 0, sem="relaxed", scope="gpu")
        tl.debug_barrier()
        tl.atomic_add(cnt_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _main_program(
    m,
    n,
    s,
    w_ptr,
    a_ptr,
    b_ptr,
    u_ptr,
    sumsq_ptr,
    out_ptr,
    out_sumsq_ptr,
    part_ptr,
    wpart_ptr,
    g3_ptr,
    cnt_ptr,
    d_out,
    d_in,
    rank,
    r_pad,
    stride_wm,
    stride_wk,
    stride_ar,
    stride_ak,
    stride_bm,
    stride_br,
    stride_um,
    stride_ur,
    scaling,
    eps,
    n_m,
    NR,
    S,
    NT,
    KT,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BKG: tl.constexpr,
    BG_STAGES: tl.constexpr,
    U_GIVEN: tl.constexpr,
    G_GIVEN: tl.constexpr,
    COLD: tl.constexpr,
    OUT_SUMSQ: tl.constexpr,
    SQRT: tl.constexpr,
    A_MODE: tl.constexpr,
    B_MODE: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_MN: tl.constexpr,
    UPCAST: tl.constexpr,
):
    rows = m * BM + tl.arange(0, BM)
    row_ok = rows < d_out
    rows64 = rows.to(tl.int64)
    rn = n * BN + tl.arange(0, BN)
    rn_ok = rn < rank
    rn64 = rn.to(tl.int64)
    it0 = s * KT // S
    it1 = (s + 1) * KT // S

    # 1. acc = W[rows, split] @ A[rn, split]^T (and ||W[rows, split]||^2 in the cold n == 0 programs)
    if U_GIVEN:  # W A^T came from a GEMM (gemm_weight_norm_sq): the split s == 0 program adds U's tile once
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        wsq = tl.zeros((BM,), dtype=tl.float32)
        if s == 0:
            acc = tl.load(
                u_ptr + rows64[:, None] * stride_um + rn64[None, :] * stride_ur,
                mask=row_ok[:, None] & rn_ok[None, :],
                other=0.0,
            )
    elif COLD:
        if n == 0:
            acc, wsq = _gemm_part(
                w_ptr, a_ptr, rows64, row_ok, rn64, rn_ok, d_in, stride_wm, stride_wk, stride_ar, stride_ak,
                it0, it1, BM, BN, BK, A_MODE, True, EVEN_K, EVEN_MN, UPCAST,
            )  # fmt: skip
        else:
            acc, wsq = _gemm_part(
                w_ptr, a_ptr, rows64, row_ok, rn64, rn_ok, d_in, stride_wm, stride_wk, stride_ar, stride_ak,
                it0, it1, BM, BN, BK, A_MODE, False, EVEN_K, EVEN_MN, UPCAST,
            )  # fmt: skip
    else:
        acc, wsq = _gemm_part(
            w_ptr, a_ptr, rows64, row_ok, rn64, rn_ok, d_in, stride_wm, stride_wk, stride_ar, stride_ak,
            it0, it1, BM, BN, BK, A_MODE, False, EVEN_K, EVEN_MN, UPCAST,
        )  # fmt: skip

    # 2. acc += B[rows, k] @ G''[k, rn] for this split's share of the chunks k >= n*BN (lower block triangle)
    if not G_GIVEN:  # wait for the gram programs (G_GIVEN: the fp32 G = A A^T came from a GEMM)
        done = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
        while done < NT:
            done = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
    n_chunks = (r_pad - n * BN) // BKG
    c0 = s * n_chunks // S
    c1 = (s + 1) * n_chunks // S
    offs_g = tl.arange(0, BKG)
    for c in tl.range(c0, c1, num_stages=BG_STAGES):  # a few chunks: a shallow pipeline (shared memory)
        kk = n * BN + c * BKG + offs_g
        kk64 = kk.to(tl.int64)
        b = tl.load(
            b_ptr + rows64[:, None] * stride_bm + kk64[None, :] * stride_br,
            mask=row_ok[:, None] & (kk < rank)[None, :],
            other=0.0,
        )
        if G_GIVEN:  # fp32 G [r, r]: scale the tile (s/2 on the diagonal block, s below it), split in registers
            g = tl.load(
                g3_ptr + kk64[:, None] * rank + rn64[None, :],
                mask=(kk < rank)[:, None] & rn_ok[None, :],
                other=0.0,
            )
            g_hi, g_mid, g_lo = _split3(g * tl.where(c * BKG < BN, scaling * 0.5, scaling))
        else:
            g_ptrs = g3_ptr + kk64[:, None] * r_pad + rn64[None, :]
            g_hi = tl.load(g_ptrs, cache_modifier=".cg")
            g_mid = tl.load(g_ptrs + r_pad * r_pad, cache_modifier=".cg")
            g_lo = tl.load(g_ptrs + 2 * r_pad * r_pad, cache_modifier=".cg")
        # products of parts whose orders sum to < 3: ~24 bits, fp32's own precision
        if B_MODE == 0:  # bf16 B: exact in one part
            acc = _mma(b, g_hi, acc, UPCAST)
            acc = _mma(b, g_mid, acc, UPCAST)
            acc = _mma(b, g_lo, acc, UPCAST)
        elif B_MODE == 1:  # fp16 B: exact in two bf16 parts (11 = 8 + 3 significant bits)
            b_hi, b_lo = _split2(b.to(tl.float32), tl.bfloat16)
            acc = _mma(b_hi, g_hi, acc, UPCAST)
            acc = _mma(b_hi, g_mid, acc, UPCAST)
            acc = _mma(b_hi, g_lo, acc, UPCAST)
            acc = _mma(b_lo, g_hi, acc, UPCAST)
            acc = _mma(b_lo, g_mid, acc, UPCAST)
        else:  # fp32 B
            b_hi, b_mid, b_lo = _split3(b)
            acc = _mma(b_hi, g_hi, acc, UPCAST)
            acc = _mma(b_hi, g_mid, acc, UPCAST)
            acc = _mma(b_hi, g_lo, acc, UPCAST)
            acc = _mma(b_mid, g_hi, acc, UPCAST)
            acc = _mma(b_mid, g_mid, acc, UPCAST)
            acc = _mma(b_lo, g_hi, acc, UPCAST)

    # 3. epilogue: rowsum(B[rows, rn] * acc) -> partial (n, s); no atomics on data
    bt = tl.load(
        b_ptr + rows64[:, None] * stride_bm + rn64[None, :] * stride_br,
        mask=row_ok[:, None] & rn_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    part = tl.sum(acc * bt, axis=1)
    tl.store(part_ptr + (n * S + s).to(tl.int64) * d_out + rows64, part, mask=row_ok)
    if COLD:  # noqa: SIM102 (compile-time branch around a run-time one)
        if n == 0:
            tl.store(wpart_ptr + s.to(tl.int64) * d_out + rows64, wsq, mask=row_ok)

    # 4. the last program of row tile m sums the partials in a fixed order and assembles the result
    tl.debug_barrier()
    ticket = tl.atomic_add(cnt_ptr + 2 + NT + m, 1, sem="acq_rel", scope="gpu")
    if ticket == NR * S - 1:
        cross = tl.zeros((BM,), dtype=tl.float32)
        p_ptrs = part_ptr + rows64
        for _ in range(NR * S):
            cross += tl.load(p_ptrs, mask=row_ok, other=0.0, cache_modifier=".cg")
            p_ptrs += d_out
        if COLD:
            w = tl.zeros((BM,), dtype=tl.float32)
            w_ptrs = wpart_ptr + rows64
            for _ in range(S):
                w += tl.load(w_ptrs, mask=row_ok, other=0.0, cache_modifier=".cg")
                w_ptrs += d_out
            if OUT_SUMSQ:
                tl.store(out_sumsq_ptr + rows64, w, mask=row_ok)
        else:
            w = tl.load(sumsq_ptr + rows64, mask=row_ok, other=0.0)
        res = w + (2.0 * scaling) * cross
        if SQRT:  # the engine's final norm, sqrt(max(n^2, 0)) clamped below at eps, NaN kept as NaN
            res = tl.sqrt_rn(tl.maximum(res, 0.0, propagate_nan=tl.PropagateNan.ALL))
            res = tl.maximum(res, eps, propagate_nan=tl.PropagateNan.ALL)
        tl.store(out_ptr + rows64, res, mask=row_ok)
        tl.atomic_xchg(cnt_ptr + 2 + NT + m, 0, sem="relaxed", scope="gpu")
        finished = tl.atomic_add(cnt_ptr + 1, 1, sem="acq_rel", scope="gpu")
        if finished == n_m - 1:
            # every program has passed its gram wait: reset the counters for the next launch
            tl.atomic_xchg(cnt_ptr + 1, 0, sem="relaxed", scope="gpu")
            tl.atomic_xchg(cnt_ptr, 0, sem="relaxed", scope="gpu")


# the launch-plan integers are read as scalars only: no 1/16-divisibility specializations (fewer compiles)
@triton.jit(do_not_specialize=["n_m", "NR", "S", "NT", "S_G", "KT"])
def _weight_norm_sq_kernel(
    w_ptr,
    a_ptr,
    b_ptr,
    u_ptr,
    sumsq_ptr,
    out_ptr,
    out_sumsq_ptr,
    ws_ptr,
    g_ptr,
    cnt_ptr,
    d_out,
    d_in,
    rank,
    r_pad,
    stride_wm,
    stride_wk,
    stride_ar,
    stride_ak,
    stride_bm,
    stride_br,
    stride_um,
    stride_ur,
    scaling,
    eps,
    n_m,
    NR,
    S,
    NT,
    S_G,
    KT,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BKG: tl.constexpr,
    BG_STAGES: tl.constexpr,
    U_GIVEN: tl.constexpr,
    G_GIVEN: tl.constexpr,
    COLD: tl.constexpr,
    OUT_SUMSQ: tl.constexpr,
    SQRT: tl.constexpr,
    A_MODE: tl.constexpr,
    A_GRAM_MODE: tl.constexpr,
    B_MODE: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_MN: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # the workspace's sections, laid out as NormPlan.sections() does (each 32-element aligned): cross
    # partials [NR * S, d_out], ||W||^2 partials [S, d_out] (cold launches only), gram partials
    # [S_G * NT, BN, BN], then the three bf16 parts of G''. G_GIVEN: G is the fp32 GEMM result g_ptr.
    part_ptr = ws_ptr
    wpart_ptr = part_ptr + tl.multiple_of(_round32(tl.cast(NR, tl.int64) * S * d_out), 32)
    gpart_ptr = wpart_ptr
    if COLD:
        gpart_ptr += tl.multiple_of(_round32(tl.cast(S, tl.int64) * d_out), 32)
    if G_GIVEN:
        g3_ptr = g_ptr
    else:
        g3_ptr = (gpart_ptr + tl.multiple_of(_round32(tl.cast(S_G, tl.int64) * NT * (BN * BN)), 32)).to(
            tl.pointer_type(tl.bfloat16)
        )
    pid = tl.program_id(0)
    if G_GIVEN:  # no gram programs, and none compiled in (their BN x BN accumulator sets the register count)
        n_gram = 0
    else:
        n_gram = NT * S_G
        if pid < n_gram:
            _gram_program(
                pid // S_G, pid % S_G, a_ptr, gpart_ptr, g3_ptr, cnt_ptr, d_in, rank, r_pad,
                stride_ar, stride_ak, scaling, NT, S_G, KT, BN, BK, A_GRAM_MODE, EVEN_K, UPCAST,
            )  # fmt: skip
    if pid >= n_gram:
        q = pid - n_gram
        if U_GIVEN:  # no W to share in L2: the longest B G'' programs (n == 0) first, the shortest last
            n = q // (n_m * S)
            q = q % (n_m * S)
        else:  # n fastest: the NR programs that read the same W tiles run side by side
            n = q % NR
            q = q // NR
        s = q % S
        m = q // S
        _main_program(
            m, n, s, w_ptr, a_ptr, b_ptr, u_ptr, sumsq_ptr, out_ptr, out_sumsq_ptr, part_ptr, wpart_ptr, g3_ptr,
            cnt_ptr, d_out, d_in, rank, r_pad, stride_wm, stride_wk, stride_ar, stride_ak, stride_bm,
            stride_br, stride_um, stride_ur, scaling, eps, n_m, NR, S, NT, KT, BM, BN, BK, BKG, BG_STAGES, U_GIVEN, G_GIVEN,
            COLD, OUT_SUMSQ, SQRT, A_MODE, B_MODE, EVEN_K, EVEN_MN, UPCAST,
        )  # fmt: skip


@triton.jit
def _row_sumsq_kernel(
    w_ptr,
    out_ptr,
    d_out,
    d_in,
    stride_wm,
    stride_wk,
    BM: tl.constexpr,
    BK: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    """``out[i] = sum_j W[i, j]^2`` in fp32, one program per ``BM`` rows, streaming ``d_in`` once."""
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    row_ok = rows < d_out
    offs_k = tl.arange(0, BK)
    ptrs = w_ptr + rows.to(tl.int64)[:, None] * stride_wm + offs_k.to(tl.int64)[None, :] * stride_wk
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for k0 in range(0, d_in, BK):
        if EVEN_K:
            w = tl.load(ptrs, mask=row_ok[:, None], other=0.0).to(tl.float32)
        else:
            w = tl.load(ptrs, mask=row_ok[:, None] & ((k0 + offs_k) < d_in)[None, :], other=0.0).to(tl.float32)
        acc += w * w
        ptrs += BK * stride_wk
    tl.store(out_ptr + rows, tl.sum(acc, axis=1), mask=row_ok)


# ---------------------------------------------------------------------------------------------
# launch configuration


@dataclass(frozen=True)
class NormKernelConfig:
    """Launch configuration of the norm kernel (fixed per shape, dtypes and device: no timing involved).

    ``block_m`` rows of ``d_out`` x ``block_n`` ranks per program, ``block_k`` columns of ``d_in`` per step,
    ``splits`` ranges of ``d_in`` per (row, rank) tile, ``gram_splits`` ranges of ``d_in`` per gram tile;
    ``bg_chunk`` ranks per step of the ``B G''`` loop (capped at ``block_n``), ``bg_stages`` its pipeline depth.
    """

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3
    splits: int = 1
    gram_splits: int = 1
    bg_chunk: int = 64
    bg_stages: int = 2

    def validate(self) -> None:
        if self.bg_stages < 1:
            raise ValueError(f"bg_stages={self.bg_stages} must be >= 1")
        for name in ("block_m", "block_n", "block_k", "bg_chunk"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name}={v} must be a power of two >= 16")
        if self.splits < 1 or self.gram_splits < 1:
            raise ValueError(f"splits={self.splits} and gram_splits={self.gram_splits} must be >= 1")


#: Shared memory the heuristic plans the main loop's pipeline into (sm_90 allows 227 KiB per block).
_SMEM_BUDGET = 200 * 1024
#: Largest fp32 gram-partial buffer the heuristic allows itself (bytes).
_GRAM_PARTIAL_BUDGET = 8 << 20
_MAX_SPLITS = 16


def _pow2_at_least(x: int, lo: int) -> int:
    return max(lo, 1 << max(0, (x - 1).bit_length()))


@functools.lru_cache(maxsize=1024)
def pick_config(
    d_out: int,
    d_in: int,
    rank: int,
    a_is_fp32: bool,
    num_sms: int,
    interpret: bool,
) -> NormKernelConfig:
    """The launch configuration for a shape: a pure function of its arguments (hence deterministic).

    Rank tile: the smallest power of two >= r up to 128 (so r <= 128 is one tile and W is read once).
    Row tile 128, 8 warps for 128-wide rank tiles (and fp32 adapters), as many pipeline stages as fit in
    ~200 KiB of shared memory (at most 4). ``splits`` cuts ``d_in`` so the main programs fill the SMs in
    nearly whole waves (each split keeps >= 8 k-steps); ``gram_splits`` keeps each gram program shorter
    than half a main program so the gram tiles are final before the first main program needs them.
    """
    block_n = min(128, _pow2_at_least(rank, 16))
    if interpret:
        # the CPU interpreter: few, small programs
        block_m = 32 if d_out > 16 else 16
        block_n = min(block_n, 64)
        return NormKernelConfig(block_m, block_n, 32, 4, 1, 1, 1)
    # 128-row tiles everywhere (64-row tiles spill at 4 warps and need too much shared memory for fp32 A,
    # checked on sm_90 cubins): small d_out is filled by splitting d_in instead
    block_m = 128
    block_k = 64
    num_warps = 8 if block_n >= 128 or (a_is_fp32 and block_n >= 32) else 4
    a_bytes = 4 if a_is_fp32 else 2
    stage_bytes = block_m * block_k * 2 + block_k * block_n * a_bytes
    split_bytes = 3 * block_k * block_n * 2 if a_is_fp32 else 0  # the bf16 parts of the A tile
    num_stages = max(2, min(4, (_SMEM_BUDGET - split_bytes) // stage_bytes))
    n_m = triton.cdiv(d_out, block_m)
    nr = triton.cdiv(rank, block_n)
    k_steps = triton.cdiv(d_in, block_k)
    tiles = n_m * nr
    best, best_score = 1, -1.0
    # measured on an H200 (benchmarks/tune_norm.py --sweep, r=384/768): once 128-wide rank tiles fill half
    # the SMs, a split shorter than 64 k-steps costs more in partial sums and gram waits than it wins in
    # wave filling; fewer tiles keep splitting down to 8 k-steps (too few programs to stream W otherwise)
    min_steps = 64 if block_n >= 128 and tiles * 2 >= num_sms else 8
    for splits in range(1, _MAX_SPLITS + 1):
        if splits > 1 and k_steps // splits < min_steps:
            break
        programs = tiles * splits
        waves = triton.cdiv(programs, num_sms)
        score = programs / (waves * num_sms) - 0.02 * (splits - 1)
        if score > best_score + 1e-9:
            best, best_score = splits, score
    splits = best
    # gram programs (BN x BN tiles) must finish well before the main programs need G'': at most a quarter of
    # a main program's k-steps and of its tensor-core work (fp32 A: 6 dots per gram step, 3 per main step);
    # a quarter rather than a half measured 4-11% faster at the shapes (tune_norm.py --sweep, BN=128)
    dots_gram = 6 if a_is_fp32 else 1
    dots_main = 3 if a_is_fp32 else 1
    main_steps = max(1, k_steps // splits)
    share = 4 if block_n >= 128 else 2  # narrower rank tiles: the earlier half, not re-measured
    gram_steps_max = max(
        1, min(main_steps // share, (main_steps * block_m * dots_main) // (share * block_n * dots_gram))
    )
    gram_splits = max(1, min(k_steps, triton.cdiv(k_steps, gram_steps_max)))
    nt = nr * (nr + 1) // 2
    cap = max(1, _GRAM_PARTIAL_BUDGET // (nt * block_n * block_n * 4))
    gram_splits = max(1, min(gram_splits, cap, _MAX_SPLITS * 2))
    return NormKernelConfig(block_m, block_n, block_k, num_warps, num_stages, splits, gram_splits)


@functools.lru_cache(maxsize=1024)
def pick_finish_config(
    d_out: int, d_in: int, rank: int, num_sms: int, interpret: bool, gram_programs: bool = False
) -> NormKernelConfig:
    """Launch configuration of the kernel's ``U_GIVEN`` mode (:func:`gemm_weight_norm_sq`): pure function.

    The main programs have no loop over ``d_in`` (U came from a GEMM), only the ``B G''`` chunks of each
    (row, rank) tile: ``splits`` cuts them into up to 4 programs until the programs fill the SMs. With G from
    a GEMM (the default) no gram programs are compiled in, which leaves room for 4 warps and a 3-deep
    32-wide ``B G''`` pipeline (two programs per SM). With ``gram_programs``, those (the only ``d_in`` loops
    left) split ``d_in`` into ``~sqrt(k_steps / 2)`` ranges, balancing a program's k-steps against the
    ``S_G`` partial tiles its tile's last arrival sums, at most one wave.
    """
    block_n = min(128, _pow2_at_least(rank, 16))
    if interpret:
        block_m = 32 if d_out > 16 else 16
        return NormKernelConfig(block_m, min(block_n, 64), 32, 4, 1, 1, 1)
    block_m, block_k = 128, 64
    n_m = triton.cdiv(d_out, block_m)
    nr = triton.cdiv(rank, block_n)
    if gram_programs:
        # 8 warps for 128-wide tiles: 4 spill registers on sm_90 with the gram programs compiled in
        # (tests/kernels/_row_norm_aot.py), which this kernel does not accept
        num_warps, bg_chunk, bg_stages = (8 if block_n >= 128 else 4), 64, 2
    else:
        # measured on an H200 (tune_norm.py --finish-sweep, gpu-logs/s11): 4 warps with 32 x 3 against
        # 8 warps with 64 x 2, whole path: 124 vs 130 us at 14336x4096, 98 vs 106 us at 4096x14336 r384
        num_warps, bg_chunk, bg_stages = 4, 32, 3
    chunks = max(1, block_n // min(block_n, bg_chunk))  # B G'' chunks of the last (shortest) rank tile
    splits = 1
    while n_m * nr * splits < num_sms and splits < 4 and splits < chunks * nr:
        splits += 1
    k_steps = triton.cdiv(d_in, block_k)
    nt = nr * (nr + 1) // 2
    gram_splits = max(1, round(math.sqrt(k_steps / 2)))
    cap = _GRAM_PARTIAL_BUDGET // (nt * block_n * block_n * 4)
    gram_splits = max(1, min(gram_splits, num_sms // nt, cap, _MAX_SPLITS, k_steps))
    return NormKernelConfig(block_m, block_n, block_k, num_warps, 3, splits, gram_splits, bg_chunk, bg_stages)


@dataclass(frozen=True)
class NormPlan:
    """Everything a launch derives from (shape, config): grid layout and workspace sizes."""

    config: NormKernelConfig
    d_out: int
    row_tiles: int
    rank_tiles: int
    r_pad: int
    k_steps: int
    splits: int
    gram_splits: int
    gram_tiles: int
    gram_chunk: int
    #: launch constants per (d_in, rank, mode, dtypes), filled by ``_launch`` (not part of the plan's identity)
    launch_cache: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def build(cls, d_out: int, d_in: int, rank: int, cfg: NormKernelConfig) -> NormPlan:
        cfg.validate()
        rank_tiles = triton.cdiv(rank, cfg.block_n)
        k_steps = triton.cdiv(d_in, cfg.block_k)
        return cls(
            config=cfg,
            d_out=d_out,
            row_tiles=triton.cdiv(d_out, cfg.block_m),
            rank_tiles=rank_tiles,
            r_pad=rank_tiles * cfg.block_n,
            k_steps=k_steps,
            splits=max(1, min(cfg.splits, k_steps)),
            gram_splits=max(1, min(cfg.gram_splits, k_steps)),
            gram_tiles=rank_tiles * (rank_tiles + 1) // 2,
            gram_chunk=min(cfg.block_n, cfg.bg_chunk),
        )

    @property
    def programs(self) -> int:
        return self.gram_tiles * self.gram_splits + self.row_tiles * self.rank_tiles * self.splits

    def sections(self, cold: bool, g_given: bool = False) -> tuple[int, int, int, int]:
        """fp32 elements of the workspace's four sections, in order (the kernel derives the same offsets):
        cross partials, ``||W||^2`` partials (cold only), gram partials and the bf16 ``G''`` parts (both
        absent in ``G_GIVEN`` mode, whose G comes from a GEMM). Each starts 128-byte aligned."""
        bn = self.config.block_n
        n_part = self.rank_tiles * self.splits * self.d_out
        n_wpart = self.splits * self.d_out if cold else 0
        n_gpart = 0 if g_given else self.gram_splits * self.gram_tiles * bn * bn
        n_g = 0 if g_given else (3 * self.r_pad * self.r_pad + 1) // 2  # three bf16 matrices (hi, mid, lo)
        return tuple(-(-n // 32) * 32 for n in (n_part, n_wpart, n_gpart, n_g))

    def workspace_elements(self, cold: bool, g_given: bool = False) -> int:
        """fp32 elements of the one workspace a launch allocates (besides the ``[d_out]`` result)."""
        return sum(self.sections(cold, g_given))

    def workspace_bytes(self, cold: bool, g_given: bool = False) -> int:
        """Bytes a launch allocates: the workspace plus the fp32 ``[d_out]`` result (no ``d_in`` term)."""
        return 4 * (self.workspace_elements(cold, g_given) + self.d_out)


@functools.lru_cache(maxsize=1024)
def _default_plan(d_out: int, d_in: int, rank: int, a_is_fp32: bool, num_sms: int, interpret: bool) -> NormPlan:
    return NormPlan.build(d_out, d_in, rank, pick_config(d_out, d_in, rank, a_is_fp32, num_sms, interpret))


@functools.lru_cache(maxsize=1024)
def _finish_plan(d_out: int, d_in: int, rank: int, num_sms: int, interpret: bool, gram_programs: bool) -> NormPlan:
    cfg = pick_finish_config(d_out, d_in, rank, num_sms, interpret, gram_programs)
    return NormPlan.build(d_out, d_in, rank, cfg)


def plan_for(
    d_out: int,
    d_in: int,
    rank: int,
    *,
    a_is_fp32: bool,
    device: torch.device | str = "cuda",
    num_sms: int | None = None,
) -> NormPlan:
    """The plan :func:`triton_weight_norm_sq` uses for a shape (for tests, benchmarks and memory accounting)."""
    device = torch.device(device)
    sms = num_sms if num_sms is not None else _num_sms(device)
    interpret = device.type != "cuda"
    return _default_plan(d_out, d_in, rank, a_is_fp32, sms, interpret)


@functools.lru_cache(maxsize=16)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


# ---------------------------------------------------------------------------------------------
# host functions


def _check_device(t: torch.Tensor) -> bool:
    """True when launching on ``t``'s device runs the interpreter (CPU tensors)."""
    interpret = config.triton_interpreter_active()
    if t.device.type != "cuda" and not interpret:
        raise ValueError(f"the Triton norm kernels need CUDA tensors (or TRITON_INTERPRET=1); got {t.device}")
    return interpret


def triton_row_sumsq(weight: torch.Tensor) -> torch.Tensor:
    """``||W||^2`` per row in fp32: ``weight`` is ``[d_out, d_in]`` (fp16/bf16/fp32, any strides).

    Returns a new fp32 ``[d_out]`` tensor. One launch, one read of W, no temporaries.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    _check_device(weight)
    d_out, d_in = weight.shape
    if d_out == 0 or d_in == 0:
        return torch.zeros(d_out, dtype=torch.float32, device=weight.device)
    out = torch.empty(d_out, dtype=torch.float32, device=weight.device)
    block_m = 32
    block_k = 128
    if weight.stride(0) == 1 and weight.stride(1) != 1:  # transposed view: rows are the contiguous dim
        block_m, block_k = 128, 32
    _row_sumsq_kernel[(triton.cdiv(d_out, block_m),)](
        weight,
        out,
        d_out,
        d_in,
        weight.stride(0),
        weight.stride(1),
        BM=block_m,
        BK=block_k,
        EVEN_K=d_in % block_k == 0,
        num_warps=4,
    )
    return out


def _finish_on_host(norm_sq: torch.Tensor, eps: float) -> torch.Tensor:
    """``max(sqrt(max(n^2, 0)), eps)`` of an fp32 ``[d_out]`` vector outside the kernel (the no-product cases),
    with the kernel's correctly rounded sqrt on every device: the sqrt is taken in fp64 and rounded once
    (exact for fp32), since some CPU builds' vectorized fp32 sqrt is off by an ulp. NaN stays NaN."""
    return norm_sq.clamp_min(0).double().sqrt_().float().clamp_min_(eps)


def _validate(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    if weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError("weight, lora_A and lora_B must be 2-D")
    d_out, d_in = weight.shape
    rank = lora_A.shape[0]
    if lora_A.shape[1] != d_in or lora_B.shape != (d_out, rank):
        raise ValueError(
            f"shape mismatch: W {tuple(weight.shape)}, A {tuple(lora_A.shape)}, B {tuple(lora_B.shape)}; "
            "expected A [r, d_in] and B [d_out, r]"
        )
    if weight.dtype not in _HALF:
        raise ValueError(f"the tensor-core norm takes fp16/bf16 W, got {weight.dtype}")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if t.dtype not in (weight.dtype, torch.float32):
            raise ValueError(f"{name} dtype {t.dtype}: must be W's dtype ({weight.dtype}) or fp32")
        if t.device != weight.device:
            raise ValueError(f"{name} is on {t.device}, W on {weight.device}")


def _as_sumsq(cached_sumsq: torch.Tensor | None, d_out: int, device: torch.device) -> torch.Tensor | None:
    """``cached_sumsq`` checked for shape and made a contiguous fp32 vector on ``device`` (or None)."""
    if cached_sumsq is None:
        return None
    if cached_sumsq.shape != (d_out,):
        raise ValueError(f"cached_sumsq must be [{d_out}], got {tuple(cached_sumsq.shape)}")
    if cached_sumsq.dtype != torch.float32 or cached_sumsq.device != device or cached_sumsq.stride(0) != 1:
        cached_sumsq = cached_sumsq.to(device=device, dtype=torch.float32).contiguous()
    return cached_sumsq


def triton_weight_norm_sq(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    cached_sumsq: torch.Tensor | None = None,
    out_sumsq: torch.Tensor | None = None,
    eps: float | None = None,
    kernel_config: NormKernelConfig | None = None,
) -> torch.Tensor:
    """Squared row norm of ``W + scaling * B @ A`` in fp32, not clamped (may hold tiny negatives).

    Args:
        weight: ``W`` ``[d_out, d_in]`` fp16/bf16, any strides (``W.T`` views welcome).
        lora_A: ``A`` ``[r, d_in]`` in W's dtype or fp32, any strides.
        lora_B: ``B`` ``[d_out, r]`` in W's dtype or fp32, any strides.
        scaling: ``s`` (0, negative and large values are fine).
        cached_sumsq: fp32 ``[d_out]`` ``||W||^2_row`` from an earlier call; the kernel then spends no work on
            ``||W||^2``. Without it, ``||W||^2`` comes from the same pass over W that computes ``W A^T``.
        out_sumsq: optional fp32 ``[d_out]`` buffer that receives the ``||W||^2`` a cold call computes (for a
            cache: a later call with ``cached_sumsq=out_sumsq`` returns bitwise the same result).
        eps: if given, return the finished norm ``max(sqrt(max(n^2, 0)), eps)`` (the engine's clamp, fused
            into the same launch, NaN preserved) instead of ``n^2``.
        kernel_config: launch configuration override (tests, tuning); default :func:`pick_config`.

    Returns:
        fp32 ``[d_out]``. One kernel launch (plus a one-time counter allocation per device and stream);
        ``s == 0`` or ``r == 0`` needs no product at all.
    """
    interpret = _check_device(weight)
    _validate(weight, lora_A, lora_B)
    d_out, d_in = weight.shape
    rank = lora_A.shape[0]
    device = weight.device
    cached_sumsq = _as_sumsq(cached_sumsq, d_out, device)
    if out_sumsq is not None and (
        out_sumsq.shape != (d_out,) or out_sumsq.dtype != torch.float32 or not out_sumsq.is_contiguous()
    ):
        raise ValueError(f"out_sumsq must be a contiguous fp32 [{d_out}] tensor")
    scaling = float(scaling)

    if d_out == 0:
        return torch.zeros(0, dtype=torch.float32, device=device)
    if scaling == 0.0 or rank == 0 or d_in == 0:
        if cached_sumsq is not None:
            res = cached_sumsq.clone()
        else:
            res = triton_row_sumsq(weight)
            if out_sumsq is not None:
                out_sumsq.copy_(res)
        return res if eps is None else _finish_on_host(res, eps)

    a_is_fp32 = lora_A.dtype == torch.float32
    if kernel_config is None:
        plan = _default_plan(d_out, d_in, rank, a_is_fp32, _num_sms(device), interpret)
    else:
        plan = NormPlan.build(d_out, d_in, rank, kernel_config)
    cold = cached_sumsq is None
    out = _launch(plan, weight, lora_A, lora_B, None, cached_sumsq, out_sumsq, scaling, eps, interpret)
    if out_sumsq is not None and not cold:
        out_sumsq.copy_(cached_sumsq)
    return out


def _launch(
    plan: NormPlan,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    u: tuple[torch.Tensor, torch.Tensor | None] | None,
    cached_sumsq: torch.Tensor | None,
    out_sumsq: torch.Tensor | None,
    scaling: float,
    eps: float | None,
    interpret: bool,
) -> torch.Tensor:
    """One launch of ``_weight_norm_sq_kernel`` for validated operands; returns the fp32 ``[d_out]`` result.

    ``u`` (``U_GIVEN`` mode, needs ``cached_sumsq``): the fp32 GEMM results ``(W A^T [d_out, r] contiguous,
    A A^T [r, r] contiguous or None)``. With a G (``G_GIVEN``) the launch has no gram programs; without
    one its gram programs compute ``G''`` as in the one-pass mode.
    """
    device = weight.device
    d_out, d_in = weight.shape
    rank = lora_A.shape[0]
    cold = cached_sumsq is None
    u_given = u is not None
    g_given = u_given and u[1] is not None
    # everything _launch_constants reads besides the plan (a plan is shared by W dtypes and modes)
    key = (
        weight.dtype,
        lora_A.dtype,
        lora_B.dtype,
        d_in,
        rank,
        u_given,
        g_given,
        cold,
        out_sumsq is not None,
        eps is not None,
        interpret,
    )
    launch = plan.launch_cache.get(key)
    if launch is None:
        launch = plan.launch_cache[key] = _launch_constants(plan, *key)
    programs, ws_elements, constants = launch
    ws = torch.empty(ws_elements, dtype=torch.float32, device=device)
    out = torch.empty(d_out, dtype=torch.float32, device=device)
    counters = ticket_buffer(device, 2 + plan.gram_tiles + plan.row_tiles)
    u_mat = u[0] if u_given else out
    gram = u[1] if g_given else ws
    _weight_norm_sq_kernel[(programs,)](
        weight,
        lora_A,
        lora_B,
        u_mat,
        out if cold else cached_sumsq,
        out,
        out if out_sumsq is None else out_sumsq,
        ws,
        gram,
        counters,
        d_out,
        d_in,
        rank,
        plan.r_pad,
        weight.stride(0),
        weight.stride(1),
        lora_A.stride(0),
        lora_A.stride(1),
        lora_B.stride(0),
        lora_B.stride(1),
        u_mat.stride(0) if u_given else 0,
        1,
        scaling,
        0.0 if eps is None else float(eps),
        plan.row_tiles,
        plan.rank_tiles,
        plan.splits,
        0 if g_given else plan.gram_tiles,  # G from a GEMM: no gram programs
        plan.gram_splits,
        plan.k_steps,
        **constants,
    )
    return out


def _launch_constants(
    plan: NormPlan,
    w_dtype: torch.dtype,
    a_dtype: torch.dtype,
    b_dtype: torch.dtype,
    d_in: int,
    rank: int,
    u_given: bool,
    g_given: bool,
    cold: bool,
    out_sumsq: bool,
    sqrt: bool,
    interpret: bool,
) -> tuple[int, int, dict[str, int | bool]]:
    """Grid size, workspace elements and compile-time arguments of a launch (cached per plan by ``_launch``)."""
    cfg = plan.config
    if a_dtype == w_dtype:
        a_mode = 0
    elif w_dtype == torch.bfloat16:
        a_mode = 1
    else:
        a_mode = 2
    gram_programs = 0 if g_given else plan.gram_tiles * plan.gram_splits
    programs = plan.row_tiles * plan.rank_tiles * plan.splits + gram_programs
    constants = dict(
        BM=cfg.block_m,
        BN=cfg.block_n,
        BK=cfg.block_k,
        BKG=plan.gram_chunk,
        BG_STAGES=cfg.bg_stages,
        U_GIVEN=u_given,
        G_GIVEN=g_given,
        COLD=cold,
        OUT_SUMSQ=cold and out_sumsq,
        SQRT=sqrt,
        A_MODE=a_mode,
        A_GRAM_MODE=1 if a_dtype == torch.float32 else 0,
        B_MODE={torch.bfloat16: 0, torch.float16: 1}.get(b_dtype, 2),
        EVEN_K=d_in % cfg.block_k == 0,
        EVEN_MN=plan.d_out % cfg.block_m == 0 and rank % cfg.block_n == 0,
        UPCAST=interpret,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return programs, plan.workspace_elements(cold, g_given), constants


def gemm_supported(device: torch.device) -> bool:
    """True when :func:`gemm_weight_norm_sq` can get an fp32 ``W A^T`` from half inputs on ``device``.

    CUDA: ``torch.mm(..., out_dtype=torch.float32)`` (PyTorch >= 2.9, cuBLAS with fp32 output). The CPU
    (Triton's interpreter, tests) multiplies the fp32 upcasts instead: the same exact products.
    """
    from ..dispatch.rules import mm_out_dtype_available

    return device.type != "cuda" or mm_out_dtype_available()


def matmul_fp32(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x @ y^T`` in fp32 from half ``x`` ``[m, k]`` and ``y`` ``[n, k]`` (``W A^T``, ``A A^T``): contiguous ``[m, n]``.

    On CUDA one cuBLAS GEMM on tensor cores with fp32 accumulation and fp32 output (the operands are never
    upcast in memory); on the CPU (tests only) the product of the fp32 upcasts.
    """
    if x.device.type == "cuda":
        return torch.mm(x, y.t(), out_dtype=torch.float32)
    return torch.mm(x.float(), y.float().t())


def gemm_weight_norm_sq(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    cached_sumsq: torch.Tensor | None = None,
    eps: float | None = None,
    kernel_config: NormKernelConfig | None = None,
    gram_from_gemm: bool = True,
) -> torch.Tensor:
    """:func:`triton_weight_norm_sq` with ``W A^T`` from a GEMM: for half ``A`` and ``B`` in ``W``'s dtype.

    Two GEMMs (:func:`matmul_fp32`: the fp32 ``U = W A^T`` and ``G = A A^T``), then one launch of the norm
    kernel in its ``U_GIVEN`` + ``G_GIVEN`` mode: each (row, rank) tile loads its U tile, adds ``B G''`` on
    tensor cores (``G''``: the scaled lower block triangle of G, split into bf16 parts in registers), and the
    row sums and the assembly follow exactly as in the one-pass kernel (fixed summation orders). Without
    ``cached_sumsq``, ``||W||^2`` comes from :func:`triton_row_sumsq` (a second pass over W).

    ``gram_from_gemm=False``: no second GEMM; gram programs in the same launch compute ``G''`` as in the
    one-pass mode (measured slower or even at every issue shape on an H200, ``gpu-logs/s11``; kept for
    comparison and tests).

    Args and returns: as :func:`triton_weight_norm_sq`; ``lora_A`` and ``lora_B`` must have W's dtype.
    Extra memory: ``U`` (``4 * d_out * r`` bytes, ``+ 4 r^2`` for a GEMM's G) besides the kernel's workspace.
    """
    interpret = _check_device(weight)
    _validate(weight, lora_A, lora_B)
    if lora_A.dtype != weight.dtype or lora_B.dtype != weight.dtype:
        raise ValueError(
            f"gemm_weight_norm_sq takes A and B in W's dtype ({weight.dtype}); got {lora_A.dtype}/{lora_B.dtype} "
            "(fp32 adapters: use triton_weight_norm_sq)"
        )
    if not gemm_supported(weight.device):
        raise RuntimeError("torch.mm(..., out_dtype=torch.float32) needs PyTorch >= 2.9; use triton_weight_norm_sq")
    d_out, d_in = weight.shape
    rank = lora_A.shape[0]
    device = weight.device
    scaling = float(scaling)
    cached_sumsq = _as_sumsq(cached_sumsq, d_out, device)
    if d_out == 0:
        return torch.zeros(0, dtype=torch.float32, device=device)
    sumsq = cached_sumsq if cached_sumsq is not None else triton_row_sumsq(weight)
    if scaling == 0.0 or rank == 0 or d_in == 0:
        res = sumsq.clone() if sumsq is cached_sumsq else sumsq
        return res if eps is None else _finish_on_host(res, eps)
    if kernel_config is None:
        plan = _finish_plan(d_out, d_in, rank, _num_sms(device), interpret, not gram_from_gemm)
    else:
        plan = NormPlan.build(d_out, d_in, rank, kernel_config)
    u = (matmul_fp32(weight, lora_A), matmul_fp32(lora_A, lora_A) if gram_from_gemm else None)
    return _launch(plan, weight, lora_A, lora_B, u, sumsq, None, scaling, eps, interpret)
