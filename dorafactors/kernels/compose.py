"""Host entry points of the DoRA composition kernels (forward out-of-place, in-place or into slices, and
the one-pass backward); the maths and numerics are in ``compose_kernel.py``, the PyTorch reference is
``compose_reference.py``.

Layouts. Every tensor is handled as a 2-D ``[R, K]`` matrix with unit column stride and an arbitrary row
stride (so column slices of a larger tensor, as the chunked base recompute writes, need no copy):

* ``g`` along the columns (Linear/Embedding: ``[..., C]``; channels-last conv activations): ``K = C``.
* ``g`` along the rows (conv activations in NCHW-contiguous memory, ``[N, C, S]``): ``R = N * C``,
  ``K = S`` and row ``r`` uses ``g[r % C]``.

Any other memory layout is made contiguous first (a copy, never a wrong answer). Offsets are 64-bit.

The kernels are in ``compose_kernel.py``, their launch configurations (autotuning) in ``compose_launch.py``.
"""

from __future__ import annotations

import contextlib

import torch

from ._triton_utils import cdiv, num_sms, partials_buffer, ticket_buffer
from .compose_kernel import INTERPRETER, _sum_partials_kernel
from .compose_launch import (
    _BWD_COLS,
    _BWD_LORA_B,
    _BWD_ROWS,
    _FWD,
    _FWD_INPLACE,
    _launch,
    _row_bucket,
    _skip_launch,
    forced_config,
    launch_counts,
)
from .launch import launch
from .operands import KERNEL_DTYPES

__all__ = [
    "BACKWARD_PROGRAMS_PER_SM",
    "compose_backward",
    "compose_backward_lora_b",
    "compose_forward",
    "compose_forward_",
    "compose_forward_contiguous_",
    "compose_forward_into",
    "forced_config",
    "launch_counts",
]

#: Programs per SM the one-pass backward aims for (rows are split into groups to reach it).
BACKWARD_PROGRAMS_PER_SM = 8
#: Row groups of the backward hold a multiple of this many rows (the largest BLOCK_R of any config).
_ROW_GRANULE = 64
#: The backward never splits the reduction dimension into more than this many groups.
_MAX_GROUPS = 1024


#: Row and column counts stay below this (32-bit index arithmetic inside a program; offsets are 64-bit).
_INDEX_LIMIT = 2**30


# ------------------------------------------------------------------------------------------------ layouts


def _cols_view(t: torch.Tensor, K: int) -> torch.Tensor | None:
    """``t`` as ``[R, K]`` with unit column stride (any row stride), without copying; None if impossible."""
    if t.dim() == 2:
        v = t
    else:
        try:
            v = t.view(-1, K)
        except (RuntimeError, ValueError):  # ValueError: FakeTensors (under torch.compile)
            return None
    if K != 1 and v.stride(1) != 1:
        return None
    return v


def _as_cols(t: torch.Tensor, K: int) -> tuple[torch.Tensor, int]:
    """``(tensor, row stride)`` to hand to a kernel as ``[R, K]``; contiguous tensors pass as they are."""
    if t.is_contiguous():
        return t, K
    v = _cols_view(t, K)
    if v is None:
        v = t.contiguous().view(-1, K)
    return v, v.stride(0)


def _check_size(R, K) -> None:
    if isinstance(R, int) and (R >= _INDEX_LIMIT or K >= _INDEX_LIMIT):
        raise ValueError(f"compose kernels take fewer than 2**30 rows and columns, got [{R}, {K}]")


