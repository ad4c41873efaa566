"""``dorafactors::cached_weight_norm`` and ``dorafactors::refresh_weight_norm``: the forward norm as opaque
``torch.library`` ops, so that a ``torch.compile`` graph runs the norm kernels *and* the never-stale norm cache
at run time.

Why an opaque op: the cache decides at run time, from the stamps of the live tensors and the optimizer step
(``norm/cache.py``), whether the norm of the last call is still exact. Traced ops cannot do that (a traced
cache would be a constant baked into the graph), and the Triton norm's host side is not traceable either. So
the op's body is ordinary eager code, run by the compiled graph on every call: it looks the norm up in the
caches of its layer, and computes it through :func:`dorafactors.norm.engine.weight_norm` (the one-pass
Triton kernel, the GEMM path or the PyTorch reference, as in eager mode) only on a miss.

Signature::

    cached_weight_norm(Tensor owner, Tensor weight, Tensor lora_A, Tensor lora_B, float scaling,
                       str layout, bool cache, bool recording) -> Tensor   # [d_out], fp32 (fp64 for fp64 inputs)

* ``owner``: the layer's magnitude parameter. Its data is not read: its identity selects the layer's
  :class:`~dorafactors.norm.cache.OwnedNormCaches` (no per-layer constant in the graph, so a block compiled
  once serves every layer of its kind without a recompile);
* ``weight`` / ``lora_A`` / ``lora_B``: the tensors the layer's ``_norm_factors`` takes (the base weight
  parameter, the adapter parameters or, for embeddings, views of them); the cache stamps them exactly as
  the eager path does, so a hit needs the very same tensor objects, unchanged;
* ``layout``: how they become the engine's 2-D factors: ``"linear"`` (``W`` as is), ``"transposed"``
  (``W.T``: ``fan_in_fan_out`` Linear, Embedding), ``"conv"`` (:func:`~dorafactors.norm.engine.conv_factors`);
* ``cache``: False where the layer must not cache (sharded parameters, quantized or dequantized base weights);
* ``recording``: the layer's forward records autograd (grad mode was on when the graph was traced). Such a
  call through trainable tensors that no optimizer has stepped neither reads nor stores the cache, as in
  eager mode ("Training without an optimizer" in ``norm/cache.py``).

The result is a fresh tensor (never the cached one: Inductor may reuse an extern kernel's output buffer),
detached; ``g = m / norm`` stays in the graph. The op has no autograd formula: the layers call it under
``no_grad``. It is tagged ``cudagraph_unsafe``: its host-side checks must run on every call, so Inductor's
graph partitioning keeps it out of captured CUDA graphs (``mode="reduce-overhead"``), and moves it, whose
inputs are all graph inputs, ahead of the captured partition.

The copy costs a launch and an allocation on every call, which decode cannot afford (one call per layer and
token). Where no autograd is recorded, the layers call the second op instead::

    refresh_weight_norm(Tensor(a!) store, Tensor owner, Tensor weight, Tensor lora_A, Tensor lora_B,
                        float scaling, str layout, bool cache) -> ()

It leaves the same norm in the layer's *norm store* (``NORM_STORE``: a ``[d_out]`` int32 tensor holding the
fp32 bits, int64 for fp64, that the layer keeps as a plain attribute) and writes it only when it changed; the
graph reads the norm from the store, a graph input, which Inductor never hands to another buffer (it
re-inplaces the functionalized mutation, so the op works on the store itself). Not where autograd records:
a graph may save the norm for its backward, and a later write into the store would change it.

Under Inductor a graph runs one call for all its layers instead, which a graph pass merges the layers' calls
into (``autograd/norm_batching.py``)::

    refresh_weight_norms(Tensor(a!)[] stores, Tensor[] owners, Tensor[] weights, Tensor[] lora_As,
                         Tensor[] lora_Bs, str plan) -> ()

The tensors as lists, one entry per layer; the plain arguments, constants of the graph, as one string
(:func:`merged_plan`): the dispatcher converts every list element on every call, and this op runs on every
compiled decode step.

All three are registered through ``torch.library.Library`` directly rather than ``torch.library.custom_op``: they
run once per DoRA layer per forward, and the direct registration costs a fraction of ``custom_op``'s Python
dispatch wrapper per call.
"""

