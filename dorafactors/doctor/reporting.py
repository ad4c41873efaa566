"""The doctor's report: every section gathered into one dict, and the text rendering of that dict."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .model import SHORT_DTYPE, TINY_MODEL, build_model
from .paths import DECISIONS, model_paths
from .system import environment, peft_status, versions


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
    from .. import patching

    info: dict[str, Any] = {"versions": versions(), "peft": peft_status(), "environment": environment()}
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


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def _short(dtype_name: str) -> str:
    return SHORT_DTYPE.get(getattr(torch, dtype_name, None), dtype_name)


def _format_versions(v: dict[str, Any]) -> list[str]:
    return _table(
        [
            ["python", f"{v['python']} ({v['platform']})"],
            ["torch", f"{v['torch']} (CUDA build {v['cuda_build'] or 'none'}, CUDA available: {v['cuda_available']})"],
            ["GPUs", ", ".join(v["gpus"]) or "none"],
            *[
                [name, v[name] or "not installed"]
                for name in ("triton", "peft", "transformers", "accelerate", "deepspeed", "bitsandbytes")
            ],
            ["dorafactors", f"{v['dorafactors']} ({v['dorafactors_path']})"],
        ]
    )


def _format_peft(peft: dict[str, Any], alive: int | None) -> list[str]:
    lines = [f"tested releases: {peft['tested']}"]
    if peft["ok"]:
        lines.append("patch() accepts it" + (f", with a warning: {peft['warning']}" if peft.get("warning") else ""))
    else:
        lines.append(f"patch() refuses it: {peft['error']}")
    lines.append(f"PEFT patched in this process: {'yes' if peft['patched'] else 'no'}")
    if alive:
        lines.append(f"stock PEFT DoRA layers alive in this process: {alive} (dorafactors.patch(model) converts them)")
    return lines


def _format_environment(environment_rows: list[dict[str, str]]) -> list[str]:
    rows = [["variable", "value", "source", "meaning"]]
    for row in environment_rows:
        value = row["value"] if row["source"] != "environment" else f"{row['value']} (={row['raw'].strip()!r})"
        rows.append([row["name"], value, row["source"], row["meaning"]])
    errors = [f"ERROR {row['name']}: {row['error']}" for row in environment_rows if "error" in row]
    return _table(rows) + errors


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
    header = ["layer", "kind", "d_out x d_in, r", "W / lora", "impl"]
    rows = [[*header, "norm", "compose eval", "compose train", "fold", "cache"]]
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
                *[reasons.mark(layer[key]["value"], layer[key]["reason"]) for key in DECISIONS],
            ]
        )
    lines += _table(rows)
    lines.append(f"{len(section['layers'])} DoRA layers. Why a path was not taken:")
    lines += [f"  [{i}] {text}" for i, text in enumerate(reasons.items, 1)]
    return lines


def format_report(info: dict[str, Any]) -> str:
    """The text ``python -m dorafactors`` prints for :func:`report`'s dict."""
    lines = [
        "# dorafactors doctor (python -m dorafactors): paste all of this into a bug report",
        "",
        "== versions",
        *_format_versions(info["versions"]),
        "",
        "== PEFT",
        *_format_peft(info["peft"], info.get("stock_dora_layers_alive")),
        "",
        "== environment (effective value, source)",
        *_format_environment(info["environment"]),
    ]
    section = info.get("model")
    if section is not None:
        lines += ["", "== DoRA layer paths"]
        if "error" in section:
            lines.append(f"cannot evaluate the model: {section['error']}")
        else:
            lines += _format_layers(section)
    return "\n".join(lines) + "\n"
