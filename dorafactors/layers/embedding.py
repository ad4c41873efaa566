"""``DoraEmbeddingLayer``: PEFT's DoRA layer for ``nn.Embedding``, with the factored norm too.

PEFT calls it with ``lora_A = lora_embedding_A.T`` (``[V, r]``) and ``lora_B = lora_embedding_B.T``
(``[r, d]``) and combines the result itself (``g * base + result``), so this layer returns the tuple
``(g, g * s * embed(x, A) @ B)`` like stock. The norm runs over each embedding *dimension* (a column of
the ``[V, d]`` table): ``W2 = W^T`` ``[d, V]``, ``A2 = lora_embedding_A`` ``[r, V]``, ``B2 = lora_embedding_B``
``[d, r]``. The dense ``[d, V]`` delta stock builds is never formed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from peft.tuners.lora import dora as peft_dora
from torch import nn

from ..norm.scale import magnitude_scale
from ._common import DoraLayerMixin
from .linear import DoraLinearLayer

__all__ = ["DoraEmbeddingLayer"]


class DoraEmbeddingLayer(DoraLayerMixin, peft_dora.DoraEmbeddingLayer):
    """Factored-norm DoRA for embeddings; drop-in for ``peft.tuners.lora.dora.DoraEmbeddingLayer``."""

    _adapter_gemms_autocast = False  # the adapters are looked up (F.embedding), which autocast leaves alone

    def __init__(self, fan_in_fan_out: bool) -> None:
        super().__init__(fan_in_fan_out)
        self._stock_cache()

    get_weight_norm = DoraLinearLayer.get_weight_norm

    def get_lora_weight(self, lora_A: torch.Tensor, lora_B: torch.Tensor, adapter_name: str | None = None):
        """Dense ``(A @ B)^T`` ``[d, V]`` (stock semantics); not used by the forward."""
        return self._stock_cached("lora-weight", adapter_name, lambda: (lora_A @ lora_B).T)

    def _norm_factors(self, weight, lora_A, lora_B):
        # Both callers hand over A as [r, V] and B as [d, r]: update_layer gets PEFT's parameters, and
        # forward transposes the [V, r] / [r, d] views PEFT passes it back to them.
        return weight.T, lora_A, lora_B

    def _norm_layout(self) -> str:
        return "transposed"

    def forward(
        self,
        x: torch.Tensor,
        *,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        scaling: float,
        base_layer: nn.Module,
        embed_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        adapter_name: str = "default",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(g [d], g * s * embed(x, A) @ B [..., d])``; PEFT adds ``g * base``."""
        magnitude = self.weight
        norm = self._forward_norm(
            base_layer,
            lora_A.T,
            lora_B.T,
            scaling,
            adapter_name,
            gather_modules=(lora_A, lora_B),
            dequantize=False,
        )
        self._mirror_stock_cache(adapter_name, norm)
        mag_norm_scale = magnitude_scale(magnitude, norm)
        result_dora = mag_norm_scale * (embed_fn(x, lora_A) @ lora_B) * scaling
        return mag_norm_scale, result_dora
