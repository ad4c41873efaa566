"""Every environment variable dorafactors reads, parsed and validated in one place.

Values are read once (on first use), cached under a lock, and reset by :func:`invalidate_cache`.
A malformed value raises ``ValueError`` naming the variable and the values it accepts, on first use.

Boolean convention (all switches): ``1/true/yes/on`` and ``0/false/no/off``, case-insensitive,
surrounding blanks ignored. An unset or empty variable means "default"; the ternary switches also take
``auto`` for their default.

| variable                         | kind    | default        |
|----------------------------------|---------|----------------|
| ``PEFT_DORA_FUSED``              | ternary | unset = auto   |
| ``PEFT_DORA_FUSED_BACKWARD``     | ternary | unset = auto   |
| ``PEFT_DORA_NORM_CHUNK_MB``      | int     | 256 (16..65536)|
| ``PEFT_DORA_FWD_CHUNK_MB``       | int     | 256 (16..65536)|
| ``DORA_AUTOTUNE_COMPREHENSIVE``  | bool    | off            |
| ``PEFT_DORA_ALLOW_PARTIAL_GATHER`` | bool  | off            |
| ``PEFT_FORCE_GATHER``            | ternary | unset = auto   |
| ``PEFT_DORA_NORM_CACHE``         | bool or ``verify`` | on  |
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

__all__ = [
    "MAX_THRESHOLD_MB",
    "MIN_THRESHOLD_MB",
    "allow_partial_gather",
    "autotune_comprehensive",
    "cache_settings",
    "force_gather",
    "fused_backward_mode",
    "fused_mode",
    "get_dora_fwd_threshold_bytes",
    "get_dora_fwd_threshold_mb",
    "get_dora_norm_threshold_bytes",
    "get_dora_norm_threshold_mb",
    "invalidate_cache",
    "norm_cache_enabled",
    "norm_cache_mode",
    "norm_cache_verify",
    "set_dora_fwd_threshold_mb",
    "set_dora_norm_threshold_mb",
    "triton_interpreter_active",
]

MIN_THRESHOLD_MB = 16
MAX_THRESHOLD_MB = 65536
DEFAULT_THRESHOLD_MB = 256

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_BOOL_HELP = "one of 1/true/yes/on or 0/false/no/off (case-insensitive)"

_lock = threading.RLock()  # re-entrant: a combined value (cache_settings) resolves its parts under it
_cache: dict[str, Any] = {}
_T = TypeVar("_T")


def _raw(name: str) -> str | None:
    """Return the stripped value of ``name``, or None when unset or empty."""
    value = os.environ.get(name)
    if value is None:
        return None
    value = value.strip()
    return value or None


def _switch_value(name: str, value: str | None, default_help: str) -> bool | None:
    """None when ``value`` is None (unset); True/False for a boolean value; else a ValueError naming the
    variable, the boolean values and ``default_help`` (how to get the default)."""
    if value is None:
        return None
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"{name}={value!r} is not a valid value: use {_BOOL_HELP}, {default_help}.")


def _parse_ternary(name: str) -> bool | None:
    """None when unset or ``auto``; True/False when set; ValueError when malformed."""
    value = _raw(name)
    if value is not None and value.lower() == "auto":
        return None
    return _switch_value(name, value, "or auto (or unset it) for the default")


def _parse_bool(name: str, default: bool) -> bool:
    """A plain switch: ``default`` when unset; ``auto`` is not one of its values."""
    parsed = _switch_value(name, _raw(name), "or unset it for the default")
    return default if parsed is None else parsed


def _parse_threshold_mb(name: str) -> int:
    value = _raw(name)
    if value is None:
        return DEFAULT_THRESHOLD_MB
    try:
        mb = int(value, 10)
    except ValueError:
        raise ValueError(
            f"{name}={value!r} is not a valid value: use a whole number of MiB between "
            f"{MIN_THRESHOLD_MB} and {MAX_THRESHOLD_MB} (default {DEFAULT_THRESHOLD_MB})."
        ) from None
    if not MIN_THRESHOLD_MB <= mb <= MAX_THRESHOLD_MB:
        raise ValueError(
            f"{name}={value!r} is out of range: use a whole number of MiB between "
            f"{MIN_THRESHOLD_MB} and {MAX_THRESHOLD_MB} (default {DEFAULT_THRESHOLD_MB})."
        )
    return mb


def _cached(key: str, resolve: Callable[[], _T]) -> _T:
    """Double-checked cached read; a failed parse is not cached, so it raises on every use."""
    try:
        return _cache[key]
    except KeyError:
        pass
    with _lock:
        if key not in _cache:
            _cache[key] = resolve()
        return _cache[key]


def invalidate_cache() -> None:
    """Forget every cached value; the next use re-reads the environment."""
    with _lock:
        _cache.clear()


# ---------------------------------------------------------------------------------------------
# switches


def fused_mode() -> bool | None:
    """``PEFT_DORA_FUSED``: True (force on), False (off), None (auto: on where Triton can run)."""
    return _cached("PEFT_DORA_FUSED", lambda: _parse_ternary("PEFT_DORA_FUSED"))


def fused_backward_mode() -> bool | None:
    """``PEFT_DORA_FUSED_BACKWARD``: True (force, skip the shape heuristic), False (off), None (auto)."""
    return _cached("PEFT_DORA_FUSED_BACKWARD", lambda: _parse_ternary("PEFT_DORA_FUSED_BACKWARD"))


def autotune_comprehensive() -> bool:
    """``DORA_AUTOTUNE_COMPREHENSIVE``: search the full Triton config grid (slow first call)."""
    return _cached("DORA_AUTOTUNE_COMPREHENSIVE", lambda: _parse_bool("DORA_AUTOTUNE_COMPREHENSIVE", False))


def allow_partial_gather() -> bool:
    """``PEFT_DORA_ALLOW_PARTIAL_GATHER``: downgrade a partial ZeRO-3 gather from error to warning."""
    return _cached("PEFT_DORA_ALLOW_PARTIAL_GATHER", lambda: _parse_bool("PEFT_DORA_ALLOW_PARTIAL_GATHER", False))


def force_gather() -> bool | None:
    """``PEFT_FORCE_GATHER``: True (always gather), False (never), None (auto-detect ZeRO-3)."""
    return _cached("PEFT_FORCE_GATHER", lambda: _parse_ternary("PEFT_FORCE_GATHER"))


def _parse_norm_cache(name: str) -> str:
    """``"on"`` (unset, empty or true), ``"off"`` (false) or ``"verify"``; ValueError otherwise."""
    value = _raw(name)
    if value is not None and value.lower() == "verify":
        return "verify"
    try:
        return "on" if _parse_bool(name, True) else "off"
    except ValueError:
        raise ValueError(
            f"{name}={value!r} is not a valid value: use {_BOOL_HELP}, or 'verify' (recompute every cached "
            "value and raise on a mismatch), or unset it for the default (on)."
        ) from None


def norm_cache_mode() -> str:
    """``PEFT_DORA_NORM_CACHE``: ``"on"`` (default), ``"off"``, or ``"verify"``: cache as ``on``, but recompute
    every cached value when it is served and raise ``StaleNormCacheError`` naming the layer on a mismatch."""
    return _cached("PEFT_DORA_NORM_CACHE", lambda: _parse_norm_cache("PEFT_DORA_NORM_CACHE"))


def norm_cache_enabled() -> bool:
    """Reuse the detached weight norm while nothing it depends on changed (``PEFT_DORA_NORM_CACHE`` not off)."""
    return norm_cache_mode() != "off"


def norm_cache_verify() -> bool:
    """``PEFT_DORA_NORM_CACHE=verify``: check every served cached value against a recomputation."""
    return norm_cache_mode() == "verify"


class CacheSettings(NamedTuple):
    """What every cached-value lookup on a layer's hot path reads (part of its entries' signatures)."""

    norm_cache: str  #: :func:`norm_cache_mode`
    norm_chunk_mb: int  #: :func:`get_dora_norm_threshold_mb`
    fused: bool | None  #: :func:`fused_mode`


_CACHE_SETTINGS = "cache settings"


def cache_settings() -> CacheSettings:
    """:func:`norm_cache_mode`, :func:`get_dora_norm_threshold_mb` and :func:`fused_mode` in one cached read
    (a decode step reads them once per layer); reset with each of them."""
    return _cached(
        _CACHE_SETTINGS, lambda: CacheSettings(norm_cache_mode(), get_dora_norm_threshold_mb(), fused_mode())
    )


def deepspeed_zero_stage_env() -> str | None:
    """``DS_ZERO_STAGE`` as set by DeepSpeed launchers (read uncached: it may appear late)."""
    return _raw("DS_ZERO_STAGE")


def triton_interpreter_active() -> bool:
    """True when ``TRITON_INTERPRET`` asks Triton to run kernels on the CPU interpreter."""
    return _cached("TRITON_INTERPRET", lambda: _parse_bool("TRITON_INTERPRET", False))


# ---------------------------------------------------------------------------------------------
# chunk thresholds


def _check_mb(mb: object) -> int:
    if isinstance(mb, bool) or not isinstance(mb, int):
        raise ValueError(f"mb must be an integer number of MiB, got {type(mb).__name__} {mb!r}")
    if not MIN_THRESHOLD_MB <= mb <= MAX_THRESHOLD_MB:
        raise ValueError(f"mb must be between {MIN_THRESHOLD_MB} and {MAX_THRESHOLD_MB} (got {mb})")
    return mb


def set_dora_norm_threshold_mb(mb: int) -> None:
    """Set the working-set budget of the chunked norm (``PEFT_DORA_NORM_CHUNK_MB``), in MiB."""
    os.environ["PEFT_DORA_NORM_CHUNK_MB"] = str(_check_mb(mb))
    with _lock:
        _cache.pop("PEFT_DORA_NORM_CHUNK_MB", None)
        _cache.pop(_CACHE_SETTINGS, None)


def get_dora_norm_threshold_mb() -> int:
    """Current norm working-set budget in MiB."""
    return _cached("PEFT_DORA_NORM_CHUNK_MB", lambda: _parse_threshold_mb("PEFT_DORA_NORM_CHUNK_MB"))


def get_dora_norm_threshold_bytes() -> int:
    """Current norm working-set budget in bytes."""
    return get_dora_norm_threshold_mb() * 1024 * 1024


def set_dora_fwd_threshold_mb(mb: int) -> None:
    """Set the budget of the chunked base recompute (``PEFT_DORA_FWD_CHUNK_MB``), in MiB."""
    os.environ["PEFT_DORA_FWD_CHUNK_MB"] = str(_check_mb(mb))
    with _lock:
        _cache.pop("PEFT_DORA_FWD_CHUNK_MB", None)


def get_dora_fwd_threshold_mb() -> int:
    """Current forward-chunk budget in MiB."""
    return _cached("PEFT_DORA_FWD_CHUNK_MB", lambda: _parse_threshold_mb("PEFT_DORA_FWD_CHUNK_MB"))


def get_dora_fwd_threshold_bytes() -> int:
    """Current forward-chunk budget in bytes."""
    return get_dora_fwd_threshold_mb() * 1024 * 1024


def validate_all() -> None:
    """Parse every variable now (raises the first ValueError); used by ``patch()`` to fail early."""
    fused_mode()
    fused_backward_mode()
    autotune_comprehensive()
    allow_partial_gather()
    force_gather()
    norm_cache_enabled()
    get_dora_norm_threshold_mb()
    cache_settings()
    get_dora_fwd_threshold_mb()
