"""The folded DoRA composition for small no-grad Linear calls (decode): no kernel launch of its own.

With the base output ``result = W x + bias``, the LoRA branch ``B (A x)`` and ``g = m / ||W + s B A||``,
the extra output DoRA adds on top of ``result`` is

    extra = (g - 1) * (result - bias) + g * s * B (A x)
          = [(g * s) B] (A x) - (g - 1) * bias  +  (g - 1) * result
          =      F.linear(A x, B', c)           +  (g - 1) * result

``B' = (g * s)[:, None] * B`` and ``c = -(g - 1) * bias`` change only when the weights, the magnitude or the
scaling do, so the layer caches them (``layers/linear.py``) and a decode step costs one ``F.linear`` in place
of ``lora_B`` plus one ``addcmul_``: the same number of launches as plain LoRA's ``* scaling`` and ``+``.

Precision: ``g - 1`` is fp32 (fp64 for fp64 operands), ``B'`` and ``c`` are computed in fp32 and rounded
once to ``B``'s dtype, and ``addcmul_`` computes ``lora + (g - 1) * result`` in fp32 with one rounding to the
result dtype. The LoRA term therefore carries one more rounding than on the kernel path (``B'``), a term that
is small next to ``(g - 1) * result``; the composition as a whole rounds once, as the kernel path does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..norm.dense import compute_dtype_for

__all__ = ["FoldedLoraB", "fold_scale_into_lora_B", "folded_dora_extra"]

#: ``(B' [d_out, r] in B's dtype, c [d_out] in B's dtype or None, g - 1 [d_out] fp32/fp64)``
FoldedLoraB = tuple[torch.Tensor, "torch.Tensor | None", torch.Tensor]


@torch.no_grad()
def fold_scale_into_lora_B(
    lora_B: torch.Tensor, scale: torch.Tensor, scaling: float, bias: torch.Tensor | None
) -> FoldedLoraB:
    """``(B', c, g - 1)`` for :func:`folded_dora_extra`.

    Args:
        lora_B: ``B`` ``[d_out, r]`` (any float dtype).
        scale: ``g = m / norm`` ``[d_out]`` (fp32, or fp64).
        scaling: ``s``.
        bias: the base layer's bias ``[d_out]`` or None.
    """
    cdt = compute_dtype_for(lora_B.dtype, scale.dtype)
    g = scale.to(device=lora_B.device, dtype=cdt)
    b_folded = (lora_B.to(cdt) * (g * float(scaling)).unsqueeze(1)).to(lora_B.dtype)
    g_minus_1 = g - 1
    c = None if bias is None else (bias.to(cdt) * g_minus_1).neg_().to(lora_B.dtype)
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
    if torch.promote_types(lora.dtype, result.dtype) == lora.dtype:
        return lora.addcmul_(g_minus_1, result)  # a fresh temporary of ours: written in place
    return torch.addcmul(lora, g_minus_1, result).to(torch.promote_types(lora.dtype, result.dtype))
