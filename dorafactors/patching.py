"""Everything that touches PEFT's namespaces, in one reviewable file.

``patch()`` rebinds PEFT-owned names only:

* ``peft.tuners.lora.variants.Dora{Linear,Embedding,Conv1d,Conv2d,Conv3d}Layer``: the names PEFT's DoRA
  variants look up each time they build a layer (so every layer built afterwards is ours);
* the same five names in ``peft.tuners.lora.dora``, for code that imports them later;
* ``peft.tuners.lora.variants.DoraLinearVariant``, the variant class PEFT instantiates per Linear adapter, with
  our subclass: in training with PEFT's dropout it tells our layer when the dropped-out input is an exact fp32
  copy of a bf16 activation (``layers/linear.py::DoraLinearVariant``); every other call is PEFT's forward;
* ``check_adapters_to_merge`` in the ``peft.tuners.lora`` submodules that imported it (and in
  ``peft.tuners.tuners_utils``): every PEFT ``merge()`` calls it first. The wrapper clears the norm caches
  of that module's DoRA layers and bumps the version counters of its base weight and bias, because
  merge/unmerge write them through ``.data``, which PyTorch's version counters cannot see (a DoRA layer of
  another module may share the weight: tied embeddings), and then calls the original unchanged;
* ``unmerge`` and ``update_layer`` of every PEFT LoRA layer class that defines them (``LoraLayer`` and its
  subclasses): after the original, the same version bump (unmerge writes W back; adding an adapter may
  initialize it from W and write W: OLoRA).

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
import gc
import importlib
import sys
import threading
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import wrapt

__all__ = [
    "SUPPORTED_PEFT",
    "TESTED_PEFT",
    "StockDoraLayersWarning",
    "UntestedPeftWarning",
    "clear_norm_caches",
    "is_patched",
    "live_stock_dora_layers",
    "patch",
    "patched",
    "unpatch",
]

#: PEFT releases: ``patch()`` raises below ``SUPPORTED_PEFT[0]`` (older PEFT breaks with transformers v5) and
#: warns from ``SUPPORTED_PEFT[1]`` on (not yet tested). ``TESTED_PEFT`` is the range the test suite covers.
SUPPORTED_PEFT = ("0.18.0", "0.22.0")
TESTED_PEFT = "0.18.x to 0.21.x"
#: transformers releases the examples and tests run with (PEFT itself leaves transformers unpinned).
TESTED_TRANSFORMERS = ">=4.57"
_LAYER_NAMES = ("DoraLinearLayer", "DoraEmbeddingLayer", "DoraConv1dLayer", "DoraConv2dLayer", "DoraConv3dLayer")
#: Variant classes rebound in ``peft.tuners.lora.variants`` only (PEFT builds one instance per adapter from them).
_VARIANT_NAMES = ("DoraLinearVariant",)
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


class UntestedPeftWarning(UserWarning):
    """PEFT is newer than the releases dorafactors was tested with (``patch()`` still applies)."""


_warned_peft_versions: set[str] = set()


def _distribution_version(name: str) -> str | None:
    """Installed version of a distribution without importing it, or None when it is not installed."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _peft_import_error(exc: ImportError) -> ImportError:
    """An ImportError that names what is really missing when ``import peft`` failed."""
    peft_version = _distribution_version("peft")
    if peft_version is None:
        return ImportError(f"dorafactors needs PEFT, which is not installed: pip install 'peft>={SUPPORTED_PEFT[0]}'")
    missing = getattr(exc, "name", None)
    transformers_version = _distribution_version("transformers")
    if isinstance(exc, ModuleNotFoundError) and missing and missing.split(".")[0] != "peft":
        top = missing.split(".")[0]
        hint = f"'transformers{TESTED_TRANSFORMERS}'" if top == "transformers" else top
        return ImportError(
            f"peft {peft_version} is installed but cannot be imported: the module {top!r} it needs is missing "
            f"({exc}). Install it: pip install {hint}"
        )
    return ImportError(
        f"peft {peft_version} is installed but cannot be imported: {exc}. This usually means transformers is "
        f"too old or too new for this PEFT (installed: transformers {transformers_version or 'none'}); "
        f"dorafactors is tested with transformers{TESTED_TRANSFORMERS} and peft {TESTED_PEFT}: "
        f"pip install -U 'transformers{TESTED_TRANSFORMERS}' 'peft>={SUPPORTED_PEFT[0]}'"
    )


