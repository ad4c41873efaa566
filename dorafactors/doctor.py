"""``python -m dorafactors``: what a bug report needs, in one printout.

Three sections:

* versions of Python, torch (CUDA build, GPUs), Triton, PEFT, transformers, accelerate, DeepSpeed,
  bitsandbytes and dorafactors, and whether PEFT is patched in this process;
* every environment variable dorafactors reads, with its effective value and where it came from
  (``environment`` or ``default``); a malformed value is reported with the error ``patch()`` would raise,
  and unknown ``PEFT_DORA_*`` / ``DORA_*`` variables are flagged as likely typos;
* for a model (``--model``: a Hugging Face id, a local model folder or a PEFT adapter folder; default a tiny
  built-in Llama), which path each DoRA layer takes: the norm (``dense`` / ``gemm`` / ``triton`` /
  ``torch``, ``norm.engine.norm_path``), the composition in inference and in training, the folded decode
  path, the norm cache, and the rule that turned a fast path down (``dispatch/rules.py``).

Models given by name are built on the ``meta`` device (no weights are read or allocated). The decisions that
look at tensors get zero-stride stand-ins with the real shapes and dtypes on the target device
(``--device``, default CUDA when available), so even a 70B model costs no memory here.

In a running program, ``dorafactors.doctor.report(model)`` returns the same information for a live model
(the paths of its real tensors) and ``format_report`` renders it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import __version__

__all__ = ["ENV_VARIABLES", "EnvVariable", "build_model", "format_report", "main", "report"]

TINY_MODEL = "tiny"
_TINY_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SHORT_DTYPE = {
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
}


# ---------------------------------------------------------------------------------------------- environment
@dataclasses.dataclass(frozen=True)
class EnvVariable:
    """One environment variable dorafactors reads: ``effective()`` returns the value in effect."""

    name: str
    effective: Callable[[], Any]
    default: str
    meaning: str


def _env_table() -> tuple[EnvVariable, ...]:
    from .dispatch import config

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


#: The variables, built lazily (``dispatch.config`` is imported on first use).
ENV_VARIABLES: tuple[EnvVariable, ...] = ()
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
    global ENV_VARIABLES
    if not ENV_VARIABLES:
        ENV_VARIABLES = _env_table()
    rows = []
    for var in ENV_VARIABLES:
        raw = os.environ.get(var.name)
        source = "environment" if raw is not None and raw.strip() else "default"
        row = {"name": var.name, "raw": raw, "source": source, "meaning": var.meaning, "default": var.default}
        try:
            row["value"] = _render(var.effective(), var.default)
        except ValueError as exc:
            row["value"] = "INVALID"
            row["error"] = str(exc)
        rows.append(row)
    known = {var.name for var in ENV_VARIABLES}
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


# ---------------------------------------------------------------------------------------------- versions
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
        "dorafactors_path": os.path.dirname(os.path.abspath(__file__)),
    }
    return info


def _peft_status() -> dict[str, Any]:
    """Whether ``patch()`` accepts the installed PEFT (and its warning or error)."""
    from . import patching

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


# ---------------------------------------------------------------------------------------------- model
def _resolve_dtype(name: str, config: Any) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    # transformers v5 names it ``dtype`` (``torch_dtype`` is deprecated there); 4.x ``torch_dtype``
    found = getattr(config, "dtype", None) if hasattr(config, "dtype") else getattr(config, "torch_dtype", None)
    if isinstance(found, str):
        found = getattr(torch, found, None)
    return found if isinstance(found, torch.dtype) and found.is_floating_point else torch.float32


def _tiny_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )


def build_model(
    model: str = TINY_MODEL, *, dtype: str = "auto", rank: int = 16, target_modules: Sequence[str] | str | None = None
) -> tuple[torch.nn.Module, str]:
    """A PEFT DoRA model built on the meta device while PEFT is patched, and a one-line description.

    ``model``: ``"tiny"`` (a 2-layer Llama from a config), a local folder or Hugging Face id of a
    transformers model (only its config is read), or a PEFT adapter folder (its LoraConfig is used on its
    base model). ``target_modules`` defaults to the adapter's, else every Linear but the output head.
    """
    from peft import LoraConfig, PeftConfig, get_peft_model
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .patching import patched

    lora_config = None
    if model == TINY_MODEL:
        config = _tiny_config()
        targets: Any = target_modules or list(_TINY_TARGETS)
        described = "tiny built-in Llama (2 layers, hidden 128)"
    else:
        if os.path.isfile(os.path.join(model, "adapter_config.json")):
            lora_config = PeftConfig.from_pretrained(model)
            base_name = lora_config.base_model_name_or_path
            if not base_name:
                raise ValueError(f"the adapter in {model} does not name its base model (base_model_name_or_path)")
            described = f"adapter {model} on {base_name}"
            model = base_name
        else:
            described = model
        config = AutoConfig.from_pretrained(model)
        targets = target_modules or "all-linear"
    torch_dtype = _resolve_dtype(dtype, config)
    with torch.device("meta"):
        try:
            base = AutoModelForCausalLM.from_config(config)
        except ValueError:  # not a causal LM: the plain backbone
            base = AutoModel.from_config(config)
    base = base.to(torch_dtype)
    if lora_config is None:
        if isinstance(targets, str) and targets != "all-linear":
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        lora_config = LoraConfig(r=rank, lora_alpha=2 * rank, use_dora=True, target_modules=targets)
    with patched(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation notes, not ours
        peft_model = get_peft_model(base, lora_config)
    return peft_model, f"{described}, {_SHORT_DTYPE.get(torch_dtype, str(torch_dtype))}"


def _stand_in(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-stride tensor with this shape, dtype and device: one element of memory."""
    return torch.empty((), dtype=dtype, device=device).expand(*shape)


