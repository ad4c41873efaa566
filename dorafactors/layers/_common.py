"""What every dorafactors DoRA layer shares: PEFT's cache API, the stock caching flag, and the norm pipeline.

The layer classes subclass PEFT's originals and put :class:`DoraLayerMixin` first in the MRO. They stay
childless modules whose only parameter is the magnitude ``weight`` (PEFT's FSDP wrap policy, state_dict
keys). Everything dorafactors keeps per layer lives in plain attributes prefixed ``_df_``; they are
created lazily so that a stock instance converted in place by ``patch(model)`` works without ``__init__``.
"""

from __future__ import annotations

import contextlib
import weakref
from copy import deepcopy
from typing import Any

import torch
from peft.tuners.lora import dora as peft_dora
from peft.utils.integrations import dequantize_module_weight
from torch import nn

from .. import distributed
from ..autograd import norm_op
from ..dispatch import config, rules
from ..kernels.operands import HALF_DTYPES, promote
from ..norm import NormCache, engine
from ..norm.cache import (
    StaleNormCacheError,
    TensorStamp,
    advance_write_epoch,
    caching_allowed,
    hidden_from_selective_checkpoint,
    install_step_hook,
    normal_tensors,
    optimizer_may_write,
    optimizer_untracked,
    owned_norm_caches,
    same_values,
    stampable,
    write_epoch,
)
from ..norm.replay import NormReplay
from ..norm.scale import magnitude_scale, scale_divisor

__all__ = ["DoraLayerMixin", "autocast_on", "base_weight", "norm_cache_key_tensors", "stock_extra_dtype"]


def base_weight(base_layer: torch.nn.Module) -> torch.Tensor:
    """The base layer's weight as a float tensor: the parameter itself when it is a plain ``nn.Parameter``,
    PEFT's ``dequantize_module_weight`` otherwise (bnb, HQQ, torchao). Skipping PEFT's helper for plain
    weights saves host time on every forward and keeps ``torch.compile`` graphs whole (the helper calls
    ``str.startswith`` on a type's module name, which Dynamo cannot trace)."""
    weight = getattr(base_layer, "weight", None)
    if type(weight) is nn.Parameter:
        return weight
    return dequantize_module_weight(base_layer)


#: True when autocast is on for any device (one C call: the common no-autocast case costs no device lookup).
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None)


def autocast_on(tensor: torch.Tensor) -> bool:
    """``torch.is_autocast_enabled(tensor.device.type)``, answered without the device lookup when autocast is off
    everywhere (every call of a training or decode step without AMP)."""
    if _any_autocast is not None and not _any_autocast():
        return False
    return torch.is_autocast_enabled(tensor.device.type)


def stock_extra_dtype(base: torch.dtype, lora: torch.dtype, magnitude: torch.dtype, x: torch.dtype) -> torch.dtype:
    """The dtype of stock PEFT's extra output ``(g - 1) * base + g * s * lora``: ``g = m / norm`` with the norm
    in ``x``'s dtype (stock casts ``W`` to it), so ``promote(base, lora, m, x)``.

    Without autocast that is the activation dtype. Under ``torch.autocast`` on a model with fp32 weights the
    magnitude and ``x`` are fp32 while the GEMM outputs ``base`` and ``lora`` are half: stock keeps the extra
    in fp32 and PEFT rounds the layer's output once, at its end; a composition in half would round twice."""
    return promote(promote(base, lora), promote(magnitude, x))


