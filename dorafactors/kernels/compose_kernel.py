"""The Triton kernels of the DoRA composition (host entry points: ``compose.py``).

    out   = (g - 1) * base + g * (s * lora)          forward (out-of-place, in-place, or into slices)
    inner = base + s * lora                           also written when the magnitude needs a gradient
    d_lora = (g * s) * d_out;  d_base = (g - 1) * d_out;  d_g = sum_rows(inner * d_out)

``ADD_BASE`` (the forward kernel and the Linear node's backward): the composition returns PEFT's whole
variant output ``base + ((g - 1) * base + g * (s * lora))`` instead of the extra part, and ``d_base = d_out +
(g - 1) * d_out``. Both are evaluated in that order, in fp32, so that a non-finite value lands where PEFT's
``result + extra`` (and autograd's sum of the two ``d_base`` contributions) puts it: an infinite ``base``
with ``g < 1`` gives NaN, not ``g * inf``.

With ``lora = h B^T`` inside the autograd node (``autograd/lora_compose.py``), ``_compose_bwd_lora_b_kernel``
takes the base output in place of ``inner`` and, in the same launch, finishes from ``M = d_out^T h``:
``d_B = (g * s) M``, ``(g * s) B`` (for ``d_h``) and ``d_g += s * rowsum(B * M)``.

Every kernel loads its operands in their own dtype, computes in fp32 and rounds once at the store. ``g``
(the magnitude scale, usually fp32) is never downcast: ``g - 1`` and ``g * s`` are fp32, the magnitude
gradient is accumulated in fp32 and returned in ``g``'s dtype.

The magnitude gradient is deterministic: one pass over ``d_out`` writes fp32 partial sums per group of
rows (``[groups, C]``), and they are summed in a fixed order: in eager mode by the last program of each
column tile to finish (an integer ticket decides who, not the order), inside a ``torch.library`` op (the
``torch.compile`` path, and the channels-first conv layout) by a second tiny kernel. No floating-point
atomics; the same inputs give bitwise the same ``d_g`` on every call.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._triton_utils import is_interpreted


@triton.jit
def _to_dtype(x, dtype: tl.constexpr):
    """Round fp32 ``x`` to ``dtype`` to nearest-even (one rounding, as PyTorch's ``.to``).

    Triton's CPU interpreter truncates fp32 -> bf16 (verified with triton 3.9, also with
    ``fp_downcast_rounding="rtne"``); there the rounding is done on the bits first. Compiled out on GPUs.
    """
    if _INTERPRETER_BF16_FIX:  # noqa: SIM102 (nested constexpr ifs: the Triton JIT prunes both)
        if dtype == tl.bfloat16:
            u = x.to(tl.uint32, bitcast=True)
            u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
            x = u.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _magnitude_over(m_ptr, div_ptr, cols, cmask):
    """``g = fp32(m) / div`` of columns ``cols`` (fp32), rounded once to nearest as PyTorch's division of
    the magnitude by its fp32 divisor (``norm/scale.py::magnitude_scale``): ``div_rn``, not Triton's
    approximate fp32 ``/``, so that ``g`` is bitwise the same as the eager division's."""
    m = tl.load(m_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    div = tl.load(div_ptr + cols, mask=cmask, other=1.0).to(tl.float32)
    return tl.math.div_rn(m, div)


@triton.jit
def _compose_fwd_kernel(
    lora_ptr,
    base_ptr,
    g_ptr,
    div_ptr,
    out_ptr,
    inner_ptr,
    R,
    K,
    C,
    stride_lora,
    stride_base,
    stride_out,
    stride_inner,
    scaling,
    R_BUCKET,  # autotune key only
    G_ON_ROWS: tl.constexpr,
    WRITE_INNER: tl.constexpr,
    ADD_BASE: tl.constexpr,
    DIVIDE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The forward; ``DIVIDE`` (last-dim ``g`` only): ``g_ptr`` holds the magnitude ``m`` and ``g = m / div``
    (``_magnitude_over``)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = rows < R
    cmask = cols < K
    mask = rmask[:, None] & cmask[None, :]
    if G_ON_ROWS:
        g = tl.load(g_ptr + rows % C, mask=rmask, other=0.0).to(tl.float32)[:, None]
    elif DIVIDE:
        g = _magnitude_over(g_ptr, div_ptr, cols, cmask)[None, :]
    else:
        g = tl.load(g_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    c = cols[None, :]
    lora = tl.load(lora_ptr + (r64 * stride_lora + c), mask=mask, other=0.0).to(tl.float32)
    base = tl.load(base_ptr + (r64 * stride_base + c), mask=mask, other=0.0).to(tl.float32)
    s_lora = lora * scaling
    out = (g - 1.0) * base + g * s_lora
    if ADD_BASE:
        out = base + out
    tl.store(out_ptr + (r64 * stride_out + c), _to_dtype(out, out_ptr.dtype.element_ty), mask=mask)
    if WRITE_INNER:
        tl.store(inner_ptr + (r64 * stride_inner + c), _to_dtype(base + s_lora, inner_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_row_loop(
    dout_ptr,
    inner_ptr,
    dlora_ptr,
    dbase_ptr,
    cols,
    cmask,
    gs,
    gm1,
    r_start,
    r_end,
    stride_dout,
    stride_inner,
    stride_dlora,
    stride_dbase,
    NEED_LORA: tl.constexpr,
    NEED_BASE: tl.constexpr,
    NEED_G: tl.constexpr,
    ADD_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Rows ``[r_start, r_end)`` of one column tile: stores ``d_lora`` / ``d_base`` (``d_out + (g - 1) d_out``
    with ``ADD_D``) and returns the ``[BLOCK_R, BLOCK_C]`` fp32 accumulator of ``inner * d_out`` (zeros
    without ``NEED_G``)."""
    c = cols[None, :]
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for r0 in range(r_start, r_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask = (rows < r_end)[:, None] & cmask[None, :]
        r64 = rows.to(tl.int64)[:, None]
        d = tl.load(dout_ptr + (r64 * stride_dout + c), mask=mask, other=0.0).to(tl.float32)
        if NEED_LORA:
            tl.store(dlora_ptr + (r64 * stride_dlora + c), _to_dtype(d * gs, dlora_ptr.dtype.element_ty), mask=mask)
        if NEED_BASE:
            d_base = d * gm1
            if ADD_D:
                d_base = d + d_base
            tl.store(dbase_ptr + (r64 * stride_dbase + c), _to_dtype(d_base, dbase_ptr.dtype.element_ty), mask=mask)
        if NEED_G:
            x = tl.load(inner_ptr + (r64 * stride_inner + c), mask=mask, other=0.0).to(tl.float32)
            acc += x * d
    return acc


@triton.jit
def _tile_partials_sum(part_ptr, cols, cmask, groups, K, BLOCK_C: tl.constexpr):
    """``sum_group part[group, cols]`` in a fixed order: rows ``[j, j + SUM_G)`` of ``part``, then over ``SUM_G``."""
    SUM_G: tl.constexpr = (4096 + BLOCK_C - 1) // BLOCK_C  # >= 1: BLOCK_C <= 4096
    offs_g = tl.arange(0, SUM_G)
    tot = tl.zeros([SUM_G, BLOCK_C], dtype=tl.float32)
    for j in range(0, groups, SUM_G):
        gj = j + offs_g
        p = part_ptr + (gj.to(tl.int64)[:, None] * K + cols[None, :])
        tot += tl.load(p, mask=(gj < groups)[:, None] & cmask[None, :], other=0.0, cache_modifier=".cg")
    return tl.sum(tot, axis=0)


@triton.jit
def _compose_bwd_cols_kernel(
    dout_ptr,
    g_ptr,
    inner_ptr,
    dlora_ptr,
    dbase_ptr,
    part_ptr,
    dg_ptr,
    cnt_ptr,
    R,
    K,
    groups,
    rows_per_group,
    stride_dout,
    stride_inner,
    stride_dlora,
    stride_dbase,
    scaling,
    R_BUCKET,  # autotune key only
    NEED_LORA: tl.constexpr,
    NEED_BASE: tl.constexpr,
    NEED_G: tl.constexpr,
    FUSED_SUM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``g`` along the columns. Program (group, column tile) walks its group's rows; ``part[group, cols]``.

    ``FUSED_SUM``: the last of a column tile's ``groups`` programs to finish (an integer ticket in
    ``cnt_ptr[pid_c]``, reset to 0 by that program) sums the tile's partials in a fixed order into
    ``dg_ptr`` (``g``'s dtype): no second launch. Otherwise ``_sum_partials_kernel`` does it.
    """
    pid_g = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < K
    g = tl.load(g_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    gs = (g * scaling)[None, :]
    gm1 = (g - 1.0)[None, :]
    r_start = pid_g * rows_per_group
    r_end = tl.minimum(r_start + rows_per_group, R)
    acc = _bwd_row_loop(
        dout_ptr,
        inner_ptr,
        dlora_ptr,
        dbase_ptr,
        cols,
        cmask,
        gs,
        gm1,
        r_start,
        r_end,
        stride_dout,
        stride_inner,
        stride_dlora,
        stride_dbase,
        NEED_LORA,
        NEED_BASE,
        NEED_G,
        False,
        BLOCK_R,
        BLOCK_C,
    )
    if NEED_G:
        tl.store(part_ptr + (pid_g.to(tl.int64) * K + cols), tl.sum(acc, axis=0), mask=cmask)
        if FUSED_SUM:
            tl.debug_barrier()  # every thread's partial is stored before the ticket is taken
            ticket = tl.atomic_add(cnt_ptr + pid_c, 1, sem="acq_rel", scope="gpu")
            if ticket == groups - 1:  # fixed order whoever arrives last
                total = _tile_partials_sum(part_ptr, cols, cmask, groups, K, BLOCK_C)
                tl.store(dg_ptr + cols, _to_dtype(total, dg_ptr.dtype.element_ty), mask=cmask)
                tl.atomic_xchg(cnt_ptr + pid_c, 0, sem="relaxed", scope="gpu")


@triton.jit
def _finish_lora_b(
    m_ptr,
    b_ptr,
    db_ptr,
    bs_ptr,
    dg_ptr,
    div_ptr,
    dout_ptr,
    h_ptr,
    cols,
    cmask,
    g,
    d_g_base,
    RANK,
    T,
    stride_dout,
    stride_h,
    scaling,
    NEED_DB: tl.constexpr,
    NEED_BS: tl.constexpr,
    NEED_G: tl.constexpr,
    DIVIDE: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Rows ``cols`` of ``M = d_out^T h`` and ``B`` (``[K, RANK]``, contiguous): ``d_B = (g s) M``, ``(g s) B`` and
    ``d_g = d_g_base + s * rowsum(B * M)``. A row whose ``g s`` is infinite (an infinite magnitude) gets ``d_B``
    as ``sum_t (g s d[t]) h[t]``, the non-finite class of the unfactored sum (NaN where infinite terms of
    both signs meet), from ``d_out`` (``[T, K]``) and ``h`` (``[T, RANK]``): a branch only such tiles take.
    ``DIVIDE``: ``d_g / div`` is stored in place of ``d_g``."""
    FIN_K: tl.constexpr = 4096 // BLOCK_C  # >= 1: BLOCK_C <= 4096
    gs_rows = g * scaling
    gs = gs_rows[:, None]
    infinite = tl.abs(gs_rows) == float("inf")
    tile_has_infinite = tl.max(infinite.to(tl.int32), axis=0) > 0
    row_off = cols.to(tl.int64)[:, None] * RANK
    acc = tl.zeros([BLOCK_C, FIN_K], dtype=tl.float32)
    for k0 in range(0, RANK, FIN_K):
        ks = k0 + tl.arange(0, FIN_K)
        kmask = ks < RANK
        mask = cmask[:, None] & kmask[None, :]
        offs = row_off + ks[None, :]
        b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if NEED_BS:
            tl.store(bs_ptr + offs, _to_dtype(b * gs, bs_ptr.dtype.element_ty), mask=mask)
        if NEED_DB or NEED_G:
            m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if NEED_DB:
                d_b = m * gs
                if tile_has_infinite:
                    exact = tl.zeros([BLOCK_C, FIN_K], dtype=tl.float32)
                    for t in range(0, T):
                        dv = tl.load(dout_ptr + (t * stride_dout + cols), mask=cmask, other=0.0).to(tl.float32)
                        hv = tl.load(h_ptr + (t * stride_h + ks), mask=kmask, other=0.0).to(tl.float32)
                        exact += (gs_rows * dv)[:, None] * hv[None, :]
                    d_b = tl.where(infinite[:, None], exact, d_b)
                tl.store(db_ptr + offs, _to_dtype(d_b, db_ptr.dtype.element_ty), mask=mask)
            if NEED_G:
                acc += b * m
    if NEED_G:
        total = d_g_base + scaling * tl.sum(acc, axis=1)
        if DIVIDE:
            total = tl.math.div_rn(total, tl.load(div_ptr + cols, mask=cmask, other=1.0).to(tl.float32))
        tl.store(dg_ptr + cols, _to_dtype(total, dg_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _compose_bwd_lora_b_kernel(
    dout_ptr,
    g_ptr,
    div_ptr,
    base_ptr,
    dbase_ptr,
    part_ptr,
    dg_ptr,
    cnt_ptr,
    m_ptr,
    b_ptr,
    db_ptr,
    bs_ptr,
    h_ptr,
    R,
    K,
    RANK,
    T,
    groups,
    rows_per_group,
    stride_dout,
    stride_base,
    stride_dbase,
    stride_h,
    scaling,
    R_BUCKET,  # autotune key only
    NEED_BASE: tl.constexpr,
    NEED_G: tl.constexpr,
    NEED_DB: tl.constexpr,
    NEED_BS: tl.constexpr,
    ADD_BASE: tl.constexpr,
    DIVIDE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The one-pass backward of the Linear node with ``lora_B`` inside (``autograd/lora_compose.py``).

    Rows ``[0, R)`` of ``d_out`` as ``_compose_bwd_cols_kernel`` with the base output as ``inner``: ``d_base =
    (g - 1) d_out`` (``ADD_BASE``: ``d_out + (g - 1) d_out``) and the partials of ``sum_t d_out * base``. Column ``j`` of ``d_out`` is row ``j`` of
    ``M = d_out^T h`` and of ``B``, so the program that finishes a column tile (the last of its ``groups`` to
    arrive, by integer ticket, when ``NEED_G``; group 0 otherwise) also writes that tile's ``d_B``, ``(g s) B``
    and ``d_g`` (``_finish_lora_b``): one launch for what needed two.

    ``DIVIDE``: ``g_ptr`` holds the magnitude ``m``, ``g = m / div`` (``_magnitude_over``), and ``dg_ptr``
    receives the magnitude's gradient ``d_g / div`` in its own dtype (what autograd's division node and its
    cast to the parameter's dtype give) instead of ``d_g``.
    """
    pid_g = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < K
    if DIVIDE:
        g = _magnitude_over(g_ptr, div_ptr, cols, cmask)
    else:
        g = tl.load(g_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    r_start = pid_g * rows_per_group
    r_end = tl.minimum(r_start + rows_per_group, R)
    acc = _bwd_row_loop(
        dout_ptr,
        base_ptr,
        dbase_ptr,
        dbase_ptr,
        cols,
        cmask,
        (g * scaling)[None, :],
        (g - 1.0)[None, :],
        r_start,
        r_end,
        stride_dout,
        stride_base,
        stride_dbase,
        stride_dbase,
        False,
        NEED_BASE,
        NEED_G,
        ADD_BASE,
        BLOCK_R,
        BLOCK_C,
    )
    finishes = pid_g == 0
    if NEED_G:
        tl.store(part_ptr + (pid_g.to(tl.int64) * K + cols), tl.sum(acc, axis=0), mask=cmask)
        tl.debug_barrier()  # every thread's partial is stored before the ticket is taken
        ticket = tl.atomic_add(cnt_ptr + pid_c, 1, sem="acq_rel", scope="gpu")
        finishes = ticket == groups - 1
    if finishes:
        d_g_base = tl.zeros([BLOCK_C], dtype=tl.float32)
        if NEED_G:
            d_g_base = _tile_partials_sum(part_ptr, cols, cmask, groups, K, BLOCK_C)
            tl.atomic_xchg(cnt_ptr + pid_c, 0, sem="relaxed", scope="gpu")
        _finish_lora_b(
            m_ptr,
            b_ptr,
            db_ptr,
            bs_ptr,
            dg_ptr,
            div_ptr,
            dout_ptr,
            h_ptr,
            cols,
            cmask,
            g,
            d_g_base,
            RANK,
            T,
            stride_dout,
            stride_h,
            scaling,
            NEED_DB,
            NEED_BS,
            NEED_G,
            DIVIDE,
            BLOCK_C,
        )


@triton.jit
def _compose_bwd_rows_kernel(
    dout_ptr,
    g_ptr,
    inner_ptr,
    dlora_ptr,
    dbase_ptr,
    part_ptr,
    R,
    K,
    C,
    cols_per_group,
    scaling,
    R_BUCKET,  # autotune key only
    NEED_LORA: tl.constexpr,
    NEED_BASE: tl.constexpr,
    NEED_G: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """``g`` along the rows (row ``r`` uses ``g[r % C]``), contiguous ``[R, K]``. ``part[group, rows]``."""
    pid_r = tl.program_id(0)
    pid_g = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    g = tl.load(g_ptr + rows % C, mask=rmask, other=0.0).to(tl.float32)
    gs = (g * scaling)[:, None]
    gm1 = (g - 1.0)[:, None]
    row_off = rows.to(tl.int64)[:, None] * K
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    c_start = pid_g * cols_per_group
    c_end = tl.minimum(c_start + cols_per_group, K)
    for c0 in range(c_start, c_end, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = rmask[:, None] & (cols < c_end)[None, :]
        offs = row_off + cols[None, :]
        d = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if NEED_LORA:
            tl.store(dlora_ptr + offs, _to_dtype(d * gs, dlora_ptr.dtype.element_ty), mask=mask)
        if NEED_BASE:
            tl.store(dbase_ptr + offs, _to_dtype(d * gm1, dbase_ptr.dtype.element_ty), mask=mask)
        if NEED_G:
            x = tl.load(inner_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            acc += x * d
    if NEED_G:
        tl.store(part_ptr + (pid_g.to(tl.int64) * R + rows), tl.sum(acc, axis=1), mask=rmask)


@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, G, K, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    """``out[c] = sum_g part[g, c]`` in a fixed order (fp32 accumulation, one rounding at the store)."""
    pid = tl.program_id(0)
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < K
    acc = tl.zeros([BLOCK_G, BLOCK_C], dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        rows = g0 + tl.arange(0, BLOCK_G)
        mask = (rows < G)[:, None] & cmask[None, :]
        acc += tl.load(part_ptr + (rows.to(tl.int64)[:, None] * K + cols[None, :]), mask=mask, other=0.0)
    tl.store(out_ptr + cols, _to_dtype(tl.sum(acc, axis=0), out_ptr.dtype.element_ty), mask=cmask)


INTERPRETER = is_interpreted(_compose_fwd_kernel)
_INTERPRETER_BF16_FIX = tl.constexpr(INTERPRETER)
