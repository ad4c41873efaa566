"""PNG charts drawn from a saved results file (matplotlib, Agg backend); nothing is re-measured.

``python -m benchmarks plot <results.json> [--outdir DIR]`` (or ``python benchmarks/plot.py <file>``) writes,
per device found in the file (latest run per case, ratios from the same run):

* ``<stem>[-<device>]-ratio-<suite>.png``: time (and peak memory) ratio to LoRA per case, model/decode/layer;
* ``...-compose-bandwidth.png``: compose GB/s of eager and dorafactors next to the copy bandwidth;
* ``...-norm-time.png``: norm time of stock / dorafactors cold / warm next to the bf16 GEMM floor;
* ``...-ranks.png``: training-step time and peak memory against the rank.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python benchmarks/plot.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from benchmarks.common import load_results
from benchmarks.report import PROVIDER_LABEL, PROVIDER_ORDER, add_ratios, latest_rows

__all__ = ["plot_file"]

_COLORS = {
    "lora": "#7f7f7f",
    "lora_dropout_floor": "#bcbd22",
    "stock": "#d62728",
    "stock_cached": "#ff9896",
    "dorafactors": "#1f77b4",
    "dorafactors_cold": "#aec7e8",
    "lora+compile": "#c7c7c7",
    "stock+compile": "#e377c2",
    "dorafactors+compile": "#17becf",
    "eager": "#d62728",
    "copy": "#2ca02c",
    "gemm_floor": "#2ca02c",
    "dorafactors_warm": "#1f77b4",
}


def _legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        ax.text(
            0.5, 0.5, "no data (e.g. no CUDA memory stats on CPU)", ha="center", va="center", transform=ax.transAxes
        )


def _ok(row: dict[str, Any] | None) -> bool:
    return bool(row) and row.get("status") == "ok"


def _by_case(rows: list[dict[str, Any]], suite: str) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        if row["suite"] == suite:
            out.setdefault(row["case"], {})[row["provider"]] = row
    return out


def _ratio_chart(rows, suite: str, path: Path, title: str) -> Path | None:
    cases = _by_case(rows, suite)
    providers = [p for p in PROVIDER_ORDER if p != "lora" and any(p in by for by in cases.values())]
    if not cases or not providers:
        return None
    names = list(cases)
    has_peak = any(_ok(r) and "peak_vs_lora" in r.get("ratios", {}) for by in cases.values() for r in by.values())
    panels = [("ms_vs_lora", "time / LoRA")] + ([("peak_vs_lora", "peak extra memory / LoRA")] if has_peak else [])
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 0.9 * len(names) + 3), 4.2 * len(panels)), squeeze=False)
    width = 0.8 / len(providers)
    for ax, (key, ylabel) in zip(axes[:, 0], panels):
        for i, provider in enumerate(providers):
            xs, ys = [], []
            for j, name in enumerate(names):
                row = cases[name].get(provider)
                value = row.get("ratios", {}).get(key) if _ok(row) else None
                if value is not None:
                    xs.append(j + (i - (len(providers) - 1) / 2) * width)
                    ys.append(value)
            if xs:
                ax.bar(xs, ys, width=width, label=PROVIDER_LABEL.get(provider, provider), color=_COLORS.get(provider))
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(1.1 if key == "ms_vs_lora" else 1.2, color="black", linewidth=0.8, linestyle="--")
        ax.set_ylabel(ylabel)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        _legend(ax)
    axes[0, 0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _compose_chart(rows, path: Path, title: str) -> Path | None:
    cases = _by_case(rows, "compose")
    peak = next((by["copy"] for name, by in cases.items() if name.startswith("copy/") and _ok(by.get("copy"))), None)
    peak_label = f"copy, {peak['case'].split('/', 1)[1]}" if peak else ""
    modes = [m for m in ("fwd", "fwd_bwd") if any(n.endswith("/" + m) for n in cases)]
    if not modes:
        return None
    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        items = []
        for name, by in cases.items():
            if not name.endswith("/" + mode):
                continue
            params = next(iter(by.values()))["params"]
            items.append((params["rows"] * params["cols"], name, by))
        items.sort()
        for provider in ("copy", "eager", "dorafactors"):
            xs, ys = [], []
            for n, _, by in items:
                row = by.get(provider)
                if _ok(row) and row["metrics"].get("gbps"):
                    xs.append(n * 2)
                    ys.append(row["metrics"]["gbps"])
            if xs:
                ax.plot(xs, ys, marker="o", label=provider, color=_COLORS.get(provider))
        if peak is not None:
            ax.axhline(peak["metrics"]["gbps"], color="black", linestyle="--", linewidth=0.8, label=peak_label)
        ax.set_xscale("log")
        ax.set_xlabel("bytes of one rows x cols bf16 tensor")
        ax.set_ylabel("nominal GB/s")
        ax.set_title(f"{title}: compose {mode}")
        _legend(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _norm_chart(rows, path: Path, title: str) -> Path | None:
    cases = _by_case(rows, "norm")
    if not cases:
        return None
    names = list(cases)
    providers = ("gemm_floor", "stock", "dorafactors_cold", "dorafactors_warm")
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(names) + 3), 4.5))
    width = 0.8 / len(providers)
    for i, provider in enumerate(providers):
        xs, ys = [], []
        for j, name in enumerate(names):
            row = cases[name].get(provider)
            if _ok(row):
                xs.append(j + (i - 1.5) * width)
                ys.append(row["metrics"]["ms"])
        if xs:
            ax.bar(
                xs,
                ys,
                width=width,
                label=provider,
                color=_COLORS.get(provider),
                alpha=0.6 if provider == "gemm_floor" else 1.0,
            )
    ax.set_yscale("log")
    ax.set_ylabel("ms (median)")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_title(f"{title}: weight norm vs the bf16 W @ A.T floor")
    _legend(ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _ranks_chart(rows, path: Path, title: str) -> Path | None:
    cases = _by_case(rows, "ranks")
    if not cases:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for provider in ("lora", "stock", "dorafactors"):
        points = []
        for by in cases.values():
            row = by.get(provider)
            if _ok(row):
                points.append((row["params"]["r"], row["metrics"].get("ms"), row["metrics"].get("peak_extra_mib")))
        points.sort()
        if not points:
            continue
        label = PROVIDER_LABEL.get(provider, provider)
        axes[0].plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label, color=_COLORS[provider])
        mem = [(p[0], p[2]) for p in points if p[2] is not None]
        if mem:
            axes[1].plot([m[0] for m in mem], [m[1] for m in mem], marker="o", label=label, color=_COLORS[provider])
    axes[0].set_ylabel("training step, ms")
    axes[1].set_ylabel("peak extra memory, MiB")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank r")
        _legend(ax)
    axes[0].set_title(f"{title}: rank sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def plot_file(path: Path, outdir: Path | None = None) -> list[Path]:
    """Draw every chart the file has data for; returns the PNG paths."""
    data = load_results(path)
    add_ratios(data["rows"])
    outdir = outdir or path.parent / "plots"
    outdir.mkdir(parents=True, exist_ok=True)
    per_device = latest_rows(data["rows"])
    written: list[Path] = []
    for label, rows in per_device.items():
        prefix = path.stem if len(per_device) == 1 else f"{path.stem}-{_slug(label)}"
        title = label
        for suite in ("model", "decode", "layer"):
            chart = _ratio_chart(rows, suite, outdir / f"{prefix}-ratio-{suite}.png", f"{title}: {suite}")
            if chart:
                written.append(chart)
        for chart in (
            _compose_chart(rows, outdir / f"{prefix}-compose-bandwidth.png", title),
            _norm_chart(rows, outdir / f"{prefix}-norm-time.png", title),
            _ranks_chart(rows, outdir / f"{prefix}-ranks.png", title),
        ):
            if chart:
                written.append(chart)
    return written


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="PNG charts from a dorafactors benchmark results file")
    parser.add_argument("files", nargs="+")
    parser.add_argument("--outdir", default=None)
    args = parser.parse_args()
    for f in args.files:
        for p in plot_file(Path(f), Path(args.outdir) if args.outdir else None):
            print(p)