from __future__ import annotations

import contextlib
import operator
import weakref
from typing import NamedTuple

import torch
from torch import nn

from .. import distributed
from ..dispatch import config
from ..kernels.operands import compute_dtype_for
from ..norm import engine
from ..norm.cache import (
    OwnedNormCaches,
    StaleNormCacheError,
    StampSet,
    advance_write_epoch,
    normal_tensors,
    optimizer_untracked,
    owned_norm_caches,
    same_values,
    stampable,
    write_epoch,
)

__all__ = [
    "LAYOUTS",
    "NORM_STORE",
    "MergedPlan",
    "cached_weight_norm",
    "merged_plan",
    "new_norm_store",
    "norm_factors",
    "norm_store_fits",
    "parse_merged_plan",
    "refresh_weight_norm",
    "static_store",
]

#: The values of the op's ``layout`` argument.
LAYOUTS = ("linear", "transposed", "conv")

_OP_NAME = "cached_weight_norm"
_SCHEMA = (
    f"{_OP_NAME}(Tensor owner, Tensor weight, Tensor lora_A, Tensor lora_B, float scaling, str layout, "
    "bool cache, bool recording) -> Tensor"
)
_STORE_OP_NAME = "refresh_weight_norm"
_STORE_SCHEMA = (
    f"{_STORE_OP_NAME}(Tensor(a!) store, Tensor owner, Tensor weight, Tensor lora_A, Tensor lora_B, float scaling, "
    "str layout, bool cache) -> ()"
)
_unsafe_tag = getattr(torch.Tag, "cudagraph_unsafe", None)  # PyTorch >= 2.8
_tags = (_unsafe_tag,) if _unsafe_tag is not None else ()
_BATCH_OP_NAME = "refresh_weight_norms"
_BATCH_SCHEMA = (
    f"{_BATCH_OP_NAME}(Tensor(a!)[] stores, Tensor[] owners, Tensor[] weights, Tensor[] lora_As, Tensor[] lora_Bs, "
    "str plan) -> ()"
)
_lib = torch.library.Library("dorafactors", "FRAGMENT")
_lib.define(_SCHEMA, tags=_tags)
_lib.define(_STORE_SCHEMA, tags=_tags)
_lib.define(_BATCH_SCHEMA, tags=_tags)

#: Attribute name of a DoRA layer's norm store: a tensor holding the bits of its forward norm.
NORM_STORE = "_df_norm_bits"
#: The integer dtype whose bits a store holds, per norm dtype (integers: ``module.half()`` / ``.to(dtype)``
#: leave them alone, so the fp32 norm is never rounded by a model-wide cast).
_STORE_BITS = {torch.float32: torch.int32, torch.float64: torch.int64}
_STORE_VALUES = {bits: value for value, bits in _STORE_BITS.items()}


