"""The tensor-core factored row norm kernel: ``||W + s*B@A||^2_row``, fp32 throughout.

    ||W + s B A||^2_row = ||W||^2_row + 2s * rowsum(B * (W A^T)) + s^2 * rowsum((B (A A^T)) * B)

The PyTorch reference of the same maths is :func:`dorafactors.kernels.row_norm_reference.factored_row_norm_sq`.

Design (``_weight_norm_sq_kernel``: two kinds of programs, numbered ``pid = program id + pid_base``; the
host launches the gram programs and the main programs as two launches of the same kernel, see
"Synchronization"):

* **Gram programs** (``pid < NT * S_G``). ``G = A A^T`` is needed only as its lower block
  triangle (``NT = NR (NR + 1) / 2`` tiles of ``BN x BN``, ``NR = ceil(r / BN)``), each tile split over
  ``S_G`` ranges of ``d_in``. Each program writes an fp32 partial tile; the last of a tile's ``S_G`` programs
  to arrive (an integer ticket) sums the partials in a fixed order, scales the tile by ``s/2`` (diagonal
  tiles) or ``s`` (below the diagonal), splits it into three bf16 parts ``hi + mid + lo`` (24 significant
  bits: fp32's own precision) and bumps a "gram done" counter.
* **Main programs** (the rest), one per (row tile ``m`` of ``d_out``, rank tile ``n``, ``d_in`` split ``s``),
  ``n`` fastest so the ``NR`` programs reading the same W tiles run side by side and share them in L2.
  Each accumulates ``acc = W_tile A_tile^T`` over its ``d_in`` range on tensor cores with fp32 accumulation
  (half-precision W goes from global to shared memory to the MMA as is: it is never upcast in memory).
  It then checks the gram counter (complete: the gram launch ran first) and adds its share of ``sum_{k >= n} B[:, k] G''[k, n]`` (``G''`` being the scaled
  lower block triangle), so that ``rowsum(B[:, n] * acc)`` summed over ``n`` and the splits is
  ``c + (s/2) b`` with ``c = rowsum(B * (W A^T))`` and ``b = rowsum((B G) * B)``: the symmetric gram term
  costs ``NR (NR + 1) / 2`` instead of ``NR^2`` tile products. The epilogue multiplies by the fp32 B tile,
  reduces the rows and stores one fp32 partial per (n, s): no atomics on data. The last program of a row
  tile to arrive sums those partials in a fixed order and writes ``||W||^2 + 2s (c + (s/2) b)``. Without
  ``cached_sumsq`` the ``n == 0`` programs also square the W tiles they already hold in shared memory
  ("one pass over W"); with it, no work at all is spent on ``||W||^2``.

``FROM_GEMM`` mode (:func:`gemm_weight_norm_sq`): ``U = W A^T`` and ``G = A A^T`` come from fp32-output
GEMMs (cuBLAS). There are no gram programs (none compiled in); the main programs load their U tile instead
of looping over ``d_in``, run longest first (``n == 0``), and load, scale and split their chunks of the fp32
G in registers.

``PROBE`` mode (with the final ``SQRT``): the engine's non-finite row repair (``norm/engine.py``) in the same
launches, instead of five small PyTorch launches after them. The host gives ``||A_k||`` (fp32, one launch), the
``s == 0`` main programs store their tile's ``sum_k |B_ik| ||A_k||``, and the row assembly adds those partials
in a fixed order (and ``||W||^2`` where ``W`` is not known to be finite) and keeps the norm only where that
probe is finite.

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
not ``cached_sumsq`` is given: a warm call differs from a cold one only by the ``||W||^2`` it adds.

Working set: the kernel allocates nothing proportional to ``d_in``: fp32 partials
``(NR * S + S) * d_out`` (``S`` <= 16 splits), the gram partials ``S_G * NT * BN^2`` fp32 (capped at 8 MiB
by the heuristic) and the three ``r_pad x r_pad`` bf16 parts of ``G''``, plus the ``[d_out]`` result
(:meth:`NormLaunchPlan.workspace_bytes`). There is therefore no ``d_in`` chunking to do:
``PEFT_DORA_NORM_CHUNK_MB`` bounds the PyTorch reference only.

Synchronization uses a small int32 ticket buffer per (device, stream) that the kernel itself resets to zero
before it finishes, so consecutive launches (CUDA graphs included) reuse it without a memset. No program
waits on another program of its own launch: the gram programs run in a launch of their own (``pid_base``
0) and the main programs in the next launch on the same stream (``pid_base = NT * S_G``), so stream order
guarantees ``G''`` is complete before any main program starts, whatever order the hardware starts a grid's
blocks in (CUDA does not promise program-id order: MPS, concurrent streams, partial residency). The main
programs' check of the gram counter is a guard that passes at once. The row-tile and gram-tile tickets are
"last to arrive sums" schemes: nobody waits on them. ``FROM_GEMM`` launches have no gram programs.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["_row_sumsq_kernel", "_weight_norm_sq_kernel"]


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
def _load_k_step(left_ptrs, right_ptrs, left_ok, right_ok, it, d_in, offs_k, BK: tl.constexpr, EVEN_K: tl.constexpr):
    """k-step ``it`` of a left ``[M, BK]`` and a right ``[BK, N]`` operand, zero outside ``left_ok`` (rows),
    ``right_ok`` (columns) and ``d_in``."""
    if EVEN_K:
        left = tl.load(left_ptrs, mask=left_ok[:, None], other=0.0)
        right = tl.load(right_ptrs, mask=right_ok[None, :], other=0.0)
    else:
        k_ok = (it * BK + offs_k) < d_in
        left = tl.load(left_ptrs, mask=left_ok[:, None] & k_ok[None, :], other=0.0)
        right = tl.load(right_ptrs, mask=right_ok[None, :] & k_ok[:, None], other=0.0)
    return left, right


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
        else:
            w, a = _load_k_step(w_ptrs, a_ptrs, row_ok, rn_ok, it, d_in, offs_k, BK, EVEN_K)
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
    """Gram tile ``t`` (lower block triangle, row-major), ``d_in`` split ``sg``; the last arrival finalizes it.

    No work beside the tile's dots in the pipelined loop: summing the squares of the loaded ``A`` tile there
    (for the non-finite row probe's ``||A_k||``) made the one-pass norm wrong and non-deterministic on sm_90
    (a tile read by the MMA and by a register computation at once); the host computes ``||A_k||`` instead."""
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
        x1, x2 = _load_k_step(p1, p2, ra_ok, rb_ok, it, d_in, offs_k, BK, EVEN_K)
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
def _cross_tile(
    n, s, w_ptr, a_ptr, u_ptr, rows64, row_ok, rn64, rn_ok, d_in, stride_wm, stride_wk, stride_ar, stride_ak,
    stride_um, stride_ur, KT, S,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, FROM_GEMM: tl.constexpr, COLD: tl.constexpr,
    A_MODE: tl.constexpr, EVEN_K: tl.constexpr, EVEN_MN: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """``(W[rows, split] @ A[rn, split]^T, ||W[rows, split]||^2)``, fp32 ``[BM, BN]`` and ``[BM]``.

    ``||W||^2`` is computed only by the cold ``n == 0`` programs (zeros otherwise). ``FROM_GEMM``: ``W A^T``
    came from a GEMM (``u_ptr``), and the split ``s == 0`` program adds U's tile once.
    """
    it0 = s * KT // S
    it1 = (s + 1) * KT // S
    if FROM_GEMM:
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
    return acc, wsq


@triton.jit
def _add_gram_term(
    acc, n, s, b_ptr, g3_ptr, rows64, row_ok, rn64, rn_ok, rank, r_pad, stride_bm, stride_br, scaling, S,
    BN: tl.constexpr, BKG: tl.constexpr, BG_STAGES: tl.constexpr, FROM_GEMM: tl.constexpr,
    B_MODE: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """``acc + B[rows, k] @ G''[k, rn]`` for split ``s``'s share of the chunks ``k >= n * BN`` (``G''``: the
    scaled lower block triangle of ``A A^T``; its bf16 parts in ``g3_ptr``, or ``FROM_GEMM``: the fp32 G).

    Only products of parts whose orders sum to < 3 are kept: ~24 bits, fp32's own precision.
    """
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
        if FROM_GEMM:  # fp32 G [r, r]: scale the tile (s/2 on the diagonal block, s below it), split in registers
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
    return acc


@triton.jit
def _assemble_rows(
    rows64, row_ok, sumsq_ptr, out_ptr, part_ptr, wpart_ptr, pprobe_ptr, probe_w, d_out, scaling, eps, NR, S,
    BM: tl.constexpr, COLD: tl.constexpr, SQRT: tl.constexpr, PROBE: tl.constexpr,
):  # fmt: skip
    """The last program of a row tile: ``||W||^2 + 2s * cross`` from the partials, summed in a fixed order.

    ``PROBE`` (with ``SQRT``): rows whose ``W + s B A`` is not finite get the dense row's class, the engine's
    ``_dense_class_of_nonfinite_rows`` in the same store: ``probe = sum_k |B_ik| ||A_k||`` (the ``NR`` partials
    of the ``s == 0`` programs, in a fixed order), plus ``||W||^2`` where ``probe_w`` says ``W`` is not known
    to be finite; a probe that is not ``< inf`` (+inf or NaN) replaces the norm."""
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
    else:
        w = tl.load(sumsq_ptr + rows64, mask=row_ok, other=0.0)
    res = w + (2.0 * scaling) * cross
    if SQRT:  # the engine's final norm, sqrt(max(n^2, 0)) clamped below at eps, NaN kept as NaN
        res = tl.sqrt_rn(tl.maximum(res, 0.0, propagate_nan=tl.PropagateNan.ALL))
        res = tl.maximum(res, eps, propagate_nan=tl.PropagateNan.ALL)
    if PROBE:
        probe = tl.zeros((BM,), dtype=tl.float32)
        q_ptrs = pprobe_ptr + rows64
        for _ in range(NR):
            probe += tl.load(q_ptrs, mask=row_ok, other=0.0, cache_modifier=".cg")
            q_ptrs += d_out
        if probe_w != 0:
            probe += w
        # every term is >= 0, +inf or NaN: "probe < inf" is "probe is finite" (NaN compares false)
        res = tl.where(probe < float("inf"), res, probe)
    tl.store(out_ptr + rows64, res, mask=row_ok)


@triton.jit
def _load_b_tile(b_ptr, rows64, row_ok, rn64, rn_ok, stride_bm, stride_br):
    """``B[rows, rn]`` as fp32 ``[BM, BN]``, zero outside ``d_out x rank``."""
    return tl.load(
        b_ptr + rows64[:, None] * stride_bm + rn64[None, :] * stride_br,
        mask=row_ok[:, None] & rn_ok[None, :],
        other=0.0,
    ).to(tl.float32)


@triton.jit
def _main_program(
    m, n, s, w_ptr, a_ptr, b_ptr, u_ptr, sumsq_ptr, out_ptr, part_ptr, wpart_ptr, g3_ptr, cnt_ptr,
    pprobe_ptr, arow_ptr, probe_w,
    d_out, d_in, rank, r_pad, stride_wm, stride_wk, stride_ar, stride_ak, stride_bm, stride_br, stride_um,
    stride_ur, scaling, eps, n_m, NR, S, NT, KT,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BKG: tl.constexpr, BG_STAGES: tl.constexpr,
    FROM_GEMM: tl.constexpr, COLD: tl.constexpr, SQRT: tl.constexpr, A_MODE: tl.constexpr,
    B_MODE: tl.constexpr, EVEN_K: tl.constexpr, EVEN_MN: tl.constexpr, UPCAST: tl.constexpr,
    PROBE: tl.constexpr,
):  # fmt: skip
    """Row tile ``m``, rank tile ``n``, ``d_in`` split ``s``: its partial of ``c + (s/2) b`` (module docstring)."""
    rows = m * BM + tl.arange(0, BM)
    row_ok = rows < d_out
    rows64 = rows.to(tl.int64)
    rn = n * BN + tl.arange(0, BN)
    rn_ok = rn < rank
    rn64 = rn.to(tl.int64)

    # 0. PROBE: this rank tile's share of sum_k |B_ik| ||A_k|| (elementwise: 0 * inf stays NaN), first, while
    # no accumulator holds registers (in the epilogue beside acc it spills)
    if PROBE:  # noqa: SIM102 (compile-time branch around a run-time one)
        if s == 0:
            b_abs = tl.abs(_load_b_tile(b_ptr, rows64, row_ok, rn64, rn_ok, stride_bm, stride_br))
            a_norm = tl.load(arow_ptr + rn64, mask=rn_ok, other=0.0)
            tl.store(pprobe_ptr + n.to(tl.int64) * d_out + rows64, tl.sum(b_abs * a_norm[None, :], axis=1), mask=row_ok)

    # 1. acc = W[rows, split] @ A[rn, split]^T (and ||W[rows, split]||^2 in the cold n == 0 programs)
    acc, wsq = _cross_tile(
        n, s, w_ptr, a_ptr, u_ptr, rows64, row_ok, rn64, rn_ok, d_in, stride_wm, stride_wk, stride_ar, stride_ak,
        stride_um, stride_ur, KT, S, BM, BN, BK, FROM_GEMM, COLD, A_MODE, EVEN_K, EVEN_MN, UPCAST,
    )  # fmt: skip

    # 2. acc += B[rows, k] @ G''[k, rn] for this split's share of the chunks k >= n*BN (lower block triangle)
    if not FROM_GEMM:  # FROM_GEMM: G = A A^T came from a GEMM
        # G'' is complete: the host runs the gram programs in a launch before this one, so this acquire
        # passes at once (it would wait if both kinds shared one grid started in program-id order)
        done = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
        while done < NT:
            done = tl.atomic_add(cnt_ptr, 0, sem="acquire", scope="gpu")
    acc = _add_gram_term(
        acc, n, s, b_ptr, g3_ptr, rows64, row_ok, rn64, rn_ok, rank, r_pad, stride_bm, stride_br, scaling, S,
        BN, BKG, BG_STAGES, FROM_GEMM, B_MODE, UPCAST,
    )  # fmt: skip

    # 3. epilogue: rowsum(B[rows, rn] * acc) -> partial (n, s); no atomics on data
    bt = _load_b_tile(b_ptr, rows64, row_ok, rn64, rn_ok, stride_bm, stride_br)
    part = tl.sum(acc * bt, axis=1)
    tl.store(part_ptr + (n * S + s).to(tl.int64) * d_out + rows64, part, mask=row_ok)
    if COLD:  # noqa: SIM102 (compile-time branch around a run-time one)
        if n == 0:
            tl.store(wpart_ptr + s.to(tl.int64) * d_out + rows64, wsq, mask=row_ok)

    # 4. the last program of row tile m sums the partials in a fixed order and assembles the result
    tl.debug_barrier()
    ticket = tl.atomic_add(cnt_ptr + 2 + NT + m, 1, sem="acq_rel", scope="gpu")
    if ticket == NR * S - 1:
        _assemble_rows(
            rows64, row_ok, sumsq_ptr, out_ptr, part_ptr, wpart_ptr, pprobe_ptr, probe_w, d_out, scaling, eps,
            NR, S, BM, COLD, SQRT, PROBE,
        )  # fmt: skip
        tl.atomic_xchg(cnt_ptr + 2 + NT + m, 0, sem="relaxed", scope="gpu")
        finished = tl.atomic_add(cnt_ptr + 1, 1, sem="acq_rel", scope="gpu")
        if finished == n_m - 1:
            # every program has passed its gram wait: reset the counters for the next launch
            tl.atomic_xchg(cnt_ptr + 1, 0, sem="relaxed", scope="gpu")
            tl.atomic_xchg(cnt_ptr, 0, sem="relaxed", scope="gpu")


# the launch-plan integers are read as scalars only: no 1/16-divisibility specializations (fewer compiles)
@triton.jit(do_not_specialize=["probe_w", "n_m", "NR", "S", "NT", "S_G", "KT", "pid_base"])
def _weight_norm_sq_kernel(
    w_ptr,
    a_ptr,
    b_ptr,
    u_ptr,
    sumsq_ptr,
    out_ptr,
    ws_ptr,
    g_ptr,
    cnt_ptr,
    pprobe_ptr,
    arow_ptr,
    probe_w,
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
    pid_base,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    BKG: tl.constexpr,
    BG_STAGES: tl.constexpr,
    FROM_GEMM: tl.constexpr,
    COLD: tl.constexpr,
    SQRT: tl.constexpr,
    A_MODE: tl.constexpr,
    A_GRAM_MODE: tl.constexpr,
    B_MODE: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_MN: tl.constexpr,
    UPCAST: tl.constexpr,
    PROBE: tl.constexpr,
):
    # ``PROBE``: the non-finite row repair in the same launches (``_assemble_rows``); ``pprobe_ptr`` [NR, d_out]
    # probe partials, ``arow_ptr`` [r] the host's fp32 ||A_k||. Unused (any pointer) without PROBE.
    # the workspace's sections, laid out as NormLaunchPlan.sections() does (each 32-element aligned): cross
    # partials [NR * S, d_out], ||W||^2 partials [S, d_out] (cold launches only), gram partials
    # [S_G * NT, BN, BN], then the three bf16 parts of G''. FROM_GEMM: G is the fp32 GEMM result g_ptr.
    part_ptr = ws_ptr
    wpart_ptr = part_ptr + tl.multiple_of(_round32(tl.cast(NR, tl.int64) * S * d_out), 32)
    gpart_ptr = wpart_ptr
    if COLD:
        gpart_ptr += tl.multiple_of(_round32(tl.cast(S, tl.int64) * d_out), 32)
    if FROM_GEMM:
        g3_ptr = g_ptr
    else:
        g3_ptr = (gpart_ptr + tl.multiple_of(_round32(tl.cast(S_G, tl.int64) * NT * (BN * BN)), 32)).to(
            tl.pointer_type(tl.bfloat16)
        )
    pid = tl.program_id(0) + pid_base
    if FROM_GEMM:  # no gram programs, and none compiled in (their BN x BN accumulator sets the register count)
        n_gram = 0
    else:
        n_gram = NT * S_G
        if pid < n_gram:
            _gram_program(
                pid // S_G, pid % S_G, a_ptr, gpart_ptr, g3_ptr, cnt_ptr, d_in, rank, r_pad, stride_ar, stride_ak,
                scaling, NT, S_G, KT, BN, BK, A_GRAM_MODE, EVEN_K, UPCAST,
            )  # fmt: skip
    if pid >= n_gram:
        q = pid - n_gram
        if FROM_GEMM:  # no W to share in L2: the longest B G'' programs (n == 0) first, the shortest last
            n = q // (n_m * S)
            q = q % (n_m * S)
        else:  # n fastest: the NR programs that read the same W tiles run side by side
            n = q % NR
            q = q // NR
        s = q % S
        m = q // S
        _main_program(
            m, n, s, w_ptr, a_ptr, b_ptr, u_ptr, sumsq_ptr, out_ptr, part_ptr, wpart_ptr, g3_ptr,
            cnt_ptr, pprobe_ptr, arow_ptr, probe_w, d_out, d_in, rank, r_pad, stride_wm, stride_wk, stride_ar,
            stride_ak, stride_bm, stride_br, stride_um, stride_ur, scaling, eps, n_m, NR, S, NT, KT, BM, BN, BK, BKG,
            BG_STAGES, FROM_GEMM, COLD, SQRT, A_MODE, B_MODE, EVEN_K, EVEN_MN, UPCAST, PROBE,
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
