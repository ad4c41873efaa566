"""``DoraLinearLayer``: PEFT's DoRA layer for ``nn.Linear`` (and bnb / HQQ / torchao / transformers Conv1D)."""

from __future__ import annotations

import struct
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import dora as peft_dora
from peft.tuners.lora import variants as peft_variants
from peft.utils.other import transpose
from torch import nn
from torch.nn.modules import module as module_mod

from .. import distributed
from ..autograd.compose import dora_compose
from ..autograd.folded import FoldedLoraB, fold_scale_into_lora_B, folded_dora_extra, folded_dora_output
from ..autograd.lora_compose import dora_linear_compose
from ..autograd.recompute_base import compose_recompute_base
from ..dispatch import config, rules
from ..norm import engine
from ..norm.cache import caching_allowed, normal_tensors, optimizer_may_write, stampable, write_epoch
from ..norm.dense import dense_norm_rows
from ..norm.scale import magnitude_scale
from ._common import DoraLayerMixin, autocast_on, base_weight, stock_extra_dtype

__all__ = ["DoraLinearLayer", "DoraLinearVariant", "bf16_dropout_scale"]


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

        Accumulated in fp32 (fp64 for fp64 inputs) and returned in stock's dtype, ``promote(W, lora)``; rows
        the delta leaves unchanged get the forward's own norm (``engine.dense_delta_norm``).
        """

        def compute() -> torch.Tensor:
            w = transpose(weight, self.fan_in_fan_out)
            out_dtype = torch.promote_types(w.dtype, lora_weight.dtype)
            rows = dense_norm_rows(w.shape[1])
            rank = self.__dict__.get("_df_norm_rank", 1)
            norm = engine.dense_delta_norm(w, lora_weight, float(scaling), rank=rank, max_rows=rows)
            return norm.to(out_dtype)

        return self._stock_cached("weight-norm", adapter_name, compute)

    def get_lora_weight(self, lora_A: nn.Module, lora_B: nn.Module, adapter_name: str | None = None) -> torch.Tensor:
        """Dense ``(B @ A)^T`` through the modules (stock semantics, FSDP-safe); not used by the forward."""

        def compute() -> torch.Tensor:
            eye = torch.eye(lora_A.weight.shape[1], device=lora_A.weight.device, dtype=lora_A.weight.dtype)
            return lora_B(lora_A(eye)).T

        return self._stock_cached("lora-weight", adapter_name, compute)

    _norm_replay_ok = True  # the factors are the parameters (W.T a view of one): see norm/replay.py

    def _norm_factors(self, weight, lora_A, lora_B):
        # a plain view: PEFT's transpose() wraps a Parameter in a new Parameter, which tracing cannot record
        return (weight.T if self.fan_in_fan_out else weight), lora_A, lora_B

    def _norm_layout(self) -> str:
        return "transposed" if self.fan_in_fan_out else "linear"

    def _oriented_base_weight(self, base_layer: nn.Module) -> torch.Tensor:
        """The base weight as ``[d_out, d_in]`` (dequantized where PEFT would): a transposed view for
        ``fan_in_fan_out`` (transformers' ``Conv1D``). Not PEFT's ``transpose()``, which wraps a Parameter's
        transpose in a new Parameter: a leaf that requires a gradient whatever the base weight's flag (the
        backward then computes a weight gradient nobody reads, and a trainable base weight loses that part of
        its own), and one that ``torch.compile(fullgraph=True)`` cannot trace."""
        weight = base_weight(base_layer)
        return weight.T if self.fan_in_fan_out else weight

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
        bf16_dropout_scale: float | None = None,
        add_base_result: bool = False,
    ) -> torch.Tensor:
        """Extra output of DoRA on top of ``base_result`` (the variant adds it): ``[..., d_out]``.

        ``bf16_dropout_scale``: ``c = 1 / (1 - p)`` where the caller knows that ``x`` is PEFT's ``nn.Dropout`` of
        the fp32 cast of a bf16 activation (:class:`DoraLinearVariant`); the base output is then
        recomputed with one bf16 GEMM (``autograd/recompute_base.py``). Ignored where it does not apply.

        ``add_base_result`` (with ``base_result``): return PEFT's variant output ``base_result + extra`` instead
        (:class:`DoraLinearVariant` wherever PEFT passes ``base_result=result``). The decode fold adds it into
        its own temporary, the training node composes it in its own kernel pass where ``base_layer`` has no
        bias (``autograd/lora_compose.py``); elsewhere it is the sum.
        """
        if add_base_result and base_result is None:
            raise ValueError("add_base_result=True needs base_result (PEFT's result)")
        result = base_result
        # The adapters run before the fold and the norm read their weights: a hook may set them (pruning's
        # pre-hook), and they run before stock's norm too, which calls the modules on an identity matrix.
        h = _lora_A_call(lora_A, x)
        if base_result is not None:
            folded = self._folded_lora_B(x, lora_A, lora_B, scaling, base_layer, base_result, adapter_name)
            if folded is not None:
                if add_base_result:
                    return folded_dora_output(h, folded, base_result)
                return folded_dora_extra(h, folded, base_result)
        magnitude = self.weight
        weight_b = _lora_B_weight_for_node(lora_B, x)
        if weight_b is None:
            lora_out = lora_B(h)
        norm = self._forward_norm(base_layer, lora_A, lora_B, scaling, adapter_name, gather_modules=(lora_A, lora_B))
        self._mirror_stock_cache(adapter_name, norm)
        if weight_b is None:
            scale = self._magnitude_scale(magnitude, norm)
        else:
            if magnitude.requires_grad and magnitude.dim() == 1 and rules.node_divides_magnitude():
                # training a magnitude: the node divides it by its divisor itself (m / divisor and m's gradient
                # inside its kernels: no division launch, no division node), with the values autograd's
                # division would give
                scale, divisor = magnitude, self._magnitude_divisor(magnitude, norm)
            else:
                scale, divisor = self._magnitude_scale(magnitude, norm), None
            if h.requires_grad or weight_b.requires_grad or scale.requires_grad:
                # training: lora_B runs inside the composition's autograd node (autograd/lora_compose.py)
                if base_result is not None:
                    bias = base_layer.bias
                    if bias is None:
                        return dora_linear_compose(
                            h, weight_b, scale, scaling, base=base_result, add_base=add_base_result, divisor=divisor
                        )
                    extra = dora_linear_compose(
                        h, weight_b, scale, scaling, base=base_result - bias.to(base_result.dtype), divisor=divisor
                    )
                    return result + extra if add_base_result else extra
                weight = self._oriented_base_weight(base_layer)
                if not weight.requires_grad:
                    return dora_linear_compose(
                        h,
                        weight_b,
                        scale,
                        scaling,
                        x=x,
                        weight=weight,
                        bf16_origin_scale=bf16_dropout_scale,
                        divisor=divisor,
                    )
            if divisor is not None:
                scale = self._magnitude_scale(magnitude, norm)
            lora_out = F.linear(h, weight_b)
        if base_result is not None:
            bias = base_layer.bias
            if bias is not None:
                base_result = base_result - bias  # as stock: in fp32 under autocast (a half result, an fp32 bias)
            # In inference the kernel may write the result over lora_out (a fresh temporary of ours).
            out_dtype = stock_extra_dtype(base_result.dtype, lora_out.dtype, magnitude.dtype, x.dtype)
            extra = dora_compose(lora_out, base_result, scale, scaling, out_dtype=out_dtype, inplace=True)
            return result + extra if add_base_result else extra
        weight = self._oriented_base_weight(base_layer)
        out_dtype = stock_extra_dtype(x.dtype, lora_out.dtype, magnitude.dtype, x.dtype)
        return compose_recompute_base(
            x, weight, lora_out, scale, scaling, out_dtype=out_dtype, bf16_origin_scale=bf16_dropout_scale
        )

    def _folded_lora_B(
        self,
        x: torch.Tensor,
        lora_A: nn.Module,
        lora_B: nn.Module,
        scaling: float,
        base_layer: nn.Module,
        base_result: torch.Tensor,
        adapter_name: str,
    ) -> FoldedLoraB | None:
        """The cached ``(B', c, g - 1)`` of the decode path (``autograd/folded.py``), or None where it does
        not apply: a gradient to record, ``torch.compile`` / ``torch.jit`` tracing or a ``torch.func``
        transform, ``torch.autocast`` (it would round ``(g s) B`` to half), inference tensors, sharded
        parameters, PEFT's own DoRA caching (whose ``_dora_cache`` entries stock fills on every call), a
        ``lora_B`` that is not a plain hook-free ``nn.Linear``, a ``rules.inference_fold_ok`` rejection (size,
        settings), or weights where the fold would not be accurate (``fold_scale_into_lora_B`` declines;
        remembered in the fold cache). One entry per layer (slot: the adapter).

        This runs on every decode step, so it reads parameters from ``_parameters`` where the module type
        is known (``nn.Module.__getattr__`` costs about a microsecond per lookup) and checks the cheap
        conditions first; the validity check itself is the full ``NormCache`` stamp comparison.
        """
        if torch.is_grad_enabled() and (
            x.requires_grad or base_result.requires_grad or _any_param_requires_grad(self, lora_A, lora_B)
        ):
            return None
        if base_result.dim() == 0 or not caching_allowed() or autocast_on(base_result):
            return None
        settings = config.cache_settings()
        if not rules.inference_fold_ok(base_result.numel() // max(1, base_result.shape[-1]), settings)[0]:
            return None
        if distributed.process_group_active() or self._stock_caching_on(adapter_name):
            return None
        if type(lora_B) is not nn.Linear or _has_hooks(lora_B):
            return None
        weight_b = _linear_param(lora_B, "weight")
        if _linear_param(lora_B, "bias") is not None or weight_b.device != base_result.device:
            return None
        weight_a = _linear_param(lora_A, "weight")
        magnitude = _own_weight(self)
        bias = _linear_param(base_layer, "bias")
        inputs = (*self._base_tensors(base_layer), weight_a, weight_b, magnitude)
        if bias is not None:
            inputs = (*inputs, bias)
        signature = (float(scaling), settings, write_epoch() if optimizer_may_write(inputs) else -1)
        fold_cache = self.__dict__.get("_df_fold_cache_obj")
        folded = None if fold_cache is None else fold_cache.get(adapter_name, signature, inputs)
        if folded is None:
            # checked on a miss only: a hit's stamps hold the dtypes that passed this check when it was stored;
            # inference tensors cannot be stamped, so nothing is cached for them
            if weight_a.dtype != weight_b.dtype or magnitude.dtype != weight_b.dtype or not stampable(inputs):
                return None
            with normal_tensors():
                folded = self._fold(
                    lora_A, lora_B, weight_b, magnitude, bias, scaling, base_layer, adapter_name, base_result.dtype
                )
            self._df_fold_cache.put(adapter_name, signature, inputs, folded)  # a declined fold is remembered too
        elif settings.norm_cache == "verify":
            fresh = self._fold(
                lora_A, lora_B, weight_b, magnitude, bias, scaling, base_layer, adapter_name, base_result.dtype
            )
            self._check_cached("folded lora_B (g * s) B", adapter_name, folded, fresh)
        if self.__dict__.get("_dora_cache"):
            self._cache_clear()  # as stock does on every call with its caching off
        return None if folded is _NOT_FOLDABLE else folded

    def _fold(
        self, lora_A, lora_B, weight_b, magnitude, bias, scaling, base_layer, adapter_name, result_dtype
    ) -> FoldedLoraB:
        """``(B', c, g - 1)`` from the (cached) norm and the current magnitude, ``lora_B`` and bias, or
        ``_NOT_FOLDABLE`` where ``fold_scale_into_lora_B`` declines."""
        norm = self._forward_norm(base_layer, lora_A, lora_B, scaling, adapter_name, gather_modules=(lora_A, lora_B))
        scale = magnitude_scale(magnitude.detach().reshape(-1), norm)
        folded = fold_scale_into_lora_B(weight_b, scale, scaling, bias, result_dtype)
        return _NOT_FOLDABLE if folded is None else folded


_MISSING = object()
#: Fold-cache value of a layer whose fold ``fold_scale_into_lora_B`` declined (ill-conditioned or non-finite).
_NOT_FOLDABLE = ()


def _linear_param(module: nn.Module, name: str) -> torch.Tensor | None:
    """``module.<name>``, read straight from ``_parameters`` for a plain ``nn.Linear`` (no ``__getattr__``).

    A name missing from ``_parameters`` (FSDP1 flattens parameters into plain attributes) falls back to
    ``getattr``."""
    if type(module) is nn.Linear:
        value = module._parameters.get(name, _MISSING)
        if value is not _MISSING:
            return value
    return getattr(module, name)


def _own_weight(layer: nn.Module) -> torch.Tensor:
    """The DoRA layer's magnitude parameter (``layer.weight``) without ``nn.Module.__getattr__``."""
    weight = layer._parameters.get("weight")
    return layer.weight if weight is None else weight


def _any_param_requires_grad(layer: nn.Module, lora_A: nn.Module, lora_B: nn.Module) -> bool:
    """True when the magnitude, ``A`` or ``B`` requires a gradient (then a grad-mode call records autograd)."""
    return (
        _own_weight(layer).requires_grad
        or _linear_param(lora_A, "weight").requires_grad
        or _linear_param(lora_B, "weight").requires_grad
    )


def _lora_B_weight_for_node(lora_B: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``lora_B``'s weight when ``lora_B`` may run inside the training node (``dora_linear_compose``), else None.

    Only for what ``F.linear(h, weight)`` reproduces exactly: a plain, hook-free, bias-free ``nn.Linear`` whose
    weight is a plain tensor (not a DTensor or other subclass), in eager mode (``torch.compile`` traces the
    ``torch.library`` ops; ``torch.func`` transforms and ``torch.jit`` tracing need plain ops), with grad mode
    on and autocast off on ``x``'s device.
    """
    if not torch.is_grad_enabled() or type(lora_B) is not nn.Linear or _has_hooks(lora_B):
        return None
    if torch.compiler.is_compiling() or autocast_on(x) or rules.plain_autograd_required():
        return None
    weight = _linear_param(lora_B, "weight")
    if type(weight) not in (nn.Parameter, torch.Tensor) or _linear_param(lora_B, "bias") is not None:
        return None
    return weight


def _lora_A_call(lora_A: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``lora_A(x)``; a plain hook-free ``nn.Linear`` is applied as ``F.linear`` directly (what its
    ``forward`` does), which skips ``nn.Module.__call__``'s bookkeeping on the decode path."""
    if type(lora_A) is nn.Linear and not _has_hooks(lora_A):
        return F.linear(x, _linear_param(lora_A, "weight"), _linear_param(lora_A, "bias"))
    return lora_A(x)


def _has_hooks(module: nn.Module) -> bool:
    """True when calling ``module`` would run more than its class's ``forward``: any hook (the checks of
    ``nn.Module._call_impl``'s fast path) or a ``forward`` set on the instance (accelerate's
    ``add_hook_to_module`` wraps a module's forward that way). Such a module is called, never bypassed."""
    return bool(
        "forward" in module.__dict__
        or module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or module_mod._global_forward_hooks
        or module_mod._global_forward_pre_hooks
        or module_mod._global_backward_hooks
        or module_mod._global_backward_pre_hooks
    )


def bf16_dropout_scale(module: nn.Module, active_adapter: str, x: torch.Tensor, result: torch.Tensor) -> float | None:
    """``c = fp32(1 / (1 - p))`` when PEFT's DoRA variant is about to recompute the base output from
    ``dropout(x)`` and ``x`` is exactly an fp32 copy of a bf16 activation; else None.

    Called with the variant's arguments: ``module`` (PEFT's LoRA ``Linear``), ``x`` (its input after PEFT's
    cast to the adapter dtype), ``result`` (the base layer's output on the *uncast* input).

    The proof that the uncast input was bf16: ``result`` is bf16 and came from a plain ``nn.Linear`` with a bf16
    weight, and ``F.linear`` accepts no other input dtype with a bf16 weight; nothing could have cast the input
    on its way (no autocast, torch-function mode, hook, instance ``forward`` or replaced ``nn.Linear.forward``).
    A later adapter of the same module sees an fp32 ``result`` (PEFT added an fp32 extra output to it) and is not
    accelerated. The dropout must be a plain ``nn.Dropout`` in training mode with ``0 < p < 1``, ``x`` a plain
    tensor, the DoRA layer ours; never while ``torch.compile`` traces (that path recomputes with plain ops).
    """
    if not module.training or x.dtype != torch.float32 or result.dtype != torch.bfloat16:
        return None
    if type(x) is not torch.Tensor or torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type):
        return None
    dropout = module.lora_dropout[active_adapter]
    if type(dropout) is not nn.Dropout or not dropout.training or not 0.0 < dropout.p < 1.0:
        return None
    if not isinstance(module.lora_magnitude_vector[active_adapter], DoraLinearLayer):
        return None
    base_layer = _base_layer_of(module)
    if type(base_layer) is not nn.Linear or _has_hooks(base_layer):
        return None
    if nn.Linear.forward is not _LINEAR_FORWARD or torch._C._is_torch_function_mode_enabled():
        return None  # nn.Linear's forward replaced, or a torch-function mode that may cast F.linear's input
    weight = _linear_param(base_layer, "weight")
    if type(weight) not in (nn.Parameter, torch.Tensor) or weight.dtype != torch.bfloat16:
        return None
    return struct.unpack("f", struct.pack("f", 1.0 / (1.0 - dropout.p)))[0]  # the fp32 factor nn.Dropout uses


#: ``nn.Linear.forward`` as PyTorch defines it (``bf16_dropout_scale`` relies on its dtype check).
_LINEAR_FORWARD = nn.Linear.forward
#: PEFT's own variant class, bound when this module loads (``patching.py`` later rebinds PEFT's name to ours).
_StockDoraLinearVariant = peft_variants.DoraLinearVariant


class DoraLinearVariant(_StockDoraLinearVariant):
    """PEFT's DoRA variant of ``lora.Linear`` (a drop-in subclass): the same forward, except that where PEFT
    passes ``base_result=result`` (evaluation, or training without dropout) our layer returns PEFT's
    ``result + extra`` itself (:func:`_layer_output`: the decode fold, the training node's composed sum),
    and in training with PEFT's dropout it tells our layer when the dropped-out input is an exact fp32 copy
    of a bf16 activation (:func:`bf16_dropout_scale`), so the layer recomputes the base output with one bf16
    GEMM.

    PEFT keeps one variant instance per adapter (``module.lora_variant``), built from the class name it looks
    up in ``peft.tuners.lora.variants``: ``patching.py`` rebinds that name, so a model built while patched
    keeps these variants, as it keeps our layers.
    """

    @staticmethod
    def forward(
        module: nn.Module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs: Any
    ) -> torch.Tensor:
        """PEFT's ``forward``, except: where PEFT would pass ``base_result=result`` (evaluation, or
        ``lora_dropout`` an ``nn.Identity``), the whole output from our layer (:func:`_layer_output`); in
        training with dropout, its dropout branch with the bf16 scale passed on where that applies."""
        # PEFT passes its variant keywords (``VARIANT_KWARG_KEYS``) on every call, None unless set
        plain = True
        for value in kwargs.values():
            if value is not None:
                plain = False
                break
        if not module.training or isinstance(_adapter_module(module, "lora_dropout", active_adapter), nn.Identity):
            out = None
            if plain:
                out = _cached_fold_output(module, active_adapter, x, result)
                if out is None:
                    out = _layer_output(module, active_adapter, x, result)
            if out is not None:
                return out
            return _StockDoraLinearVariant.forward(module, active_adapter, x, result, **kwargs)
        scale = bf16_dropout_scale(module, active_adapter, x, result)
        if scale is None:
            return _StockDoraLinearVariant.forward(module, active_adapter, x, result, **kwargs)
        extra = module.lora_magnitude_vector[active_adapter](
            module.lora_dropout[active_adapter](x),
            lora_A=module.lora_A[active_adapter],
            lora_B=module.lora_B[active_adapter],
            scaling=module.scaling[active_adapter],
            base_layer=_base_layer_of(module),
            base_result=None,
            adapter_name=active_adapter,
            bf16_dropout_scale=scale,
        )
        return result + extra


def _cached_fold_output(
    module: nn.Module, active_adapter: str, x: torch.Tensor, result: torch.Tensor
) -> torch.Tensor | None:
    """``result + extra`` from the layer's cached decode fold, where the general path
    (:func:`_layer_output` -> ``DoraLinearLayer.forward`` -> ``_folded_lora_B``) would serve that same cached
    fold: bitwise its output, for the common case only. None wherever anything differs from it, or the
    fold cache has no valid entry: the general path then decides (builds and stores the fold, clears PEFT's
    ``_dora_cache``, verifies, or takes another path), so this function never stores, drops or counts a miss.

    The common case: evaluation (or no gradient to record) with the norm cache on (not ``verify``), nothing
    tracing or sharded, autocast and PEFT's caching off; the adapter's magnitude module our ``DoraLinearLayer``
    itself and ``lora_A`` / ``lora_B`` plain ``nn.Linear`` s (``lora_B`` without bias), none of them with hooks
    or an instance ``forward`` (nor any global module hook) or shadowed by an instance attribute. Every check of
    the general path, in one frame: a decode step pays this per layer instead of six calls' worth of the same
    checks.
    """
    if not caching_allowed():  # tracing (torch.compile, torch.jit) or a torch.func transform
        return None
    grad = torch.is_grad_enabled()
    if grad and (x.requires_grad or result.requires_grad):
        return None
    containers = module._modules
    own = module.__dict__
    if "lora_magnitude_vector" in own or "lora_A" in own or "lora_B" in own:
        return None
    magnitudes, adapters_a, adapters_b = (
        containers.get("lora_magnitude_vector"),
        containers.get("lora_A"),
        containers.get("lora_B"),
    )
    if not (type(magnitudes) is type(adapters_a) is type(adapters_b) is nn.ModuleDict):
        return None
    layer = magnitudes._modules.get(active_adapter)
    lora_A = adapters_a._modules.get(active_adapter)
    lora_B = adapters_b._modules.get(active_adapter)
    if type(layer) is not DoraLinearLayer or type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear:
        return None
    params_a, params_b = lora_A._parameters, lora_B._parameters
    weight_a, weight_b = params_a.get("weight"), params_b.get("weight")
    magnitude = layer._parameters.get("weight")
    if weight_a is None or weight_b is None or magnitude is None or params_b.get("bias") is not None:
        return None
    trainable = magnitude.requires_grad or weight_a.requires_grad or weight_b.requires_grad
    if grad and trainable:  # a training call: decided before the checks below
        return None
    if layer.__dict__.get("_dora_cache"):
        return None
    if (
        module_mod._global_forward_hooks
        or module_mod._global_forward_pre_hooks
        or module_mod._global_backward_hooks
        or module_mod._global_backward_pre_hooks
    ):
        return None
    for part in (layer, lora_A, lora_B):  # what _has_hooks checks of each, the global hooks above
        if (
            "forward" in part.__dict__
            or part._forward_hooks
            or part._forward_pre_hooks
            or part._backward_hooks
            or part._backward_pre_hooks
        ):
            return None
    if result.dim() == 0 or weight_b.device != result.device or autocast_on(result):
        return None
    settings = config.cache_settings()
    rows = result.numel() // max(1, result.shape[-1])
    if settings.norm_cache != "on" or not rules.inference_fold_ok(rows, settings)[0]:
        return None
    if distributed.process_group_active() or layer._stock_caching_on(active_adapter):
        return None
    fold_cache = layer.__dict__.get("_df_fold_cache_obj")
    if fold_cache is None:
        return None
    base_layer = _base_layer_of(module)
    bias = _linear_param(base_layer, "bias")
    inputs = (*layer._base_tensors(base_layer), weight_a, weight_b, magnitude)
    if bias is not None:
        inputs = (*inputs, bias)
    signature = (
        float(module.scaling[active_adapter]),
        settings,
        write_epoch() if trainable or optimizer_may_write(inputs) else -1,
    )
    folded = fold_cache.hit(active_adapter, signature, inputs)
    if not folded:  # no valid entry (None), or a declined fold (_NOT_FOLDABLE)
        return None
    return folded_dora_output(F.linear(x, weight_a, params_a.get("bias")), folded, result)


def _layer_output(module: nn.Module, active_adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor | None:
    """``result + extra`` of PEFT's DoRA variant where PEFT passes ``base_result=result`` (evaluation, or
    training with ``lora_dropout`` an ``nn.Identity``), returned by our layer itself
    (``DoraLinearLayer.forward(add_base_result=True)``); None where PEFT's forward must run instead.

    The layer then adds ``result`` where that costs nothing: into the decode fold's own temporary
    (``autograd/folded.py``), inside the training node's kernel pass (``autograd/lora_compose.py``; the two
    gradients reaching ``result`` arrive already summed), else as PEFT's ``result + extra``. Calling the layer
    directly also saves PEFT's variant plumbing and a module call per layer and call, which is what bounds a
    decode step's host time. Only where calling it as a module would run nothing else
    (:func:`_plain_dora_layer`).
    """
    layer = _plain_dora_layer(module, active_adapter)
    if layer is None:
        return None
    return layer.forward(
        x,
        lora_A=_adapter_module(module, "lora_A", active_adapter),
        lora_B=_adapter_module(module, "lora_B", active_adapter),
        scaling=module.scaling[active_adapter],
        base_layer=_base_layer_of(module),
        base_result=result,
        adapter_name=active_adapter,
        add_base_result=True,
    )


def _adapter_module(module: nn.Module, name: str, adapter: str) -> nn.Module | None:
    """``module.<name>[adapter]`` of one of PEFT's per-adapter ``ModuleDict`` s (``lora_A``, ``lora_dropout``...)
    read from ``_modules`` on both levels (no ``nn.Module.__getattr__``: about a microsecond per layer and
    decode step); None where the adapter has none. Falls back to attribute access where an instance
    attribute shadows the registered module or the container is not a plain ``ModuleDict``."""
    container = module._modules.get(name)
    if type(container) is not nn.ModuleDict or name in module.__dict__:
        container = getattr(module, name)  # a ModuleDict has no .get
        if adapter not in container:
            return None
        return container[adapter]
    return container._modules.get(adapter)


def _base_layer_of(module: nn.Module) -> nn.Module:
    """``module.get_base_layer()`` (PEFT: follow ``base_layer`` attributes down), answered from ``_modules``
    where the base layer is a plain ``nn.Linear`` with nothing named ``base_layer``: PEFT's ``hasattr`` walk
    ends there through a raised and caught ``AttributeError`` of ``nn.Module.__getattr__``, on every call of
    every layer."""
    base = module._modules.get("base_layer")
    if (
        type(base) is nn.Linear
        and "base_layer" not in module.__dict__  # an instance attribute would shadow the registered module
        and "base_layer" not in base.__dict__
        and "base_layer" not in base._modules
        and "base_layer" not in base._parameters
        and "base_layer" not in base._buffers
    ):
        return base
    return module.get_base_layer()


def _plain_dora_layer(module: nn.Module, active_adapter: str) -> DoraLinearLayer | None:
    """The adapter's magnitude module where calling its ``forward`` directly is what calling the module would
    do: our ``DoraLinearLayer`` with no hooks (its own or global) and no instance ``forward``; else None."""
    layer = _adapter_module(module, "lora_magnitude_vector", active_adapter)
    if not isinstance(layer, DoraLinearLayer) or _has_hooks(layer):
        return None
    return layer