def _meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def _logical_base_weight(base_layer: torch.nn.Module) -> torch.Tensor:
    """A meta tensor with the shape and dtype of the (dequantized) base weight, without dequantizing."""
    weight = getattr(base_layer, "W_q", None)
    if not isinstance(weight, torch.Tensor):
        weight = base_layer.weight
    if weight.is_floating_point() and type(weight) in (torch.nn.Parameter, torch.Tensor):
        return _meta(weight)
    quant_state = getattr(weight, "quant_state", None)
    dtype = getattr(quant_state, "dtype", None) or getattr(base_layer, "compute_dtype", None) or torch.float16
    shape = (base_layer.out_features, base_layer.in_features)
    return torch.empty(shape, dtype=dtype, device="meta")


def _stock_base(cls: type) -> type:
    """The stock PEFT class of a DoRA layer class (ours subclass it and list it last)."""
    return cls.__bases__[-1] if cls.__module__.startswith("dorafactors.") else cls


class _Reasons:
    """Numbered footnotes: identical reasons share one number."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def mark(self, value: str, reason: str) -> str:
        if not reason:
            return value
        if reason not in self.items:
            self.items.append(reason)
        return f"{value} [{self.items.index(reason) + 1}]"


def _layer_paths(
    name: str,
    lora_layer: torch.nn.Module,
    adapter: str,
    dora_layer: torch.nn.Module,
    device: torch.device,
    tokens: int,
    decode_tokens: int,
) -> dict[str, Any]:
    """Every dispatch decision for one DoRA layer, as plain data (value and reason per decision)."""
    from peft.tuners.lora import dora as peft_dora
    from torch import nn

    from . import distributed, layers
    from .dispatch import config, rules
    from .norm import engine

    stock_cls = _stock_base(type(dora_layer))
    ours_cls = getattr(layers, stock_cls.__name__)
    ours = type(dora_layer) is ours_cls
    kind = stock_cls.__name__.removeprefix("Dora").removesuffix("Layer")
    base_layer = lora_layer.get_base_layer()
    if kind == "Embedding":
        lora_A, lora_B = lora_layer.lora_embedding_A[adapter], lora_layer.lora_embedding_B[adapter]
    else:
        lora_A, lora_B = lora_layer.lora_A[adapter].weight, lora_layer.lora_B[adapter].weight
    weight = _logical_base_weight(base_layer)
    w2, a2, b2 = ours_cls._norm_factors(dora_layer, weight, _meta(lora_A), _meta(lora_B))
    real = lora_A.device if lora_A.device.type != "meta" else device
    w2, a2, b2 = (_stand_in(t.shape, t.dtype, real) for t in (w2, a2, b2))
    d_out, d_in, rank = w2.shape[0], w2.shape[1], a2.shape[0]
    magnitude = dora_layer.weight
    row: dict[str, Any] = {
        "layer": name,
        "adapter": adapter,
        "kind": kind
        if type(base_layer) in (nn.Linear, nn.Embedding) or kind != "Linear"
        else type(base_layer).__name__,
        "implementation": "dorafactors" if ours else "stock PEFT",
        "shape": [d_out, d_in, rank],
        "dtypes": {
            "weight": str(weight.dtype).removeprefix("torch."),
            "lora": str(lora_A.dtype).removeprefix("torch."),
            "magnitude": str(magnitude.dtype).removeprefix("torch."),
        },
        "device": str(real),
    }
    if not ours:
        reason = "a stock PEFT layer: dorafactors.patch(model) converts it"
        for key in ("norm", "compose_inference", "compose_training", "decode_fold", "norm_cache"):
            row[key] = {"value": "stock", "reason": reason}
        return row

    path = engine.norm_path(w2, a2, b2)
    if path == "dense":
        reason = f"d_in {d_in} <= r {rank}: the exact dense form is as cheap"
    elif path == "torch":
        reason = rules.fused_norm_ok(w2, a2, b2)[1]
    elif path == "triton":
        reason = rules.norm_gemm_ok(w2, a2, b2)[1]  # why not the GEMM path (informational)
    else:
        reason = ""
    row["norm"] = {"value": path, "reason": reason}

    dropout = lora_layer.lora_dropout[adapter] if kind != "Embedding" else nn.Identity()
    if kind == "Embedding":
        skipped = {"value": "n/a", "reason": "embeddings: PEFT composes g * base + result itself"}
        row["compose_inference"] = row["compose_training"] = skipped
    elif not isinstance(dropout, nn.Identity):
        note = "lora_dropout > 0: PEFT passes no base output; the base is recomputed in chunks (PEFT_DORA_FWD_CHUNK_MB)"
        row["compose_inference"] = row["compose_training"] = {"value": "recompute-base", "reason": note}
    else:
        act_dtype = weight.dtype
        scale_dtype = torch.promote_types(magnitude.dtype, torch.float32)
        shape = (tokens, d_out) if kind == "Linear" else (1, d_out, tokens)
        lora_act, base_act = _stand_in(shape, lora_A.dtype, real), _stand_in(shape, act_dtype, real)
        scale = _stand_in((d_out,), scale_dtype, real)
        out_dtype = torch.promote_types(lora_A.dtype, act_dtype)
        ok, reason = rules.fused_compose_ok(lora_act, base_act, scale, out_dtype)
        row["compose_inference"] = {"value": "triton" if ok else "torch", "reason": reason}
        if ok:
            ok, reason = rules.fused_backward_ok(tokens, d_out, kind == "Linear")
        row["compose_training"] = {"value": "triton" if ok else "torch", "reason": reason}

    if kind != "Linear":
        fold = {"value": "n/a", "reason": "the decode fold is for Linear layers"}
    else:
        fold_ok, reason = rules.inference_fold_ok(decode_tokens)
        lora_B_module = lora_layer.lora_B[adapter]
        checks = (
            (not isinstance(dropout, nn.Identity), "lora_dropout > 0"),
            (type(lora_B_module) is not nn.Linear, f"lora_B is a {type(lora_B_module).__name__}, not nn.Linear"),
            (getattr(lora_B_module, "bias", None) is not None, "lora_B has a bias"),
            (lora_A.dtype != lora_B.dtype, "lora_A and lora_B dtypes differ"),
            (distributed.process_group_active(), "a torch.distributed process group is initialized"),
            (bool(getattr(peft_dora, "ENABLE_DORA_CACHING", False)), "PEFT's ENABLE_DORA_CACHING is on"),
        )
        for failed, why in checks:
            if fold_ok and failed:
                fold_ok, reason = False, why
        fold = {"value": "yes" if fold_ok else "no", "reason": reason}
    row["decode_fold"] = fold

    if config.norm_cache_verify():
        row["norm_cache"] = {"value": "verify", "reason": "PEFT_DORA_NORM_CACHE=verify (every served value checked)"}
    elif config.norm_cache_enabled():
        row["norm_cache"] = {"value": "on", "reason": ""}
    else:
        row["norm_cache"] = {"value": "off", "reason": "PEFT_DORA_NORM_CACHE=0"}
    return row


def _dora_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, str, torch.nn.Module]]:
    found = []
    for name, module in model.named_modules():
        magnitudes = getattr(module, "lora_magnitude_vector", None)
        if isinstance(magnitudes, torch.nn.ModuleDict):
            for adapter, layer in magnitudes.items():
                found.append((name, module, adapter, layer))
    return found


def model_paths(
    model: torch.nn.Module, *, device: str | torch.device | None = None, tokens: int = 4096, decode_tokens: int = 1
) -> dict[str, Any]:
    """The per-layer decisions of every DoRA layer of ``model`` (a PEFT model, live or on the meta device)."""
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    layers = [
        _layer_paths(name, lora_layer, adapter, dora_layer, target, tokens, decode_tokens)
        for name, lora_layer, adapter, dora_layer in _dora_layers(model)
    ]
    return {"tokens": tokens, "decode_tokens": decode_tokens, "target_device": str(target), "layers": layers}


def report(
    model: torch.nn.Module | str | None = TINY_MODEL,
    *,
    device: str | None = None,
    dtype: str = "auto",
    rank: int = 16,
    target_modules: Sequence[str] | str | None = None,
    tokens: int = 4096,
    decode_tokens: int = 1,
) -> dict[str, Any]:
    """Everything ``python -m dorafactors`` prints, as a dict (JSON-serializable).

    ``model``: a live PEFT model (its real tensors decide), a name for :func:`build_model`, or None (no
    model section). ``tokens``: activation rows for the compose decisions (prefill / training);
    ``decode_tokens``: rows of a decode call (the fold).
    """
    from . import patching

    info: dict[str, Any] = {"versions": versions(), "peft": _peft_status(), "environment": environment()}
    try:
        info["stock_dora_layers_alive"] = len(patching.live_stock_dora_layers())
    except ImportError:
        info["stock_dora_layers_alive"] = None
    if model is None:
        return info
    section: dict[str, Any] = {}
    invalid = [row for row in info["environment"] if "error" in row]
    if invalid:
        section["error"] = "the layer paths need valid settings: " + "; ".join(row["error"] for row in invalid)
    elif not info["peft"]["ok"]:
        section["error"] = info["peft"]["error"]
    else:
        try:
            if isinstance(model, str):
                built, described = build_model(model, dtype=dtype, rank=rank, target_modules=target_modules)
                section["description"] = described + " (built on the meta device)"
            else:
                built, section["description"] = model, f"live model {type(model).__name__}"
            section.update(model_paths(built, device=device, tokens=tokens, decode_tokens=decode_tokens))
        except Exception as exc:  # a model that cannot be built is reported, not raised
            section["error"] = f"{type(exc).__name__}: {exc}"
    info["model"] = section
    return info


# ---------------------------------------------------------------------------------------------- text
def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def format_report(info: dict[str, Any]) -> str:
    """The text ``python -m dorafactors`` prints for :func:`report`'s dict."""
    v = info["versions"]
    gpus = ", ".join(v["gpus"]) or "none"
    lines = [
        "# dorafactors doctor (python -m dorafactors): paste all of this into a bug report",
        "",
        "== versions",
        *_table(
            [
                ["python", f"{v['python']} ({v['platform']})"],
                [
                    "torch",
                    f"{v['torch']} (CUDA build {v['cuda_build'] or 'none'}, CUDA available: {v['cuda_available']})",
                ],
                ["GPUs", gpus],
                *[
                    [name, v[name] or "not installed"]
                    for name in ("triton", "peft", "transformers", "accelerate", "deepspeed", "bitsandbytes")
                ],
                ["dorafactors", f"{v['dorafactors']} ({v['dorafactors_path']})"],
            ]
        ),
        "",
        "== PEFT",
    ]
    peft = info["peft"]
    lines.append(f"tested releases: {peft['tested']}")
    if peft["ok"]:
        lines.append("patch() accepts it" + (f", with a warning: {peft['warning']}" if peft.get("warning") else ""))
    else:
        lines.append(f"patch() refuses it: {peft['error']}")
    lines.append(f"PEFT patched in this process: {'yes' if peft['patched'] else 'no'}")
    alive = info.get("stock_dora_layers_alive")
    if alive:
        lines.append(f"stock PEFT DoRA layers alive in this process: {alive} (dorafactors.patch(model) converts them)")
    lines += ["", "== environment (effective value, source)"]
    env_rows = [["variable", "value", "source", "meaning"]]
    for row in info["environment"]:
        value = row["value"] if row["source"] != "environment" else f"{row['value']} (={row['raw'].strip()!r})"
        env_rows.append([row["name"], value, row["source"], row["meaning"]])
    lines += _table(env_rows)
    for row in info["environment"]:
        if "error" in row:
            lines.append(f"ERROR {row['name']}: {row['error']}")
    section = info.get("model")
    if section is not None:
        lines += ["", "== DoRA layer paths"]
        if "error" in section:
            lines.append(f"cannot evaluate the model: {section['error']}")
        else:
            lines += _format_layers(section)
    return "\n".join(lines) + "\n"


