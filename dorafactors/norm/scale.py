"""From the row norm to DoRA's magnitude scale ``g = m / ||W + s B A||``: the one place every path divides.

The norm comes out of the engine in fp32 (fp64 for fp64 inputs). A half-precision magnitude holds only
bf16/fp16 precision, and PEFT initializes it to the norm rounded to that dtype, ``m = round(||W||)``.
Dividing it by the fp32 norm would give ``g = 1 + O(2^-9)`` at initialization and move an untrained DoRA
model away from its base model. So with a half-precision magnitude the norm is rounded to the magnitude's
dtype first (as stock PEFT's half-precision norm is): ``g == 1`` exactly whenever ``m == round(norm)``. The
division itself stays in the norm's precision (fp32), one rounding fewer than stock's half-precision ``g``.
fp32 and fp64 magnitudes divide by the unrounded norm.
"""

from __future__ import annotations

import torch

__all__ = ["magnitude_scale", "scale_divisor"]


def magnitude_scale(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``g = m / norm``, differentiable in ``magnitude``.

    Args:
        magnitude: ``m``, any float dtype, shaped like ``norm`` (callers reshape PEFT's parameter).
        norm: the detached row norm ``[d_out]`` in fp32 or fp64 (moved to ``magnitude``'s device).

    Returns:
        ``g`` in ``promote(m, norm)`` (fp32 for a half-precision magnitude): ``magnitude / scale_divisor(...)``.
    """
    return magnitude / scale_divisor(norm, magnitude.dtype, magnitude.device)


def scale_divisor(norm: torch.Tensor, magnitude_dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The divisor of :func:`magnitude_scale`: ``norm`` on ``device``, for a bf16/fp16 magnitude rounded to that
    dtype and held in the norm's dtype (``norm`` itself for fp32/fp64 magnitudes on its device).

    A pure function of ``norm``'s values: a caller that reuses the same (cached, never written) norm tensor may
    keep the divisor with it. bf16 holds every norm the engine returns (fp32's exponent range, clamped at
    ``engine.clamp_eps``); fp16 does not, so an fp16 rounding that overflows to inf or underflows to zero
    keeps the unrounded norm rather than giving an infinite or zero divisor.
    """
    if norm.device != device:
        norm = norm.to(device)
    if magnitude_dtype == torch.bfloat16:
        return norm.to(torch.bfloat16).to(norm.dtype)
    if magnitude_dtype == torch.float16:
        rounded = norm.to(torch.float16).to(norm.dtype)
        return torch.where((rounded > 0) & (rounded < torch.inf), rounded, norm)
    return norm