def norm_factors(
    layout: str, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 2-D ``(W [d_out, d_in], A [r, d_in], B [d_out, r])`` of ``layout`` (see the module docstring)."""
    if layout == "linear":
        return weight, lora_A, lora_B
    if layout == "transposed":
        return weight.T, lora_A, lora_B
    if layout == "conv":
        return engine.conv_factors(weight, lora_A, lora_B)
    raise ValueError(f"unknown norm layout {layout!r}; expected one of {LAYOUTS}")


def cached_weight_norm(
    owner: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    layout: str,
    cache: bool,
    recording: bool,
) -> torch.Tensor:
    """Call the op (module docstring): the detached row norm of ``W + scaling * B @ A``, ``[d_out]``."""
    return torch.ops.dorafactors.cached_weight_norm(owner, weight, lora_A, lora_B, scaling, layout, cache, recording)


def _step_keyed(inputs: tuple[torch.Tensor, ...]) -> bool:
    """Must an entry also be keyed by the write epoch? Yes when a tensor behind it requires or has a gradient (a
    fused optimizer writes it without a version bump: ``norm.cache.optimizer_may_write``) or is not a parameter
    (its ``requires_grad`` says nothing about the parameter it may alias)."""
    for tensor in inputs:
        root = tensor._base  # _root(tensor), inlined: this runs for every layer on every compiled call
        if root is None:
            root = tensor
        if root.requires_grad or root.grad is not None or not isinstance(root, nn.Parameter):
            return True
    return False


def _may_store(inputs: tuple[torch.Tensor, ...]) -> bool:
    """May a norm computed from ``inputs`` be kept? Not for inference tensors (no version counter) or sharded
    parameters (as in eager). Asked before a value is stored: a lookup can only hit an entry stored after
    this check passed for the very same tensor objects."""
    if not stampable(inputs):
        return False
    if distributed.process_group_active():
        return distributed.norm_cache_allowed(distributed.GatherInfo(), inputs)[0]
    return True


@contextlib.contextmanager
def _norm_context(device_type: str):
    """No autograd, and no autocast (the norm controls its own precision), while the norm is computed."""
    with torch.no_grad():
        if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type=device_type, enabled=False):
                yield
        else:
            yield


def _compute(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    layout: str,
    caches: OwnedNormCaches | None,
) -> torch.Tensor:
    """The norm from scratch; with ``caches``, ``||W||^2`` comes from (and fills) their sum-of-squares cache."""
    w2, a2, b2 = norm_factors(layout, weight, lora_A, lora_B)
    if caches is None:
        return engine.weight_norm(w2, a2, b2, scaling)
    return engine.weight_norm_with_cached_sumsq(
        w2,
        a2,
        b2,
        scaling,
        base_tensors=(weight,),
        base_trainable=_step_keyed((weight,)),
        sumsq_cache=caches.sumsq,
        check=_raise_if_stale,
    )


def _raise_if_stale(what: str, cached: torch.Tensor, fresh: torch.Tensor) -> None:
    """``PEFT_DORA_NORM_CACHE=verify`` inside the op: raise :class:`StaleNormCacheError` on a difference."""
    if same_values(cached, fresh):
        return
    detail = ""
    if cached.shape == fresh.shape:
        detail = f" (largest difference {(cached.double() - fresh.double()).abs().max().item():.3g})"
    raise StaleNormCacheError(
        f"dorafactors: the cached {what} of a compiled DoRA layer (magnitude of {cached.shape[0]} rows) "
        f"differs from its recomputation{detail}. A tensor it depends on was written in a way PyTorch's "
        "version counter does not see (through `.data`, a NumPy or DLPack alias, `p.data = t` then writing `t`, "
        "a kernel, an optimizer outside `torch.optim` or a `torch.distributed` collective writing into it). "
        "Call `dorafactors.clear_norm_caches(model)` after such writes."
    )


class _CallSettings(NamedTuple):
    """The settings one call of the ops reads, read once: the merged op's layers share them (they cannot change
    during one call), which keeps the per-layer work of a cache hit to the stamp comparisons."""

    cache_mode: str
    threshold_mb: float
    fused_mode: bool | None
    optimizer_step: int

    @classmethod
    def now(cls) -> _CallSettings:
        settings = config.cache_settings()
        return cls(settings.norm_cache, settings.norm_chunk_mb, settings.fused, write_epoch())


def _norm_value(
    caches: OwnedNormCaches,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    layout: str,
    cache: bool,
    settings: _CallSettings | None = None,
) -> tuple[torch.Tensor, bool]:
    """``(norm, kept)``: the row norm from the layer's cache or computed (and cached where allowed); ``kept``
    says that ``norm`` is the cached tensor itself, which the caller must not hand out for writing.
    ``settings``: the call's :class:`_CallSettings` (read here when None)."""
    inputs = (weight, lora_A, lora_B)
    if settings is None:
        settings = _CallSettings.now()
    mode = settings.cache_mode
    if cache and mode != "off":
        signature = (
            scaling,
            layout,
            settings.threshold_mb,
            settings.fused_mode,
            settings.optimizer_step if _step_keyed(inputs) else -1,
        )
        hit = caches.norm.get(None, signature, inputs)  # counts the miss
        if hit is not None:
            if mode == "verify":
                with _norm_context(weight.device.type):
                    _raise_if_stale("weight norm", hit, _compute(weight, lora_A, lora_B, scaling, layout, caches))
            return hit, True
        if _may_store(inputs):
            with _norm_context(weight.device.type), normal_tensors():
                norm = _compute(weight, lora_A, lora_B, scaling, layout, caches)
            caches.norm.put(None, signature, inputs, norm)
            return norm, True
    else:
        caches.norm.misses += 1  # an uncached call computes the norm every time: counted like a miss
    with _norm_context(weight.device.type):
        return _compute(weight, lora_A, lora_B, scaling, layout, None), False


