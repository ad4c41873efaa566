"""``DoraLinearLayer``: PEFT's DoRA layer for ``nn.Linear`` (and bnb / HQQ / torchao / transformers Conv1D)."""

from __future__ import annotations

import torch
from peft.tuners.lora import dora as peft_dora
from peft.utils.other import transpose
from torch import nn

from ..autograd.compose import dora_compose
from ..autograd.recompute_base import compose_recompute_base
from ..dispatch import config
from ..norm import dense_row_norm
from ._common import DoraLayerMixin, base_weight

__all__ = ["DoraLinearLayer"]


def _dense_norm_rows(d_in: int, elem: int = 4) -> int:
    """Rows per step of the dense norm so its fp32 temporaries fit the norm budget."""
    return max(1, config.get_dora_norm_threshold_bytes() // max(1, 2 * d_in * elem))


class DoraLinearLayer(DoraLayerMixin, peft_dora.DoraLinearLayer):
    """Factored-norm DoRA for linear layers; drop-in for ``peft.tuners.lora.dora.DoraLinearLayer``.

    ``W`` is ``[d_out, d_in]`` after PEFT's ``fan_in_fan_out`` transpose, ``lora_A.weight`` ``[r, d_in]``,
    ``lora_B.weight`` ``[d_out, r]``, the magnitude ``weight`` ``[d_out]``.
    """

    def __init__(self, fan_in_fan_out: bool) -> None:
        super().__init__(fan_in_fan_out)
        self._stock_cache()

    # ---------------------------------------------------------------- PEFT-facing helpers
    def get_weight_norm(
        self, weight: torch.Tensor, lora_weight: torch.Tensor, scaling: float, adapter_name: str | None = None
    ) -> torch.Tensor:
        """Row norm of ``transpose(weight) + scaling * lora_weight`` (dense ``lora_weight``, as merge passes).

        Accumulated in fp32 (fp64 for fp64 inputs) and returned in stock's dtype, ``promote(W, lora)``.
        """

        def compute() -> torch.Tensor:
            w = transpose(weight, self.fan_in_fan_out)
            out_dtype = torch.promote_types(w.dtype, lora_weight.dtype)
            norm = dense_row_norm(w, lora_weight, float(scaling), max_rows=_dense_norm_rows(w.shape[1]))
            return norm.to(out_dtype)

        return self._stock_cached("weight-norm", adapter_name, compute)

    def get_lora_weight(self, lora_A: nn.Module, lora_B: nn.Module, adapter_name: str | None = None) -> torch.Tensor:
        """Dense ``(B @ A)^T`` through the modules (stock semantics, FSDP-safe); not used by the forward."""

        def compute() -> torch.Tensor:
            eye = torch.eye(lora_A.weight.shape[1], device=lora_A.weight.device, dtype=lora_A.weight.dtype)
            return lora_B(lora_A(eye)).T

        return self._stock_cached("lora-weight", adapter_name, compute)

    def _norm_factors(self, weight, lora_A, lora_B):
        return transpose(weight, self.fan_in_fan_out), lora_A, lora_B

    # ---------------------------------------------------------------- forward
    def forward(
        self,
        x: torch.Tensor,
        *,
        lora_A: nn.Module,
        lora_B: nn.Module,
        scaling: float,
        base_layer: nn.Module,
        base_result: torch.Tensor | None = None,
        adapter_name: str = "default",
    ) -> torch.Tensor:
        """Extra output of DoRA on top of ``base_result`` (the variant adds it): ``[..., d_out]``."""
        magnitude = self.weight
        norm = self._forward_norm(base_layer, lora_A, lora_B, scaling, adapter_name, gather_modules=(lora_A, lora_B))
        self._mirror_stock_cache(adapter_name, norm)
        scale = self._magnitude_scale(magnitude, norm)
        lora_out = lora_B(lora_A(x))
        if base_result is not None:
            bias = base_layer.bias
            if bias is not None:
                base_result = base_result - bias.to(base_result.dtype)
            # In inference the kernel may write the result over lora_out (a fresh temporary of ours).
            return dora_compose(lora_out, base_result, scale, scaling, inplace=True)
        weight = transpose(base_weight(base_layer), self.fan_in_fan_out)
        return compose_recompute_base(x, weight, lora_out, scale, scaling)
