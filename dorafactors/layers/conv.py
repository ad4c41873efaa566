"""``DoraConv{1,2,3}dLayer``: PEFT's DoRA layers for convolutions (groups, stride, padding, dilation).

The norm runs on the flattened weight ``[out, in/groups * prod(k)]`` through the same factored engine; for
``groups > 1`` the factors reproduce PEFT's own reshape of the delta (see ``norm.engine.conv_factors``).
The magnitude keeps PEFT's shape ``[1, out, 1, ...]``; the composition broadcasts ``g`` along dim 1.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import dora as peft_dora
from torch import nn

from ..autograd.compose import dora_compose
from ..norm import engine
from ..norm.dense import dense_norm_rows
from ._common import DoraLayerMixin, stock_extra_dtype

__all__ = ["DoraConv1dLayer", "DoraConv2dLayer", "DoraConv3dLayer"]


class _ConvMixin(DoraLayerMixin):
    """Conv-specific norm factors, dense norm and forward; shared by the 1-D/2-D/3-D classes."""

    conv_fn: object

    def _magnitude_shape(self, weight: torch.Tensor) -> tuple[int, ...]:
        return (1, -1) + (1,) * (weight.dim() - 2)

    def get_weight_norm(self, weight, lora_weight, scaling, adapter_name=None) -> torch.Tensor:
        """Norm over all dims but 0 of ``weight + scaling * lora_weight``, shaped ``[1, out, 1, ...]`` (stock);
        rows the delta leaves unchanged get the forward's own norm (``engine.dense_delta_norm``)."""

        def compute() -> torch.Tensor:
            out = weight.shape[0]
            w2 = weight.reshape(out, -1)
            l2 = lora_weight.reshape(out, -1)
            rows = dense_norm_rows(w2.shape[1])
            rank = self.__dict__.get("_df_norm_rank", 1)
            norm = engine.dense_delta_norm(w2, l2, float(scaling), rank=rank, max_rows=rows)
            norm = norm.to(torch.promote_types(weight.dtype, lora_weight.dtype))
            return norm.view((1, out) + (1,) * (weight.dim() - 2))

        return self._stock_cached("weight-norm", adapter_name, compute)

    def get_lora_weight(self, lora_A, lora_B, adapter_name=None) -> torch.Tensor:
        """Dense ``B.view(-1, r) @ A.view(r, -1)`` (stock semantics); not used by the forward."""

        def compute() -> torch.Tensor:
            r = lora_A.weight.shape[0]
            return torch.mm(lora_B.weight.view([-1, r]), lora_A.weight.view([r, -1]))

        return self._stock_cached("lora-weight", adapter_name, compute)

    def _norm_factors(self, weight, lora_A, lora_B):
        return engine.conv_factors(weight, lora_A, lora_B)

    def _norm_layout(self) -> str:
        return "conv"

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
        """Extra output of DoRA on top of ``base_result``: ``[N, out, *spatial]``."""
        weight = base_layer.weight
        magnitude = self.weight
        # the adapters run first: their hooks may set the weights the norm reads (pruning's pre-hook), as they
        # run before stock's norm, which calls the modules on an identity matrix
        lora_out = lora_B(lora_A(x))
        norm = self._forward_norm(
            base_layer,
            lora_A,
            lora_B,
            scaling,
            adapter_name,
            gather_modules=(lora_A, lora_B),
            dequantize=False,
        )
        self._mirror_stock_cache(adapter_name, norm)
        scale = self._magnitude_scale(magnitude, norm)
        if base_result is None:
            base_result = self.conv_fn(
                x,
                weight.to(x.dtype),
                bias=None,
                stride=base_layer.stride,
                padding=base_layer.padding,
                dilation=base_layer.dilation,
                groups=base_layer.groups,
            )
        else:
            bias = base_layer.bias
            if bias is not None:
                shape = (1, -1) + (1,) * (base_result.dim() - 2)
                base_result = base_result - bias.view(*shape)  # as stock: in fp32 under autocast
        channel_dim = 1 if lora_out.dim() == weight.dim() else 0
        out_dtype = stock_extra_dtype(base_result.dtype, lora_out.dtype, magnitude.dtype, x.dtype)
        return dora_compose(
            lora_out, base_result, scale, scaling, channel_dim=channel_dim, out_dtype=out_dtype, inplace=True
        )


class DoraConv1dLayer(_ConvMixin, peft_dora.DoraConv1dLayer):
    """Factored-norm DoRA for ``nn.Conv1d``."""

    def __init__(self, fan_in_fan_out: bool) -> None:
        super().__init__(fan_in_fan_out)
        self._stock_cache()


class DoraConv2dLayer(_ConvMixin, peft_dora.DoraConv2dLayer):
    """Factored-norm DoRA for ``nn.Conv2d``."""

    def __init__(self, fan_in_fan_out: bool) -> None:
        super().__init__(fan_in_fan_out)
        self._stock_cache()


class DoraConv3dLayer(_ConvMixin, peft_dora.DoraConv3dLayer):
    """Factored-norm DoRA for ``nn.Conv3d``."""

    def __init__(self, fan_in_fan_out: bool) -> None:
        super().__init__(fan_in_fan_out)
        self._stock_cache()
