"""Caches of the detached DoRA weight norm that are never stale.

A cached value is served only when a *stamp* of everything it was computed from is unchanged. A stamp of a
tensor records:

* which storage it lives in: a weak reference to the storage object. PyTorch keeps one Python object per
  live storage, so the reference dies exactly when the storage is freed and a new allocation at the same
  address can never be mistaken for the old one;
* where in it, and how: ``data_ptr``, storage offset, shape, strides, dtype, device;
* its autograd version counter, which every in-place write PyTorch can see bumps: optimizer steps (also
  the ``_foreach`` kernels), ``copy_`` in ``load_state_dict``, ``zero_``/``mul_`` under ``no_grad``;
* the identity of the tensor object (a weak reference; for a view, of the tensor it was taken from), so a
  new Parameter bound over the same storage starts a new entry.

The version counter is not enough on its own: fused optimizer kernels (``torch.optim.AdamW(fused=True)``,
the Hugging Face Trainer's default on CUDA; DeepSpeed's and bitsandbytes' optimizers) write parameters
without bumping it. So every key also carries :func:`optimizer_steps`, a counter advanced after every
``step()`` of any ``torch.optim.Optimizer`` (PyTorch's global step post-hook, installed on first use; it
only counts). The layers add it to a key whenever a tensor behind the value requires a gradient.

Writes that PyTorch itself cannot see (``tensor.data.add_(...)``: ``.data`` has its own version counter)
are the remaining channel a stamp cannot observe. PEFT writes base weights that way only inside ``merge`` /
``unmerge``; ``dorafactors.patch()`` hooks PEFT's merge entry point and calls :meth:`NormCache.clear` on
the DoRA layers of the merged module (``patching.py``), and a DoRA forward cannot run while an adapter is
merged. Code outside PEFT that writes through ``.data`` must call ``dorafactors.clear_norm_caches(model)``.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

__all__ = ["NormCache", "TensorStamp", "optimizer_steps", "stamp"]


_optimizer_steps = 0
_step_hook: Any = None


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def optimizer_steps() -> int:
    """How many ``torch.optim.Optimizer.step()`` calls completed in this process since first asked."""
    global _step_hook
    if _step_hook is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _step_hook = register_optimizer_step_post_hook(_count_optimizer_step)
    return _optimizer_steps


def _root(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor a view was taken from (views share its version counter), or the tensor itself.

    PEFT hands some factors over as fresh views (``lora_embedding_A[name].T``); the stamp follows the
    parameter behind them, while the layout it records is the view's own.
    """
    base = tensor._base
    return tensor if base is None else base


class TensorStamp:
    """Identity + layout + version of one tensor at one moment (see module docstring)."""

    __slots__ = ("_key", "_root_ref", "_storage_ref")

    def __init__(self, tensor: torch.Tensor) -> None:
        self._root_ref = weakref.ref(_root(tensor))
        self._storage_ref = weakref.ref(tensor.untyped_storage())  # the device is the storage's
        self._key = (
            tensor._version,
            tensor.data_ptr(),
            tensor.storage_offset(),
            tensor.shape,
            tensor.stride(),
            tensor.dtype,
        )

    def matches(self, tensor: torch.Tensor) -> bool:
        """True when ``tensor`` is the same object, in the same storage, unchanged since the stamp."""
        base = tensor._base  # _root(tensor), inlined: this runs for every cached tensor on every call
        return (
            self._root_ref() is (tensor if base is None else base)
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

    def __getstate__(self) -> None:  # pragma: no cover - guarded by NormCache.__getstate__
        raise TypeError("TensorStamp holds weak references and is not picklable")


def stamp(*tensors: torch.Tensor) -> tuple[TensorStamp, ...]:
    """Stamps of several tensors, in order."""
    return tuple(TensorStamp(t) for t in tensors)


class NormCache:
    """One cached value per key, valid while the stamps of its inputs match.

    ``key`` holds plain hashables that select the entry (adapter name, scaling, dtype of the result,
    chunk budget, kernel path); ``inputs`` are the tensors the value was computed from.
    """

    def __init__(self) -> None:
        self._entries: dict[Any, tuple[tuple[TensorStamp, ...], torch.Tensor]] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: Any, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
        entry = self._entries.get(key)
        if entry is not None:
            stamps, value = entry
            if len(stamps) == len(inputs):
                for stamp_, tensor in zip(stamps, inputs):
                    if not stamp_.matches(tensor):
                        break
                else:
                    self.hits += 1
                    return value
            del self._entries[key]
        self.misses += 1
        return None

    def put(self, key: Any, inputs: tuple[torch.Tensor, ...], value: torch.Tensor) -> None:
        # One entry per key: a stale entry for the same key is replaced, never kept beside the new one.
        self._entries[key] = (stamp(*inputs), value)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    # The cache is derived state: drop it when pickled or deep-copied (weak references cannot travel).
    def __getstate__(self) -> dict[str, Any]:
        return {"hits": 0, "misses": 0}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._entries = {}
        self.hits = state.get("hits", 0)
        self.misses = state.get("misses", 0)

    def __deepcopy__(self, memo: dict[int, Any]) -> NormCache:
        return NormCache()