def check_peft_version() -> str:
    """Return the installed PEFT version; raise ImportError for a PEFT that cannot work, warn for an untested one.

    Below ``SUPPORTED_PEFT[0]``: ImportError naming the range. From ``SUPPORTED_PEFT[1]`` on: an
    :class:`UntestedPeftWarning` (once per PEFT version and process) naming the tested range. A PEFT that
    fails to import (transformers missing or incompatible) raises an ImportError that says which.
    """
    from packaging.version import Version

    try:
        import peft
    except ImportError as exc:
        raise _peft_import_error(exc) from exc
    installed = Version(peft.__version__).release[:2]
    low, high = (Version(v).release[:2] for v in SUPPORTED_PEFT)
    if installed < low:  # by minor release
        raise ImportError(
            f"dorafactors needs peft>={SUPPORTED_PEFT[0]} (tested: {TESTED_PEFT}); peft {peft.__version__} is "
            f"installed. Upgrade it: pip install -U 'peft>={SUPPORTED_PEFT[0]}'."
        )
    variants = importlib.import_module("peft.tuners.lora.variants")
    missing = [name for name in _LAYER_NAMES if not hasattr(variants, name)]
    if missing:
        raise ImportError(
            f"peft {peft.__version__} does not expose {missing} in peft.tuners.lora.variants; "
            f"dorafactors cannot patch it. Install a tested release ({TESTED_PEFT}): pip install 'peft<{SUPPORTED_PEFT[1]}'."
        )
    if installed >= high and peft.__version__ not in _warned_peft_versions:  # 0.22.0.dev0 is untested too
        _warned_peft_versions.add(peft.__version__)
        warnings.warn(
            f"dorafactors was tested with peft {TESTED_PEFT}; peft {peft.__version__} is newer. patch() applies, "
            f"but if outputs or errors differ from stock PEFT, pin 'peft<{SUPPORTED_PEFT[1]}' and report it with "
            "the output of `python -m dorafactors`.",
            UntestedPeftWarning,
            stacklevel=3,
        )
    return peft.__version__


def _replacements() -> dict[str, type]:
    from . import layers

    return {name: getattr(layers, name) for name in _LAYER_NAMES}


def _variant_replacements() -> dict[str, type]:
    from . import layers

    return {name: getattr(layers, name) for name in _VARIANT_NAMES}


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
    _mark_base_written(module)
    with _lock:
        _wrap_weight_writers()  # the class of a module that merges now unmerges later: wrapped before that
    return wrapped(*args, **kwargs)


@wrapt.decorator
def _mark_written_after(wrapped, instance, args, kwargs):
    """Wrapper of a PEFT LoRA layer class's ``unmerge()`` or ``update_layer()``: it may have written W (also
    when it raised part way)."""
    try:
        result = wrapped(*args, **kwargs)
    except BaseException:
        with contextlib.suppress(Exception):  # never mask the method's own error
            _mark_base_written(instance)
        raise
    _mark_base_written(instance)
    return result


def _mark_base_written(module: Any) -> None:
    """Bump the version counters of ``module``'s base weight and bias. PEFT's merge and unmerge of a plain
    LoRA adapter write them through ``.data`` (``weight.data += delta``), which PyTorch does not count; the
    bump makes every cache stamped on them see the write: the module's own DoRA layers, and a DoRA layer of
    another module that shares the parameter (tied embeddings: ``lm_head.weight is embed_tokens.weight``).
    A merge bumps before it writes (nothing reads W in between), an unmerge after."""
    get_base_layer = getattr(module, "get_base_layer", None)
    if get_base_layer is None:
        return
    base = get_base_layer()
    written = [
        tensor
        for tensor in (getattr(base, "weight", None), getattr(base, "bias", None))
        if isinstance(tensor, torch.Tensor) and not tensor.is_inference()  # no version counter to bump
    ]
    for tensor in written:  # one at a time: older PyTorch releases take a single tensor here
        torch.autograd.graph.increment_version(tensor)


#: Methods of PEFT's LoRA layer classes that may write the base weight in place through ``.data``: ``unmerge``
#: (``weight.data -= delta``) and ``update_layer``, which adds an adapter and runs its initialization
#: (OLoRA subtracts its initial ``B A`` from an fp32 base weight in place).
_WEIGHT_WRITERS = ("unmerge", "update_layer")


