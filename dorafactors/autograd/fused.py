"""Bridge from the autograd code to the Triton compose kernels, with the PyTorch reference as fallback.

Who calls what:

* :func:`dorafactors.autograd.compose.dora_compose` asks :func:`available_for`, then runs :func:`compose`
  (inference) or its fused autograd Function (:func:`forward` / :func:`backward`); while ``torch.compile``
  traces it asks :func:`compiled_ok` and calls the ``torch.library`` ops of :mod:`.ops` instead.
* The ``base_result=None`` path (:mod:`.recompute_base`) calls :func:`compose_into` per column chunk and
  :func:`compose_backward` once; both pick the kernel or the reference themselves.
* The Linear node with ``lora_B`` inside (:mod:`.lora_compose`) calls :func:`compose_inplace`,
  :func:`compose`, :func:`compose_into` and :func:`compose_backward_lora_b`.

Triton is imported on the first kernel call, never at import of this module.
"""

from __future__ import annotations

import torch

from ..dispatch import rules
from ..kernels.compose_reference import (
    compose_backward_reference,
    compose_forward_reference,
    lora_b_grads_reference,
)
from ..kernels.operands import KERNEL_DTYPES

__all__ = [
    "available_for",
    "backward",
    "compiled_ok",
    "compose",
    "compose_backward",
    "compose_backward_lora_b",
    "compose_inplace",
    "compose_into",
    "forward",
    "kernel_divides",
]

_kernels = None


def _k():
    """The kernel module, imported on first use (it imports Triton)."""
    global _kernels
    if _kernels is None:
        from ..kernels import compose as kernels

        _kernels = kernels
    return _kernels


