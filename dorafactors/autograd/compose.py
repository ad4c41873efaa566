"""Autograd for the DoRA composition ``out = (g - 1) * base + g * (s * lora)``.

:func:`dora_compose` is the public functional. In training it saves only what the backward needs: one
activation-sized ``inner = base + s * lora`` when ``g`` (the magnitude scale) requires a gradient, and
nothing activation-sized when the magnitude is frozen. The arithmetic is fp32 (fp64 for fp64 operands)
with one rounding to the activation dtype, on both the Triton and the PyTorch path; ``(g - 1)`` and the
``g`` gradient stay in fp32 under AMP (fp32 magnitude, bf16 activations).

Paths (``dispatch/rules.py`` decides):

* eager, kernels available: inference launches the forward kernel directly; training goes through
  :class:`_ComposeFunction` with ``kernel=True`` (forward kernel that also writes ``inner`` when ``g``
  needs a gradient, one-pass backward kernel);
* while ``torch.compile`` traces: inference and (by default) training trace plain ops that Inductor fuses
  (training with a trainable magnitude through :func:`_compose_saving_inner`, whose backward needs only the
  rounded ``inner``, as eager saves); with ``PEFT_DORA_FUSED_BACKWARD=1`` training runs the ``torch.library``
  Triton ops of :mod:`.ops` (kernels inside the compiled graph, no graph break);
* inside a ``torch.func`` transform or while ``torch.jit`` traces: plain differentiable PyTorch ops
  (:func:`_compose_plain`; functorch cannot run these custom Functions, a trace cannot record a kernel);
* otherwise the PyTorch reference (:class:`_ComposeFunction` with ``kernel=False`` in training).

Second-order gradients (``create_graph=True``, e.g. a gradient penalty) are exact on every eager path:
while a graph is being created the backward is plain autograd ops (see :class:`_ComposeFunction`). Under
``torch.compile`` the compiled backward cannot be differentiated again; PyTorch raises for it, as it does
for stock PEFT.
"""

from __future__ import annotations

import torch

from ..dispatch import rules
from ..kernels.compose_reference import (
    broadcast_scale,
    compose_backward_reference,
    compose_forward_reference,
)
from ..kernels.operands import compute_dtype_for, promote
from . import fused

__all__ = ["dora_compose"]


