"""Test data and checks for the compose kernels, shared by ``tests/kernels`` and ``tests/autograd``.

Two kinds of data:

* **exact** data (small integers, dyadic ``g`` and ``s``): every intermediate and every result is exactly
  representable in fp32 and in the output dtype, in any summation order. Kernel results must then equal the
  fp64 truth *bitwise*: any indexing, masking, stride or layout bug shows, with no tolerance to hide in.
* **random** data: checks the precision contract (fp32 arithmetic, one rounding at the store) with an
  elementwise bound against fp64 truth.
"""

from __future__ import annotations

import torch

from tests._tolerances import assert_close_verbose

#: Significand bits (with the implicit one) per dtype.
_MANT = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}
#: fp32 unit roundoff.
EPS32 = 2.0**-24

EXACT_SCALING = 0.5
#: Where the kernel tests run: the GPU when there is one, else the Triton CPU interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` numbers at ``|x|`` (fp64 tensor; subnormal spacing below the smallest normal)."""
    ax = x.abs().to(torch.float64).clamp_min(torch.finfo(dtype).tiny)
    return torch.exp2(torch.floor(torch.log2(ax)) - (_MANT[dtype] - 1))


def exact_tensor(shape, dtype, gen: torch.Generator, lo: int = -3, hi: int = 3) -> torch.Tensor:
    return torch.randint(lo, hi + 1, shape, generator=gen).to(dtype).to(DEVICE)


def exact_scale(C: int, dtype, gen: torch.Generator) -> torch.Tensor:
    """``g`` in {1/4, ..., 2} (so ``g - 1`` and ``g * s`` are dyadic), never all ones."""
    g = torch.randint(1, 9, (C,), generator=gen).to(torch.float64) / 4
    g[0] = 0.75 if C else g[0]
    return g.to(dtype).to(DEVICE)


def random_tensor(shape, dtype, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def random_scale(C: int, dtype, gen: torch.Generator) -> torch.Tensor:
    """A magnitude scale near 1 but not 1 (``g = m / ||W + sBA||`` in practice)."""
    return (0.6 + 0.8 * torch.rand(C, generator=gen, dtype=torch.float64)).to(dtype).to(DEVICE)


def _bcast(g: torch.Tensor, ndim: int, channel_dim: int) -> torch.Tensor:
    shape = [1] * ndim
    shape[channel_dim] = g.numel()
    return g.reshape(shape)


def truth_forward(lora, base, g, scaling: float, channel_dim: int = -1):
    """fp64 ``(out, inner, term magnitude |(g-1) b| + |g s l|)``."""
    gg = _bcast(g.to(torch.float64), lora.dim(), channel_dim)
    sl = lora.to(torch.float64) * scaling
    b = base.to(torch.float64)
    out = (gg - 1) * b + gg * sl
    inner = b + sl
    mag = ((gg - 1) * b).abs() + (gg * sl).abs()
    return out, inner, mag


def truth_backward(d_out, g, inner, scaling: float, channel_dim: int = -1):
    """fp64 ``(d_lora, d_base, d_g, sum |inner * d_out| per channel)``."""
    nd = d_out.dim()
    gg = _bcast(g.to(torch.float64), nd, channel_dim)
    d = d_out.to(torch.float64)
    dims = [i for i in range(nd) if i != channel_dim % nd]
    d_g = d_g_mag = None
    if inner is not None:
        prod = inner.to(torch.float64) * d
        d_g = prod.sum(dim=dims)
        d_g_mag = prod.abs().sum(dim=dims)
    return d * (gg * scaling), d * (gg - 1), d_g, d_g_mag


def assert_exact(actual: torch.Tensor, truth: torch.Tensor, name: str) -> None:
    """Bitwise equality with the fp64 truth rounded once to ``actual``'s dtype (NaN = unwritten)."""
    expected = truth.to(actual.dtype)
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert_close_verbose(actual, expected, rtol=0.0, atol=0.0, name=name)


def assert_one_rounding(actual: torch.Tensor, truth: torch.Tensor, fp32_terms: torch.Tensor, k: float, name: str):
    """``|actual - truth| <= ulp(truth) + k * eps32 * fp32_terms``, elementwise.

    ``fp32_terms`` bounds the magnitude of what the fp32 arithmetic rounded on the way (``k`` roundings of it);
    ``ulp`` is the final rounding to ``actual.dtype`` (half an ulp for round-to-nearest, with margin).
    """
    a = actual.detach().cpu().to(torch.float64)
    t = truth.detach().cpu().to(torch.float64)
    assert a.shape == t.shape, f"{name}: shape {tuple(a.shape)} != {tuple(t.shape)}"
    assert torch.isfinite(a).all(), f"{name}: {int((~torch.isfinite(a)).sum())} non-finite elements (unwritten?)"
    bound = ulp(t, actual.dtype) + k * EPS32 * fp32_terms.detach().cpu().to(torch.float64)
    err = (a - t).abs()
    bad = err > bound
    if bad.any():
        i = int((err - bound).flatten().argmax())
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), a.shape)) if a.dim() else ()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{a.numel()} elements exceed one rounding of fp32 arithmetic; worst at {idx}: "
            f"actual={a.flatten()[i].item()!r} truth={t.flatten()[i].item()!r} bound={bound.flatten()[i].item():.3e}"
        )