def norm_cache_key_tensors(base_layer: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    """The raw tensors the (dequantized) base weight is a pure function of.

    Plain layers: the weight parameter. Quantized layers: the packed weight plus its quantization state
    (bitsandbytes 4-bit ``quant_state`` absmax, code and, with double quantization, the offset and the
    nested ``state2`` absmax and code; 8-bit ``state.SCB``; HQQ ``meta`` scale and zero), so a new or
    rewritten quantization state invalidates the cache even when the packed bytes are reused.
    """
    tensors: list[torch.Tensor] = []
    packed = getattr(base_layer, "W_q", None)  # HQQ
    weight = packed if isinstance(packed, torch.Tensor) else getattr(base_layer, "weight", None)
    if isinstance(weight, torch.Tensor):
        tensors.append(weight)
        quant_state = getattr(weight, "quant_state", None)
        # with double quantization the 4-bit absmax is itself quantized: its scales live in ``state2``
        for state, names in (
            (quant_state, ("absmax", "code", "offset")),
            (getattr(quant_state, "state2", None), ("absmax", "code")),
        ):
            for name in names:
                value = getattr(state, name, None)
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


#: Per-layer derived state (caches and memos with weak references): never pickled, dropped on revert.
_DERIVED_STATE = (
    "_df_norm_cache_obj",
    "_df_sumsq_cache_obj",
    "_df_fold_cache_obj",
    "_df_base_memo",
    "_df_scale_memo",
    "_df_divisor_memo",
    "_df_norm_replays",
)


class DoraLayerMixin:
    """Shared behaviour of the dorafactors DoRA layers (see module docstring)."""

    training: bool
    fan_in_fan_out: bool

    # ------------------------------------------------------------------ per-layer state
    def _lazy_cache(self, slot: str) -> NormCache:
        """The layer's ``NormCache`` in ``__dict__[slot]``, created on first use (no ``__init__`` needed)."""
        cache = self.__dict__.get(slot)
        if cache is None:
            cache = NormCache()
            self.__dict__[slot] = cache
        return cache

    @property
    def _df_norm_cache(self) -> NormCache:
        return self._lazy_cache("_df_norm_cache_obj")

    @property
    def _df_sumsq_cache(self) -> NormCache:
        return self._lazy_cache("_df_sumsq_cache_obj")

    @property
    def _df_fold_cache(self) -> NormCache:
        """Folded ``(g * s) B`` of the decode path (``autograd/folded.py``), keyed like the norm."""
        return self._lazy_cache("_df_fold_cache_obj")

    def clear_norm_cache(self) -> None:
        """Forget every cached norm, base sum of squares and folded ``lora_B`` of this layer (compiled
        graphs' caches included)."""
        self._df_norm_cache.clear()
        self._df_sumsq_cache.clear()
        self._df_fold_cache.clear()
        self.__dict__.pop("_df_scale_memo", None)
        self.__dict__.pop("_df_divisor_memo", None)
        self.__dict__.pop("_df_norm_replays", None)
        compiled = self._compiled_norm_caches()
        if compiled is not None:
            compiled.clear()

    @property
    def norm_computations(self) -> int:
        """How many times this layer computed its forward norm (cache misses and uncached calls), in eager
        mode and inside ``torch.compile`` graphs (counted at run time by the norm op); for tests and
        benchmarks."""
        compiled = self._compiled_norm_caches()
        return self._df_norm_cache.misses + (0 if compiled is None else compiled.norm.misses)

    def _compiled_norm_caches(self):
        """The caches of ``dorafactors::cached_weight_norm`` for this layer (owner: the magnitude), or None."""
        magnitude = self.__dict__.get("_parameters", {}).get("weight")
        return None if magnitude is None else owned_norm_caches(magnitude, create=False)

    def _check_cached(self, what: str, adapter_name: str | None, cached: Any, fresh: Any) -> None:
        """``PEFT_DORA_NORM_CACHE=verify``: raise :class:`StaleNormCacheError` naming this layer when the
        cached value (a tensor or a tuple of them) differs from ``fresh``, its recomputation from scratch."""
        if isinstance(cached, tuple) != isinstance(fresh, tuple) or (
            isinstance(cached, tuple) and len(cached) != len(fresh)
        ):
            pairs = ((cached, None),)  # one side declined (an empty tuple) or changed form: never equal
        else:
            pairs = zip(cached, fresh) if isinstance(cached, tuple) else ((cached, fresh),)
        for old, new in pairs:
            if same_values(old, new):
                continue
            detail = ""
            if old is not None and new is not None and old.shape == new.shape:
                detail = f" (largest difference {(old.double() - new.double()).abs().max().item():.3g})"
            raise StaleNormCacheError(
                f"dorafactors: the cached {what} of DoRA layer {_module_path(self)!r} (adapter "
                f"{adapter_name!r}) differs from its recomputation{detail}. A tensor it depends on was written "
                "in a way PyTorch's version counter does not see (through `.data`, a NumPy or DLPack alias, "
                "`p.data = t` then writing `t`, `vector_to_parameters` then writing the vector, a kernel, an "
                "optimizer outside `torch.optim` or a `torch.distributed` collective writing into it). Call "
                "`dorafactors.clear_norm_caches(model)` after such writes."
            )

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
            fold = self.__dict__.get("_df_fold_cache_obj")
            if fold is not None:
                fold.clear()  # the folded B' is an eval-time copy of lora_B: free it for training
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
        install_step_hook()  # the first optimizer step of a run is counted (norm/cache.py)
        with torch.no_grad(), distributed.gathered_for_norm(base_layer, lora_A, lora_B) as gathered:
            lora_A, lora_B = gathered.full(lora_A), gathered.full(lora_B)
            if base_layer.__class__.__name__ == "Linear4bit":
                base_layer = deepcopy(base_layer)  # as stock: FSDP cannot share the quantized base here
            weight = gathered.full(base_weight(base_layer)).to(lora_A.device)
            with _autocast_off(weight.device.type):
                w2, a2, b2 = self._norm_factors(weight, lora_A, lora_B)
                # ||W||^2 from weight_sumsq, as the forward takes it (_norm_in_scope): the forward's norm at
                # these weights is then bitwise this one, so g == 1 exactly until the adapter trains (the
                # kernel's one-pass ||W||^2 sums in another order and differs in the last fp32 bits).
                norm = engine.weight_norm(w2, a2, b2, float(scaling), cached_sumsq=engine.weight_sumsq(w2))
                self.__dict__["_df_norm_rank"] = a2.shape[0]  # for get_weight_norm (merge): the same norm path
            norm = norm.to(torch.promote_types(weight.dtype, lora_A.dtype)).view(self._magnitude_shape(weight))
        if place_on_cpu:
            norm = norm.to("cpu")
        self.weight = nn.Parameter(norm, requires_grad=True)
        self._add_norm_store()

    def _add_norm_store(self) -> None:
        """Give the layer the norm store of its compiled no-grad forward (``autograd/norm_op.py``): ``[d_out]``
        int32 holding fp32 bits (int64 for an fp64 magnitude), on the magnitude's device.

        A plain attribute, not a buffer: the layer's parameters, buffers and state dict stay stock PEFT's.
        :meth:`_apply` moves it with the module (``.to()``, ``.cuda()``); model-wide dtype casts leave integers
        alone. A store that no longer fits (moved by other means, cast by ``Module.type``) only costs the
        compiled forward its fast path (``norm_op.norm_store_fits``)."""
        magnitude = self._parameters.get("weight")
        if magnitude is None:
            return
        norm_dtype = torch.float64 if magnitude.dtype == torch.float64 else torch.float32
        self.__dict__[norm_op.NORM_STORE] = norm_op.new_norm_store(magnitude.numel(), norm_dtype, magnitude.device)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        """``nn.Module._apply``, and the same conversion for the norm store, as for a buffer."""
        result = super()._apply(fn, recurse)  # type: ignore[misc]
        store = self.__dict__.get(norm_op.NORM_STORE)
        if store is not None:
            if store.is_meta:
                # made beside a meta magnitude (PEFT's low_cpu_mem_usage), which loading has since replaced: a
                # meta tensor has no data to move, and the store holds none yet, so a new one beside the magnitude
                self._add_norm_store()
            else:
                self.__dict__[norm_op.NORM_STORE] = norm_op.static_store(fn(store))
        return result

    # ------------------------------------------------------------------ the forward norm
    def _base_tensors(self, base_layer: nn.Module) -> tuple[torch.Tensor, ...]:
        """``norm_cache_key_tensors(base_layer)``, memoized for the common plain-weight layer.

        Probing a module for quantization attributes costs microseconds per ``getattr`` miss; once a
        base layer is known to hold a plain ``nn.Parameter`` weight, only that is re-checked per call.
        """
        if type(base_layer) is nn.Linear:  # the common case, decided without probing
            weight = base_layer._parameters.get("weight")  # absent under FSDP1's flat parameters
            if type(weight) is nn.Parameter:
                return (weight,)
        if torch.compiler.is_compiling():
            return norm_cache_key_tensors(base_layer)
        memo = self.__dict__.get("_df_base_memo")
        if memo is not None and memo[0]() is base_layer and memo[1]:
            weight = base_layer._parameters.get("weight")
            if type(weight) is nn.Parameter:
                return (weight,)
        tensors = norm_cache_key_tensors(base_layer)
        weight = base_layer._parameters.get("weight") if hasattr(base_layer, "_parameters") else None
        plain = type(weight) is nn.Parameter and tensors == (weight,)
        self.__dict__["_df_base_memo"] = (weakref.ref(base_layer), plain)
        return tensors

    def _magnitude_scale(self, magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """``g = m / norm`` (``[d_out]``, ``norm.scale.magnitude_scale``). With no autograd to record, reuse the last ``g`` while ``norm`` is
        the same cached tensor and the magnitude is unchanged (saves a launch per decode step). One memo
        per layer; never kept for inference tensors or while tracing (see ``norm/cache.py``)."""
        if torch.is_grad_enabled() and magnitude.requires_grad:
            # recorded for autograd on every call; the divisor is kept while the norm is the same cached tensor
            # (gradient accumulation: several forwards per optimizer step). A 1-D magnitude (Linear,
            # Embedding) divides as it is: a reshape would add a view and its backward node per call.
            flat = magnitude if magnitude.dim() == 1 else magnitude.reshape(-1)
            return flat / self._magnitude_divisor(magnitude, norm)
        if not caching_allowed():
            return magnitude_scale(magnitude.reshape(-1), norm)
        epoch = write_epoch() if optimizer_may_write((magnitude,)) else -1
        memo = self.__dict__.get("_df_scale_memo")
        if memo is not None and memo[0] is norm and memo[2] == epoch and memo[1].matches(magnitude):
            if config.norm_cache_verify():
                fresh = magnitude_scale(magnitude.detach().reshape(-1), norm)
                self._check_cached("magnitude scale m / norm", None, memo[3], fresh)
            return memo[3]
        self.__dict__.pop("_df_scale_memo", None)  # the stale memo's tensors are freed before the new ones
        if magnitude.is_inference() or norm.is_inference():  # nothing is kept for inference tensors
            return magnitude_scale(magnitude.detach().reshape(-1), norm)
        with normal_tensors():
            scale = magnitude_scale(magnitude.detach().reshape(-1), norm)
        self.__dict__["_df_scale_memo"] = (norm, TensorStamp(magnitude), epoch, scale)
        return scale

    def _magnitude_divisor(self, magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """The divisor of a trained magnitude's ``g = m / divisor`` (:meth:`_magnitude_scale` in grad mode, or the
        training node, which divides the magnitude itself: ``autograd/lora_compose.py``); kept with the cached
        norm where caching is allowed."""
        if not caching_allowed():
            return scale_divisor(norm, magnitude.dtype, magnitude.device)
        return self._scale_divisor(norm, magnitude)

    def _scale_divisor(self, norm: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
        """``norm.scale.scale_divisor`` of ``norm`` for ``magnitude``, reused while ``norm`` is the same tensor
        object (a cached norm is never written: its divisor cannot change). One memo per layer, holding ``norm``
        (so its identity cannot be reused by a new tensor); nothing is kept for inference tensors."""
        dtype, device = magnitude.dtype, magnitude.device
        memo = self.__dict__.get("_df_divisor_memo")
        if memo is not None and memo[0] is norm and memo[1] == dtype and memo[2] == device:
            return memo[3]
        divisor = scale_divisor(norm, dtype, device)
        if divisor is norm or norm.is_inference():  # nothing to keep (fp32 magnitude), or not keepable
            self.__dict__.pop("_df_divisor_memo", None)
        else:
            self.__dict__["_df_divisor_memo"] = (norm, dtype, device, divisor)
        return divisor

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
        recording = torch.is_grad_enabled()
        with torch.no_grad(), hidden_from_selective_checkpoint():
            if not distributed.process_group_active():  # nothing can be sharded: no gather context at all
                return self._norm_in_scope(
                    distributed.NOT_SHARDED, base_layer, lora_A, lora_B, scaling, adapter_name, dequantize, recording
                )
            with distributed.gathered_for_norm(base_layer, *gather_modules) as gathered:
                return self._norm_in_scope(
                    gathered, base_layer, lora_A, lora_B, scaling, adapter_name, dequantize, recording
                )

    def _norm_in_scope(
        self,
        gathered: distributed.GatherInfo,
        base_layer: nn.Module,
        lora_A: torch.Tensor | nn.Module,
        lora_B: torch.Tensor | nn.Module,
        scaling: float,
        adapter_name: str,
        dequantize: bool,
        recording: bool = True,
    ) -> torch.Tensor:
        """The body of :meth:`_forward_norm`, run with the parameters gathered (under ``no_grad``);
        ``recording``: grad mode was on in the caller (autograd records what the norm feeds).

        Two caches, each with one entry: the norm (slot: the adapter) and the base weight's row sum of
        squares (one slot). Neither is used while tracing or for inference tensors (``norm/cache.py``);
        while ``torch.compile`` traces, the norm is the op of :meth:`_compiled_norm`, which caches at run time.
        """
        if torch.compiler.is_compiling() and rules.compiled_norm_op_ok()[0]:
            use_store = not recording and not self._stock_caching_on(adapter_name)
            return self._compiled_norm(gathered, base_layer, lora_A, lora_B, scaling, dequantize, use_store, recording)
        lora_A, lora_B = gathered.full(lora_A), gathered.full(lora_B)
        base_tensors = self._base_tensors(base_layer)
        inputs = (*base_tensors, lora_A, lora_B)
        autocast_dtype = self._adapter_autocast_dtype(lora_A)
        allowed = caching_allowed()
        reuse = allowed and distributed.norm_cache_allowed(gathered, inputs)[0]
        untracked = False
        if recording and (reuse or not allowed) and not torch.compiler.is_compiling():
            untracked = self._untracked_training_forward(base_layer, inputs, inspectable=reuse)
            if untracked and reuse:  # ||W||^2 still comes from its cache unless W is such a tensor too
                reuse = not optimizer_untracked(base_tensors)
        settings = config.cache_settings() if reuse else None  # (never read while tracing: reuse is False)
        use_norm_cache = (
            reuse and not untracked and (settings.norm_cache != "off" or self._stock_caching_on(adapter_name))
        )
        if use_norm_cache:
            signature = (
                scaling,
                settings.norm_chunk_mb,
                settings.fused,
                write_epoch() if optimizer_may_write(inputs) else -1,
                autocast_dtype,
            )
            hit = self._df_norm_cache.get(adapter_name, signature, inputs)
            if hit is not None:
                if settings.norm_cache == "verify":
                    factor_A, factor_B = _as_autocast_sees(lora_A, lora_B, autocast_dtype)
                    fresh = self._compute_norm(base_layer, gathered, factor_A, factor_B, scaling, dequantize, "fresh")
                    self._check_cached("weight norm", adapter_name, hit, fresh)
                return hit
        elif not torch.compiler.is_compiling():  # no Python state is mutated in a traced region
            self._df_norm_cache.misses += 1
        if reuse and not stampable(inputs):  # inference tensors: nothing is cached for them
            reuse = use_norm_cache = False
        factor_A, factor_B = _as_autocast_sees(lora_A, lora_B, autocast_dtype)
        with normal_tensors() if reuse else contextlib.nullcontext():
            norm = self._compute_norm(
                base_layer,
                gathered,
                factor_A,
                factor_B,
                scaling,
                dequantize,
                # untracked: as the cache would compute it (bitwise), except inside transforms, which cache nothing
                "cached" if reuse else ("fresh" if untracked and allowed else "inline"),
                base_tensors,
                # a replayed graph reads the parameters themselves, not a rounded copy made per call
                replay_slot=adapter_name if reuse and self._norm_replay_ok and autocast_dtype is None else None,
            )
        if use_norm_cache:
            self._df_norm_cache.put(adapter_name, signature, inputs, norm)
        return norm

    def _untracked_training_forward(
        self, base_layer: nn.Module, inputs: tuple[torch.Tensor, ...], *, inspectable: bool
    ) -> bool:
        """Does this forward record autograd through tensors that no optimizer has stepped (``inputs``: the
        norm's; the magnitude and the base bias, which the decode fold reads)? A hand-written update may follow
        its backward, unseen by the stamps ("Training without an optimizer" in ``norm/cache.py``): the write
        epoch is advanced, which ends every value cached from trainable tensors, and the caller neither serves
        nor keeps the norm. ``inspectable``: plain tensors, which the optimizers' step record can be asked
        about; else (inside ``torch.func`` transforms, forward-mode AD, ``torch.jit`` traces) any trainable
        tensor counts."""
        magnitude = self.__dict__["_parameters"].get("weight")
        bias = base_layer.__dict__.get("_parameters", {}).get("bias")
        tensors = (*inputs, *(t for t in (magnitude, bias) if t is not None))
        untracked = optimizer_untracked(tensors) if inspectable else any(t.requires_grad for t in tensors)
        if untracked:
            advance_write_epoch()
        return untracked

    #: True where the adapters' forward runs GEMMs (``F.linear``, convolutions) that ``torch.autocast`` casts to
    #: its dtype; an Embedding's lookup is not autocast (see :meth:`_adapter_autocast_dtype`)
    _adapter_gemms_autocast = True

    def _adapter_autocast_dtype(self, lora_A: torch.Tensor) -> torch.dtype | None:
        """The dtype autocast runs this layer's adapter GEMMs in now, or None (autocast off on the adapters'
        device, or an adapter forward autocast does not touch).

        Under autocast the forward applies ``A`` and ``B`` rounded to that dtype, and stock PEFT's norm is built
        from ``B A`` through the same autocast modules; the norm is then computed from the factors rounded as
        the forward sees them (accumulated in fp32, as always), so that ``g`` normalizes the adapter the forward
        applies (:func:`_as_autocast_sees`)."""
        if not self._adapter_gemms_autocast or not autocast_on(lora_A):
            return None
        device_type = lora_A.device.type
        return torch.get_autocast_dtype(device_type) if device_type in ("cuda", "cpu") else None

    # ------------------------------------------------------------------ the norm under torch.compile
    def _norm_layout(self) -> str:
        """``layout`` of the compiled norm op (``autograd/norm_op.py``): what :meth:`_norm_factors` does."""
        raise NotImplementedError

    def _compiled_norm(
        self,
        gathered: distributed.GatherInfo,
        base_layer: nn.Module,
        lora_A: torch.Tensor | nn.Module,
        lora_B: torch.Tensor | nn.Module,
        scaling: float,
        dequantize: bool,
        use_store: bool = False,
        recording: bool = True,
    ) -> torch.Tensor:
        """While ``torch.compile`` traces: the norm as an opaque op that the compiled graph runs eagerly on
        every call (kernels, cache and norm count at run time).

        The op receives the tensors the eager path stamps and identifies this layer's caches by its
        magnitude parameter. No cache for sharded parameters or a dequantized base weight (a new tensor
        every call), as in eager mode. With ``use_store`` (nothing recorded for autograd) and a norm store
        that fits, ``dorafactors::refresh_weight_norm`` keeps the norm in the layer's store (a graph input,
        which Inductor never reuses for another buffer), written only when it changes, and the graph reads
        it there: no copy and no allocation per call. Otherwise ``dorafactors::cached_weight_norm`` returns
        a fresh copy (a graph that records autograd may save the norm for its backward, which a later write
        must not change); ``recording`` (grad mode on) tells it that a training forward calls it (see the op's
        ``recording``).
        """
        lora_A, lora_B = gathered.full(lora_A), gathered.full(lora_B)
        weight = gathered.full(base_weight(base_layer) if dequantize else base_layer.weight)
        cache = gathered.backend is None and type(weight) is nn.Parameter
        layout = self._norm_layout()
        if use_store:
            store = self.__dict__.get(norm_op.NORM_STORE)
            if norm_op.norm_store_fits(store, weight, lora_A, lora_B, layout):
                return norm_op.refresh_weight_norm(store, self.weight, weight, lora_A, lora_B, scaling, layout, cache)
        return norm_op.cached_weight_norm(self.weight, weight, lora_A, lora_B, scaling, layout, cache, recording)

    def _compute_norm(
        self,
        base_layer: nn.Module,
        gathered: distributed.GatherInfo,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        scaling: float,
        dequantize: bool,
        sumsq_from: str,
        base_tensors: tuple[torch.Tensor, ...] = (),
        *,
        replay_slot: str | None = None,
    ) -> torch.Tensor:
        """The norm from scratch. ``sumsq_from`` says where the base weight's row sum of squares comes from:
        ``"inline"``: the norm computes it itself; ``"cached"``: the sum-of-squares cache (filled on a miss),
        validated by the stamps of ``base_tensors``; ``"fresh"``: recomputed the way the cache computes it, so
        that a recomputation under ``verify`` is bitwise the cached norm when nothing changed.
        ``replay_slot`` (with ``"cached"``): the computation may be replayed from a CUDA graph, under this
        slot's :class:`~dorafactors.norm.replay.NormReplay` (``norm/replay.py``)."""
        weight = gathered.full(base_weight(base_layer) if dequantize else base_layer.weight)
        if torch.jit.is_tracing():  # a trace does not record no_grad: detach, as stock PEFT does its norm
            weight, lora_A, lora_B = weight.detach(), lora_A.detach(), lora_B.detach()
        with _autocast_off(weight.device.type):
            w2, a2, b2 = self._norm_factors(weight, lora_A, lora_B)
            if sumsq_from == "inline":
                return engine.weight_norm(w2, a2, b2, scaling)
            if sumsq_from == "fresh":
                return engine.weight_norm_fresh_sumsq(w2, a2, b2, scaling)
            sumsq, rows_finite = engine.cached_weight_sumsq(
                w2,
                base_tensors=base_tensors,
                base_trainable=optimizer_may_write(base_tensors),
                sumsq_cache=self._df_sumsq_cache,
                check=lambda what, cached, fresh: self._check_cached(what, None, cached, fresh),
            )
            if replay_slot is not None:
                return self._replayed_norm(replay_slot, w2, a2, b2, scaling, sumsq, rows_finite)
            return engine.weight_norm(w2, a2, b2, scaling, cached_sumsq=sumsq, weight_rows_finite=rows_finite)

    #: Linear layers set this: their norm factors are the parameters themselves (or a transposed view), the
    #: same tensors at every call, which is what a replayed graph needs (``norm/replay.py``)
    _norm_replay_ok = False

    def _replayed_norm(
        self,
        slot: str,
        w2: torch.Tensor,
        a2: torch.Tensor,
        b2: torch.Tensor,
        scaling: float,
        sumsq: torch.Tensor,
        rows_finite: bool,
    ) -> torch.Tensor:
        """:func:`engine.weight_norm` on the cached sum of squares, through the slot's ``NormReplay``.

        With a half-precision magnitude on the norm's device, the computation also rounds the norm to the
        magnitude's dtype (``norm.scale.scale_divisor``, what every training forward divides by) and the
        divisor memo is filled with it: on CUDA the rounding is then part of the replayed graph, not two
        launches per training call. Both come from one ``[2, d_out]`` output (one copy per replay); the norm
        returned is its first row. (The CPU, which replays nothing, takes the same path, so that CPU tests
        cover it.)"""
        replays = self.__dict__.get("_df_norm_replays")
        if replays is None:
            replays = self.__dict__["_df_norm_replays"] = {}
        replay = replays.get(slot)
        if replay is None:
            replay = replays[slot] = NormReplay()
        magnitude = self.__dict__["_parameters"].get("weight")
        divisor_dtype = None
        if magnitude is not None and magnitude.dtype in HALF_DTYPES and magnitude.device == w2.device:
            divisor_dtype = magnitude.dtype

        def compute() -> torch.Tensor:
            norm = engine.weight_norm(w2, a2, b2, scaling, cached_sumsq=sumsq, weight_rows_finite=rows_finite)
            if divisor_dtype is None:
                return norm
            return torch.stack((norm, scale_divisor(norm, divisor_dtype, norm.device)))

        settings = config.cache_settings()
        values = (
            scaling,
            rows_finite,
            settings.fused,
            settings.norm_chunk_mb,
            config.autotune_comprehensive(),
            divisor_dtype,
        )
        out = replay.run(
            compute, (w2, a2, b2, sumsq), values, lambda: engine.norm_path(w2, a2, b2) in ("gemm", "triton")
        )
        if divisor_dtype is None:
            return out
        norm, divisor = out.unbind(0)
        self.__dict__["_df_divisor_memo"] = (norm, divisor_dtype, norm.device, divisor)
        return norm

    def _mirror_stock_cache(self, adapter_name: str, norm: torch.Tensor) -> None:
        """Keep PEFT's ``_dora_cache`` observable exactly as stock fills and clears it during forward."""
        if self._stock_caching_on(adapter_name):
            self._cache_store(f"weight-norm-{adapter_name}", norm)
        elif self.__dict__.get("_dora_cache"):
            self._cache_clear()

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()  # type: ignore[misc]
        state = dict(state)
        for name in _DERIVED_STATE:
            state.pop(name, None)
        return state


def _module_path(layer: nn.Module) -> str:
    """Dotted name of ``layer`` in the outermost live module that contains it, e.g.
    ``base_model.model.lin.lora_magnitude_vector.default``; its class name if no module holds it.

    A layer does not know its parent, so this walks every live ``nn.Module`` once: it runs only on the
    error path of ``PEFT_DORA_NORM_CACHE=verify``.
    """
    import gc

    parents: dict[int, tuple[nn.Module, str]] = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), nn.Module):  # type(): isinstance would touch dead weak proxies
            for name, child in obj._modules.items():
                if child is not None:
                    parents.setdefault(id(child), (obj, name))
    names: list[str] = []
    node: nn.Module = layer
    while id(node) in parents and len(names) < 1000:
        node, name = parents[id(node)]
        names.append(name)
    return ".".join(reversed(names)) or type(layer).__name__


#: The dtypes ``torch.autocast`` casts a GEMM's operands from (fp64 stays fp64).
_AUTOCAST_CAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _as_autocast_sees(
    lora_A: torch.Tensor, lora_B: torch.Tensor, autocast_dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` and ``B`` with the values autocast's GEMMs apply (rounded to ``autocast_dtype``), kept in their own
    dtype so the norm takes the paths it takes without autocast; the tensors themselves where autocast is off
    or leaves them as they are."""
    if autocast_dtype is None:
        return lora_A, lora_B
    rounded = []
    for factor in (lora_A, lora_B):
        if factor.dtype in _AUTOCAST_CAST_DTYPES and factor.dtype != autocast_dtype:
            factor = factor.to(autocast_dtype).to(factor.dtype)
        rounded.append(factor)
    return rounded[0], rounded[1]


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager[Any]:
    """The norm controls its own precision: no autocast inside it (a plain ``nullcontext`` where autocast is
    off, which is every training call without AMP: no generator-based context per norm)."""
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()
