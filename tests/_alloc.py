"""A TorchDispatchMode that records every new storage an op allocates, and the peak of those alive."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class AllocationTracker(TorchDispatchMode):
    """Tracks storages created inside the block (views and in-place results reuse a storage: not counted).

    ``allocations``: ``(op name, numel, nbytes)`` of every new storage; ``peak_bytes``: the most bytes of
    those alive at once (frees observed through weak references to the storages).
    """

    def __init__(self) -> None:
        super().__init__()
        self.allocations: list[tuple[str, int, int]] = []
        self.live_bytes = 0
        self.peak_bytes = 0
        self._known: dict[int, weakref.ref] = {}

    def _release(self, key: int, nbytes: int) -> None:
        self._known.pop(key, None)
        self.live_bytes -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in inputs or key in self._known:
                continue
            nbytes = storage.nbytes()
            self._known[key] = weakref.ref(storage, lambda _ref, k=key, n=nbytes: self._release(k, n))
            self.allocations.append((str(func), t.numel(), nbytes))
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        return out

    @property
    def largest_numel(self) -> int:
        return max((numel for _, numel, _ in self.allocations), default=0)
