"""Tolerances per dtype (one table) and a mismatch reporter for every numerical test.

Comparisons against stock PEFT (same inputs, same dtype):
  fp32: rel 1e-5; fp64: rel 1e-10 (both paths compute the same function; they differ only in the order of
  roundings: factored vs dense norm, (g*lora)*s vs g*(s*lora)).
Half precision is never compared to stock directly: both are compared against an fp64 ground truth and
ours must not be worse than stock by more than ``HALF_ERROR_FACTOR`` (see ``assert_not_worse``).
"""

from __future__ import annotations

import torch

#: (rtol, atol) for same-dtype comparisons against stock PEFT or a same-precision reference.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float16: (2e-3, 1e-3),
}

#: Ours may exceed stock's error against fp64 by at most this factor (errors floored at the dtype's
#: quantization floor, see ``assert_not_worse``). 1.25: both are one-rounding-dominated in half precision; random
#: inputs put stock and ours within a few percent of each other, and ours is usually better (fp32 norm and
#: fp32 composition instead of stock's half-precision arithmetic), so 25% headroom only absorbs draws
#: where the two roundings land differently on a handful of elements.
HALF_ERROR_FACTOR = 1.25


def rel_error(actual: torch.Tensor, truth: torch.Tensor) -> float:
    """``||actual - truth|| / ||truth||`` in fp64 (inf for non-finite values, 0/0 -> 0)."""
    a = actual.detach().to(torch.float64).cpu()
    t = truth.detach().to(torch.float64).cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    denom = t.norm().item()
    diff = (a - t).norm().item()
    if denom == 0.0:
        return diff
    return diff / denom


def assert_close_verbose(
    actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float, name: str = ""
) -> None:
    """``allclose`` that reports the count of mismatches, the worst element, and NaN/Inf disagreements."""
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    inf_a, inf_e = torch.isinf(a), torch.isinf(e)
    nonfinite_mismatch = int(((nan_a != nan_e) | (inf_a != inf_e)).sum())
    finite = torch.isfinite(a) & torch.isfinite(e)
    diff = (a - e).abs()
    bad = (diff > atol + rtol * e.abs()) & finite
    count = int(bad.sum()) + nonfinite_mismatch
    if count:
        worst = int(torch.where(finite, diff, torch.zeros_like(diff)).flatten().argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape)) if a.dim() else ()
        raise AssertionError(
            f"{name}: {count}/{a.numel()} elements differ (rtol={rtol}, atol={atol}); "
            f"worst at {idx}: actual={a.flatten()[worst].item()!r} expected={e.flatten()[worst].item()!r} "
            f"|diff|={diff.flatten()[worst].item():.3e}; NaN/Inf mismatches: {nonfinite_mismatch}"
        )


def assert_dtype_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str = "") -> None:
    rtol, atol = TOLERANCES[dtype]
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    assert_close_verbose(actual, expected, rtol=rtol, atol=atol * max(1.0, scale), name=name)


def quantization_floor(truth: torch.Tensor, dtype: torch.dtype) -> float:
    """Relative error of the fp64 truth merely rounded to ``dtype``: no result stored in ``dtype`` beats it."""
    return rel_error(truth.to(dtype), truth)


def assert_not_worse(
    ours: torch.Tensor, stock: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype, name: str = ""
) -> tuple[float, float]:
    """Ours must be at least as close to ``truth`` as stock, up to ``HALF_ERROR_FACTOR``.

    Both errors are floored at the quantization floor of ``dtype`` (the truth rounded once): when stock
    happens to be exact, being one rounding away from the truth is not "worse", it is the format.
    """
    err_ours = rel_error(ours, truth)
    err_stock = rel_error(stock, truth)
    floor = quantization_floor(truth, dtype)
    limit = HALF_ERROR_FACTOR * max(err_stock, floor)
    assert err_ours <= limit, (
        f"{name}: ours is further from fp64 truth than stock PEFT: {err_ours:.3e} > "
        f"{HALF_ERROR_FACTOR} * max(stock {err_stock:.3e}, floor {floor:.3e})"
    )
    return err_ours, err_stock
