"""Caches of the detached DoRA weight norm (and values derived from it) that are never stale.

A cached value is served only when a *stamp* of everything it was computed from is unchanged. A stamp of a
tensor records:

* which storage it lives in: a weak reference to the storage object. PyTorch keeps one Python object per
  live storage, so the reference dies exactly when the storage is freed and a new allocation at the same
  address can never be mistaken for the old one;
* where in it, and how: ``data_ptr``, storage offset, shape, strides, dtype, device;
* its autograd version counter, which every in-place write PyTorch can see bumps: optimizer steps (also
  the ``_foreach`` kernels), ``copy_`` in ``load_state_dict``, ``zero_``/``mul_`` under ``no_grad`` or
  ``inference_mode``, writes through any view or ``.detach()`` of the tensor (they share its counter);
* the identity of the tensor object (for a view, of the tensor it was taken from), so a new Parameter bound
  over the same storage starts a new entry: a weak reference to it, except for an ``nn.Parameter``, which
  is recorded by its ``id`` (``torch.utils.swap_tensors``, which a swapping ``.to()`` or ``load_state_dict``
  uses, refuses a tensor that has a weak reference). Another tensor (a ``.data`` alias handed to
  ``functional_call``: a new object with a version counter of its own on every access) keeps the weak
  reference, so a freed alias is never taken for its successor at the same address.

The version counter is not enough on its own: fused optimizer kernels (``torch.optim.AdamW(fused=True)``,
the Hugging Face Trainer's default on CUDA; DeepSpeed's and bitsandbytes' optimizers) write parameters
without bumping it. So every entry is also validated against :func:`write_epoch`, a counter advanced after
every ``step()`` of any ``torch.optim.Optimizer`` (PyTorch's global step post-hook, installed on first use).
The layers add it to an entry's signature whenever a tensor behind the value requires a gradient or has one
(a fused optimizer also writes a parameter frozen after its gradient was made: :func:`optimizer_may_write`).
The same hook also bumps the version of every parameter the step had a gradient for, so a stamp sees what
the step wrote even once the parameter is frozen again and the entry no longer keyed by the epoch (an
adapter evaluated frozen, trained by a fused optimizer, frozen again).

**Training without an optimizer.** A loop that updates its parameters by hand (``p.data.add_(p.grad,
alpha=-lr)``, or any rule that is not a ``torch.optim.Optimizer``) writes with no step and often no version
bump. So a forward that records autograd through a trainable tensor that no optimizer has stepped yet
(:func:`optimizer_untracked`; the layers ask about the norm's factors, the magnitude and the base bias)
neither reads nor stores a cached norm, and advances the epoch, which drops the values cached by earlier
``no_grad`` calls: a backward, and then such a write, may follow it. Once an optimizer has stepped a tensor
(the step hook records its parameters), the step counts its writes and the cache serves it again:
gradient-accumulation micro-batches recompute the norm only before the first step. Only while that optimizer
lives: once it is freed (a warm-up optimizer dropped for a hand-written rule), its tensors count as stepped by
none again. A ``no_grad`` forward between the training forward and the hand-written write caches what the
write then makes stale: that is the ``.data`` blind spot below. The epoch is process-wide: a trainable tensor
no optimizer steps (one left out of the optimizer, master weights copied in through ``.data``) makes every
training forward recompute its norm.

**Bounded.** A cache holds at most one entry per *slot* (the layers use the adapter name; one cache per
layer and purpose). Everything else that selects a value (scaling, chunk budget, kernel switch, write
epoch) is part of the entry's *signature*, which is validated like the stamps: a new signature replaces the
old entry instead of adding one, and a failed validation drops the stale value before it is recomputed.

**The rule: what the cache cannot see.** A write is seen exactly when it bumps the version counter of the
parameter tensor itself (or of a view of it, ``.detach()`` included), when it replaces the tensor, its
storage, or its layout, or when it is an optimizer ``step()``. Any write that bypasses PyTorch's version
counter of that tensor is invisible, and the cached value goes stale:

* through ``tensor.data`` (``w.data.mul_(2)``: ``.data`` has a version counter of its own);
* through memory PyTorch does not track: a NumPy view (``w.detach().numpy()[:] *= 2``), a DLPack alias
  (``torch.from_dlpack(w)`` is a new tensor with its own counter), CUDA IPC, a C extension or another
  library writing the buffer;
* through another tensor bound to the same storage: ``p.data = t`` then ``t.mul_(2)`` (``p`` keeps its own
  counter), or ``torch.nn.utils.vector_to_parameters(vec, params)`` (which binds every parameter to a slice
  of ``vec`` through ``.data``) followed by an in-place edit of ``vec``;
* by a custom optimizer (not a ``torch.optim.Optimizer``) writing parameters that a live
  ``torch.optim.Optimizer`` also steps;
* by a ``torch.distributed`` collective writing into a parameter (``dist.broadcast(p, 0)``,
  ``dist.all_reduce(p)``, ``dist.recv(p)``), which bumps no version.

A hand-written update of tensors no optimizer steps, right after the backward of a training forward, is the
exception that is seen (see "Training without an optimizer" above).

PEFT writes base weights through ``.data`` only inside ``merge`` / ``unmerge``; while patched, dorafactors hooks
both and bumps the written weight's version counter (``patching.py``), which every stamp on it sees, a tied
layer's included. After any other such write call
``dorafactors.clear_norm_caches(model)``; ``PEFT_DORA_NORM_CACHE=verify`` recomputes every cached value on use
and raises :class:`StaleNormCacheError` naming the layer, to prove or rule out staleness.

**Never cached** (see :func:`caching_allowed` and :func:`stampable`): while ``torch.compile`` or
``torch.jit`` traces (a cached tensor would be baked into the graph as a constant), inside a ``torch.func``
transform (its wrapped tensors have no storage to stamp), inside a ``torch.autograd.forward_ad.dual_level``
(a cached value derived from an adapter, the decode fold's ``lora_B``, would drop that adapter's tangent),
inside a selective activation checkpoint (its recomputation must run the operators its forward ran: the norm,
cached or not, is computed outside the checkpoint's view, :func:`hidden_from_selective_checkpoint`), and
for inference tensors (made under
``torch.inference_mode``: they have no version counter, so an in-place write to them could never be seen).
A value computed while inference mode is on is computed with it locally off (:func:`normal_tensors`), so a
cache never holds an inference tensor and may serve its values to a call that records autograd.
"""