def reference_backward(
    d_out: torch.Tensor | None,
    g: torch.Tensor | None,
    inner: torch.Tensor | None,
    d_inner: torch.Tensor | None,
    scaling: float,
    *,
    channel_dim: int,
    lora_dtype: torch.dtype,
    base_dtype: torch.dtype,
    need_lora: bool,
    need_base: bool,
    need_g: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The composition's backward in plain (differentiable) ops, shared by the autograd Functions and the
    ``torch.library`` op: ``(d_lora, d_base, d_g)`` by :func:`compose_backward_reference`; with only
    ``d_inner`` (no ``d_out``: double backward through ``inner = base + s * lora``): ``(s d_inner, d_inner, None)``."""
    if d_out is None:
        extra = d_inner.to(compute_dtype_for(d_inner.dtype))  # type: ignore[union-attr]
        return (
            (extra * scaling).to(lora_dtype) if need_lora else None,
            extra.to(base_dtype) if need_base else None,
            None,
        )
    return compose_backward_reference(
        d_out,
        g,
        inner,
        scaling,
        channel_dim=channel_dim,
        lora_dtype=lora_dtype,
        base_dtype=base_dtype,
        need_lora=need_lora,
        need_base=need_base,
        need_scale=need_g,
        d_inner=d_inner,
    )


class _ComposeFunction(torch.autograd.Function):
    """Custom autograd of the composition; the forward runs the Triton kernel (``kernel=True``) or the
    PyTorch reference, and saves ``g`` plus, only when ``g`` needs a gradient, ``inner``.

    ``inner`` is returned as a second output (the caller drops it) so that the saved copy stays connected
    to this node: in a double backward, the gradient that reaches ``inner`` through ``d_g`` comes back here
    as ``d_inner`` and goes on to ``lora`` and ``base``.

    Second-order gradients: when a graph is being created (``create_graph=True``, so grad mode is on inside
    ``backward``), or when ``d_inner`` arrives, the backward is :func:`compose_backward_reference`, which is
    plain autograd ops on the saved ``g`` (still connected to the magnitude) and ``inner``: exact, on every
    path. Otherwise it is the one-pass kernel or the reference with no graph. (``once_differentiable`` would
    not do: it raises only when an incoming gradient requires grad and silently drops the dependence of
    ``d_lora`` / ``d_base`` on a saved ``g`` that does.)
    """

    @staticmethod
    def forward(ctx, lora, base, scale, scaling, channel_dim, out_dtype, kernel):  # type: ignore[override]
        save_inner = ctx.needs_input_grad[2]
        if kernel:
            out, inner = fused.forward(
                lora, base, scale, scaling, channel_dim=channel_dim, out_dtype=out_dtype, save_inner=save_inner
            )
        else:
            out, inner = compose_forward_reference(
                lora, base, scale, scaling, channel_dim=channel_dim, out_dtype=out_dtype, save_inner=save_inner
            )
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(scale, inner)
        ctx.scaling = scaling
        ctx.channel_dim = channel_dim
        ctx.lora_dtype = lora.dtype
        ctx.base_dtype = base.dtype
        ctx.kernel = kernel
        return out, inner

    @staticmethod
    def backward(ctx, d_out, d_inner):  # type: ignore[override]
        need_lora, need_base, need_scale = ctx.needs_input_grad[:3]
        if d_out is None and d_inner is None:
            return None, None, None, None, None, None, None
        if d_out is None:  # only through inner (double backward): g and inner are not needed
            scale = inner = None
        else:
            scale, inner = ctx.saved_tensors
        if ctx.kernel and d_inner is None and not torch.is_grad_enabled():
            grads = fused.backward(
                d_out,
                scale,
                inner,
                ctx.scaling,
                channel_dim=ctx.channel_dim,
                lora_dtype=ctx.lora_dtype,
                base_dtype=ctx.base_dtype,
                need_lora=need_lora,
                need_base=need_base,
                need_scale=need_scale,
            )
        else:
            grads = reference_backward(
                d_out,
                scale,
                inner,
                d_inner,
                ctx.scaling,
                channel_dim=ctx.channel_dim,
                lora_dtype=ctx.lora_dtype,
                base_dtype=ctx.base_dtype,
                need_lora=need_lora,
                need_base=need_base,
                need_g=need_scale,
            )
        return (*grads, None, None, None, None)


def _compose_plain(lora, base, scale, scaling, channel_dim, out_dtype):
    """The composition in plain PyTorch ops, differentiable by autograd and by ``torch.func`` transforms,
    recordable by ``torch.jit.trace``; fp32 arithmetic (fp64 for fp64 operands), one rounding."""
    cdt = compute_dtype_for(lora.dtype, base.dtype, scale.dtype)
    g = broadcast_scale(scale.to(cdt), lora.dim(), channel_dim)
    return torch.addcmul((g - 1.0) * base.to(cdt), g, lora.to(cdt) * scaling).to(out_dtype)


def _compose_saving_inner(lora, base, scale, scaling, channel_dim, out_dtype):
    """The composition for a compiled training graph: plain ops whose backward needs only ``g`` and the
    rounded ``inner`` (one ``[..., C]`` activation in ``out_dtype``, what :class:`_ComposeFunction` saves),
    where :func:`_compose_plain` makes AOTAutograd save both ``base`` and ``lora``.

    Forward: bitwise :func:`_compose_plain`'s output. The composition itself runs on a detached ``g``
    (``d_lora = g s d_out``, ``d_base = (g - 1) d_out``, the same ops as there), and ``g`` enters only through

        out = composition(g.detach()) - ((g.detach() - g) * inner + 0)

    whose value is ``+0`` (``x - x`` is ``+0``, ``+-0 + 0`` is ``+0``, and ``x - (+0)`` is ``x`` for every ``x``,
    ``-0``, infinities and NaN included), and whose gradient is ``d_g = sum_rows(d_out * inner)``, accumulated
    in fp32 (fp64) like :func:`compose_backward_reference`. ``inner = (base + s lora)`` rounded to ``out_dtype``
    exactly as the eager Function rounds it, and detached: the partitioner then saves that one tensor (it
    recomputes everything else from it and ``g``).

    Non-finite values cannot take part in a term that must be exactly zero (``0 * inf`` is NaN), so the saved
    ``inner`` is made finite (NaN -> 0, +-inf -> the largest finite ``out_dtype`` value): a NaN ``inner``
    contributes 0 to ``d_g`` and an infinite one ``d_out`` times that value, and a column whose ``g`` is
    infinite or NaN (all its outputs are non-finite) gets ``d_g = 0``; the eager Function's ``d_g`` is non-finite
    in the first two cases and ``sum_rows(d_out * inner)`` in the last. Finite values are exact.

    First-order only: ``g.detach()`` cuts the dependence of ``d_lora`` / ``d_base`` on ``g``, so a second
    derivative through them would miss terms. A compiled backward cannot be differentiated again anyway;
    ``torch.func`` transforms and ``torch.jit`` tracing keep :func:`_compose_plain` (exact to every order).
    """
    cdt = compute_dtype_for(lora.dtype, base.dtype, scale.dtype)
    g = broadcast_scale(scale.to(cdt), lora.dim(), channel_dim)
    g_const = g.detach()
    b = base.to(cdt)
    s_lora = lora.to(cdt) * scaling
    composed = torch.addcmul((g_const - 1.0) * b, g_const, s_lora)
    inner = torch.nan_to_num((b + s_lora).to(out_dtype).detach(), nan=0.0)  # the saved tensor: finite
    zero_with_g_grad = torch.where(torch.isfinite(g_const), g_const - g, 0.0)  # value +0, d/dg = -1
    zero = zero_with_g_grad * inner.to(cdt) + 0.0  # value +0 (never -0, never NaN)
    return (composed - zero).to(out_dtype)


def _compose_compiled(lora, base, scale, scaling, channel_dim, out_dtype, needs_grad):
    """The path taken while ``torch.compile`` traces.

    Without a gradient to record: the reference's plain ops (fp32 arithmetic, one rounding), which Inductor
    fuses into one pointwise kernel together with what follows (PEFT's ``result + extra``), instead of an
    opaque op whose output must be written out and read back. In training: the Triton ops where
    ``rules.compiled_compose_ok`` runs the kernels (``PEFT_DORA_FUSED_BACKWARD=1``), else plain differentiable
    ops that AOTAutograd differentiates itself (:func:`_compose_saving_inner` when ``g`` needs a gradient).
    Never :class:`_ComposeFunction`: Dynamo traces a custom Function's ``forward`` and ``backward`` itself, and
    torch 2.11's trace of this one lost its gradients on CUDA (every adapter gradient zero); plain ops leave
    nothing to that machinery.
    """
    if not needs_grad:
        out, _ = compose_forward_reference(lora, base, scale, scaling, channel_dim=channel_dim, out_dtype=out_dtype)
        return out
    if fused.compiled_ok(lora.device.type, lora.dtype, base.dtype, scale.dtype, out_dtype, needs_grad):
        if scale.requires_grad:
            out, _ = torch.ops.dorafactors.compose_and_inner(lora, base, scale, scaling, channel_dim, out_dtype)
            return out
        return torch.ops.dorafactors.compose(lora, base, scale, scaling, channel_dim, out_dtype)
    if scale.requires_grad:
        return _compose_saving_inner(lora, base, scale, scaling, channel_dim, out_dtype)
    return _compose_plain(lora, base, scale, scaling, channel_dim, out_dtype)


def dora_compose(
    lora: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    scaling: float,
    *,
    channel_dim: int = -1,
    out_dtype: torch.dtype | None = None,
    inplace: bool = False,
) -> torch.Tensor:
    """DoRA composition ``(g - 1) * base + g * (scaling * lora)``, differentiable in all three tensors.

    Args:
        lora: ``s``-less LoRA branch output ``B(A(x))``, ``[..., C, ...]``, fp16/bf16/fp32/fp64.
        base: base-layer output without bias, same shape as ``lora``.
        scale: ``g = m / ||W + s B A||``, shape ``[C]`` (fp32 or the magnitude dtype).
        scaling: ``s``, a Python float.
        channel_dim: dimension of ``lora`` that ``g`` runs along (-1 for Linear/Embedding, 1 for Conv).
        out_dtype: result dtype; default ``promote(lora.dtype, base.dtype)`` (the activation dtype).
        inplace: when no gradient is needed, the kernel may write the result into ``lora``'s memory
            (``lora`` must not be used afterwards); ignored otherwise.

    Returns:
        Tensor shaped like ``lora`` in ``out_dtype``.
    """
    if lora.shape != base.shape:
        raise ValueError(f"lora {tuple(lora.shape)} and base {tuple(base.shape)} must have the same shape")
    if scale.dim() != 1 or scale.numel() != lora.shape[channel_dim]:
        raise ValueError(
            f"scale must be a vector of {lora.shape[channel_dim]} (dim {channel_dim} of lora), "
            f"got shape {tuple(scale.shape)}"
        )
    scaling = float(scaling)
    out_dtype = out_dtype or promote(lora.dtype, base.dtype)
    needs_grad = torch.is_grad_enabled() and (lora.requires_grad or base.requires_grad or scale.requires_grad)
    if torch.compiler.is_compiling():
        return _compose_compiled(lora, base, scale, scaling, channel_dim, out_dtype, needs_grad)
    if rules.plain_autograd_required():
        return _compose_plain(lora, base, scale, scaling, channel_dim, out_dtype)
    if fused.available_for(lora, base, scale, channel_dim, training=needs_grad, out_dtype=out_dtype):
        if needs_grad:
            return _ComposeFunction.apply(lora, base, scale, scaling, channel_dim, out_dtype, True)[0]
        return fused.compose(lora, base, scale, scaling, channel_dim=channel_dim, out_dtype=out_dtype, inplace=inplace)
    if not needs_grad:
        out, _ = compose_forward_reference(lora, base, scale, scaling, channel_dim=channel_dim, out_dtype=out_dtype)
        return out
    return _ComposeFunction.apply(lora, base, scale, scaling, channel_dim, out_dtype, False)[0]
