"""The doctor's first sections: versions, PEFT's status, and every environment variable dorafactors reads."""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import warnings
from collections.abc import Callable
from typing import Any

import torch

from .. import __version__


@dataclasses.dataclass(frozen=True)
class EnvVariable:
    """One environment variable dorafactors reads: ``effective()`` returns the value in effect."""

    name: str
    effective: Callable[[], Any]
    default: str
    meaning: str


@functools.cache
def env_variables() -> tuple[EnvVariable, ...]:
    """The variables, built on first use (``dispatch.config`` is imported then)."""
    from ..dispatch import config

    return (
        EnvVariable(
            "PEFT_DORA_FUSED",
            config.fused_mode,
            "auto",
            "master switch of every Triton path (auto: kernels for CUDA tensors when Triton is installed)",
        ),
        EnvVariable(
            "PEFT_DORA_FUSED_BACKWARD",
            config.fused_backward_mode,
            "auto",
            "fused training composition (auto: above the FUSED_BACKWARD_MIN_* activation size)",
        ),
        EnvVariable(
            "PEFT_DORA_NORM_CHUNK_MB",
            config.get_dora_norm_threshold_mb,
            str(config.DEFAULT_THRESHOLD_MB),
            "working-set budget of the PyTorch norm, MiB",
        ),
        EnvVariable(
            "PEFT_DORA_FWD_CHUNK_MB",
            config.get_dora_fwd_threshold_mb,
            str(config.DEFAULT_THRESHOLD_MB),
            "budget of the lora_dropout > 0 path (base recomputed in chunks), MiB",
        ),
        EnvVariable(
            "PEFT_DORA_NORM_CACHE",
            config.norm_cache_mode,
            "on",
            "reuse the norm while its inputs are unchanged (verify: recompute and compare every cached value)",
        ),
        EnvVariable(
            "DORA_AUTOTUNE_COMPREHENSIVE",
            config.autotune_comprehensive,
            "off",
            "autotune the compose kernels over a large grid (slow first call per shape)",
        ),
        EnvVariable(
            "PEFT_DORA_ALLOW_PARTIAL_GATHER",
            config.allow_partial_gather,
            "off",
            "ZeRO-3: a partial gather is a warning instead of an error",
        ),
        EnvVariable("PEFT_FORCE_GATHER", config.force_gather, "auto", "ZeRO-3 gathering (auto: detect ZeRO-3)"),
        EnvVariable(
            "TRITON_INTERPRET",
            config.triton_interpreter_active,
            "off",
            "Triton's CPU interpreter; with PEFT_DORA_FUSED=1 the kernels run on CPU tensors (tests)",
        ),
        EnvVariable(
            "DS_ZERO_STAGE", config.deepspeed_zero_stage_env, "unset", "set by DeepSpeed launchers (ZeRO stage)"
        ),
    )


_TYPO_PREFIXES = ("PEFT_DORA_", "DORA_", "PEFT_FORCE_")


def _render(value: Any, default: str) -> str:
    if value is None:
        return default
    if value is True:
        return "on"
    if value is False:
        return "off"
    return str(value)


def environment() -> list[dict[str, str]]:
    """One row per variable: name, value (effective), source (``environment`` / ``default``), meaning, and
    ``error`` for a malformed value. Unknown ``PEFT_DORA_*`` / ``DORA_*`` variables get source ``unknown``."""
    rows = []
    for var in env_variables():
        raw = os.environ.get(var.name)
        source = "environment" if raw is not None and raw.strip() else "default"
        row = {"name": var.name, "raw": raw, "source": source, "meaning": var.meaning, "default": var.default}
        try:
            row["value"] = _render(var.effective(), var.default)
        except ValueError as exc:
            row["value"] = "INVALID"
            row["error"] = str(exc)
        rows.append(row)
    known = {var.name for var in env_variables()}
    for name in sorted(os.environ):
        if name.startswith(_TYPO_PREFIXES) and name not in known:
            rows.append(
                {
                    "name": name,
                    "raw": os.environ[name],
                    "source": "unknown",
                    "value": "ignored",
                    "meaning": "not a variable dorafactors reads (a typo?)",
                    "default": "",
                }
            )
    return rows


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _module_version(name: str) -> str | None:
    """``module.__version__`` for an importable module (imported here), else None."""
    try:
        module = __import__(name)
    except Exception:  # a broken install must not stop the report
        return None
    return str(getattr(module, "__version__", _dist_version(name)))


def versions() -> dict[str, Any]:
    """Versions of everything that decides dorafactors' behaviour (None = not installed)."""
    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            gpus.append(f"{torch.cuda.get_device_name(index)} (sm_{major}{minor})")
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpus": gpus,
        "triton": _module_version("triton"),
        "peft": _module_version("peft"),
        "transformers": _module_version("transformers"),
        "accelerate": _dist_version("accelerate"),
        # DeepSpeed and bitsandbytes print banners and probe CUDA on import: read their metadata only
        "deepspeed": _dist_version("deepspeed"),
        "bitsandbytes": _dist_version("bitsandbytes"),
        "dorafactors": __version__,
        # the dorafactors package folder (this file lies in its doctor/ subpackage)
        "dorafactors_path": os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    }
    return info


def peft_status() -> dict[str, Any]:
    """Whether ``patch()`` accepts the installed PEFT (and its warning or error)."""
    from .. import patching

    status: dict[str, Any] = {"tested": patching.TESTED_PEFT, "patched": patching.is_patched()}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            saved = set(patching._warned_peft_versions)
            patching._warned_peft_versions.clear()
            try:
                patching.check_peft_version()
            finally:
                patching._warned_peft_versions.clear()
                patching._warned_peft_versions.update(saved)
        status["ok"] = True
        status["warning"] = next((str(w.message) for w in caught), None)
    except ImportError as exc:
        status["ok"] = False
        status["error"] = str(exc)
    return status