def _format_layers(section: dict[str, Any]) -> list[str]:
    lines = [
        f"model: {section['description']}",
        f"decisions for {section['target_device']} tensors, {section['tokens']} tokens per prefill / training "
        f"call, {section['decode_tokens']} per decode call; the norm cache is bypassed for sharded (FSDP / ZeRO-3) "
        "parameters (under torch.compile it runs inside the norm op)",
    ]
    if not section["layers"]:
        return [*lines, "no DoRA layers (LoraConfig(use_dora=True) and target_modules select them)"]
    reasons = _Reasons()
    rows = [
        [
            "layer",
            "kind",
            "d_out x d_in, r",
            "W / lora",
            "impl",
            "norm",
            "compose eval",
            "compose train",
            "fold",
            "cache",
        ]
    ]
    for layer in section["layers"]:
        d_out, d_in, rank = layer["shape"]
        dtypes = layer["dtypes"]
        label = layer["layer"] + ("" if layer["adapter"] == "default" else f" [{layer['adapter']}]")
        rows.append(
            [
                label,
                layer["kind"],
                f"{d_out}x{d_in}, {rank}",
                f"{_short(dtypes['weight'])}/{_short(dtypes['lora'])}",
                layer["implementation"],
                *[
                    reasons.mark(layer[key]["value"], layer[key]["reason"])
                    for key in ("norm", "compose_inference", "compose_training", "decode_fold", "norm_cache")
                ],
            ]
        )
    lines += _table(rows)
    lines.append(f"{len(section['layers'])} DoRA layers. Why a path was not taken:")
    lines += [f"  [{i}] {text}" for i, text in enumerate(reasons.items, 1)]
    return lines


def _short(dtype_name: str) -> str:
    return _SHORT_DTYPE.get(getattr(torch, dtype_name, None), dtype_name)


# ---------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dorafactors",
        description="Versions, settings and the path each DoRA layer takes: paste the output into bug reports.",
    )
    parser.add_argument(
        "--model",
        default=TINY_MODEL,
        help="'tiny' (default, built in), a Hugging Face model id or local folder (only its config is read), "
        "or a PEFT adapter folder",
    )
    parser.add_argument("--no-model", action="store_true", help="versions and settings only")
    parser.add_argument("--dtype", default="auto", choices=["auto", *_DTYPES], help="base weight dtype")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--target-modules", default=None, help="comma-separated names, or all-linear")
    parser.add_argument("--device", default=None, help="device the decisions are for (default: cuda if available)")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per prefill / training call")
    parser.add_argument("--decode-tokens", type=int, default=1, help="tokens per decode call")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    info = report(
        None if args.no_model else args.model,
        device=args.device,
        dtype=args.dtype,
        rank=args.rank,
        target_modules=args.target_modules,
        tokens=args.tokens,
        decode_tokens=args.decode_tokens,
    )
    if args.json:
        json.dump(info, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_report(info))
    return 0
