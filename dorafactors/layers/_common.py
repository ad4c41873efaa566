"""What every dorafactors DoRA layer shares: PEFT's cache API, the stock caching flag, and the norm pipeline.

The layer classes subclass PEFT's originals and put :class:`DoraLayerMixin` first in the MRO. They stay
childless modules whose only parameter is the magnitude ``weight`` (PEFT's FSDP wrap policy, state_dict
keys). Everything dorafactors keeps per layer lives in plain attributes prefixed ``_df_``; they are
created lazily so that a stock instance converted in place by ``patch(model)`` works without ``__init__``.
"""

from __future__ import annotations

import contextlib
from copy import deepcopy
from typing import Any

import torch
from peft.tuners.lora import dora as peft_dora
from peft.utils.integrations import dequantize_module_weight
from torch import nn

from .. import distributed
from ..dispatch import config
from ..norm import NormCache, engine

__all__ = ["DoraLayerMixin", "norm_cache_key_tensors"]


def norm_cache_key_tensors(base_layer: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    """The raw tensors the (dequantized) base weight is a pure function of.

    Plain layers: the weight parameter. Quantized layers: the packed weight plus its quantization state
    (bitsandbytes ``quant_state.absmax`` / ``state.SCB``, HQQ ``meta`` scale and zero), so a new
    quantization state invalidates the cache even when the packed bytes are reused.
    """
    tensors: list[torch.Tensor] = []
    packed = getattr(base_layer, "W_q", None)  # HQQ
    weight = packed if isinstance(packed, torch.Tensor) else getattr(base_layer, "weight", None)
    if isinstance(weight, torch.Tensor):
        tensors.append(weight)
        quant_state = getattr(weight, "quant_state", None)
        for name in ("absmax", "code"):
            value = getattr(quant_state, name, None)
            if isinstance(value, torch.Tensor):
                tensors.append(value)
    scb = getattr(getattr(base_layer, "state", None), "SCB", None)
    if isinstance(scb, torch.Tensor):
        tensors.append(scb)
    meta = getattr(base_layer, "meta", None)
    if isinstance(meta, dict):
        for name in ("scale", "zero"):
            value = meta.get(name)
            if isinstance(value, torch.Tensor):
                tensors.append(value)
    return tuple(tensors)


class DoraLayerMixin:
    """Shared behaviour of the dorafactors DoRA layers (see module docstring)."""

    training: bool
    fan_in_fan_out: bool

    # ------------------------------------------------------------------ per-layer state
    @property
    def _df_norm_cache(self) -> NormCache:
        cache = self.__dict__.get("_df_norm_cache_obj")
        if cache is None:
            cache = NormCache()
            self.__dict__["_df_norm_cache_obj"] = cache
        return cache

    @property
    def _df_sumsq_cache(self) -> NormCache:
        cache = self.__dict__.get("_df_sumsq_cache_obj")
        if cache is None:
            cache = NormCache()
            self.__dict__["_df_sumsq_cache_obj"] = cache
        return cache

    def clear_norm_cache(self) -> None:
        """Forget every cached norm and base sum of squares of this layer."""
        self._df_norm_cache.clear()
        self._df_sumsq_cache.clear()

    @property
    def norm_computations(self) -> int:
        """How many times this layer computed its forward norm (cache misses); for tests and benchmarks."""
        return self._df_norm_cache.misses

    # ------------------------------------------------------------------ PEFT's ad hoc cache (>= 0.19 API)
    def _stock_cache(self) -> dict[str, Any]:
        cache = self.__dict__.get("_dora_cache")
        if cache is None:
            cache = {}
            self.__dict__["_dora_cache"] = cache
        return cache

    def _cache_store(self, key: str, value: Any) -> None:
        self._stock_cache()[key] = value

    def _cache_get(self, key: str, default: Any | None) -> Any | None:
        return self._stock_cache().get(key, default)

    def _cache_clear(self) -> None:
        self._stock_cache().clear()

    def train(self, mode: bool = True):  # type: ignore[override]
        if mode:
            self._cache_clear()
        return super().train(mode)  # type: ignore[misc]

    def _stock_caching_on(self, adapter_name: str | None) -> bool:
        """PEFT's ``ENABLE_DORA_CACHING`` rule, reading the module attribute on every call like stock."""
        return bool(getattr(peft_dora, "ENABLE_DORA_CACHING", False)) and not self.training and adapter_name is not None

    def _stock_cached(self, key: str, adapter_name: str | None, compute):
        """Stock ``cache_decorator`` semantics for ``get_weight_norm`` / ``get_lora_weight``."""
        if not self._stock_caching_on(adapter_name):
            self._cache_clear()
            return compute()
        full_key = f"{key}-{adapter_name}"
        value = self._cache_get(full_key, None)
        if value is None:
            value = compute()
            self._cache_store(full_key, value)
        return value

    # ------------------------------------------------------------------ construction
    def _magnitude_shape(self, weight: torch.Tensor) -> tuple[int, ...]:
        """Shape of the magnitude parameter (stock's): ``[d_out]``; conv overrides it."""
        return (-1,)

    def update_layer(
        self,
        *,
        base_layer: nn.Module,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        scaling: float,
        place_on_cpu: bool = False,
    ) -> None:
        """Initialize the magnitude to ``||W + s B A||_row`` (factored), in stock's dtype ``promote(W, A)``.

        ``lora_A`` / ``lora_B`` are the weight tensors, as PEFT's variants pass them.
        """
        with torch.no_grad(), distributed.gathered_for_norm(base_layer, lora_A, lora_B) as gathered:
            lora_A, lora_B = gathered.full(lora_A), gathered.full(lora_B)
            if base_layer.__class__.__name__ == "Linear4bit":
                base_layer = deepcopy(base_layer)  # as stock: FSDP cannot share the quantized base here
            weight = gathered.full(dequantize_module_weight(base_layer)).to(lora_A.device)
            with _autocast_off(weight.device.type):
                w2, a2, b2 = self._norm_factors(weight, lora_A, lora_B)
                norm = engine.weight_norm(w2, a2, b2, float(scaling))
            norm = norm.to(torch.promote_types(weight.dtype, lora_A.dtype)).view(self._magnitude_shape(weight))
        if place_on_cpu:
            norm = norm.to("cpu")
        self.weight = nn.Parameter(norm, requires_grad=True)

    # ------------------------------------------------------------------ the forward norm
    def _norm_factors(
        self, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """2-D ``(W [d_out, d_in], A [r, d_in], B [d_out, r])`` views for the engine; overridden per type."""
        raise NotImplementedError

    def _forward_norm(
        self,
        base_layer: torch.nn.Module,
        lora_A: torch.Tensor | nn.Module,
        lora_B: torch.Tensor | nn.Module,
        scaling: float,
        adapter_name: str,
        *,
        gather_modules: tuple[Any, ...],
        dequantize: bool = True,
    ) -> torch.Tensor:
        """Detached fp32 row norm of ``W + s B A`` for the forward, served from the cache when valid.

        ``lora_A`` / ``lora_B`` are the adapter modules (their ``weight`` is read inside the gather: FSDP1
        and FSDP2 swap in new tensor objects when they unshard) or the weight tensors (conv: 3-5-D).
        ``gather_modules`` are the modules or tensors the distributed helpers must gather first.
        """
        scaling = float(scaling)
        with torch.no_grad(), distributed.gathered_for_norm(base_layer, *gather_modules) as gathered:
            lora_A, lora_B = gathered.full(lora_A), gathered.full(lora_B)
            base_tensors = norm_cache_key_tensors(base_layer)
            inputs = (*base_tensors, lora_A, lora_B)
            reuse, _reason = distributed.norm_cache_allowed(gathered, inputs)
            reuse = reuse and not torch.compiler.is_compiling()
            use_norm_cache = reuse and (config.norm_cache_enabled() or self._stock_caching_on(adapter_name))
            if use_norm_cache:
                key = (adapter_name, scaling, config.get_dora_norm_threshold_mb(), config.fused_mode())
                hit = self._df_norm_cache.get(key, inputs)
                if hit is not None:
                    return hit
            else:
                self._df_norm_cache.misses += 1
            weight = gathered.full(dequantize_module_weight(base_layer) if dequantize else base_layer.weight)
            with _autocast_off(weight.device.type):
                w2, a2, b2 = self._norm_factors(weight, lora_A, lora_B)
                sumsq = None
                if reuse:
                    sumsq_key = (config.get_dora_norm_threshold_mb(), config.fused_mode(), engine.norm_path(w2, a2, b2))
                    sumsq = self._df_sumsq_cache.get(sumsq_key, base_tensors)
                    if sumsq is None:
                        sumsq = engine.weight_sumsq(w2)
                        self._df_sumsq_cache.put(sumsq_key, base_tensors, sumsq)
                norm = engine.weight_norm(w2, a2, b2, scaling, cached_sumsq=sumsq)
            if use_norm_cache:
                self._df_norm_cache.put(key, inputs, norm)
            return norm

    def _mirror_stock_cache(self, adapter_name: str, norm: torch.Tensor) -> None:
        """Keep PEFT's ``_dora_cache`` observable exactly as stock fills and clears it during forward."""
        if self._stock_caching_on(adapter_name):
            self._cache_store(f"weight-norm-{adapter_name}", norm)
        else:
            self._cache_clear()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()  # type: ignore[misc]
        state = dict(state)
        state.pop("_df_norm_cache_obj", None)
        state.pop("_df_sumsq_cache_obj", None)
        return state


@contextlib.contextmanager
def _autocast_off(device_type: str):
    """The norm controls its own precision: no autocast inside it."""
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    else:
        yield