from __future__ import annotations

import contextlib
import operator
import weakref
from typing import Any, NamedTuple

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import nn

__all__ = [
    "NormCache",
    "OwnedNormCaches",
    "StaleNormCacheError",
    "StampSet",
    "TensorStamp",
    "advance_write_epoch",
    "caching_allowed",
    "hidden_from_selective_checkpoint",
    "install_step_hook",
    "normal_tensors",
    "optimizer_may_write",
    "optimizer_untracked",
    "owned_norm_caches",
    "same_values",
    "stampable",
    "write_epoch",
]


_write_epoch = 0
_step_hook: Any = None
#: ``id(parameter) -> (weak reference to its storage, weak reference to the optimizer)`` for every parameter of
#: an optimizer that has completed a ``step()``: the last optimizer that stepped it (the storage, not the tensor:
#: a tensor with a weak reference cannot be swapped). A parameter counts as stepped only while both live: once
#: the optimizer is gone, nothing counts its writes any more.
_stepped_params: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """The step post-hook: advance the epoch, bump the version of every parameter the step was given a gradient
    for, and record the optimizer's parameters in their current storage (every step: a parameter moved since,
    ``.to(device)`` with the optimizer already built, is recorded anew; a dictionary lookup per parameter).

    The bump: ``torch.optim`` skips a parameter without a gradient and writes every other one in place, but its
    fused implementations (and optimizers writing through raw pointers, such as 8-bit ones) do not bump the
    version; a stamp on such a parameter would then miss the write once the parameter is frozen again (no
    gradient, no ``requires_grad``: entries no longer keyed by the epoch). Bumping twice is harmless (PyTorch's
    ``increment_version``)."""
    global _write_epoch
    _write_epoch += 1
    written = []
    stepper = weakref.ref(optimizer)
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.grad is not None:
                written.append(param)
            try:
                storage = param.untyped_storage()
            except (RuntimeError, NotImplementedError, TypeError):  # a tensor subclass without one (DTensor)
                continue
            key = id(param)
            known = _stepped_params.get(key)
            if known is None or known[0]() is not storage:
                kept = weakref.ref(storage, lambda dead, key=key: _forget_param(key, dead))
                _stepped_params[key] = (kept, stepper)
            elif known[1] is not stepper:
                _stepped_params[key] = (known[0], stepper)
    if written:
        torch._C._increment_version(written)  # torch.autograd.graph.increment_version, without its frame