def available_for(
    lora: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    channel_dim: int,
    *,
    training: bool,
    out_dtype: torch.dtype | None = None,
) -> bool:
    """True when the Triton compose (and, in training, its one-pass backward) should run (eager only)."""
    ok, _ = rules.fused_compose_ok(lora, base, scale, out_dtype)
    if ok and training:
        cols = lora.shape[channel_dim]
        nd = lora.dim()
        ok, _ = rules.fused_backward_ok(lora.numel() // cols, cols, channel_dim % nd == nd - 1)
    return ok


@rules.constant_while_compiling
def compiled_ok(
    device_type: str,
    lora_dtype: torch.dtype,
    base_dtype: torch.dtype,
    scale_dtype: torch.dtype,
    out_dtype: torch.dtype,
    training: bool,
) -> bool:
    """The compose decision while ``torch.compile`` traces (evaluated once per graph, baked in).

    Depends only on device type, dtypes and the dispatch settings; loads the ``torch.library`` ops when
    it says yes, so the traced code only looks them up.
    """
    ok, _ = rules.compiled_compose_ok(device_type, lora_dtype, base_dtype, scale_dtype, out_dtype, training)
    if ok:
        from . import ops  # noqa: F401  (registers torch.ops.dorafactors.*)
    return ok


def compose(
    lora: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    scaling: float,
    *,
    channel_dim: int,
    out_dtype: torch.dtype,
    inplace: bool = False,
) -> torch.Tensor:
    """Inference compose on the kernel (no autograd); ``inplace`` writes into ``lora`` when it can."""
    kernels = _k()
    if (
        inplace
        and out_dtype == lora.dtype
        and channel_dim % lora.dim() == lora.dim() - 1
        and kernels._cols_view(lora, lora.shape[-1]) is not None
    ):
        return kernels.compose_forward_(lora, base, scale, scaling)
    out, _ = kernels.compose_forward_unchecked(lora, base, scale, scaling, channel_dim, out_dtype, False)
    return out


def compose_inplace(
    lora: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    scaling: float,
    add_base: bool = False,
    divisor: torch.Tensor | None = None,
) -> torch.Tensor:
    """Training forward of the Linear node on the kernel, written over ``lora`` (its own temporary), ``g``
    along the last dim; the caller checked :func:`available_for` and that ``lora``'s dtype is the output's.
    ``add_base``: ``base + composition`` (the kernel for contiguous operands, else the reference).
    ``divisor``: ``scale`` is the magnitude ``m`` and ``g = m / divisor`` (inside the kernel where it takes
    the division: :func:`kernel_divides`)."""
    contiguous = lora.is_contiguous() and base.is_contiguous() and scale.is_contiguous()
    if contiguous and (divisor is None or kernel_divides(scale, divisor)):
        return _k().compose_forward_contiguous_(lora, base, scale, scaling, add_base, divisor)
    if divisor is not None:
        scale = scale / divisor
    if add_base:
        out, _ = compose_forward_reference(lora, base, scale, scaling, out_dtype=lora.dtype, add_base=True)
        return out
    return compose(lora, base, scale, scaling, channel_dim=-1, out_dtype=lora.dtype, inplace=True)


def kernel_divides(magnitude: torch.Tensor, divisor: torch.Tensor) -> bool:
    """True when the kernels take ``g = magnitude / divisor`` themselves: a contiguous fp16/bf16/fp32
    magnitude and a contiguous fp32 divisor (the division is then fp32, as PyTorch's)."""
    return (
        divisor.dtype == torch.float32
        and magnitude.dtype in KERNEL_DTYPES
        and magnitude.is_contiguous()
        and divisor.is_contiguous()
    )


def forward(
    lora: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    scaling: float,
    *,
    channel_dim: int,
    out_dtype: torch.dtype,
    save_inner: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Training forward on the kernel: ``(out, inner or None)``."""
    return _k().compose_forward_unchecked(lora, base, scale, scaling, channel_dim, out_dtype, save_inner)


def backward(
    d_out: torch.Tensor,
    scale: torch.Tensor,
    inner: torch.Tensor | None,
    scaling: float,
    *,
    channel_dim: int,
    lora_dtype: torch.dtype,
    base_dtype: torch.dtype,
    need_lora: bool,
    need_base: bool,
    need_scale: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """One-pass backward on the kernel (the forward already chose the kernel path and validated)."""
    return _k().compose_backward_unchecked(
        d_out, scale, inner, scaling, channel_dim, lora_dtype, base_dtype, need_lora, need_base, need_scale
    )


def compose_into(
    out: torch.Tensor,
    inner: torch.Tensor | None,
    lora: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    scaling: float,
) -> None:
    """Write ``(g-1)*base + g*(s*lora)`` into ``out`` (and ``base + s*lora`` into ``inner``); last-dim ``g``.

    ``out``, ``inner`` and ``lora`` may be column slices (row-strided views) of larger tensors: the kernel
    writes through them. ``inner`` is passed in training with a trainable magnitude, so
    ``PEFT_DORA_FUSED_BACKWARD=0`` sends that case to the reference.
    """
    if not torch.compiler.is_compiling() and _into_ok(out, inner, lora, base, scale):
        _k().compose_forward_into(out, inner, lora, base, scale, scaling)
        return
    value, inner_value = compose_forward_reference(
        lora, base, scale, scaling, channel_dim=-1, out_dtype=out.dtype, save_inner=inner is not None
    )
    out.copy_(value)
    if inner is not None:
        inner.copy_(inner_value)


def _into_ok(out, inner, lora, base, scale) -> bool:
    ok, _ = rules.fused_compose_ok(lora, base, scale, out.dtype)
    if ok and (out.device != lora.device or (inner is not None and inner.dtype != out.dtype)):
        ok = False
    if ok and inner is not None:
        ok, _ = rules.fused_backward_enabled()
    return ok


def compose_backward(
    d_out: torch.Tensor,
    scale: torch.Tensor,
    inner: torch.Tensor | None,
    scaling: float,
    *,
    lora_dtype: torch.dtype,
    base_dtype: torch.dtype,
    need_lora: bool,
    need_base: bool,
    need_scale: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(d_lora, d_base, d_g)`` for a last-dim ``g``; ``None`` for what is not needed."""
    if not torch.compiler.is_compiling():
        ok, _ = rules.fused_compose_backward_ok(d_out, inner if need_scale else None, scale, lora_dtype, base_dtype)
        if ok:
            return backward(
                d_out,
                scale,
                inner,
                scaling,
                channel_dim=-1,
                lora_dtype=lora_dtype,
                base_dtype=base_dtype,
                need_lora=need_lora,
                need_base=need_base,
                need_scale=need_scale,
            )
    return compose_backward_reference(
        d_out,
        scale,
        inner,
        scaling,
        channel_dim=-1,
        lora_dtype=lora_dtype,
        base_dtype=base_dtype,
        need_lora=need_lora,
        need_base=need_base,
        need_scale=need_scale,
    )


def compose_backward_lora_b(
    d_out: torch.Tensor,
    scale: torch.Tensor,
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
    kernel: bool | None = None,
    add_base: bool = False,
    divisor: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(d_base, d_B, (g s) B, d_g)`` of the Linear node (``lora_compose``) from ``d_out`` and ``M = d_out^T h``:
    one kernel launch where the training compose takes the kernels (``rules.fused_compose_backward_ok``, or
    ``kernel``: the forward's :func:`available_for` on the same activations), else the references
    (``compose_backward_reference`` and ``lora_b_grads_reference``). ``scale`` is fp32 (fp64). ``add_base``:
    the node returned ``base + composition`` (``d_base = d_out + (g - 1) d_out``).

    ``divisor``: ``scale`` is the magnitude ``m`` (any float dtype), ``g = m / divisor``, and the last result
    is ``m``'s gradient ``d_g / divisor`` in ``m``'s dtype: autograd's division node and its cast to the
    parameter's dtype, bitwise (fp32 division rounded to nearest, one rounding to ``m``'s dtype)."""
    dtypes_ok = weight_b.dtype in KERNEL_DTYPES and (scaled_b_dtype is None or scaled_b_dtype in KERNEL_DTYPES)
    if divisor is not None and not kernel_divides(scale, divisor):
        dtypes_ok = False
    if dtypes_ok and not torch.compiler.is_compiling():
        ok = kernel
        if ok is None:
            ok, _ = rules.fused_compose_backward_ok(d_out, base if need_g else None, scale, d_out.dtype, base_dtype)
        if ok:
            return _k().compose_backward_lora_b(
                d_out,
                scale,
                base,
                m,
                weight_b,
                h,
                scaling,
                base_dtype=base_dtype,
                need_base=need_base,
                need_b=need_b,
                scaled_b_dtype=scaled_b_dtype,
                need_g=need_g,
                add_base=add_base,
                divisor=divisor,
            )
    magnitude = scale
    if divisor is not None:
        scale = magnitude / divisor
    d_base = d_g_base = None
    if need_base or need_g:
        _, d_base, d_g_base = compose_backward_reference(
            d_out,
            scale,
            base,
            scaling,
            lora_dtype=d_out.dtype,
            base_dtype=base_dtype,
            need_lora=False,
            need_base=need_base,
            need_scale=need_g,
            add_base=add_base,
        )
    d2 = d_out.reshape(-1, d_out.shape[-1])
    d_b, scaled_b, d_g = lora_b_grads_reference(
        m,
        weight_b,
        scale,
        d_g_base,
        scaling,
        d_out=d2,
        h=h,
        need_b=need_b,
        scaled_b_dtype=scaled_b_dtype,
        need_g=need_g,
    )
    if divisor is not None and d_g is not None:
        d_g = (d_g / divisor).to(magnitude.dtype)
    return d_base, d_b, scaled_b, d_g
