"""Everything that touches PEFT's namespaces, in one reviewable file.

``patch()`` rebinds PEFT-owned names only:

* ``peft.tuners.lora.variants.Dora{Linear,Embedding,Conv1d,Conv2d,Conv3d}Layer``: the names PEFT's DoRA
  variants look up each time they build a layer (so every layer built afterwards is ours);
* the same five names in ``peft.tuners.lora.dora``, for code that imports them later;
* ``check_adapters_to_merge`` in the ``peft.tuners.lora`` submodules that imported it (and in
  ``peft.tuners.tuners_utils``): every PEFT ``merge()`` calls it first. The wrapper clears the norm caches
  of that module's DoRA layers, because merge/unmerge write base weights through ``.data``, which PyTorch's
  version counters cannot see, and then calls the original unchanged.

Each replaced object is recorded and ``unpatch()`` puts back exactly those objects (``is``-identical).
``patch(model)`` also converts the stock DoRA layers of an existing model by swapping ``__class__`` (our
classes subclass PEFT's, so ``isinstance`` and PEFT's FSDP wrap policy keep working); ``unpatch()`` reverts
those instances. Layers *built* while patched stay dorafactors layers after ``unpatch()``: that is what
``with patched(): model = get_peft_model(...)`` is for.

Nesting: ``patched()`` blocks count; the last one to exit restores stock PEFT unless ``patch()`` was called
explicitly. ``unpatch()`` always restores everything. All of it runs under one re-entrant lock.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import wrapt

__all__ = ["SUPPORTED_PEFT", "clear_norm_caches", "is_patched", "patch", "patched", "unpatch"]

#: Supported PEFT releases: >= 0.18.0 (older ones break with transformers v5), < 0.22 (not yet checked).
SUPPORTED_PEFT = ("0.18.0", "0.22.0")
_LAYER_NAMES = ("DoraLinearLayer", "DoraEmbeddingLayer", "DoraConv1dLayer", "DoraConv2dLayer", "DoraConv3dLayer")
_MERGE_HOOK_MODULES = (
    "peft.tuners.tuners_utils",
    "peft.tuners.lora.layer",
    "peft.tuners.lora.bnb",
    "peft.tuners.lora.hqq",
    "peft.tuners.lora.torchao",
    "peft.tuners.lora.tp_layer",
    "peft.tuners.lora.inc",
)

_lock = threading.RLock()
_applied: list[tuple[Any, str, Any]] = []  # (namespace, attribute, original object)
_converted: list[tuple[weakref.ref, type]] = []  # (instance, its original class)
_explicit = False
_scopes = 0


def check_peft_version() -> str:
    """Return the installed PEFT version, or raise ImportError naming the supported range."""
    from packaging.version import Version

    try:
        import peft
    except ImportError as exc:  # pragma: no cover - peft is a hard dependency
        raise ImportError("dorafactors needs PEFT: pip install 'peft>=0.18,<0.22'") from exc
    installed = Version(peft.__version__).release[:2]
    low, high = (Version(v).release[:2] for v in SUPPORTED_PEFT)
    if not (low <= installed < high):  # by minor release: 0.22.0.dev0 is not a 0.21.x
        raise ImportError(
            f"dorafactors supports peft>={SUPPORTED_PEFT[0]},<{SUPPORTED_PEFT[1]} (0.18.x to 0.21.x); "
            f"peft {peft.__version__} is installed. Install a supported release: pip install 'peft>=0.18,<0.22'."
        )
    variants = importlib.import_module("peft.tuners.lora.variants")
    missing = [name for name in _LAYER_NAMES if not hasattr(variants, name)]
    if missing:
        raise ImportError(
            f"peft {peft.__version__} does not expose {missing} in peft.tuners.lora.variants; "
            "dorafactors cannot patch it. Install peft>=0.18,<0.22."
        )
    return peft.__version__


def _replacements() -> dict[str, type]:
    from . import layers

    return {name: getattr(layers, name) for name in _LAYER_NAMES}


def _stock_classes() -> dict[type, type]:
    """stock PEFT DoRA class -> our subclass of it (each of ours lists the stock class last)."""
    return {cls.__bases__[-1]: cls for cls in _replacements().values()}


def _is_ours(obj: Any) -> bool:
    return getattr(obj, "__module__", "").startswith("dorafactors.")


@wrapt.decorator
def _clear_caches_on_merge(wrapped, instance, args, kwargs):
    """Wrapper of PEFT's ``check_adapters_to_merge(module, adapter_names)``: merge is about to write W."""
    module = args[0] if args else kwargs.get("module")
    _clear_layer_caches(module)
    return wrapped(*args, **kwargs)