def _forget_param(key: int, ref: weakref.ref) -> None:
    known = _stepped_params.get(key)
    if known is not None and known[0] is ref:
        del _stepped_params[key]


def install_step_hook() -> None:
    """Install the global optimizer step post-hook (once; the layers call it when they are built, so that the
    first step of a run is counted)."""
    global _step_hook
    if _step_hook is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        # outside Dynamo: traced into a compiled optimizer step, the hook would guard that graph on the epoch it
        # advances (a recompilation per step) and its version bump would not run
        _step_hook = register_optimizer_step_post_hook(torch.compiler.disable(_count_optimizer_step, recursive=True))


def write_epoch() -> int:
    """A counter advanced after every ``torch.optim.Optimizer.step()`` in this process (counted from the first
    call of this function) and by :func:`advance_write_epoch`: what an entry computed from trainable tensors
    is keyed by."""
    if _step_hook is None:
        install_step_hook()
    return _write_epoch


def advance_write_epoch() -> None:
    """Invalidate every entry keyed by :func:`write_epoch` (a forward through :func:`optimizer_untracked` tensors
    is recording autograd: see the module docstring)."""
    global _write_epoch
    _write_epoch += 1


def optimizer_may_write(tensors: tuple[torch.Tensor, ...]) -> bool:
    """May an optimizer step write one of ``tensors`` (or the tensor it is a view of) without bumping its
    version? A fused optimizer writes every parameter that has a gradient, frozen (``requires_grad=False``)
    since or not. An entry computed from such tensors is keyed by :func:`write_epoch`."""
    for tensor in tensors:
        base = tensor._base
        root = tensor if base is None else base
        if root.requires_grad or root.grad is not None:
            return True
    return False


def optimizer_untracked(tensors: tuple[torch.Tensor, ...]) -> bool:
    """Does one of ``tensors`` require a gradient without being (a view of) a parameter of a live optimizer that
    has completed a step? Such a tensor may be written by hand after the backward (module docstring)."""
    if _step_hook is None:
        install_step_hook()
    for tensor in tensors:
        if tensor.requires_grad:
            base = tensor._base
            root = tensor if base is None else base
            known = _stepped_params.get(id(root))
            if known is None or known[0]() is not root.untyped_storage() or known[1]() is None:
                return True
    return False


_jit_tracing = torch._C._is_tracing  # what torch.jit.is_tracing() asks, without its Python frame
_functorch_interpreter = torch._C._functorch.peek_interpreter_stack  # not None inside a torch.func transform


_dispatch_modes = torch._C._len_torch_dispatch_stack  # > 0 while a TorchDispatchMode is active


def caching_allowed() -> bool:
    """May values be cached and served now? No while ``torch.compile`` traces, while ``torch.jit`` traces or
    scripts, inside a ``torch.func`` transform or a forward-mode AD dual level, or in a selective activation
    checkpoint (see the module docstring). Runs on every layer call."""
    return not (
        torch.compiler.is_compiling()
        or _jit_tracing()
        or _functorch_interpreter() is not None
        or _forward_ad._current_level >= 0
        or torch.jit.is_scripting()
        or (_dispatch_modes() > 0 and _selective_checkpoint_active())
    )


def _selective_checkpoint_active() -> bool:
    """Is a dispatch mode of ``torch.utils.checkpoint`` active (selective activation checkpointing,
    ``create_selective_checkpoint_contexts``)? Its recomputation receives the outputs the forward saved by their
    position in the operator sequence, so the forward and the recomputation must run the same operators: a
    norm computed in one and served from the cache in the other would shift every later saved output."""
    for index in range(_dispatch_modes()):
        if type(torch._C._get_dispatch_stack_at(index)).__module__ == "torch.utils.checkpoint":
            return True
    return False