def _untracked_norm(
    caches: OwnedNormCaches,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    layout: str,
) -> torch.Tensor:
    """The norm of a recording call through trainable tensors no optimizer has stepped (module docstring:
    ``recording``): computed, neither served from nor kept in the norm cache, and the write epoch advanced;
    bitwise the norm the cache would hold (``||W||^2`` from its cache, or computed as the cache computes it
    where the base weight is such a tensor too)."""
    advance_write_epoch()
    caches.norm.misses += 1
    with _norm_context(weight.device.type):
        if not optimizer_untracked((weight,)):
            return _compute(weight, lora_A, lora_B, scaling, layout, caches)
        return engine.weight_norm_fresh_sumsq(*norm_factors(layout, weight, lora_A, lora_B), scaling)


def _cached_weight_norm_impl(
    owner: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    layout: str,
    cache: bool,
    recording: bool,
) -> torch.Tensor:
    """The op's body (eager, on every call of a compiled graph). A hit costs the stamp checks and one copy."""
    caches = owned_norm_caches(owner)
    if cache and recording and optimizer_untracked((weight, lora_A, lora_B, owner)):
        return _untracked_norm(caches, weight, lora_A, lora_B, scaling, layout)
    norm, kept = _norm_value(caches, weight, lora_A, lora_B, scaling, layout, cache)
    return norm.clone() if kept else norm


