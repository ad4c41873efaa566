"""DeepSpeed ZeRO-3: detect it, and gather the partitioned parameters the norm reads.

DeepSpeed is an optional extra: this module never imports it at import time, and imports
``deepspeed.runtime.zero.partition_parameters`` only when it meets a ZeRO-3 parameter (which means DeepSpeed
is already imported).

**Detection** (:func:`zero3_active`), asked only when a process group exists:

* ``PEFT_FORCE_GATHER`` (ternary, read once): ``1`` forces gathering on, ``0`` off, for good;
* unset: ``DS_ZERO_STAGE=3`` in the environment (fast path), or a parameter the norm reads is a ZeRO-3
  parameter (it carries ``ds_id``: covers plain ``deepspeed.initialize`` without the HF integration), or
  ``transformers``' HF DeepSpeed config says ZeRO-3. Only a detected ``True`` is cached: the common flow
  (build model -> PEFT wrap -> ``deepspeed.initialize``) runs DoRA code before ZeRO-3 exists, so ``False``
  is re-checked on every call until ZeRO-3 is seen.

**Gathering** (:func:`enter_gather`): the parameters of the base layer and of the adapter modules, and the
parameters behind bare factor tensors (embedding factors arrive as ``.T`` views), sorted by their DeepSpeed
status:

* ``AVAILABLE`` (persistent small parameters, or ones DeepSpeed's coordinator fetched): used as they are and
  never released by us, so the coordinator's bookkeeping stays true;
* ``NOT_AVAILABLE``: gathered together by **one** ``GatheredParameters(..., modifier_rank=None)`` call,
  re-partitioned on exit (nothing is modified, so nothing is broadcast);
* ``INFLIGHT`` (the coordinator is prefetching them for the adapter's own upcoming call and holds the only
  handle): ``GatheredParameters`` would skip them and read half-written memory, and its exit would trip
  DeepSpeed's "cannot partition a param in flight" assertion. We all-gather their local partitions
  (``ds_tensor``, which the prefetch does not write) into a temporary buffer, point ``param.data`` at it
  for the block, and restore the exact previous ``.data`` object after, leaving status and handle alone.

After gathering every ZeRO-3 parameter must be full (``data.numel() == ds_numel``). Anything else is a
*partial gather* — the norm would mix full and partitioned tensors — and raises ``RuntimeError`` unless
``PEFT_DORA_ALLOW_PARTIAL_GATHER=1``, which downgrades it to a warning (logged once per message).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..dispatch import config

__all__ = ["CACHE_REASON", "enter_gather", "is_zero_param", "zero3_active"]

logger = logging.getLogger("dorafactors.distributed")

CACHE_REASON = (
    "ZeRO-3 partitions the parameters: every gather builds new full buffers, and DeepSpeed writes the updated "
    "partitions through `.data`, which a version stamp cannot see"
)

_zero3_seen = False
_warned: set[str] = set()


def _reset_for_tests() -> None:
    global _zero3_seen
    _zero3_seen = False
    _warned.clear()


# ----------------------------------------------------------------------------------------- detection
def _root(t: torch.Tensor) -> torch.Tensor:
    base = t._base
    return t if base is None else base


def is_zero_param(t: Any) -> bool:
    """True for a DeepSpeed ZeRO-3 parameter (or a view of one)."""
    return isinstance(t, torch.Tensor) and hasattr(_root(t), "ds_id")


def _hf_zero3_enabled() -> bool:
    """``transformers``' HF DeepSpeed config (set by the Trainer / ``HfDeepSpeedConfig``) says ZeRO-3."""
    try:
        from peft.utils.integrations import check_deepspeed_zero3_enabled

        return bool(check_deepspeed_zero3_enabled())
    except (ImportError, RuntimeError, ValueError, AttributeError):
        return False
    except Exception:  # pragma: no cover - unexpected third-party failure must not break a forward
        logger.debug("dorafactors: check_deepspeed_zero3_enabled() raised", exc_info=True)
        return False


def zero3_active(params: tuple[torch.Tensor, ...] | list[torch.Tensor] = ()) -> bool:
    """Should the norm gather ZeRO-3 parameters? (see module docstring; call with a process group only)."""
    global _zero3_seen
    forced = config.force_gather()
    if forced is not None:
        return forced
    if _zero3_seen:
        return True
    if config.deepspeed_zero_stage_env() == "3" or any(is_zero_param(p) for p in params) or _hf_zero3_enabled():
        _zero3_seen = True
        logger.debug("dorafactors: DeepSpeed ZeRO-3 detected")
        return True
    return False


# ----------------------------------------------------------------------------------------- gathering
def _api() -> Any:
    """``deepspeed.runtime.zero.partition_parameters`` (imported only once a ZeRO-3 parameter is met)."""
    try:
        return importlib.import_module("deepspeed.runtime.zero.partition_parameters")
    except ImportError as exc:  # pragma: no cover - a ZeRO-3 parameter implies DeepSpeed is importable
        raise ImportError(
            "dorafactors: a ZeRO-3 parameter needs gathering but DeepSpeed cannot be imported; "
            "install the extra: pip install 'dorafactors[deepspeed]'"
        ) from exc


def _status(p: torch.Tensor) -> str:
    return getattr(getattr(p, "ds_status", None), "name", "")


