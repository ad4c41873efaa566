"""FSDP1 (``FullyShardedDataParallel``) and FSDP2 (``fully_shard``): expose full weights to the norm.

**FSDP1.** PEFT's wrap policy wraps ``lora_A`` / ``lora_B`` (and the DoRA magnitude module) in FSDP units of
their own. When the norm runs — inside the DoRA module's forward, before ``lora_A(x)`` is called — those units
are resharded, so their ``.weight`` is a shard or a freed view. :func:`enter_fsdp1_summon` enters
``summon_full_params(unit, recurse=False, writeback=False, with_grads=False)`` for each of the base / adapter
modules that *is* an FSDP unit and is idle. A unit already unsharded (its own forward is running, or
``SHARD_GRAD_OP`` kept it) is left alone; a resharded unit that is not idle cannot be summoned and raises.
Weights owned by an *enclosing* unit (the usual decoder-layer wrap) are already unsharded inside its forward.
Note that ``summon_full_params`` synchronizes the device; FSDP2 has no such cost.

**FSDP2.** ``fully_shard`` replaces parameters by ``DTensor`` shards, and swaps in plain unsharded
parameters only between a managed module's pre- and post-forward. When a weight the norm reads is a
``DTensor`` (e.g. ``lora_A`` sharded on its own and not yet called), :meth:`GatherInfo.full` materializes it
with ``full_tensor()`` under ``no_grad``: a separate all-gather that leaves FSDP2's unshard state, streams and
prefetch untouched. When an enclosing ``fully_shard`` module already unsharded the weights, nothing is done.
Either way the norm is detached; gradients reach the shards through the module calls of the LoRA branch and
the magnitude, which FSDP2 hooks.

Detection is cheap: ``isinstance`` checks on at most three modules, attribute look-ups on their weights, and
a scan of ``torch.distributed._composable_state``'s module-state registry (empty unless a composable API is
in use) until FSDP2 is seen; a positive is cached.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from typing import Any

import torch
from torch import nn

__all__ = [
    "FSDP1_CACHE_REASON",
    "FSDP2_CACHE_REASON",
    "enter_fsdp1_summon",
    "fsdp1_managed",
    "fsdp2_in_use",
    "fsdp2_managed",
    "is_dtensor",
    "is_fsdp1_flat",
    "is_fsdp2_managed",
]

logger = logging.getLogger("dorafactors.distributed")

FSDP1_CACHE_REASON = (
    "FSDP1 re-gathers flat parameters into reused storage every forward without bumping the version "
    "counters a cache stamp reads"
)
FSDP2_CACHE_REASON = (
    "FSDP2 re-gathers unsharded parameters into reused storage with their version counters preserved, and "
    "DTensor shards are gathered into new buffers: a stamp would not see optimizer updates"
)

_MISSING = object()
_fsdp1_cls: Any = _MISSING
_dtensor_cls: Any = _MISSING
_fsdp2_state_cls: Any = _MISSING
_composable_mod: Any = _MISSING
_fsdp2_seen = False


def _reset_for_tests() -> None:
    global _fsdp2_seen
    _fsdp2_seen = False


def _import_attr(candidates: tuple[tuple[str, str], ...]) -> Any:
    for module_name, attr in candidates:
        try:
            return getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError):
            continue
    return None


def _fsdp1() -> Any:
    global _fsdp1_cls
    if _fsdp1_cls is _MISSING:
        _fsdp1_cls = _import_attr((("torch.distributed.fsdp", "FullyShardedDataParallel"),))
    return _fsdp1_cls


def _dtensor() -> Any:
    global _dtensor_cls
    if _dtensor_cls is _MISSING:
        _dtensor_cls = _import_attr((("torch.distributed.tensor", "DTensor"), ("torch.distributed._tensor", "DTensor")))
    return _dtensor_cls


def _composable_state() -> Any:
    global _composable_mod
    if _composable_mod is _MISSING:
        try:
            _composable_mod = importlib.import_module("torch.distributed._composable_state")
        except ImportError:
            _composable_mod = None
    return _composable_mod


def _fsdp2_state() -> Any:
    global _fsdp2_state_cls
    if _fsdp2_state_cls is _MISSING:
        _fsdp2_state_cls = _import_attr(
            (
                ("torch.distributed.fsdp._fully_shard._fsdp_state", "FSDPState"),  # torch >= 2.10 (and 2.6+)
                ("torch.distributed._composable.fsdp._fsdp_state", "FSDPState"),  # torch 2.4 - 2.9
            )
        )
    return _fsdp2_state_cls


# ----------------------------------------------------------------------------------------- predicates
def is_dtensor(t: Any) -> bool:
    """True for a ``DTensor`` (FSDP2 shards parameters as DTensors)."""
    if not isinstance(t, torch.Tensor) or type(t) is torch.Tensor or type(t) is nn.Parameter:
        return False
    cls = _dtensor()
    return cls is not None and isinstance(t, cls)


def is_fsdp1_flat(t: Any) -> bool:
    """True for a tensor FSDP1 flattened (an original parameter, or a view of a ``FlatParameter``)."""
    if not isinstance(t, torch.Tensor):
        return False
    if getattr(t, "_fsdp_flattened", False):
        return True
    base = t._base
    return base is not None and getattr(base, "_fsdp_flattened", False)


def is_fsdp2_managed(module: Any) -> bool:
    """True when ``fully_shard`` was applied to ``module`` itself (its composable state is an FSDP2 state)."""
    if not isinstance(module, nn.Module):
        return False
    cls = _fsdp2_state()
    get_state = getattr(_composable_state(), "_get_module_state", None)
    if cls is None or get_state is None:
        return False
    try:
        return isinstance(get_state(module), cls)
    except (TypeError, AttributeError):
        return False


def fsdp2_in_use() -> bool:
    """Has ``fully_shard`` been applied to any live module of this process? (a positive is cached)"""
    global _fsdp2_seen
    if _fsdp2_seen:
        return True
    registry = _composable_state()
    mapping = getattr(registry, "_module_state_mapping", None)
    if not mapping:
        return False
    cls = _fsdp2_state()
    if cls is None:
        return False
    for ref in list(mapping.values()):
        state = ref() if callable(ref) else ref
        if isinstance(state, cls):
            _fsdp2_seen = True
            logger.debug("dorafactors: FSDP2 (fully_shard) detected")
            return True
    return False


def _weights(base_layer: nn.Module, factors: tuple[Any, ...]) -> list[torch.Tensor]:
    out = []
    for item in (base_layer, *factors):
        t = getattr(item, "weight", None) if isinstance(item, nn.Module) else item
        if isinstance(t, torch.Tensor):
            out.append(t)
    return out


def fsdp1_managed(base_layer: nn.Module, factors: tuple[Any, ...]) -> bool:
    """Does FSDP1 manage a weight the norm reads (also when the owning unit is an enclosing module)?"""
    return any(is_fsdp1_flat(t) for t in _weights(base_layer, factors))


def fsdp2_managed(base_layer: nn.Module, factors: tuple[Any, ...]) -> bool:
    """Is a weight the norm reads a DTensor, or is FSDP2 in use in this process (enclosing-module wrap)?"""
    return any(is_dtensor(t) for t in _weights(base_layer, factors)) or fsdp2_in_use()


# ----------------------------------------------------------------------------------------- FSDP1 summon
def _needs_unshard(unit: nn.Module) -> bool:
    handle = getattr(unit, "_handle", None)
    if handle is None:
        return False
    try:
        return bool(handle.needs_unshard())
    except Exception:  # pragma: no cover - private API moved: assume the worst
        return True


def enter_fsdp1_summon(stack: contextlib.ExitStack, base_layer: nn.Module, factors: tuple[Any, ...]) -> list[str]:
    """``summon_full_params`` for each base / adapter module that is an FSDP1 unit; returns their labels."""
    fsdp_cls = _fsdp1()
    if fsdp_cls is None:
        return []
    summoned: list[str] = []
    for label, module in (("base_layer", base_layer), *((f"factor{i}", f) for i, f in enumerate(factors))):
        if not isinstance(module, fsdp_cls):
            continue
        state = getattr(getattr(module, "training_state", None), "name", "IDLE")
        if state == "IDLE":
            stack.enter_context(fsdp_cls.summon_full_params(module, recurse=False, writeback=False, with_grads=False))
            summoned.append(label)
        elif _needs_unshard(module):
            raise RuntimeError(
                f"dorafactors: the FSDP unit of {label} ({type(module.module).__name__}) is resharded and in state "
                f"{state}, so its full parameters cannot be summoned for the DoRA norm"
            )
    return summoned