def _wrap_weight_writers() -> None:
    """Wrap each of :data:`_WEIGHT_WRITERS` that a PEFT LoRA layer class defines (:func:`_mark_written_after`),
    once per class and method; ``unpatch()`` restores them. Runs at ``patch()`` and before every merge, so that
    a class imported later (PEFT imports some integrations lazily) is wrapped before any of its modules can
    unmerge."""
    layer_module = sys.modules.get("peft.tuners.lora.layer")
    if layer_module is None:
        return
    pending = [layer_module.LoraLayer]
    seen: set[type] = set()
    while pending:
        cls = pending.pop()
        if cls in seen:
            continue
        seen.add(cls)
        pending.extend(cls.__subclasses__())
        for name in _WEIGHT_WRITERS:
            original = cls.__dict__.get(name)
            if original is None or isinstance(original, wrapt.FunctionWrapper):
                continue
            _applied.append((cls, name, original))
            setattr(cls, name, _mark_written_after(original))


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
    for name, cls in _variant_replacements().items():
        _applied.append((variants, name, getattr(variants, name)))
        setattr(variants, name, cls)
    for module_name in _MERGE_HOOK_MODULES:
        namespace = sys.modules.get(module_name)
        if namespace is None and module_name in ("peft.tuners.tuners_utils", "peft.tuners.lora.layer"):
            namespace = importlib.import_module(module_name)
        original = getattr(namespace, "check_adapters_to_merge", None) if namespace is not None else None
        if original is None or isinstance(original, wrapt.FunctionWrapper):
            continue
        _applied.append((namespace, "check_adapters_to_merge", original))
        namespace.check_adapters_to_merge = _clear_caches_on_merge(original)
    _wrap_weight_writers()


def _drop_derived_state(instance: Any) -> None:
    from .autograd.norm_op import NORM_STORE
    from .layers._common import _DERIVED_STATE

    for name in _DERIVED_STATE:
        instance.__dict__.pop(name, None)
    instance.__dict__.pop(NORM_STORE, None)  # stock layers have no norm store


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
    """Swap the class of every stock DoRA layer in ``model`` (and of the stock variants of its LoRA layers);
    returns how many layers were converted."""
    mapping = _stock_classes()
    variant_mapping = {cls.__bases__[-1]: cls for cls in _variant_replacements().values()}
    count = 0
    for module in model.modules():
        lora_variant = module.__dict__.get("lora_variant")
        if isinstance(lora_variant, dict):
            for variant in lora_variant.values():
                ours = variant_mapping.get(type(variant))
                if ours is not None:
                    _converted.append((weakref.ref(variant), type(variant)))
                    variant.__class__ = ours
        target = mapping.get(type(module))
        if target is None:
            continue
        original = type(module)
        module.__class__ = target
        module.__dict__.setdefault("_dora_cache", {})
        module._add_norm_store()
        _converted.append((weakref.ref(module), original))
        count += 1
    return count


class StockDoraLayersWarning(UserWarning):
    """``patch()`` found DoRA layers that stock PEFT built before it; they stay stock."""


def live_stock_dora_layers() -> list[torch.nn.Module]:
    """Every live instance of a stock PEFT DoRA layer class in this process (not our subclasses).

    Found by one pass over ``gc.get_objects()`` (modules are gc-tracked). That costs a few tens of ms in a
    process with a million tracked objects, which is fine for ``patch()``, called once; a registry of
    stock instances would need a hook in PEFT's constructors before ``patch()``, which dorafactors never
    installs. Garbage that the cycle collector has not reclaimed yet is excluded by a collection that runs
    only when the first pass found something.
    """
    stock = set(_stock_classes())
    if not any(type(obj) in stock for obj in gc.get_objects()):
        return []
    gc.collect()
    return [obj for obj in gc.get_objects() if type(obj) in stock]


def _warn_about_stock_layers() -> None:
    found = live_stock_dora_layers()
    if not found:
        return
    kinds = sorted({type(layer).__name__ for layer in found})
    warnings.warn(
        f"dorafactors.patch() found {len(found)} DoRA layer(s) ({', '.join(kinds)}) that stock PEFT built before "
        "it was called, e.g. by get_peft_model; they stay stock PEFT layers. Convert an existing model with "
        "dorafactors.patch(model), or call dorafactors.patch() before get_peft_model.",
        StockDoraLayersWarning,
        stacklevel=3,
    )
    del found


def patch(model: torch.nn.Module | None = None) -> None:
    """Make PEFT build dorafactors DoRA layers; with ``model``, also convert its existing DoRA layers.

    Idempotent and thread-safe. Raises ImportError for a PEFT older than ``SUPPORTED_PEFT[0]`` (or one
    that cannot be imported, naming what is missing), warns (:class:`UntestedPeftWarning`) for one newer than
    the tested releases, and raises ValueError for a malformed dorafactors environment variable. Warns
    (:class:`StockDoraLayersWarning`) when stock PEFT DoRA layers built earlier are still alive: they are
    not converted unless passed as ``model``.
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
    _warn_about_stock_layers()


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