def hidden_from_selective_checkpoint() -> contextlib.AbstractContextManager[Any]:
    """Context for the detached norm's computation: inside a selective activation checkpoint, with the dispatch
    modes set aside, so that the checkpoint neither saves nor hands back the norm's temporaries (the PyTorch
    norm works in place on them, which the checkpoint rejects as a mutation of a saved tensor). Nothing of it
    reaches autograd; every other operator of the layer stays in the checkpoint's view."""
    if not torch.compiler.is_compiling() and _dispatch_modes() > 0 and _selective_checkpoint_active():
        from torch.utils._python_dispatch import _disable_current_modes

        return _disable_current_modes()
    return _NOT_HIDDEN


_NOT_HIDDEN = contextlib.nullcontext()  # reusable: entered on every forward that computes or looks up a norm


def stampable(tensors: tuple[torch.Tensor, ...]) -> bool:
    """False when any of ``tensors`` is an inference tensor (no version counter: it cannot be stamped).

    Checked before a value is stored, not on lookups: an entry is only ever stamped from normal tensors,
    and an inference tensor is never the object (or in the storage) a stamp records, so a lookup with one
    misses before it reads a version counter.
    """
    return not any(tensor.is_inference() for tensor in tensors)


def normal_tensors() -> contextlib.AbstractContextManager[Any]:
    """Context in which new tensors are normal ones: inference mode locally off when it is on.

    Values that go into a cache are computed inside it, so a cache never holds an inference tensor (which
    autograd may not save for backward) and can serve its values to any later call.
    """
    if torch.is_inference_mode_enabled():
        return torch.inference_mode(False)
    return contextlib.nullcontext()


def same_values(cached: torch.Tensor | None, fresh: torch.Tensor | None) -> bool:
    """Bitwise-equal values (NaN equal to NaN), same shape and dtype; None only equals None."""
    if cached is None or fresh is None:
        return cached is None and fresh is None
    if cached.shape != fresh.shape or cached.dtype != fresh.dtype:
        return False
    return bool(torch.equal(cached, fresh) or ((cached == fresh) | (cached.isnan() & fresh.isnan())).all())


class StaleNormCacheError(RuntimeError):
    """Raised under ``PEFT_DORA_NORM_CACHE=verify`` when a cached value differs from its recomputation:
    something wrote a tensor behind it in a way its version counter did not see (see the module docstring)."""


