"""Plain PyTorch reference of the DoRA composition, forward and backward.

    out   = (g - 1) * base + g * (s * lora)        # the numerically stable form
    inner = base + s * lora                         # what the magnitude gradient needs
    d_lora = g * s * d_out;  d_base = (g - 1) * d_out;  d_g = sum_rows(inner * d_out)

``g`` is a vector over the channel dimension (last dim for Linear/Embedding, dim 1 for Conv) broadcast
over every other dimension. All arithmetic is fp32 (fp64 when an operand is fp64) with one rounding to the
output dtype, which is what the Triton kernels in ``compose.py`` reproduce.
"""

from __future__ import annotations

import torch

from .operands import compute_dtype_for

__all__ = [
    "broadcast_scale",
    "compose_backward_reference",
    "compose_forward_reference",
]


def broadcast_scale(scale: torch.Tensor, ndim: int, channel_dim: int) -> torch.Tensor:
    """View the ``[C]`` vector ``scale`` so it broadcasts along ``channel_dim`` of an ``ndim`` tensor."""
    shape = [1] * ndim
    shape[channel_dim] = scale.numel()
    return scale.reshape(shape)


def compose_forward_reference(
    lora: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    scaling: float,
    *,
    channel_dim: int = -1,
    out_dtype: torch.dtype | None = None,
    save_inner: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference forward.

    Args:
        lora, base: activations, same shape ``[..., C, ...]`` (fp16/bf16/fp32/fp64, may differ).
        scale: ``g`` ``[C]`` (typically fp32).
        scaling: ``s``.
        channel_dim: the dimension ``g`` runs along.
        out_dtype: dtype of ``out`` and ``inner`` (default: ``promote(lora, base)``).
        save_inner: also return ``inner = base + s * lora`` (rounded to ``out_dtype``).
    """
    out_dtype = out_dtype or torch.promote_types(lora.dtype, base.dtype)
    cdt = compute_dtype_for(lora.dtype, base.dtype, scale.dtype)
    g = broadcast_scale(scale.detach().to(cdt), lora.dim(), channel_dim)
    s_lora = lora.detach().to(cdt) * scaling
    b = base.detach().to(cdt)
    out = torch.addcmul((g - 1.0) * b, g, s_lora).to(out_dtype)
    inner = (b + s_lora).to(out_dtype) if save_inner else None
    return out, inner


def compose_backward_reference(
    d_out: torch.Tensor,
    scale: torch.Tensor,
    inner: torch.Tensor | None,
    scaling: float,
    *,
    channel_dim: int = -1,
    lora_dtype: torch.dtype,
    base_dtype: torch.dtype,
    need_lora: bool = True,
    need_base: bool = True,
    need_scale: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Reference backward: ``(d_lora, d_base, d_g)``; ``d_g`` is ``[C]`` in ``scale.dtype``."""
    cdt = compute_dtype_for(d_out.dtype, scale.dtype)
    g = broadcast_scale(scale.detach().to(cdt), d_out.dim(), channel_dim)
    grad = d_out.to(cdt)
    d_lora = (grad * (g * scaling)).to(lora_dtype) if need_lora else None
    d_base = (grad * (g - 1.0)).to(base_dtype) if need_base else None
    d_scale = None
    if need_scale:
        if inner is None:
            raise RuntimeError("the magnitude gradient needs `inner`, which the forward did not save")
        dims = [d for d in range(d_out.dim()) if d != channel_dim % d_out.dim()]
        d_scale = (inner.to(cdt) * grad).sum(dim=dims).to(scale.dtype)
    return d_lora, d_base, d_scale
