"""Plain PyTorch reference of the DoRA composition, forward and backward.

    out   = (g - 1) * base + g * (s * lora)        # the numerically stable form
    inner = base + s * lora                         # what the magnitude gradient needs
    d_lora = g * s * d_out;  d_base = (g - 1) * d_out;  d_g = sum_rows(inner * d_out)

``add_base`` (the Linear node's whole-output mode, ``compose_kernel.py``): ``out = base + ((g - 1) * base +
g * (s * lora))`` and ``d_base = d_out + (g - 1) * d_out``, evaluated in that order.

The backward is itself plain autograd ops, so it also serves as the differentiable backward of the custom
Functions in ``autograd/`` when a graph is being created (``create_graph=True``: second-order gradients).

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
    "lora_b_grads_reference",
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
    add_base: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference forward.

    Args:
        lora, base: activations, same shape ``[..., C, ...]`` (fp16/bf16/fp32/fp64, may differ).
        scale: ``g`` ``[C]`` (typically fp32).
        scaling: ``s``.
        channel_dim: the dimension ``g`` runs along.
        out_dtype: dtype of ``out`` and ``inner`` (default: ``promote(lora, base)``).
        save_inner: also return ``inner = base + s * lora`` (rounded to ``out_dtype``).
        add_base: return ``base + out`` (one rounding).
    """
    out_dtype = out_dtype or torch.promote_types(lora.dtype, base.dtype)
    cdt = compute_dtype_for(lora.dtype, base.dtype, scale.dtype)
    g = broadcast_scale(scale.detach().to(cdt), lora.dim(), channel_dim)
    s_lora = lora.detach().to(cdt) * scaling
    b = base.detach().to(cdt)
    out = torch.addcmul((g - 1.0) * b, g, s_lora)
    out = (b + out if add_base else out).to(out_dtype)
    inner = (b + s_lora).to(out_dtype) if save_inner else None
    return out, inner


def compose_backward_reference(
    d_out: torch.Tensor | None,
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
    d_inner: torch.Tensor | None = None,
    add_base: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Reference backward: ``(d_lora, d_base, d_g)``; ``d_g`` is ``[C]`` in ``scale.dtype``; ``add_base``: the
    forward returned ``base + out``, so ``d_base = d_out + (g - 1) * d_out``.

    Plain autograd ops on the tensors as given (nothing is detached): called with grad mode on (the
    backward of a ``create_graph=True`` pass), the results are differentiable in ``d_out``, ``scale`` and
    ``inner``, which is how the custom Functions give exact second-order gradients.

    ``d_inner`` is the gradient reaching ``inner = base + s * lora`` when ``inner`` itself was used in a
    graph (only in a double backward, through ``d_g``); it adds ``s * d_inner`` to ``d_lora`` and ``d_inner``
    to ``d_base``. ``d_out`` may be None when only ``d_inner`` arrives; ``d_g`` is then None (zero).
    """
    ref = d_out if d_out is not None else d_inner
    if ref is None:
        return None, None, None
    cdt = compute_dtype_for(ref.dtype, scale.dtype)
    g = broadcast_scale(scale.to(cdt), ref.dim(), channel_dim)
    grad = None if d_out is None else d_out.to(cdt)
    extra = None if d_inner is None else d_inner.to(cdt)
    d_lora = d_base = d_scale = None
    if need_lora:
        d_lora = _sum_present(
            [None if grad is None else grad * (g * scaling), None if extra is None else extra * scaling]
        ).to(lora_dtype)
    if need_base:
        through = None if grad is None else grad * (g - 1.0)
        if add_base and grad is not None:
            through = grad + through
        d_base = _sum_present([through, extra]).to(base_dtype)
    if need_scale and grad is not None:
        if inner is None:
            raise RuntimeError("the magnitude gradient needs `inner`, which the forward did not save")
        dims = [d for d in range(grad.dim()) if d != channel_dim % grad.dim()]
        d_scale = (inner.to(cdt) * grad).sum(dim=dims).to(scale.dtype)
    return d_lora, d_base, d_scale


def lora_b_grads_reference(
    m: torch.Tensor | None,
    weight_b: torch.Tensor,
    scale: torch.Tensor,
    d_g_base: torch.Tensor | None,
    scaling: float,
    *,
    d_out: torch.Tensor | None = None,
    h: torch.Tensor | None = None,
    need_b: bool,
    scaled_b_dtype: torch.dtype | None,
    need_g: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Reference of ``_lora_b_grads_kernel``: ``(d_B, (g s) B, d_g)`` from ``M = d_out^T h`` ``[d_out, r]``.

    ``d_B = (g s) M`` in ``B``'s dtype; ``(g s) B`` in ``scaled_b_dtype`` (None: not needed); ``d_g = d_g_base +
    s * rowsum(B * M)`` in ``scale``'s dtype, i.e. ``sum_t d_out * (base + s * lora)`` with the LoRA part
    taken from ``M``. Arithmetic in fp32 (fp64 for fp64 operands), one rounding per result; plain autograd
    ops (differentiable, as :func:`compose_backward_reference`).

    With ``d_out`` ``[T, d_out]`` and ``h`` ``[T, r]`` given, rows whose ``g s`` is infinite (an infinite
    magnitude) take ``d_B = sum_t (g s d_out[t]) h[t]``, the non-finite class of the unfactored sum (NaN where
    infinite terms of both signs meet), as the kernel does; this costs a second ``[d_out, r]`` GEMM here.
    """
    cdt = compute_dtype_for(weight_b.dtype, scale.dtype, *(() if m is None else (m.dtype,)))
    gs = (scale.to(cdt) * scaling).unsqueeze(1)
    b = weight_b.to(cdt)
    d_b = None
    if need_b:
        d_b = m.to(cdt) * gs  # type: ignore[union-attr]
        # (on the CPU, where asking costs no device synchronization, only when there is an infinite g s)
        if d_out is not None and h is not None and (d_out.device.type != "cpu" or bool(torch.isinf(gs).any())):
            infinite = torch.isinf(gs)
            only_infinite = torch.where(infinite, gs, 0.0).squeeze(1)
            unfactored = (d_out.to(cdt) * only_infinite).t() @ h.to(cdt)
            d_b = torch.where(infinite, unfactored, d_b)
        d_b = d_b.to(weight_b.dtype)
    scaled_b = (b * gs).to(scaled_b_dtype) if scaled_b_dtype is not None else None
    d_g = None
    if need_g:
        d_g = (d_g_base.to(cdt) + scaling * (b * m.to(cdt)).sum(1)).to(scale.dtype)  # type: ignore[union-attr]
    return d_b, scaled_b, d_g


def _sum_present(parts: list[torch.Tensor | None]) -> torch.Tensor:
    """Sum of the tensors in ``parts`` that are not None (at least one is)."""
    present = [t for t in parts if t is not None]
    total = present[0]
    for t in present[1:]:
        total = total + t
    return total
