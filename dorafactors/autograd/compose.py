"""Autograd for the DoRA composition ``out = (g - 1) * base + g * (s * lora)``.

:func:`dora_compose` is the public functional. In training it saves only what the backward needs: one
activation-sized ``inner = base + s * lora`` when ``g`` (the magnitude scale) requires a gradient, and
nothing activation-sized when the magnitude is frozen. The arithmetic is fp32 (fp64 for fp64 operands)
with one rounding to the activation dtype, on both the Triton and the PyTorch path; ``(g - 1)`` and the
``g`` gradient stay in fp32 under AMP (fp32 magnitude, bf16 activations).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..kernels.compose_reference import compose_backward_reference, compose_forward_reference

__all__ = ["dora_compose"]


class _ReferenceCompose(torch.autograd.Function):
    """Custom autograd around the PyTorch reference (saves ``inner`` instead of fp32 temporaries)."""

    @staticmethod
    def forward(ctx, lora, base, scale, scaling, channel_dim, out_dtype):  # type: ignore[override]
        save_inner = ctx.needs_input_grad[2]
        out, inner = compose_forward_reference(
            lora, base, scale, scaling, channel_dim=channel_dim, out_dtype=out_dtype, save_inner=save_inner
        )
        ctx.save_for_backward(scale, inner)
        ctx.scaling = scaling
        ctx.channel_dim = channel_dim
        ctx.lora_dtype = lora.dtype
        ctx.base_dtype = base.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out):  # type: ignore[override]
        scale, inner = ctx.saved_tensors
        d_lora, d_base, d_scale = compose_backward_reference(
            d_out,
            scale,
            inner,
            ctx.scaling,
            channel_dim=ctx.channel_dim,
            lora_dtype=ctx.lora_dtype,
            base_dtype=ctx.base_dtype,
            need_lora=ctx.needs_input_grad[0],
            need_base=ctx.needs_input_grad[1],
            need_scale=ctx.needs_input_grad[2],
        )
        return d_lora, d_base, d_scale, None, None, None


def dora_compose(
    lora: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    scaling: float,
    *,
    channel_dim: int = -1,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """DoRA composition ``(g - 1) * base + g * (scaling * lora)``, differentiable in all three tensors.

    Args:
        lora: ``s``-less LoRA branch output ``B(A(x))``, ``[..., C, ...]``, fp16/bf16/fp32/fp64.
        base: base-layer output without bias, same shape as ``lora``.
        scale: ``g = m / ||W + s B A||``, shape ``[C]`` (fp32 or the magnitude dtype).
        scaling: ``s``, a Python float.
        channel_dim: dimension of ``lora`` that ``g`` runs along (-1 for Linear/Embedding, 1 for Conv).
        out_dtype: result dtype; default ``promote(lora.dtype, base.dtype)`` (the activation dtype).

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
    out_dtype = out_dtype or torch.promote_types(lora.dtype, base.dtype)
    from . import fused  # deferred: keeps Triton out of the import of a CPU-only install

    needs_grad = torch.is_grad_enabled() and (lora.requires_grad or base.requires_grad or scale.requires_grad)
    if fused.available_for(lora, base, scale, channel_dim, training=needs_grad):
        return fused.compose(lora, base, scale, scaling, channel_dim=channel_dim, out_dtype=out_dtype)
    if not needs_grad:
        out, _ = compose_forward_reference(lora, base, scale, scaling, channel_dim=channel_dim, out_dtype=out_dtype)
        return out
    return _ReferenceCompose.apply(lora, base, scale, scaling, channel_dim, out_dtype)
