"""Bridge from the autograd functions to the Triton kernels, with the PyTorch reference as fallback.

Until the kernels land (issue: fused Triton kernels), nothing is available here and every call takes the
PyTorch reference.
"""

from __future__ import annotations

import torch

from ..kernels.compose_reference import compose_backward_reference, compose_forward_reference

__all__ = ["available_for", "compose", "compose_backward", "compose_into"]


def available_for(
    lora: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, channel_dim: int, *, training: bool
) -> bool:
    """True when the Triton compose (and, in training, its one-pass backward) should run."""
    return False


def compose(
    lora: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    scaling: float,
    *,
    channel_dim: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    raise NotImplementedError("the Triton compose is not built yet")


def compose_into(
    out: torch.Tensor,
    inner: torch.Tensor | None,
    lora: torch.Tensor,
    base: torch.Tensor,
    scale: torch.Tensor,
    scaling: float,
) -> None:
    """Write ``(g-1)*base + g*(s*lora)`` into ``out`` (and ``base + s*lora`` into ``inner``); last-dim ``g``.

    ``out``, ``inner`` and ``lora`` may be column slices (row-strided views) of larger tensors.
    """
    value, inner_value = compose_forward_reference(
        lora, base, scale, scaling, channel_dim=-1, out_dtype=out.dtype, save_inner=inner is not None
    )
    out.copy_(value)
    if inner is not None:
        inner.copy_(inner_value)


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
