"""Dense row norm ``||W + s*L||`` for callers that already hold the dense delta ``L``.

PEFT's merge path (``merge_safe`` / ``merge_unsafe``) calls ``get_weight_norm(W, delta, scaling=1)`` with a
dense ``delta`` it has built itself, so the norm has to accept one. This is also the ground-truth formula
the factored engine is tested against (at fp64).
"""

from __future__ import annotations

import torch

from ..dispatch import config
from ..kernels.operands import compute_dtype_for

__all__ = ["compute_dtype_for", "dense_factor_row_norm_sq", "dense_norm_rows", "dense_row_norm"]


def dense_norm_rows(d_in: int, elem: int = 4) -> int:
    """Rows per step of :func:`dense_row_norm` so its fp32 temporaries fit the norm budget
    (``PEFT_DORA_NORM_CHUNK_MB``)."""
    return max(1, config.get_dora_norm_threshold_bytes() // max(1, 2 * d_in * elem))


@torch.no_grad()
def dense_row_norm(
    weight: torch.Tensor, delta: torch.Tensor, scaling: float, *, max_rows: int | None = None
) -> torch.Tensor:
    """Row-wise L2 norm of ``weight + scaling * delta``, accumulated in fp32 (fp64 for fp64 inputs).

    Args:
        weight: ``[d_out, d_in]`` (any float dtype; may be a strided view).
        delta: ``[d_out, d_in]``, same shape, any float dtype / device (moved to ``weight.device``).
        scaling: Python float.
        max_rows: rows processed per step, bounding the fp32 temporaries to ``max_rows * d_in`` elements.

    Returns:
        ``[d_out]`` norm in the compute dtype (fp32 or fp64), never rounded to half precision.
    """
    if weight.shape != delta.shape:
        raise ValueError(f"weight {tuple(weight.shape)} and delta {tuple(delta.shape)} must have the same shape")
    cdt = compute_dtype_for(weight.dtype, delta.dtype)
    d_out = weight.shape[0]
    step = d_out if not max_rows else max(1, int(max_rows))
    out = torch.empty(d_out, dtype=cdt, device=weight.device)
    delta = delta.to(device=weight.device)
    for r0 in range(0, d_out, step):
        r1 = min(d_out, r0 + step)
        total = weight[r0:r1].to(cdt)
        if total.data_ptr() == weight[r0:r1].data_ptr():
            total = total.clone()  # never write into the caller's weight
        total.add_(delta[r0:r1].to(cdt), alpha=scaling)
        out[r0:r1] = torch.linalg.vector_norm(total, dim=1)
    return out


@torch.no_grad()
def dense_factor_row_norm_sq(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    max_rows: int,
    compute_dtype: torch.dtype,
) -> torch.Tensor:
    """``||W + s*B@A||^2`` per row, forming ``B@A`` a block of ``max_rows`` rows at a time.

    For ``d_in <= r``, where a block of the dense delta is no larger than the factored form's own
    ``[rows, r]`` intermediates and the factored sum is ill-conditioned. ``weight`` ``[d_out, d_in]``,
    ``lora_A`` ``[r, d_in]``, ``lora_B`` ``[d_out, r]``; returns ``[d_out]`` in ``compute_dtype``.
    """
    d_out = weight.shape[0]
    a = lora_A.to(device=weight.device, dtype=compute_dtype)
    out = torch.empty(d_out, dtype=compute_dtype, device=weight.device)
    step = max(1, int(max_rows))
    for r0 in range(0, d_out, step):
        r1 = min(d_out, r0 + step)
        block = torch.mm(lora_B[r0:r1].to(device=weight.device, dtype=compute_dtype), a)
        block.mul_(scaling).add_(weight[r0:r1].to(compute_dtype))
        out[r0:r1] = block.square_().sum(dim=1)
    return out
