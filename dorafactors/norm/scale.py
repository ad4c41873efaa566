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

__all__ = ["magnitude_scale"]


def magnitude_scale(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``g = m / norm``, differentiable in ``magnitude``.

    Args:
        magnitude: ``m``, any float dtype, shaped like ``norm`` (callers reshape PEFT's parameter).
        norm: the detached row norm ``[d_out]`` in fp32 or fp64 (moved to ``magnitude``'s device).

    Returns:
        ``g`` in ``promote(m, norm)`` (fp32 for a half-precision magnitude). For a bf16/fp16 magnitude the
        divisor is the norm rounded to that dtype. bf16 holds every norm the engine returns (fp32's exponent
        range, clamped at ``engine.clamp_eps``); fp16 does not, so an fp16 rounding that overflows to inf or
        underflows to zero keeps the unrounded norm rather than giving an infinite or zero divisor.
    """
    norm = norm.to(magnitude.device)
    if magnitude.dtype == torch.bfloat16:
        norm = norm.to(torch.bfloat16).to(norm.dtype)
    elif magnitude.dtype == torch.float16:
        rounded = norm.to(torch.float16).to(norm.dtype)
        norm = torch.where((rounded > 0) & (rounded < torch.inf), rounded, norm)
    return magnitude / norm