def _check_dtypes(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype not in KERNEL_DTYPES:
            raise TypeError(f"compose kernels take fp16/bf16/fp32 tensors, got {t.dtype} (use the PyTorch reference)")


# ------------------------------------------------------------------------------------------------ forward


def _fwd_launch(
    lora,
    base,
    g,
    out,
    inner,
    R,
    K,
    C,
    strides,
    scaling,
    g_on_rows,
    tuned,
    wrap,
    add_base: bool = False,
    divisor: torch.Tensor | None = None,
) -> None:
    """The forward kernel on ``[R, K]`` operands with row strides ``strides`` (lora, base, out, inner);
    ``add_base``: write ``base + composition`` (the kernel's ``ADD_BASE``); ``divisor`` (last-dim ``g``
    only): ``g`` is the magnitude and the kernel divides it by ``divisor`` (its ``DIVIDE``)."""
    _check_size(R, K)
    bucket = _row_bucket(R)
    write_inner = inner is not None
    divide = divisor is not None
    if divide and g_on_rows:
        raise ValueError("the forward kernel divides a magnitude along the last dim only")
    args = (lora, base, g, divisor if divide else g, out, inner, R, K, C, *strides, scaling, bucket, g_on_rows)
    args += (write_inner, add_base, divide)
    key = (K, bucket, g_on_rows, write_inner, add_base, divide, lora.dtype, base.dtype, g.dtype, out.dtype)
    _launch(tuned, lambda br, bc: (cdiv(R, br), cdiv(K, bc)), args, key, R, K, wrap)


def _fwd_cols(
    lora,
    base,
    g,
    out,
    inner,
    R,
    K,
    s_lora,
    s_base,
    s_out,
    s_inner,
    scaling,
    tuned,
    wrap,
    add_base: bool = False,
    divisor: torch.Tensor | None = None,
) -> None:
    """``g`` along the columns of ``[R, K]`` operands with the given row strides."""
    strides = (s_lora, s_base, s_out, s_inner)
    _fwd_launch(lora, base, g, out, inner, R, K, K, strides, scaling, False, tuned, wrap, add_base, divisor)


def _fwd_rows(lora3, base3, g, out3, inner3, scaling: float, wrap: bool) -> None:
    """Contiguous ``[N, C, S]`` operands, ``g`` along dim 1 (row ``r`` of ``[N * C, S]`` uses ``g[r % C]``)."""
    N, C, S = lora3.shape
    _fwd_launch(lora3, base3, g, out3, inner3, N * C, S, C, (S, S, S, S), scaling, True, _FWD, wrap)


def _check_operands(lora: torch.Tensor, base: torch.Tensor, g: torch.Tensor, channel_dim: int) -> int:
    if lora.shape != base.shape:
        raise ValueError(f"lora {tuple(lora.shape)} and base {tuple(base.shape)} must have the same shape")
    C = lora.shape[channel_dim]
    if g.dim() != 1 or g.shape[0] != C:
        raise ValueError(f"g must be a vector of {C} (dim {channel_dim}), got shape {tuple(g.shape)}")
    return C


def compose_forward(
    lora: torch.Tensor,
    base: torch.Tensor,
    g: torch.Tensor,
    scaling: float,
    *,
    channel_dim: int = -1,
    out_dtype: torch.dtype | None = None,
    save_inner: bool = False,
    wrap: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``out = (g - 1) * base + g * (scaling * lora)`` (and ``inner = base + scaling * lora``) on the GPU.

    Args:
        lora, base: ``[..., C, ...]`` fp16/bf16/fp32 (dtypes may differ), same shape, on one device.
        g: ``[C]`` fp16/bf16/fp32 (normally fp32), along ``channel_dim``.
        scaling: ``s``.
        channel_dim: ``-1`` (Linear) or the channel dim of a conv activation.
        out_dtype: dtype of ``out`` and ``inner``; default ``promote(lora, base)``.
        save_inner: also return ``inner`` (what the magnitude gradient needs).
        wrap: launch through ``torch.library.wrap_triton`` (inside a ``torch.library`` Triton op).

    Returns:
        ``(out, inner or None)``, shaped like ``lora``; ``out`` keeps ``lora``'s memory format when it is
        channels-last.
    """
    _check_operands(lora, base, g, channel_dim)
    out_dtype = out_dtype or torch.promote_types(lora.dtype, base.dtype)
    _check_dtypes(lora, base, g)
    if out_dtype not in KERNEL_DTYPES:
        raise TypeError(f"out_dtype {out_dtype} is not a kernel dtype")
    if lora.numel() == 0:
        out = torch.empty(lora.shape, dtype=out_dtype, device=lora.device)
        return out, (torch.empty_like(out) if save_inner else None)
    return compose_forward_unchecked(lora, base, g, scaling, channel_dim, out_dtype, save_inner, wrap)


def compose_forward_unchecked(
    lora: torch.Tensor,
    base: torch.Tensor,
    g: torch.Tensor,
    scaling: float,
    channel_dim: int,
    out_dtype: torch.dtype,
    save_inner: bool,
    wrap: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`compose_forward` for callers that validated shapes, dtypes and a non-empty ``lora`` (the hot path)."""
    if not g.is_contiguous():
        g = g.contiguous()
    nd = lora.dim()
    if channel_dim == -1 or channel_dim == nd - 1:
        C = lora.shape[-1]
        lora2, s_lora = _as_cols(lora, C)
        base2, s_base = _as_cols(base, C)
        out = torch.empty_like(lora, dtype=out_dtype, memory_format=torch.contiguous_format)
        inner = torch.empty_like(out) if save_inner else None
        _fwd_cols(lora2, base2, g, out, inner, out.numel() // C, C, s_lora, s_base, C, C, scaling, _FWD, wrap)
        return out, inner
    cd = channel_dim % nd
    C = lora.shape[cd]
    device = lora.device
    # Channel along a middle dim: channels-last memory is the column layout of the moved tensor.
    lora_m = _cols_view(lora.movedim(cd, -1), C)
    base_m = _cols_view(base.movedim(cd, -1), C) if lora_m is not None else None
    if lora_m is not None and base_m is not None:
        moved_shape = lora.movedim(cd, -1).shape
        R = lora_m.shape[0]
        out2 = torch.empty((R, C), dtype=out_dtype, device=device)
        inner2 = torch.empty((R, C), dtype=out_dtype, device=device) if save_inner else None
        _fwd_cols(lora_m, base_m, g, out2, inner2, R, C, lora_m.stride(0), base_m.stride(0), C, C, scaling, _FWD, wrap)
        out = out2.view(moved_shape).movedim(-1, cd)
        return out, (inner2.view(moved_shape).movedim(-1, cd) if save_inner else None)
    N = lora.shape[:cd].numel()
    S = lora.shape[cd + 1 :].numel()
    lora3 = lora.contiguous().view(N, C, S)
    base3 = base.contiguous().view(N, C, S)
    out3 = torch.empty((N, C, S), dtype=out_dtype, device=device)
    inner3 = torch.empty((N, C, S), dtype=out_dtype, device=device) if save_inner else None
    _fwd_rows(lora3, base3, g, out3, inner3, scaling, wrap)
    return out3.view(lora.shape), (inner3.view(lora.shape) if save_inner else None)


def compose_forward_into(
    out: torch.Tensor,
    inner: torch.Tensor | None,
    lora: torch.Tensor,
    base: torch.Tensor,
    g: torch.Tensor,
    scaling: float,
) -> None:
    """Write the composition into ``out`` (and ``inner``), ``g`` along the last dim.

    ``out`` / ``inner`` / ``lora`` / ``base`` may be row-strided views (column slices of larger tensors);
    they are read and written in place, never copied, when their last dim has unit stride. ``out`` may be
    ``lora`` itself (in-place); otherwise it must not overlap the inputs.
    """
    C = _check_operands(lora, base, g, -1)
    if out.shape != lora.shape or (inner is not None and inner.shape != lora.shape):
        raise ValueError("out and inner must have lora's shape")
    _check_dtypes(lora, base, g, out, *(() if inner is None else (inner,)))
    if out.numel() == 0:
        return
    if not g.is_contiguous():
        g = g.contiguous()
    inplace = out.data_ptr() == lora.data_ptr()
    lora2, s_lora = _as_cols(lora, C)
    base2, s_base = _as_cols(base, C)
    out2 = _cols_view(out, C)
    inner2 = _cols_view(inner, C) if inner is not None else None
    direct_out = out2 is not None
    direct_inner = inner is None or inner2 is not None
    if not direct_out:
        out2 = torch.empty((lora.numel() // C, C), dtype=out.dtype, device=out.device)
    if not direct_inner:
        inner2 = torch.empty((lora.numel() // C, C), dtype=inner.dtype, device=inner.device)  # type: ignore[union-attr]
    if inplace and lora2.data_ptr() != out2.data_ptr():
        raise ValueError("in-place compose needs lora and out to be the same view")
    _fwd_cols(
        lora2,
        base2,
        g,
        out2,
        inner2,
        out2.shape[0],
        C,
        s_lora,
        s_base,
        out2.stride(0),
        inner2.stride(0) if inner2 is not None else 0,
        scaling,
        _FWD_INPLACE if inplace else _FWD,
        False,
    )
    if not direct_out:
        out.copy_(out2.view(out.shape))
    if not direct_inner:
        inner.copy_(inner2.view(inner.shape))  # type: ignore[union-attr]


def compose_forward_contiguous_(
    lora: torch.Tensor,
    base: torch.Tensor,
    g: torch.Tensor,
    scaling: float,
    add_base: bool = False,
    divisor: torch.Tensor | None = None,
) -> torch.Tensor:
    """In-place forward for contiguous ``lora`` and ``base`` of one shape (any rank), ``g`` contiguous along the
    last dim: one launch on the tensors as they are (no views). The caller validated dtypes and sizes.
    ``add_base``: ``lora <- base + ((g - 1) * base + g * (s * lora))``, PEFT's whole variant output.
    ``divisor`` (fp32 ``[C]``, contiguous): ``g`` is the magnitude ``m`` and the kernel uses ``m / divisor``,
    rounded as PyTorch's division (no launch of its own)."""
    C = lora.shape[-1]
    R = lora.numel() // C
    _fwd_cols(lora, base, g, lora, None, R, C, C, C, C, 0, scaling, _FWD_INPLACE, False, add_base, divisor)
    return lora


def compose_forward_(lora: torch.Tensor, base: torch.Tensor, g: torch.Tensor, scaling: float) -> torch.Tensor:
    """In-place forward: ``lora <- (g - 1) * base + g * (scaling * lora)`` in ``lora``'s dtype; returns ``lora``.

    ``g`` along the last dim; ``lora`` must be viewable as ``[R, C]`` with unit column stride.
    """
    C = lora.shape[-1]
    if _cols_view(lora, C) is None:
        raise ValueError("in-place compose needs a lora whose last dim has unit stride and collapsible leading dims")
    compose_forward_into(lora, None, lora, base, g, scaling)
    return lora


# ------------------------------------------------------------------------------------------------ backward


def compose_backward_lora_b(
    d_out: torch.Tensor,
    g: torch.Tensor,
    base: torch.Tensor | None,
    m: torch.Tensor | None,
    weight_b: torch.Tensor,
    h: torch.Tensor | None,
    scaling: float,
    *,
    base_dtype: torch.dtype,
    need_base: bool,
    need_b: bool,
    scaled_b_dtype: torch.dtype | None,
    need_g: bool,
    add_base: bool = False,
    divisor: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The Linear node's backward in one launch (``_compose_bwd_lora_b_kernel``): ``(d_base, d_B, (g s) B, d_g)``.

    Args:
        d_out: ``[..., K]`` (fp16/bf16/fp32; rows with unit column stride), ``K = d_out``.
        g: ``[K]`` fp32 (the magnitude scale); ``d_g`` comes back in its dtype.
        base: the saved base output, ``d_out``'s shape (needed iff ``need_g``).
        m: ``M = d_out^T h`` ``[K, r]`` fp32 (needed iff ``need_b`` or ``need_g``).
        weight_b: ``B`` ``[K, r]``; h: ``[T, r]`` (read only for rows with an infinite ``g s``; None when
            neither ``d_B`` nor ``d_g`` is needed).
        scaled_b_dtype: dtype of ``(g s) B`` (None: not needed).
        add_base: the forward returned ``base + composition``: ``d_base = d_out + (g - 1) d_out``.
        divisor: fp32 ``[K]``: ``g`` is then the magnitude ``m`` (fp16/bf16/fp32), the kernel uses ``g = m /
            divisor``, and the last result is ``m``'s gradient ``d_g / divisor`` in ``m``'s dtype (what autograd's
            division node and the cast to the parameter's dtype give), not ``d_g``.
    """
    K = d_out.shape[-1]
    T = d_out.numel() // K
    rank = weight_b.shape[1]
    device = d_out.device
    if not g.is_contiguous():
        g = g.contiguous()
    d2, s_d = _as_cols(d_out, K)
    x2, s_x = _as_cols(base, K) if need_g else (d2, 0)  # type: ignore[arg-type]
    b = weight_b if weight_b.is_contiguous() else weight_b.contiguous()
    need_bs = scaled_b_dtype is not None
    d_base = torch.empty_like(d_out, dtype=base_dtype, memory_format=torch.contiguous_format) if need_base else None
    d_b = torch.empty((K, rank), dtype=weight_b.dtype, device=device) if need_b else None
    scaled_b = torch.empty((K, rank), dtype=scaled_b_dtype, device=device) if need_bs else None
    d_g = torch.empty(K, dtype=g.dtype, device=device) if need_g else None
    m_arg = b if m is None else (m if m.is_contiguous() else m.contiguous())
    h_arg, s_h = (b, 0) if h is None else (h, h.stride(0))
    rows = T if (need_base or need_g) else 0  # only the column tiles' LoRA-B part: no row work
    _check_size(T, K)
    groups, per_group = _row_groups(rows, K, device, _ROW_GRANULE) if rows else (1, 0)
    part = partials_buffer(device, groups * K) if need_g else None
    tickets = ticket_buffer(device, K) if need_g else None
    bucket = _row_bucket(rows)
    divide = divisor is not None
    args = (d2, g, divisor if divide else g, x2, d_base if need_base else d2, part, d_g if need_g else g, tickets)
    args += (m_arg, b, d_b if need_b else b, scaled_b if need_bs else b, h_arg)
    args += (rows, K, rank, T, groups, per_group, s_d, s_x, K, s_h, scaling, bucket, need_base, need_g, need_b, need_bs)
    args += (add_base, divide)
    key = (K, rank, bucket, need_base, need_g, need_b, need_bs, d2.dtype, g.dtype, x2.dtype, b.dtype, scaled_b_dtype)
    key += (base_dtype if need_base else None, add_base, divide)
    _launch(_BWD_LORA_B, lambda br, bc: (groups, cdiv(K, bc)), args, key, per_group or 1, K, False)
    return d_base, d_b, scaled_b, d_g


def _row_groups(R, K: int, device: torch.device, granule: int) -> tuple[int, int]:
    """Split ``R`` reduction rows into groups so that ``groups * cdiv(K, 256)`` programs fill the GPU.

    Returns ``(groups, rows_per_group)``; ``rows_per_group`` is a multiple of ``granule`` for a concrete ``R``.
    """
    target = BACKWARD_PROGRAMS_PER_SM * num_sms(device)
    groups = max(1, min(_MAX_GROUPS, target // cdiv(K, 256)))
    if not isinstance(R, int):  # symbolic under torch.compile: keep the group count static
        return groups, cdiv(R, groups)
    groups = max(1, min(groups, cdiv(R, granule)))
    per_group = cdiv(cdiv(R, groups), granule) * granule
    return cdiv(R, per_group), per_group


def _sum_partials(part: torch.Tensor, out_dtype: torch.dtype, wrap: bool) -> torch.Tensor:
    """``part.sum(0)`` for an fp32 ``[G, K]`` buffer, deterministically, in ``out_dtype``."""
    G, K = part.shape
    if G == 1 and out_dtype == torch.float32 and not wrap:
        return part.view(K)
    out = torch.empty(K, dtype=out_dtype, device=part.device)
    if wrap and _skip_launch(part):
        return out
    block_c = 64 if INTERPRETER else 256
    grid = (cdiv(K, block_c),)
    if wrap:
        from torch.library import wrap_triton

        wrap_triton(_sum_partials_kernel)[grid](part, out, G, K, BLOCK_G=16, BLOCK_C=block_c, num_warps=4)
    else:
        index = part.get_device()
        guard = index >= 0 and index != torch.cuda.current_device()
        with torch.cuda.device(index) if guard else contextlib.nullcontext():
            launch(_sum_partials_kernel, grid, part, out, G, K, BLOCK_G=16, BLOCK_C=block_c, num_warps=4)
    launch_counts["sum_partials"] += 1
    return out


def compose_backward(
    d_out: torch.Tensor,
    g: torch.Tensor,
    inner: torch.Tensor | None,
    scaling: float,
    *,
    channel_dim: int = -1,
    lora_dtype: torch.dtype,
    base_dtype: torch.dtype,
    need_lora: bool = True,
    need_base: bool = True,
    need_g: bool = True,
    wrap: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """One pass over ``d_out``: ``(g * s) * d_out``, ``(g - 1) * d_out`` and ``sum_rows(inner * d_out)``.

    Args:
        d_out: gradient of the composition, ``[..., C, ...]`` fp16/bf16/fp32.
        g: ``[C]`` along ``channel_dim``.
        inner: ``base + s * lora`` saved by the forward (same shape as ``d_out``); needed iff ``need_g``.
        lora_dtype, base_dtype: dtypes of ``d_lora`` / ``d_base``.

    Returns:
        ``(d_lora, d_base, d_g)``: ``None`` where not needed; ``d_g`` is ``[C]`` in ``g``'s dtype,
        accumulated in fp32 and bitwise reproducible.
    """
    if need_g and inner is None:
        raise RuntimeError("the magnitude gradient needs `inner`, which the forward did not save")
    C = d_out.shape[channel_dim]
    if g.dim() != 1 or g.shape[0] != C:
        raise ValueError(f"g must be a vector of {C}, got shape {tuple(g.shape)}")
    if need_g and inner.shape != d_out.shape:  # type: ignore[union-attr]
        raise ValueError("inner must have d_out's shape")
    _check_dtypes(d_out, g, *((inner,) if need_g else ()))
    if lora_dtype not in KERNEL_DTYPES or base_dtype not in KERNEL_DTYPES:
        raise TypeError("d_lora / d_base dtypes must be kernel dtypes")
    if not (need_lora or need_base or need_g):
        return None, None, None
    if d_out.numel() == 0:
        d_lora = torch.empty(d_out.shape, dtype=lora_dtype, device=d_out.device) if need_lora else None
        d_base = torch.empty(d_out.shape, dtype=base_dtype, device=d_out.device) if need_base else None
        return d_lora, d_base, (torch.zeros(C, dtype=g.dtype, device=d_out.device) if need_g else None)
    return compose_backward_unchecked(
        d_out, g, inner, scaling, channel_dim, lora_dtype, base_dtype, need_lora, need_base, need_g, wrap
    )


def compose_backward_unchecked(
    d_out: torch.Tensor,
    g: torch.Tensor,
    inner: torch.Tensor | None,
    scaling: float,
    channel_dim: int,
    lora_dtype: torch.dtype,
    base_dtype: torch.dtype,
    need_lora: bool,
    need_base: bool,
    need_g: bool,
    wrap: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """:func:`compose_backward` for callers that validated (the hot path); ``d_out`` non-empty."""
    if not g.is_contiguous():
        g = g.contiguous()
    if not need_g:
        inner = None
    nd = d_out.dim()
    if channel_dim == -1 or channel_dim == nd - 1:
        C = d_out.shape[-1]
        d2, s_d = _as_cols(d_out, C)
        x2, s_x = _as_cols(inner, C) if need_g else (None, 0)  # type: ignore[arg-type]
        d_lora = torch.empty_like(d_out, dtype=lora_dtype, memory_format=torch.contiguous_format) if need_lora else None
        d_base = torch.empty_like(d_out, dtype=base_dtype, memory_format=torch.contiguous_format) if need_base else None
        d_g = _bwd_cols(d2, g, x2, d_lora, d_base, d_out.numel() // C, C, s_d, s_x, scaling, wrap)
        return d_lora, d_base, d_g
    cd = channel_dim % nd
    C = d_out.shape[cd]
    device = d_out.device
    # Plan the layout from d_out; inner follows it (copied only if its memory differs).
    d_m = _cols_view(d_out.movedim(cd, -1), C)
    if d_m is not None:
        moved_shape = d_out.movedim(cd, -1).shape
        R = d_m.shape[0]
        x_m = None
        if need_g:
            x_m = _cols_view(inner.movedim(cd, -1), C)  # type: ignore[union-attr]
            if x_m is None:
                x_m = inner.movedim(cd, -1).contiguous().view(-1, C)  # type: ignore[union-attr]
        d_lora = torch.empty((R, C), dtype=lora_dtype, device=device) if need_lora else None
        d_base = torch.empty((R, C), dtype=base_dtype, device=device) if need_base else None
        d_g = _bwd_cols(d_m, g, x_m, d_lora, d_base, R, C, d_m.stride(0), x_m.stride(0) if need_g else 0, scaling, wrap)
        return (
            d_lora.view(moved_shape).movedim(-1, cd) if need_lora else None,
            d_base.view(moved_shape).movedim(-1, cd) if need_base else None,
            d_g,
        )
    N = d_out.shape[:cd].numel()
    S = d_out.shape[cd + 1 :].numel()
    d3 = d_out.contiguous().view(N * C, S)
    x3 = inner.contiguous().view(N * C, S) if need_g else None  # type: ignore[union-attr]
    d_lora = torch.empty((N * C, S), dtype=lora_dtype, device=device) if need_lora else None
    d_base = torch.empty((N * C, S), dtype=base_dtype, device=device) if need_base else None
    d_g = _bwd_rows(d3, g, x3, d_lora, d_base, scaling, C, wrap)
    shape = d_out.shape
    return (d_lora.view(shape) if need_lora else None, d_base.view(shape) if need_base else None, d_g)


def _bwd_cols(d2, g, x2, d_lora, d_base, R, K, s_d, s_x, scaling, wrap) -> torch.Tensor | None:
    """``g`` along the columns; ``d_lora`` / ``d_base`` contiguous ``[R, K]`` (or None). Returns ``d_g``."""
    _check_size(R, K)
    need_g = x2 is not None
    device = d2.device
    groups, per_group = _row_groups(R, K, device, _ROW_GRANULE)
    # eager: the kernel's last program per column tile sums the partials (no second launch), so they live in
    # a reused scratch buffer; inside a torch.library op (torch.compile) the ticket and scratch buffers, state
    # shared across launches, stay out of the graph and _sum_partials_kernel sums a fresh [groups, K] buffer
    fused_sum = need_g and not wrap
    part = None
    if fused_sum:
        part = partials_buffer(device, groups * K)
    elif need_g:
        part = torch.empty((groups, K), dtype=torch.float32, device=device)
    d_g = torch.empty(K, dtype=g.dtype, device=device) if fused_sum else None
    tickets = ticket_buffer(device, K) if fused_sum else None  # >= one per column tile, any config
    bucket = _row_bucket(R)
    need_lora, need_base = d_lora is not None, d_base is not None
    args = (d2, g, x2, d_lora, d_base, part, d_g, tickets, R, K, groups, per_group, s_d, s_x, K, K, scaling, bucket)
    args += (need_lora, need_base, need_g, fused_sum)
    key = (K, bucket, need_lora, need_base, need_g, d2.dtype, g.dtype)
    key += (x2.dtype if need_g else None, d_lora.dtype if need_lora else None, d_base.dtype if need_base else None)
    _launch(_BWD_COLS, lambda br, bc: (groups, cdiv(K, bc)), args, key, per_group, K, wrap)
    if fused_sum:
        return d_g
    return _sum_partials(part, g.dtype, wrap) if need_g else None


def _bwd_rows(d2, g, x2, d_lora, d_base, scaling, C, wrap) -> torch.Tensor | None:
    """Contiguous ``[N * C, S]`` operands, row ``r`` uses ``g[r % C]``. Returns ``d_g``."""
    R, S = d2.shape
    _check_size(R, S)
    need_g = x2 is not None
    # Split the reduction (S) into groups when there are too few rows to fill the GPU.
    target = BACKWARD_PROGRAMS_PER_SM * num_sms(d2.device)
    groups = max(1, min(_MAX_GROUPS, target // cdiv(R, 16), cdiv(S, _ROW_GRANULE)))
    per_group = cdiv(cdiv(S, groups), _ROW_GRANULE) * _ROW_GRANULE
    groups = cdiv(S, per_group)
    part = torch.empty((groups, R), dtype=torch.float32, device=d2.device) if need_g else None
    bucket = _row_bucket(R)
    need_lora, need_base = d_lora is not None, d_base is not None
    args = (d2, g, x2, d_lora, d_base, part, R, S, C, per_group, scaling, bucket, need_lora, need_base, need_g)
    key = (S, bucket, need_lora, need_base, need_g, d2.dtype, g.dtype)
    key += (x2.dtype if need_g else None, d_lora.dtype if need_lora else None, d_base.dtype if need_base else None)
    _launch(_BWD_ROWS, lambda br, bc: (cdiv(R, br), groups), args, key, R, per_group, wrap)
    # part[group, n * C + c] -> [groups * N, C], summed over its rows.
    return _sum_partials(part.view(-1, C), g.dtype, wrap) if need_g else None
