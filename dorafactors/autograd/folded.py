"""The folded DoRA composition for small no-grad Linear calls (decode): no kernel launch of its own.

With the base output ``result = W x + bias``, the LoRA branch ``B (A x)`` and ``g = m / ||W + s B A||``,
the extra output DoRA adds on top of ``result`` is

    extra = (g - 1) * (result - bias) + g * s * B (A x)
          = [(g * s) B] (A x) - (g - 1) * bias  +  (g - 1) * result
          =      F.linear(A x, B', c)           +  (g - 1) * result

``B' = (g * s)[:, None] * B`` and ``c = -(g - 1) * bias`` change only when the weights, the magnitude or the
scaling do, so the layer caches them (``layers/linear.py``) and a decode step costs one ``F.linear`` in place
of ``lora_B`` plus one ``addcmul_``: the same number of launches as plain LoRA's ``* scaling`` and ``+``.
Where the caller also owns the final ``result + extra`` (``layers/linear.py``'s ``DoraLinearVariant`` in
evaluation), :func:`folded_dora_output` adds ``result`` into ``extra``'s own temporary: stock's sum, bitwise,
without a new tensor. (``F.linear(A x, B', c) + g * result`` would save that launch but not stock's
non-finite pattern: an infinite ``result`` gives ``inf - inf = NaN`` in stock's ``result + (g - 1) * result``
for ``g < 1``, and ``inf`` in ``g * result``.)

Precision: ``g`` is fp32 (fp64 for fp64 operands), ``B'`` and ``c`` are computed in fp32 and rounded once
to ``B``'s dtype, and ``addcmul_`` computes ``lora + (g - 1) * result`` in fp32 with one rounding to the result
dtype. The LoRA term therefore carries one more rounding than on the kernel path (``B'``), a term that is
small next to ``(g - 1) * result``; the composition as a whole rounds once, as the kernel path does.
``g - 1`` itself is kept in fp32, except where ``B`` and the result share a 16-bit dtype (all-bf16 or
all-fp16 decode): there it is rounded once to that dtype, so that ``addcmul_`` reads three tensors of one
dtype (PyTorch's mixed-dtype ``addcmul`` is a non-vectorized kernel, several times slower than LoRA's own
``* scaling``). That rounding costs ``|g - 1| u`` relative on the ``(g - 1) * (result - bias)`` term, where
stock PEFT rounds ``g`` and then ``g - 1`` in that same dtype; ``c`` is computed from the rounded ``g - 1``,
so the bias cancellation below is unaffected by it. (A ``g - 1`` that overflows fp16, on a row whose norm
was clamped, stays fp32.)

Where the fold is not accurate: ``c`` and the bias inside ``(g - 1) * result`` cancel, and ``c`` is rounded
to ``B``'s dtype (and ``F.linear`` rounds ``B' (A x) + c`` there), so the fold is off by up to about
``|g - 1| * |bias| * (2 u_B + u_g)`` (``u`` the unit roundoff, ``u_g`` that of fp32/fp64, the dtype ``c`` and
``addcmul_``'s products are computed in), where the unfolded path computes ``(g - 1) * (result - bias)`` with
no such term. For ``g`` near 1 that is within a rounding of the bias; for a row whose norm was clamped (zero
rows of ``W`` and ``B``: ``g = m / eps``, 1e6 to 1e12) it swamps the output (-2389 instead of the bias 0.7 in
fp32, -inf in fp16). So :func:`fold_scale_into_lora_B` declines (returns None; the layer then takes the
unfolded composition, the path of larger calls and of training) when a row with a non-zero bias has
``|g - 1| * (2 u_B + u_g) > FOLD_BIAS_ERROR_ULPS * eps(bias dtype)``: the cancellation could then cost more
than ``FOLD_BIAS_ERROR_ULPS`` times ``eps * |bias|`` (|g - 1| up to 2.7 for fp32 and fp64, 4 for bf16/fp16
adapters, ~1.7e5 for fp32 adapters on a bf16 base). It also declines when ``g - 1``, ``B'`` or ``c`` is not
finite (an infinite or NaN magnitude, a ``(g * s) B`` that overflows ``B``'s dtype), so that the non-finite
pattern is the unfolded path's. Deciding costs one host synchronization per fold build (two where ``g - 1``
may be kept in 16 bits; the decision is cached with the fold), none per call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.operands import promote
from ..norm.dense import compute_dtype_for

__all__ = [
    "FOLD_BIAS_ERROR_ULPS",
    "FoldedLoraB",
    "fold_scale_into_lora_B",
    "folded_dora_extra",
    "folded_dora_output",
    "max_fold_gain",
]

#: The fold is used only while its bias cancellation can cost at most this many ``eps * |bias|`` (``eps`` of
#: the bias's dtype); see the module docstring.
FOLD_BIAS_ERROR_ULPS = 4

#: ``(B' [d_out, r] in B's dtype, c [d_out] in B's dtype or None, g - 1 [d_out] fp32/fp64, or the result's
#: 16-bit dtype where B has it too)``
FoldedLoraB = tuple[torch.Tensor, "torch.Tensor | None", torch.Tensor]


def max_fold_gain(lora_dtype: torch.dtype, bias_dtype: torch.dtype, compute_dtype: torch.dtype) -> float:
    """Largest ``|g - 1|`` on a row with a bias at which the fold's cancellation error stays within
    ``FOLD_BIAS_ERROR_ULPS * eps(bias dtype) * |bias|``: ``FOLD_BIAS_ERROR_ULPS * eps(bias) / (2 u_B + u_g)``
    (``eps = 2 u``; ``compute_dtype`` is that of ``g`` and ``c``, fp32 or fp64)."""
    cancellation = torch.finfo(lora_dtype).eps + torch.finfo(compute_dtype).eps / 2
    return FOLD_BIAS_ERROR_ULPS * torch.finfo(bias_dtype).eps / cancellation


@torch.no_grad()
def fold_scale_into_lora_B(
    lora_B: torch.Tensor,
    scale: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None,
    result_dtype: torch.dtype | None = None,
) -> FoldedLoraB | None:
    """``(B', c, g - 1)`` for :func:`folded_dora_extra` and :func:`folded_dora_output`, or None where the fold
    would not be accurate (a row with a bias and a large ``|g - 1|``, or a non-finite ``g - 1`` / ``B'`` /
    ``c``; see the module docstring).

    Args:
        lora_B: ``B`` ``[d_out, r]`` (any float dtype).
        scale: ``g = m / norm`` ``[d_out]`` (fp32, or fp64).
        scaling: ``s``.
        bias: the base layer's bias ``[d_out]`` or None.
        result_dtype: the dtype of the base output the fold will be applied to; where it is ``B``'s and
            16-bit, ``g - 1`` is kept in it (see the module docstring). None: fp32/fp64.
    """
    cdt = compute_dtype_for(lora_B.dtype, scale.dtype)
    g = scale.to(device=lora_B.device, dtype=cdt)
    b_folded = (lora_B.to(cdt) * (g * float(scaling)).unsqueeze(1)).to(lora_B.dtype)
    g_minus_1 = g - 1
    if result_dtype == lora_B.dtype and lora_B.dtype.itemsize == 2:  # a same-dtype addcmul_ per call
        narrow = g_minus_1.to(lora_B.dtype)
        if bool(torch.isfinite(narrow).all()):  # else (fp16 overflow: g - 1 > 65504) it stays fp32
            g_minus_1 = narrow
    ok = torch.isfinite(g_minus_1).all() & torch.isfinite(b_folded).all()
    c = None
    if bias is not None:
        c = (bias.to(cdt) * g_minus_1.to(cdt)).neg_().to(lora_B.dtype)  # cancels the g - 1 the call uses
        limit = max_fold_gain(lora_B.dtype, bias.dtype, cdt)
        well_conditioned = (g_minus_1.abs() <= limit) | (bias == 0).to(g_minus_1.device)
        ok = ok & torch.isfinite(c).all() & well_conditioned.all()
    if not bool(ok):  # one synchronization per fold build
        return None
    return b_folded, c, g_minus_1


def folded_dora_extra(lora_hidden: torch.Tensor, folded: FoldedLoraB, result: torch.Tensor) -> torch.Tensor:
    """``extra = F.linear(A x, B', c) + (g - 1) * result`` in ``promote(B.dtype, result.dtype)``.

    Args:
        lora_hidden: ``A x`` ``[..., r]`` in ``B``'s dtype.
        folded: from :func:`fold_scale_into_lora_B`.
        result: the base layer's output ``[..., d_out]`` (bias included).
    """
    b_folded, c, g_minus_1 = folded
    lora = F.linear(lora_hidden, b_folded, c)
    out_dtype = promote(lora.dtype, result.dtype)
    if out_dtype == lora.dtype:
        return lora.addcmul_(g_minus_1, result)  # a fresh temporary of ours: written in place
    return torch.addcmul(lora, g_minus_1, result).to(out_dtype)


def folded_dora_output(lora_hidden: torch.Tensor, folded: FoldedLoraB, result: torch.Tensor) -> torch.Tensor:
    """``result + extra``, bitwise stock's sum (non-finite pattern included), with ``result`` added into the
    fresh temporary :func:`folded_dora_extra` returns (``result`` itself is not written).

    Args as :func:`folded_dora_extra`.
    """
    return folded_dora_extra(lora_hidden, folded, result).add_(result)