def _clear_layer_caches(module: Any) -> None:
    dora_layers = getattr(module, "lora_magnitude_vector", None)
    if dora_layers is None:
        return
    for layer in dora_layers.values():
        clear = getattr(layer, "clear_norm_cache", None)
        if clear is not None:
            clear()


def _apply() -> None:
    variants = importlib.import_module("peft.tuners.lora.variants")
    dora = importlib.import_module("peft.tuners.lora.dora")
    ours = _replacements()
    for namespace in (variants, dora):
        for name, cls in ours.items():
            _applied.append((namespace, name, getattr(namespace, name)))
            setattr(namespace, name, cls)
    for module_name in _MERGE_HOOK_MODULES:
        namespace = sys.modules.get(module_name)
        if namespace is None and module_name in ("peft.tuners.tuners_utils", "peft.tuners.lora.layer"):
            namespace = importlib.import_module(module_name)
        original = getattr(namespace, "check_adapters_to_merge", None) if namespace is not None else None
        if original is None or isinstance(original, wrapt.FunctionWrapper):
            continue
        _applied.append((namespace, "check_adapters_to_merge", original))
        namespace.check_adapters_to_merge = _clear_caches_on_merge(original)


def _drop_derived_state(instance: Any) -> None:
    from .layers._common import _DERIVED_STATE

    for name in _DERIVED_STATE:
        instance.__dict__.pop(name, None)


def _restore() -> None:
    while _applied:
        namespace, name, original = _applied.pop()
        setattr(namespace, name, original)
    while _converted:
        ref, original_cls = _converted.pop()
        instance = ref()
        if instance is not None and type(instance) is not original_cls:
            _drop_derived_state(instance)
            instance.__class__ = original_cls


def _convert(model: torch.nn.Module) -> int:
    """Swap the class of every stock DoRA layer in ``model``; returns how many were converted."""
    mapping = _stock_classes()
    count = 0
    for module in model.modules():
        target = mapping.get(type(module))
        if target is None:
            continue
        original = type(module)
        module.__class__ = target
        module.__dict__.setdefault("_dora_cache", {})
        _converted.append((weakref.ref(module), original))
        count += 1
    return count


def patch(model: torch.nn.Module | None = None) -> None:
    """Make PEFT build dorafactors DoRA layers; with ``model``, also convert its existing DoRA layers.

    Idempotent and thread-safe. Raises ImportError for an unsupported PEFT and ValueError for a malformed
    dorafactors environment variable.
    """
    global _explicit
    from .dispatch import config

    check_peft_version()
    config.validate_all()
    with _lock:
        if not _applied:
            _apply()
        _explicit = True
        if model is not None:
            _convert(model)


def unpatch() -> None:
    """Restore every PEFT object ``patch()`` replaced and revert the layers ``patch(model)`` converted."""
    global _explicit, _scopes
    with _lock:
        _restore()
        _explicit = False
        _scopes = 0


def is_patched() -> bool:
    """True while PEFT builds dorafactors DoRA layers."""
    with _lock:
        return bool(_applied)


@contextlib.contextmanager
def patched(model: torch.nn.Module | None = None) -> Iterator[None]:
    """Scoped :func:`patch`: stock PEFT is restored when the outermost block exits, also on exceptions.

    Layers built inside the block remain dorafactors layers after it. ``model`` (optional) is converted
    on entry and reverted on exit, like ``patch(model)`` / ``unpatch()``.
    """
    global _scopes
    from .dispatch import config

    check_peft_version()
    config.validate_all()
    with _lock:
        if not _applied:
            _apply()
        _scopes += 1
        first_converted = len(_converted)
        if model is not None:
            _convert(model)
    try:
        yield
    finally:
        with _lock:
            if model is not None:
                _revert_since(first_converted)
            _scopes = max(0, _scopes - 1)
            if _scopes == 0 and not _explicit:
                _restore()


def _revert_since(index: int) -> None:
    while len(_converted) > index:
        ref, original_cls = _converted.pop()
        instance = ref()
        if instance is not None:
            _drop_derived_state(instance)
            instance.__class__ = original_cls


def clear_norm_caches(model: torch.nn.Module) -> int:
    """Drop every cached norm, sum of squares, fold and ``m / norm`` memo in ``model``: needed after a write
    that bypasses PyTorch's version counter (``.data``, NumPy / DLPack aliases; see ``norm/cache.py``)."""
    count = 0
    for module in model.modules():
        clear = getattr(module, "clear_norm_cache", None)
        if clear is not None and _is_ours(type(module)):
            clear()
            count += 1
    return count