def _is_full(p: torch.Tensor) -> bool:
    return p.data.numel() == p.ds_numel


def _collect(base_layer: nn.Module, factors: tuple[Any, ...]):
    """(label, parameter) pairs, unique, in a fixed order; and (label, view, root) for bare tensors."""
    params: list[tuple[str, torch.Tensor]] = []
    views: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    seen: set[int] = set()

    def add(label: str, p: torch.Tensor) -> None:
        if id(p) not in seen:
            seen.add(id(p))
            params.append((label, p))

    for owner, item in (("base_layer", base_layer), *((f"factor{i}", f) for i, f in enumerate(factors))):
        if item is None:
            continue
        if isinstance(item, nn.Module):
            for name, p in item.named_parameters():
                add(f"{owner}.{name}", p)
        elif isinstance(item, torch.Tensor):
            root = _root(item)
            if root is not item:
                views.append((owner, item, root))
            add(owner, root)
    return params, views


def _fail_message(failures: list[str]) -> str:
    return (
        "dorafactors: ZeRO-3 partial gather: could not make full [" + "; ".join(failures) + "]. The DoRA norm "
        "would mix gathered and partitioned parameters and be wrong."
    )


def enter_gather(stack: contextlib.ExitStack, base_layer: nn.Module, factors: tuple[Any, ...]) -> list[str] | None:
    """Gather what the norm reads into ``stack``; ``None`` when ZeRO-3 is not involved, else what was gathered."""
    params, views = _collect(base_layer, factors)
    if not zero3_active([p for _, p in params]):
        return None
    zparams = [(label, p) for label, p in params if is_zero_param(p)]
    if not zparams:
        return None

    failures: list[str] = []
    failed: set[str] = set()
    done: list[str] = []

    def fail(label: str, why: str) -> None:
        failed.add(label)
        failures.append(f"{label} ({why})")

    for label, view, root in views:
        if is_zero_param(root) and view.numel() == 0 and root.ds_numel > 0:
            fail(label, "a view taken while its parameter was partitioned")

    to_gather = [(label, p) for label, p in zparams if _status(p) == "NOT_AVAILABLE"]
    in_flight = [(label, p) for label, p in zparams if _status(p) == "INFLIGHT"]
    if to_gather:
        gathered_cls = _api().GatheredParameters
        try:
            stack.enter_context(gathered_cls([p for _, p in to_gather], modifier_rank=None))
            done.extend(label for label, _ in to_gather)
        except (TypeError, AttributeError, RuntimeError) as exc:
            logger.debug(
                "dorafactors: one-call ZeRO-3 gather failed (%s: %s); gathering per parameter", type(exc).__name__, exc
            )
            for label, p in to_gather:
                try:
                    stack.enter_context(gathered_cls([p], modifier_rank=None))
                    done.append(label)
                except (TypeError, AttributeError, RuntimeError) as one_exc:
                    fail(label, f"{type(one_exc).__name__}: {one_exc}")
    for label, p in in_flight:
        try:
            stack.enter_context(_read_in_flight(p))
            done.append(f"{label} (in flight)")
        except (TypeError, AttributeError, RuntimeError) as exc:
            fail(label, f"{type(exc).__name__}: {exc}")

    for label, p in zparams:
        if label not in failed and not _is_full(p):
            fail(label, f"still partitioned: {p.data.numel()} of {p.ds_numel} elements")

    if failures:
        message = _fail_message(failures)
        if not config.allow_partial_gather():
            raise RuntimeError(message + " Set PEFT_DORA_ALLOW_PARTIAL_GATHER=1 to continue anyway (at your own risk).")
        if message not in _warned:
            _warned.add(message)
            logger.warning("%s Continuing because PEFT_DORA_ALLOW_PARTIAL_GATHER=1.", message)
    return done


def _gather_partitions(p: torch.Tensor) -> torch.Tensor:
    """A fresh full copy of ZeRO-3 parameter ``p`` from every rank's partition (``ds_tensor``)."""
    part = getattr(p, "ds_tensor", None)
    if part is None:
        raise RuntimeError("no local partition")
    if hasattr(part, "ds_quant_scale"):
        raise RuntimeError("quantized partition (ZeRO++ qwZ) is not supported while in flight")
    if getattr(getattr(part, "status", None), "name", "") == "NOT_AVAILABLE":
        raise RuntimeError("partition is swapped out to NVMe")
    group = p.ds_process_group
    world = torch.distributed.get_world_size(group)
    device = p.data.device
    local = part.detach().reshape(-1).to(device=device).contiguous()
    if local.numel() * world < p.ds_numel:
        raise RuntimeError(f"partitions hold {local.numel() * world} elements, the parameter {p.ds_numel}")
    out = torch.empty(local.numel() * world, dtype=local.dtype, device=device)
    # torch >= 2.13 renames all_gather_into_tensor to all_gather_single (same signature)
    all_gather = getattr(torch.distributed, "all_gather_single", None) or torch.distributed.all_gather_into_tensor
    all_gather(out, local, group=group)
    return out[: p.ds_numel].view(p.ds_shape)


@contextlib.contextmanager
def _read_in_flight(p: torch.Tensor) -> Iterator[None]:
    full = _gather_partitions(p)
    saved = p.data
    p.data = full
    try:
        yield
    finally:
        p.data = saved
