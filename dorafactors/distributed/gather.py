"""Single entry point the layers use around the norm computation: expose full parameters, say what was done.

The DoRA norm reads ``base_layer.weight``, ``lora_A.weight`` and ``lora_B.weight`` directly (no module call),
so under a sharding engine those tensors may be shards, empty placeholders or stale views. Around the norm,
:func:`gathered_for_norm` makes them full for the duration of the ``with`` block:

* **DeepSpeed ZeRO-3** (:mod:`.deepspeed`): partitioned parameters are gathered with one
  ``GatheredParameters`` call (parameters DeepSpeed already holds gathered are used as they are and never
  released by us; ones it is prefetching are read through a private all-gather of their shards);
* **FSDP1** (:mod:`.fsdp`): ``summon_full_params(writeback=False)`` on the base and adapter modules that are
  ``FullyShardedDataParallel`` instances themselves (PEFT's wrap policy wraps ``lora_A`` / ``lora_B``);
  weights owned by an enclosing FSDP unit are already unsharded inside its forward;
* **FSDP2** (:mod:`.fsdp`): sharded ``DTensor`` weights are materialized with ``full_tensor()`` under
  ``no_grad`` when the layer asks for them (:meth:`GatherInfo.full`), which leaves FSDP2's own all-gather
  and prefetch state untouched; weights an enclosing ``fully_shard`` module already unsharded are used as
  they are.

The norm is detached: gradients reach the sharded parameters through the LoRA branch (module calls, which
the engines hook) and the magnitude, never through these gathered copies.

Without an initialized process group nothing can be sharded and the helper returns a shared no-op context
at the cost of one ``torch.distributed.is_initialized()`` call.

The layer reads every tensor it feeds the norm *inside* the block through :meth:`GatherInfo.full`: FSDP1
(``use_orig_params=False``) and FSDP2 swap module attributes to new tensor objects when they unshard, so a
tensor fetched before the block can be stale.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from . import deepspeed as _ds
from . import fsdp as _fsdp

__all__ = ["GatherInfo", "gathered_for_norm", "norm_cache_allowed"]

logger = logging.getLogger("dorafactors.distributed")

_logged_reasons: set[str] = set()


def _log_once(level: int, message: str) -> None:
    if message not in _logged_reasons:
        _logged_reasons.add(message)
        logger.log(level, message)


class GatherInfo:
    """What :func:`gathered_for_norm` did.

    ``backend`` is ``None`` when no parameter of the layer is managed by a sharding engine, else one of
    ``"deepspeed"``, ``"fsdp1"``, ``"fsdp2"``; ``cache_reason`` then says why the norm caches must not be
    used. ``gathered`` lists what was made full (for logs and tests).
    """

    __slots__ = ("_memo", "backend", "cache_reason", "gathered")

    def __init__(self, backend: str | None = None, cache_reason: str = "", gathered: tuple[str, ...] = ()) -> None:
        self.backend = backend
        self.cache_reason = cache_reason
        self.gathered = gathered
        self._memo: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None

    def full(self, x: Any) -> Any:
        """The full tensor to compute with.

        A module gives its current ``weight`` (read now, inside the block); a sharded ``DTensor`` (FSDP2)
        gives its ``full_tensor()``, gathered once per block; anything else is returned as is.
        """
        if isinstance(x, nn.Module):
            x = x.weight
        if self.backend is None or not _fsdp.is_dtensor(x):
            return x
        if self._memo is None:
            self._memo = {}
        hit = self._memo.get(id(x))
        if hit is not None and hit[0] is x:
            return hit[1]
        with torch.no_grad():
            full = x.full_tensor()
        self._memo[id(x)] = (x, full)  # keeps x alive, so its id cannot be reused inside the block
        return full

    def __repr__(self) -> str:
        return f"GatherInfo(backend={self.backend!r}, gathered={self.gathered!r})"


_NOT_SHARDED = GatherInfo()


class _NoOp:
    """Shared no-op context (no process group): cheaper than a generator-based context manager."""

    __slots__ = ()

    def __enter__(self) -> GatherInfo:
        return _NOT_SHARDED

    def __exit__(self, *exc: object) -> None:
        return None


_NOOP = _NoOp()


_DIST_AVAILABLE = torch.distributed.is_available()  # a property of the PyTorch build


def _dist_initialized() -> bool:
    return _DIST_AVAILABLE and torch.distributed.is_initialized()


#: What the norm path uses when no process group exists (nothing can be sharded then).
NOT_SHARDED = _NOT_SHARDED


def process_group_active() -> bool:
    """False when no ``torch.distributed`` process group is initialized: no gather can be needed."""
    return _dist_initialized()


def gathered_for_norm(base_layer: nn.Module, *factors: Any) -> contextlib.AbstractContextManager[GatherInfo]:
    """Make the full base weight and LoRA factors visible for the duration of the norm computation.

    ``factors`` are the adapter modules (``lora_A`` / ``lora_B``) or bare tensors (embedding factors,
    possibly views of their parameters). Yields a :class:`GatherInfo`; read the tensors through
    :meth:`GatherInfo.full` inside the block.
    """
    if not _dist_initialized():
        return _NOOP
    return _gathered(base_layer, factors)


@contextlib.contextmanager
def _gathered(base_layer: nn.Module, factors: tuple[Any, ...]) -> Iterator[GatherInfo]:
    with contextlib.ExitStack() as stack:
        backends: list[str] = []
        reasons: list[str] = []
        gathered: list[str] = []

        done = _ds.enter_gather(stack, base_layer, factors)
        if done is not None:
            backends.append("deepspeed")
            reasons.append(_ds.CACHE_REASON)
            gathered.extend(done)

        summoned = _fsdp.enter_fsdp1_summon(stack, base_layer, factors)
        fsdp1 = bool(summoned) or _fsdp.fsdp1_managed(base_layer, factors)
        if fsdp1:
            backends.append("fsdp1")
            reasons.append(_fsdp.FSDP1_CACHE_REASON)
            gathered.extend(summoned)

        if _fsdp.fsdp2_managed(base_layer, factors):
            backends.append("fsdp2")
            reasons.append(_fsdp.FSDP2_CACHE_REASON)

        if not backends:
            # Distributed but nothing detected: norm_cache_allowed still inspects the inputs.
            yield GatherInfo()
            return
        if gathered:
            logger.debug("dorafactors: gathered for the norm: %s", ", ".join(gathered))
        yield GatherInfo("+".join(backends), "; ".join(reasons), tuple(gathered))


def norm_cache_allowed(info: GatherInfo, inputs: tuple[torch.Tensor, ...]) -> tuple[bool, str]:
    """May the norm / sum-of-squares caches be used for these (gathered) inputs?

    No when a sharding engine manages any of the layer's parameters: the cache validates an entry by the
    stamps of its inputs (storage, address, version), and under sharding those describe a temporary gathered
    buffer, not the values the optimizer updates (see each backend's ``CACHE_REASON``). The reason is logged
    once per process at INFO level.
    """
    if info is _NOT_SHARDED:
        return True, ""
    if info.backend is None:
        reason = _input_reason(inputs)
        if reason is None:
            return True, ""
    else:
        reason = f"norm cache off under {info.backend}: {info.cache_reason}"
    _log_once(logging.INFO, f"dorafactors: {reason}")
    return False, reason


def _input_reason(inputs: tuple[torch.Tensor, ...]) -> str | None:
    """Belt and braces when no backend was detected (e.g. ``PEFT_FORCE_GATHER=0``): sharded-looking inputs."""
    for t in inputs:
        if _fsdp.is_dtensor(t):
            return "norm cache off: an input is a DTensor (sharded parameter)"
        if _ds.is_zero_param(t):
            return "norm cache off: an input is a DeepSpeed ZeRO-3 parameter"
        if _fsdp.is_fsdp1_flat(t):
            return "norm cache off: an input is managed by FSDP1"
    return None


def _reset_for_tests() -> None:
    """Forget logged reasons and cached detections (tests)."""
    _logged_reasons.clear()
    _ds._reset_for_tests()
    _fsdp._reset_for_tests()