def new_norm_store(rows: int, norm_dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A zeroed norm store for ``rows`` norms of ``norm_dtype`` (fp32 or fp64): ``[rows]`` int32 / int64."""
    return static_store(torch.zeros(rows, dtype=_STORE_BITS[norm_dtype], device=device))


def static_store(store: torch.Tensor) -> torch.Tensor:
    """``store``, marked as an input whose address stays put (``torch._dynamo.mark_static_address``): a
    captured CUDA graph (``mode="reduce-overhead"``) then reads it in place instead of copying it into a
    static input buffer on every replay (a store that moves makes the graph re-record, never read stale)."""
    torch._dynamo.mark_static_address(store)
    return store


def norm_store_fits(
    store: torch.Tensor | None, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, layout: str
) -> bool:
    """Can ``store`` receive the norm of these factors (device, row count, bit width)? Static metadata only,
    so a traced graph decides it once."""
    if store is None or store.dim() != 1 or store.device != weight.device:
        return False
    rows = weight.shape[1] if layout == "transposed" else weight.shape[0]
    norm_dtype = compute_dtype_for(weight.dtype, lora_A.dtype, lora_B.dtype)
    return store.shape[0] == rows and store.dtype == _STORE_BITS.get(norm_dtype)


def refresh_weight_norm(
    store: torch.Tensor,
    owner: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    layout: str,
    cache: bool,
) -> torch.Tensor:
    """Call ``dorafactors::refresh_weight_norm`` (module docstring) and return the norm it left in ``store``:
    a ``[d_out]`` fp32 (fp64) view of the store's bits."""
    torch.ops.dorafactors.refresh_weight_norm(store, owner, weight, lora_A, lora_B, scaling, layout, cache)
    return store.view(_STORE_VALUES[store.dtype])


def _refresh_weight_norm_impl(
    store: torch.Tensor,
    owner: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    layout: str,
    cache: bool,
    settings: _CallSettings | None = None,
) -> None:
    """The op's body: the norm as :func:`_cached_weight_norm_impl` finds it, written into ``store`` unless the
    op already wrote that very cached tensor into this very store (same object, same memory: a device move,
    a re-materialized or replaced store is written again). ``settings``: the call's :class:`_CallSettings`
    (the merged op reads them once for all its layers; read here when None).

    The store's version counter cannot tell: the dispatcher bumps it after every call of an op that declares
    a mutation, written or not. So a write into the store from outside (it is private: only this op and
    ``Module._apply`` touch it) goes unseen, like a ``.data`` write into a parameter; ``clear_norm_caches``
    forgets what the store holds, and ``PEFT_DORA_NORM_CACHE=verify`` compares it with the cached norm."""
    if settings is None:
        settings = _CallSettings.now()
    caches = owned_norm_caches(owner)
    norm, kept = _norm_value(caches, weight, lora_A, lora_B, scaling, layout, cache, settings)
    served = caches.served
    if kept and served is not None and served[2] is norm and served[0]() is store and served[1] == store.data_ptr():
        # the very store this cached norm was written into (dtype, shape and device checked then)
        if settings.cache_mode == "verify":
            _raise_if_stale("norm in the layer's store", norm, store.view(norm.dtype))
        return
    if store.dtype != _STORE_BITS.get(norm.dtype) or store.shape != norm.shape or store.device != norm.device:
        raise ValueError(
            f"dorafactors: the norm store {store.dtype} {tuple(store.shape)} on {store.device} cannot hold a "
            f"{norm.dtype} norm {tuple(norm.shape)} on {norm.device}; the layer must check norm_store_fits()"
        )
    caches.served = None
    store.view(norm.dtype).copy_(norm)
    if kept:
        caches.served = (weakref.ref(store), store.data_ptr(), norm)


class MergedPlan(NamedTuple):
    """The plain arguments of a merged ``refresh_weight_norms`` call, per layer (``scalings``, ``layouts``,
    ``caches``: what each layer's ``refresh_weight_norm`` call took), and the graph's ``layout_token``."""

    scalings: tuple[float, ...]
    layouts: tuple[str, ...]
    caches: tuple[bool, ...]
    layout_token: int = 0


#: Version prefix of a plan string (a plan of another format is refused, never misread).
_PLAN_FORMAT = "plan1"


def merged_plan(scalings: list[float], layouts: list[str], caches: list[bool], layout_token: int = 0) -> str:
    """The ``plan`` argument of ``refresh_weight_norms``: ``plan1|<layout_token>|<scaling>,<layout>,<0|1>;...``
    per layer, each scaling as its exact ``repr`` (read back bitwise by :func:`parse_merged_plan`).

    ``layout_token``: nonzero where the calling graph's guards fix the dtype, shape and strides of every weight,
    ``lora_A`` and ``lora_B`` it passes, the token naming those layouts (``norm_batching.layout_token``); 0:
    no such guarantee (the memo of an unchanged call then compares every stamp in full)."""
    if not len(scalings) == len(layouts) == len(caches):
        raise ValueError(f"merged_plan: {len(scalings)} scalings, {len(layouts)} layouts, {len(caches)} cache flags")
    for layout in layouts:
        if layout not in LAYOUTS:
            raise ValueError(f"unknown norm layout {layout!r}; expected one of {LAYOUTS}")
    rows = ";".join(f"{float(s)!r},{layout},{int(bool(c))}" for s, layout, c in zip(scalings, layouts, caches))
    return f"{_PLAN_FORMAT}|{int(layout_token)}|{rows}"


#: ``plan string -> MergedPlan``: a graph passes the same constant on every call, parsed once.
_parsed_plans: dict[str, MergedPlan] = {}
_MAX_PARSED_PLANS = 256


def parse_merged_plan(plan: str) -> MergedPlan:
    """The :class:`MergedPlan` of a :func:`merged_plan` string (``ValueError`` for a malformed one)."""
    parsed = _parsed_plans.get(plan)
    if parsed is not None:
        return parsed
    try:
        form, token, rows = plan.split("|")
        if form != _PLAN_FORMAT:
            raise ValueError(f"format {form!r}")
        fields = [row.split(",") for row in rows.split(";")] if rows else []
        if any(len(row) != 3 or row[1] not in LAYOUTS or row[2] not in ("0", "1") for row in fields):
            raise ValueError("a layer's entry is not <scaling>,<layout>,<0|1>")
        parsed = MergedPlan(
            tuple(float(row[0]) for row in fields),
            tuple(row[1] for row in fields),
            tuple(row[2] == "1" for row in fields),
            int(token),
        )
    except ValueError as error:
        raise ValueError(f"dorafactors::refresh_weight_norms: malformed plan {plan[:80]!r} ({error})") from None
    if len(_parsed_plans) >= _MAX_PARSED_PLANS:
        _parsed_plans.clear()
    _parsed_plans[plan] = parsed
    return parsed


def _refresh_weight_norms_impl(
    stores: list[torch.Tensor],
    owners: list[torch.Tensor],
    weights: list[torch.Tensor],
    lora_As: list[torch.Tensor],
    lora_Bs: list[torch.Tensor],
    plan: str,
) -> None:
    """``dorafactors::refresh_weight_norms``: :func:`_refresh_weight_norm_impl` for each layer, in order, with the
    plain arguments of ``plan`` (:func:`merged_plan`). A compiled graph calls it once in place of its layers'
    ``refresh_weight_norm`` calls (``autograd/norm_batching.py``).

    A call that finds every layer's store holding its cached norm leaves a :class:`_MergedMemo` with its first
    layer; the next call with the same arguments, all unchanged, returns after checking it (column by column
    over all the layers, without the per-layer lookups, signatures and calls). With the plan's nonzero layout
    token the stamps are compared within the layouts the token names (``StampSet.matches_in_layout``)."""
    settings = _CallSettings.now()
    first = owned_norm_caches(owners[0], create=False) if owners else None
    if first is not None and first.merged is not None:
        memo = first.merged
        if memo.plan == plan and _merged_memo_holds(memo, settings, stores, owners, weights, lora_As, lora_Bs):
            return
        first.merged = None
    layers = parse_merged_plan(plan)
    if not len(stores) == len(owners) == len(weights) == len(lora_As) == len(lora_Bs) == len(layers.scalings):
        raise ValueError(
            f"dorafactors::refresh_weight_norms: {len(stores)} stores, {len(owners)} owners, {len(weights)} weights, "
            f"{len(lora_As)} lora_As, {len(lora_Bs)} lora_Bs for a plan of {len(layers.scalings)} layers"
        )
    for args in zip(stores, owners, weights, lora_As, lora_Bs, layers.scalings, layers.layouts, layers.caches):
        _refresh_weight_norm_impl(*args, settings)
    if owners and settings.cache_mode == "on" and False not in layers.caches:
        memo = _merged_memo(settings, plan, layers.layout_token, stores, owners, weights, lora_As, lora_Bs)
        if memo is not None:
            owned_norm_caches(owners[0]).merged = memo


class _MergedMemo(NamedTuple):
    """What a merged refresh call left behind when every layer's store held its cached norm: the call's settings
    and plan, and column by column over its layers: the owners' ids, the stores (held, so that their ids stay
    theirs while the memo lives), their ids and addresses, each layer's caches with what they held then
    (``caches.served``, ``caches.norm.changes``), and the stamps of every weight, ``lora_A`` and ``lora_B``.

    While all of that is unchanged, each layer's own check (:func:`_refresh_weight_norm_impl`) would find the
    same cache entry valid (same tensors, unchanged; same signature; no optimizer step since) and its store
    already holding it, so the call has nothing to do."""

    settings: _CallSettings
    plan: str
    layout_token: int
    owner_ids: list[int]
    stores: tuple[torch.Tensor, ...]
    store_ids: list[int]
    store_ptrs: list[int]
    caches: tuple[OwnedNormCaches, ...]
    served: tuple[tuple, ...]
    changes: list[int]
    stamps: StampSet


_data_ptr = torch.Tensor.data_ptr
_served_of = operator.attrgetter("served")
_norm_changes_of = operator.attrgetter("norm.changes")


def _merged_memo(
    settings: _CallSettings,
    plan: str,
    layout_token: int,
    stores: list[torch.Tensor],
    owners: list[torch.Tensor],
    weights: list[torch.Tensor],
    lora_As: list[torch.Tensor],
    lora_Bs: list[torch.Tensor],
) -> _MergedMemo | None:
    """The memo of a merged call just made, or None when a layer's store does not hold its cached norm."""
    caches_list = []
    for owner, store in zip(owners, stores):
        caches = owned_norm_caches(owner, create=False)
        served = None if caches is None else caches.served
        if served is None or served[0]() is not store or served[1] != store.data_ptr():
            return None
        if served[2] is not caches.norm.peek(None):  # type: ignore[union-attr]
            return None
        caches_list.append(caches)
    caches = tuple(caches_list)
    return _MergedMemo(
        settings,
        plan,
        layout_token,
        list(map(id, owners)),
        tuple(stores),
        list(map(id, stores)),
        list(map(_data_ptr, stores)),
        caches,
        tuple(map(_served_of, caches)),
        list(map(_norm_changes_of, caches)),
        StampSet((*weights, *lora_As, *lora_Bs)),
    )


def _merged_memo_holds(
    memo: _MergedMemo,
    settings: _CallSettings,
    stores: list[torch.Tensor],
    owners: list[torch.Tensor],
    weights: list[torch.Tensor],
    lora_As: list[torch.Tensor],
    lora_Bs: list[torch.Tensor],
) -> bool:
    """True when a merged call with these tensors (and the memo's plan) has nothing to do (:class:`_MergedMemo`);
    counts each layer's cache hit then, as its own check would. The settings hold the optimizer step: any step
    ends the memo. Each check runs over all the layers at once (a list comparison, or ``map`` over C
    functions)."""
    if settings != memo.settings:
        return False
    if list(map(id, owners)) != memo.owner_ids or list(map(id, stores)) != memo.store_ids:
        return False  # (the memo holds the stores: the same ids are the same objects)
    if list(map(_data_ptr, stores)) != memo.store_ptrs:
        return False
    caches = memo.caches
    if not all(map(operator.is_, map(_served_of, caches), memo.served)):
        return False
    if list(map(_norm_changes_of, caches)) != memo.changes:
        return False
    tensors = (*weights, *lora_As, *lora_Bs)
    if not (memo.stamps.matches_in_layout(tensors) if memo.layout_token else memo.stamps.matches(tensors)):
        return False
    for layer_caches in caches:
        layer_caches.norm.hits += 1
    return True


def _cached_weight_norm_fake(owner, weight, lora_A, lora_B, scaling, layout, cache, recording):
    """Shape and dtype of the result: ``[d_out]`` on ``weight``'s device, fp64 if an input is fp64, else fp32."""
    rows = weight.shape[1] if layout == "transposed" else weight.shape[0]
    dtype = compute_dtype_for(weight.dtype, lora_A.dtype, lora_B.dtype)
    return weight.new_empty((rows,), dtype=dtype)


def _refresh_weight_norm_fake(store, owner, weight, lora_A, lora_B, scaling, layout, cache):
    """Nothing to return: the op writes ``store`` in place. Runs while a graph is traced, which is when the
    graph pass that batches these calls is installed (``norm_batching.install``)."""
    from .norm_batching import install

    install()
    return None


def _refresh_weight_norms_fake(stores, owners, weights, lora_As, lora_Bs, plan):
    """Nothing to return: the op writes ``stores`` in place."""
    return None


_lib.impl(_OP_NAME, _cached_weight_norm_impl, "CompositeExplicitAutograd")
torch.library.register_fake(f"dorafactors::{_OP_NAME}", _cached_weight_norm_fake, lib=_lib)
_lib.impl(_STORE_OP_NAME, _refresh_weight_norm_impl, "CompositeExplicitAutograd")
torch.library.register_fake(f"dorafactors::{_STORE_OP_NAME}", _refresh_weight_norm_fake, lib=_lib)
_lib.impl(_BATCH_OP_NAME, _refresh_weight_norms_impl, "CompositeExplicitAutograd")
torch.library.register_fake(f"dorafactors::{_BATCH_OP_NAME}", _refresh_weight_norms_fake, lib=_lib)