def _root(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor a view was taken from (views share its version counter), or the tensor itself.

    PEFT hands some factors over as fresh views (``lora_embedding_A[name].T``); the stamp follows the
    parameter behind them, while the layout it records is the view's own.
    """
    base = tensor._base
    return tensor if base is None else base


def _layout_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    """What a stamp records of a tensor besides its identity and storage: version, address, layout, dtype
    (``TensorStamp.matches``, ``StampSet.matches`` and ``StampSet.__init__`` build the same tuple inline: a cache
    hit and a norm recomputation run them)."""
    return (
        tensor._version,
        tensor.data_ptr(),
        tensor.storage_offset(),
        tensor.shape,
        tensor.stride(),
        tensor.dtype,
    )


class TensorStamp:
    """Identity + layout + version of one tensor at one moment (see module docstring)."""

    __slots__ = ("_key", "_root_id", "_root_ref", "_storage_ref")

    def __init__(self, tensor: torch.Tensor) -> None:
        root = _root(tensor)
        self._root_id = id(root)
        self._root_ref = None if isinstance(root, nn.Parameter) else weakref.ref(root)  # (module docstring)
        self._storage_ref = weakref.ref(tensor.untyped_storage())  # the device is the storage's
        self._key = _layout_key(tensor)

    def matches(self, tensor: torch.Tensor) -> bool:
        """True when ``tensor`` is the same object, in the same storage, unchanged since the stamp."""
        base = tensor._base  # _root(tensor), inlined: this runs for every cached tensor on every call
        root = tensor if base is None else base
        return (
            self._root_id == id(root)
            and (self._root_ref is None or self._root_ref() is root)
            and self._storage_ref() is tensor.untyped_storage()
            and self._key
            == (
                tensor._version,
                tensor.data_ptr(),
                tensor.storage_offset(),
                tensor.shape,
                tensor.stride(),
                tensor.dtype,
            )
        )

    def same_layout(self, tensor: torch.Tensor) -> bool:
        """:meth:`matches` without the version: the same object in the same memory with the same layout,
        written or not since the stamp (what a computation captured with the tensor's address relies on)."""
        base = tensor._base
        root = tensor if base is None else base
        return (
            self._root_id == id(root)
            and (self._root_ref is None or self._root_ref() is root)
            and self._storage_ref() is tensor.untyped_storage()
            and self._key[1:]
            == (tensor.data_ptr(), tensor.storage_offset(), tensor.shape, tensor.stride(), tensor.dtype)
        )

    def __getstate__(self) -> None:  # pragma: no cover - guarded by NormCache.__getstate__
        raise TypeError("TensorStamp holds weak references and is not picklable")


class StampSet:
    """The :class:`TensorStamp` of each of several tensors, held flat: what a cache entry checks on every hit.

    :meth:`matches` compares exactly what ``TensorStamp.matches`` compares for each tensor, in one loop without
    a method call or a stamp object per tensor (a cache hit is on the path of every decode step and every
    compiled call)."""

    __slots__ = ("_columns", "_keys", "_refs", "_views")

    def __init__(self, tensors: tuple[torch.Tensor, ...]) -> None:
        # _root(t) and _layout_key(t) inlined: a norm recomputation stamps its inputs on every training call
        refs, keys, ref, parameter = [], [], weakref.ref, nn.Parameter
        views = 0
        for t in tensors:
            base = t._base
            root = t if base is None else base
            views += base is not None
            root_ref = None if isinstance(root, parameter) else ref(root)  # (module docstring: identity)
            refs.append((id(root), root_ref, ref(t.untyped_storage())))
            keys.append((t._version, t.data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype))
        self._refs, self._keys = tuple(refs), tuple(keys)
        self._views = views
        self._columns: _StampColumns | None = None

    def matches(self, tensors: tuple[torch.Tensor, ...]) -> bool:
        """True when every tensor is the same object, in the same storage, unchanged since the stamps."""
        if len(tensors) != len(self._keys):
            return False
        for (root_id, root_ref, storage_ref), key, tensor in zip(self._refs, self._keys, tensors):
            base = tensor._base  # _root(tensor), inlined
            root = tensor if base is None else base
            if (
                root_id != id(root)
                or (root_ref is not None and root_ref() is not root)
                or storage_ref() is not tensor.untyped_storage()
                or key
                != (
                    tensor._version,
                    tensor.data_ptr(),
                    tensor.storage_offset(),
                    tensor.shape,
                    tensor.stride(),
                    tensor.dtype,
                )
            ):
                return False
        return True

    def matches_in_layout(self, tensors: tuple[torch.Tensor, ...]) -> bool:
        """:meth:`matches` for tensors whose dtype, shape and strides are known to be the stamps' (a compiled
        graph's guards checked them): every tensor the same object, in the same storage at the same address,
        unchanged. The storage offset follows from the storage, the address and the dtype.

        Where no stamped tensor was a view (a compiled graph passes parameters), each check runs column-wise
        over all the tensors (:class:`_StampColumns`), and a view passed in place of its base no longer
        matches; the merged norm op of a compiled model runs this on every call, for three tensors per layer."""
        if len(tensors) != len(self._keys):
            return False
        if not self._views:
            columns = self._columns
            if columns is None:
                columns = self._columns = _StampColumns.of(self._refs, self._keys)
            return columns.match(tensors)
        for (root_id, root_ref, storage_ref), key, tensor in zip(self._refs, self._keys, tensors):
            base = tensor._base
            root = tensor if base is None else base
            if (
                root_id != id(root)
                or (root_ref is not None and root_ref() is not root)
                or storage_ref() is not tensor.untyped_storage()
                or key[0] != tensor._version
                or key[1] != tensor.data_ptr()
            ):
                return False
        return True

    def same_layout(self, tensors: tuple[torch.Tensor, ...]) -> bool:
        """:meth:`matches` without the versions: ``TensorStamp.same_layout`` of every tensor, in one loop."""
        if len(tensors) != len(self._keys):
            return False
        for (root_id, root_ref, storage_ref), key, tensor in zip(self._refs, self._keys, tensors):
            base = tensor._base
            root = tensor if base is None else base
            if (
                root_id != id(root)
                or (root_ref is not None and root_ref() is not root)
                or storage_ref() is not tensor.untyped_storage()
                or key[1:] != (tensor.data_ptr(), tensor.storage_offset(), tensor.shape, tensor.stride(), tensor.dtype)
            ):
                return False
        return True

    def __getstate__(self) -> None:  # pragma: no cover - guarded by NormCache.__getstate__
        raise TypeError("StampSet holds weak references and is not picklable")


_data_ptr = torch.Tensor.data_ptr
_version_of = operator.attrgetter("_version")


class _StampColumns(NamedTuple):
    """A :class:`StampSet` of tensors that were no views, held column-wise for ``matches_in_layout``: one list
    per check, compared in one go (a list comparison, or ``map`` over C functions) instead of a Python loop
    with a branch per tensor.

    It compares each tensor's own identity: a stamped tensor had no base, so its root was itself. A tensor
    that is a view now has another id unless the stamped object was freed and its id reused (a parameter,
    recorded by id alone); then, as for a root, only the very storage stamped, still alive, at the same
    address, with the same version, matches.

    The storages are watched rather than compared: a weak reference with a callback per storage sets
    ``freed`` when one of them is freed, and a match needs none freed and every ``data_ptr`` unchanged. A
    tensor now in another storage at the same address while the stamped one lives could only be in memory
    that two storages alias (a DLPack or ``from_blob`` alias bound through ``.data``): the same memory, so
    the same values (later writes through the alias are the ``.data`` blind spot of the module docstring)."""

    ids: list[int]
    weak_roots: tuple[tuple[int, weakref.ref], ...]  # (position, weak reference) of the tensors not Parameters
    versions: list[int]
    data_ptrs: list[int]
    watches: tuple[weakref.ref, ...]  # kept alive for their callbacks
    freed: list[bool]  # [True] once a stamped storage was freed

    @classmethod
    def of(cls, refs: tuple[tuple[int, Any, weakref.ref], ...], keys: tuple[tuple[Any, ...], ...]) -> _StampColumns:
        freed = [False]

        def on_free(_dead: weakref.ref, freed: list[bool] = freed) -> None:
            freed[0] = True

        watches = []
        for _, _, storage_ref in refs:
            storage = storage_ref()
            if storage is None:  # freed already
                freed[0] = True
                break
            watches.append(weakref.ref(storage, on_free))
        return cls(
            [root_id for root_id, _, _ in refs],
            tuple((i, root_ref) for i, (_, root_ref, _) in enumerate(refs) if root_ref is not None),
            [key[0] for key in keys],
            [key[1] for key in keys],
            tuple(watches),
            freed,
        )

    def match(self, tensors: tuple[torch.Tensor, ...]) -> bool:
        if self.freed[0] or list(map(id, tensors)) != self.ids:
            return False
        for i, root_ref in self.weak_roots:
            if root_ref() is not tensors[i]:
                return False
        return list(map(_version_of, tensors)) == self.versions and list(map(_data_ptr, tensors)) == self.data_ptrs


class NormCache:
    """At most one cached value per slot, valid while its signature is the caller's and its inputs' stamps
    match.

    ``slot`` names the one value kept (the adapter); ``signature`` holds the plain hashables that select the
    value (scaling, chunk budget, kernel switch, write epoch); ``inputs`` are the
    tensors the value was computed from. A lookup whose signature or stamps differ drops the entry (its
    memory is freed before the caller recomputes), and :meth:`put` replaces whatever the slot held.
    ``hits`` / ``misses`` count lookups (eager only: nothing here runs while ``torch.compile`` traces).
    """

    def __init__(self) -> None:
        self._entries: dict[Any, tuple[Any, StampSet, Any]] = {}
        self.hits = 0
        self.misses = 0
        #: Bumped whenever an entry is stored, dropped or cleared: a caller that remembers it knows the entries
        #: are the ones it saw while it is unchanged (the merged norm op's memo: ``autograd/norm_op.py``).
        self.changes = 0

    def get(self, slot: Any, signature: Any, inputs: tuple[torch.Tensor, ...]) -> Any | None:
        entry = self._entries.get(slot)
        if entry is not None:
            entry_signature, stamps, value = entry
            if entry_signature == signature and stamps.matches(inputs):
                self.hits += 1
                return value
            self._entries.pop(slot, None)  # (not del: a forward on another thread may have dropped it already)
            self.changes += 1
        self.misses += 1
        return None

    def hit(self, slot: Any, signature: Any, inputs: tuple[torch.Tensor, ...]) -> Any | None:
        """The value :meth:`get` would serve (counted as a hit), or None, leaving a failed lookup to :meth:`get`:
        nothing is dropped or counted as a miss (a fast path tries this before the path that recomputes)."""
        entry = self._entries.get(slot)
        if entry is not None and entry[0] == signature and entry[1].matches(inputs):
            self.hits += 1
            return entry[2]
        return None

    def peek(self, slot: Any) -> Any | None:
        """The value stored in ``slot``, unvalidated (None when empty): for a caller that validates it by other
        means (:attr:`changes`), never to serve."""
        entry = self._entries.get(slot)
        return None if entry is None else entry[2]

    def put(self, slot: Any, signature: Any, inputs: tuple[torch.Tensor, ...], value: Any) -> None:
        self._entries[slot] = (signature, StampSet(inputs), value)
        self.changes += 1

    def clear(self) -> None:
        self._entries.clear()
        self.changes += 1

    def __len__(self) -> int:
        return len(self._entries)

    # The cache is derived state: drop it when pickled or deep-copied (weak references cannot travel).
    def __getstate__(self) -> dict[str, Any]:
        return {"hits": 0, "misses": 0}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._entries = {}
        self.hits = state.get("hits", 0)
        self.misses = state.get("misses", 0)
        self.changes = 0

    def __deepcopy__(self, memo: dict[int, Any]) -> NormCache:
        return NormCache()


class OwnedNormCaches:
    """The caches of one DoRA layer's compiled norm (``autograd/norm_op.py``): the norm (``norm``) and the base
    weight's row sum of squares (``sumsq``), each a :class:`NormCache` with one slot, and what the layer's norm
    store holds (``served``).

    A compiled graph cannot hold a reference to the layer (a per-instance constant would specialize the
    graph to one layer: one recompile per layer for a block compiled once and reused, as regional
    compilation does). So the op finds these caches at run time through a tensor it receives: the layer's
    magnitude parameter, its *owner* (:func:`owned_norm_caches`). The layer finds them the same way, to count
    and to clear.
    """

    __slots__ = ("merged", "norm", "served", "sumsq")

    def __init__(self) -> None:
        self.norm = NormCache()
        self.sumsq = NormCache()
        #: ``(weak reference to the layer's norm store, its data_ptr, the cached norm written into it)`` after
        #: ``dorafactors::refresh_weight_norm`` wrote it, or None: the op skips the write while these match.
        self.served: tuple[weakref.ref, int, torch.Tensor] | None = None
        #: What a merged ``dorafactors::refresh_weight_norms`` call whose first layer this is left behind (its
        #: memo: ``autograd/norm_op.py``), or None.
        self.merged: Any = None

    def clear(self) -> None:
        self.norm.clear()
        self.sumsq.clear()
        self.served = None
        self.merged = None


#: ``id(owner) -> (weak reference to the owner's storage, its caches)``; an entry is dropped when that storage is
#: freed (the storage, not the owner: a tensor with a weak reference cannot be swapped, ``swap_tensors``).
_owned: dict[int, tuple[weakref.ref, OwnedNormCaches]] = {}


def _drop_owned(key: int, ref: weakref.ref) -> None:
    item = _owned.get(key)
    if item is not None and item[0] is ref:
        del _owned[key]


def owned_norm_caches(owner: torch.Tensor, *, create: bool = True) -> OwnedNormCaches | None:
    """The :class:`OwnedNormCaches` of ``owner`` (a DoRA layer's magnitude parameter: the very object, in its
    current storage), made on first use with ``create``; None without. A new magnitude parameter
    (``load_state_dict(assign=True)``, a deep copy of the layer) or new memory for it (a device or dtype move, a
    swap) starts with empty caches. Which caches serve a call never decides a value: every entry is validated by
    the stamps of the tensors it was computed from."""
    key = id(owner)
    storage = owner.untyped_storage()
    item = _owned.get(key)
    if item is not None and item[0]() is storage:
        return item[1]
    if not create:
        return None
    caches = OwnedNormCaches()
    ref = weakref.ref(storage, lambda dead, key=key: _drop_owned(key, dead))
    _owned[key] = (ref, caches)
    return caches
