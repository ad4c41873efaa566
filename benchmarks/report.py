"""Ratios (always within one run) and ``RESULTS.md``: one section per GPU, targets marked pass / miss.

Ratios are computed between rows of the same ``run_id`` and the same case only, never across runs or files.
They are written back into each row (``row["ratios"]``) and shown next to the absolute numbers:

* model / decode / layer / ranks: ``ms_vs_lora``, ``ms_vs_stock``, ``peak_vs_lora``, ``peak_vs_stock``, and
  where the row has them (layer, decode, model training) ``host_vs_lora``, ``host_vs_stock`` (host time), ``device_vs_lora``,
  ``device_vs_stock`` (device time), ``loop_vs_lora``, ``loop_vs_stock`` (calls back to back); a compiled provider
  (``<p>+compile``) is compared with compiled LoRA and compiled stock, and with its own eager provider
  (``ms_vs_eager``);
* norm: ``ms_vs_gemm_floor``, ``ms_vs_stock``, ``peak_vs_stock``;
* compose: ``ms_vs_eager``, ``gbps_vs_copy`` (copy of the same size), ``gbps_vs_peak_copy`` (the run's
  1 GiB copy).
"""

from __future__ import annotations

import datetime as _dt
import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .common import (
    DECODE_LAYER,
    DECODE_LAYER_SMALL,
    LAYER_SHAPES,
    QUICK_DECODE_LAYER,
    QUICK_DECODE_LAYER_SMALL,
    QUICK_LAYER_SHAPES,
    SUITE_ORDER,
    device_label,
    load_results,
    write_results,
)

__all__ = ["TARGETS", "add_ratios", "latest_rows", "render", "write_report"]

PROVIDER_ORDER = (
    "lora",
    "lora_dropout_floor",
    "stock",
    "stock_cached",
    "dorafactors",
    "dorafactors_cold",
    "lora+compile",
    "stock+compile",
    "dorafactors+compile",
)
PROVIDER_LABEL = {
    "lora": "LoRA",
    "lora_dropout_floor": "LoRA + base GEMM on dropped input (DoRA's dropout floor)",
    "stock": "stock DoRA",
    "stock_cached": "stock + ENABLE_DORA_CACHING",
    "dorafactors": "dorafactors",
    "dorafactors_cold": "dorafactors (norm cache defeated)",
    "lora+compile": "LoRA compiled",
    "stock+compile": "stock compiled",
    "dorafactors+compile": "dorafactors compiled",
}

# ---------------------------------------------------------------------------------------------- ratios


def _ms(row: dict[str, Any] | None) -> float | None:
    if not row or row.get("status") != "ok":
        return None
    value = row.get("metrics", {}).get("ms")
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def _metric(row: dict[str, Any] | None, key: str) -> float | None:
    if not row or row.get("status") != "ok":
        return None
    value = row.get("metrics", {}).get(key)
    return float(value) if isinstance(value, (int, float)) else None


def _div(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def add_ratios(rows: Sequence[dict[str, Any]]) -> None:
    """Set ``row["ratios"]`` on every row from the rows of the same run and case (see module docstring)."""
    groups: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
    peak_copy: dict[str, float] = {}
    for row in rows:
        key = (row.get("run_id", ""), row["suite"], row["case"])
        groups.setdefault(key, {})[row["provider"]] = row
        if row["suite"] == "compose" and row["case"].startswith("copy/") and _metric(row, "gbps"):
            peak_copy[row.get("run_id", "")] = _metric(row, "gbps")  # type: ignore[assignment]
    for (run_id, suite, _case), by_provider in groups.items():
        for provider, row in by_provider.items():
            ratios: dict[str, float | None] = {}
            ms, peak = _ms(row), _metric(row, "peak_extra_mib")
            if suite == "compose":
                if provider != "eager":
                    ratios["ms_vs_eager"] = _div(ms, _ms(by_provider.get("eager")))
                gbps = _metric(row, "gbps")
                if provider != "copy":
                    ratios["gbps_vs_copy"] = _div(gbps, _metric(by_provider.get("copy"), "gbps"))
                ratios["gbps_vs_peak_copy"] = _div(gbps, peak_copy.get(run_id))
            elif suite == "norm":
                ratios["ms_vs_gemm_floor"] = _div(ms, _ms(by_provider.get("gemm_floor")))
                ratios["ms_vs_stock"] = _div(ms, _ms(by_provider.get("stock")))
                ratios["peak_vs_stock"] = _div(peak, _metric(by_provider.get("stock"), "peak_extra_mib"))
            else:
                eager = provider.removesuffix("+compile")
                suffix = "+compile" if eager != provider else ""
                lora, stock = by_provider.get("lora" + suffix), by_provider.get("stock" + suffix)
                ratios["ms_vs_lora"] = _div(ms, _ms(lora))
                ratios["ms_vs_stock"] = _div(ms, _ms(stock))
                ratios["peak_vs_lora"] = _div(peak, _metric(lora, "peak_extra_mib"))
                ratios["peak_vs_stock"] = _div(peak, _metric(stock, "peak_extra_mib"))
                if suffix:
                    ratios["ms_vs_eager"] = _div(ms, _ms(by_provider.get(eager)))
                for metric in ("host_us", "device_us", "loop_us"):
                    value, kind = _metric(row, metric), metric.removesuffix("_us")
                    ratios[f"{kind}_vs_lora"] = _div(value, _metric(lora, metric))
                    ratios[f"{kind}_vs_stock"] = _div(value, _metric(stock, metric))
            row["ratios"] = {k: v for k, v in ratios.items() if v is not None}


def _row_key(row: dict[str, Any]) -> tuple[str, str, bool]:
    return (row["suite"], row["case"], bool(row.get("optional")))


def latest_rows(rows: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per device: for each (suite, case, optional) the rows of the latest run that measured it.

    A case whose latest attempt was skipped falls back to the latest run that did measure it.
    """
    by_device: dict[str, dict[tuple[str, str, bool], dict[str, list[dict[str, Any]]]]] = {}
    for row in rows:
        label = device_label(row.get("meta", {}))
        runs = by_device.setdefault(label, {}).setdefault(_row_key(row), {})
        runs.setdefault(row.get("run_id", ""), []).append(row)
    out: dict[str, list[dict[str, Any]]] = {}
    for label, cases in by_device.items():
        chosen: list[dict[str, Any]] = []
        for runs in cases.values():

            def rank(item: tuple[str, list[dict[str, Any]]]) -> tuple[int, str]:
                _, rs = item
                measured = any(r.get("status") != "skipped" for r in rs)
                return (int(measured), max(r.get("meta", {}).get("timestamp", "") for r in rs))

            _, best = max(runs.items(), key=rank)
            chosen.extend(best)
        out[label] = chosen
    return out


# ---------------------------------------------------------------------------------------------- targets


def _layer_case(index: int, mode: str, quick: bool) -> str:
    d_in, d_out = (QUICK_LAYER_SHAPES if quick else LAYER_SHAPES)[index]
    return f"{d_in}->{d_out}/{mode}"


def _decode_layer_case(quick: bool, tokens: int = 1, small: bool = False) -> str:
    if small:
        d = QUICK_DECODE_LAYER_SMALL if quick else DECODE_LAYER_SMALL
    else:
        d = QUICK_DECODE_LAYER if quick else DECODE_LAYER
    return f"layer/{d}x{d}/tokens={tokens}"


#: Where each limit comes from (columns of the targets table).
LIMIT_SOURCES = ("issue 5", "issue 15", "anchors.md")

#: (label, suite, case (or a function of quick), metric, {source: limit on dorafactors / LoRA})
TARGETS: list[tuple[str, str, Any, str, dict[str, float]]] = [
    (
        "model training fwd+bwd, bf16",
        "model",
        "bf16/train_fwd_bwd",
        "ms",
        {"issue 5": 1.10, "issue 15": 1.10, "anchors.md": 1.10},
    ),
    ("model training step (grad-accum 8 + AdamW), bf16", "model", "bf16/train_step_accum8", "ms", {"issue 5": 1.10}),
    ("model inference prefill 4096, bf16", "model", "bf16/infer_prefill", "ms", {"issue 5": 1.10, "anchors.md": 1.10}),
    ("model decode 8 tokens (eval), bf16", "decode", "model/bf16/tokens=8", "ms", {"issue 5": 1.10}),
    (
        "model peak training memory, bf16",
        "model",
        "bf16/train_fwd_bwd",
        "peak",
        {"issue 5": 1.20, "issue 15": 1.30, "anchors.md": 1.20},
    ),
    (
        "model peak training memory, bf16, gradient checkpointing",
        "model",
        "bf16/train_fwd_bwd_gradckpt",
        "peak",
        {"issue 15": 1.00},
    ),
    (
        "model training fwd+bwd, bf16, lora_dropout 0.05",
        "model",
        "bf16/train_fwd_bwd_dropout0.05",
        "ms",
        {"issue 15": 1.50},
    ),
    (
        "layer 4096->4096 fwd+bwd",
        "layer",
        lambda q: _layer_case(0, "fwd_bwd", q),
        "ms",
        {"issue 5": 1.4, "issue 15": 1.4, "anchors.md": 1.4},
    ),
    (
        "layer 8192->8192 fwd+bwd",
        "layer",
        lambda q: _layer_case(1, "fwd_bwd", q),
        "ms",
        {"issue 5": 1.4, "issue 15": 1.2, "anchors.md": 1.3},
    ),
    (
        "layer 4096->14336 fwd+bwd",
        "layer",
        lambda q: _layer_case(2, "fwd_bwd", q),
        "ms",
        {"issue 5": 1.4, "issue 15": 1.2, "anchors.md": 1.3},
    ),
    (
        "layer 14336->4096 fwd+bwd",
        "layer",
        lambda q: _layer_case(3, "fwd_bwd", q),
        "ms",
        {"issue 5": 1.4, "issue 15": 1.2, "anchors.md": 1.3},
    ),
    ("model inference, PEFT default dtypes", "model", "peft-default/infer_prefill", "ms", {"anchors.md": 1.10}),
    (
        "model training fwd+bwd, PEFT default dtypes",
        "model",
        "peft-default/train_fwd_bwd",
        "ms",
        {"issue 15": 1.08, "anchors.md": 1.10},
    ),
    (
        "model peak training memory, PEFT default dtypes",
        "model",
        "peft-default/train_fwd_bwd",
        "peak",
        {"issue 15": 1.22, "anchors.md": 1.20},
    ),
    (
        "model training fwd+bwd, PEFT default dtypes, lora_dropout 0.05",
        "model",
        "peft-default/train_fwd_bwd_dropout0.05",
        "ms",
        {"issue 15": 1.80},
    ),
    (
        "model decode 8 tokens (eval), PEFT default dtypes",
        "decode",
        "model/peft-default/tokens=8",
        "ms",
        {"anchors.md": 1.10},
    ),
    ("layer 4096->4096 inference", "layer", lambda q: _layer_case(0, "infer", q), "ms", {"anchors.md": 1.3}),
    ("layer 8192->8192 inference", "layer", lambda q: _layer_case(1, "infer", q), "ms", {"anchors.md": 1.2}),
    (
        "decode: one 8192x8192 layer, 1 token (eval)",
        "decode",
        _decode_layer_case,
        "ms",
        {"issue 15": 1.2, "anchors.md": 1.2},
    ),
    (
        "decode: one 8192x8192 layer, 16 tokens (eval)",
        "decode",
        lambda q: _decode_layer_case(q, 16),
        "ms",
        {"issue 15": 1.2},
    ),
    (
        "decode: one 4096x4096 layer, 1 token (eval)",
        "decode",
        lambda q: _decode_layer_case(q, 1, small=True),
        "ms",
        {"issue 15": 1.3},
    ),
    # QDoRA (issue 16): measured, no limit set; the ratio is to QLoRA (LoRA on the same NF4 base)
    ("QDoRA training fwd+bwd, NF4 base (no limit)", "model", "qdora-nf4/train_fwd_bwd", "ms", {}),
    ("QDoRA peak training memory, NF4 base (no limit)", "model", "qdora-nf4/train_fwd_bwd", "peak", {}),
    ("QDoRA inference prefill 4096, NF4 base (no limit)", "model", "qdora-nf4/infer_prefill", "ms", {}),
]


#: Issue 17: each compiled dorafactors row against compiled LoRA (limit) and compiled stock (< 1.00x), same run.
COMPILED_TARGETS: list[tuple[str, str, str, float]] = [
    ("prefill 4096, bf16", "model", "bf16/infer_prefill", 1.05),
    ("training fwd+bwd, bf16", "model", "bf16/train_fwd_bwd", 1.10),
    ("training step (grad-accum 8 + AdamW), bf16", "model", "bf16/train_step_accum8", 1.10),
    ("prefill 4096, PEFT default dtypes", "model", "peft-default/infer_prefill", 1.05),
    ("training fwd+bwd, PEFT default dtypes", "model", "peft-default/train_fwd_bwd", 1.10),
    ("training step (grad-accum 8 + AdamW), PEFT default dtypes", "model", "peft-default/train_step_accum8", 1.10),
    ("decode 8 tokens, bf16", "decode", "model/bf16/tokens=8", 1.10),
    ("decode 1 token, bf16", "decode", "model/bf16/tokens=1", 1.10),
    ("decode 8 tokens, PEFT default dtypes", "decode", "model/peft-default/tokens=8", 1.10),
    ("decode 1 token, PEFT default dtypes", "decode", "model/peft-default/tokens=1", 1.10),
    ("decode 8 tokens, bf16, CUDA graphs", "decode", "model/bf16/tokens=8/mode=reduce-overhead", 1.10),
    ("decode 1 token, bf16, CUDA graphs", "decode", "model/bf16/tokens=1/mode=reduce-overhead", 1.10),
    (
        "decode 8 tokens, PEFT default dtypes, CUDA graphs",
        "decode",
        "model/peft-default/tokens=8/mode=reduce-overhead",
        1.10,
    ),
    (
        "decode 1 token, PEFT default dtypes, CUDA graphs",
        "decode",
        "model/peft-default/tokens=1/mode=reduce-overhead",
        1.10,
    ),
]


def _status(ratio: float | None, limit: float | None) -> str:
    if limit is None:
        return ""
    if ratio is None:
        return "not measured"
    return "**pass**" if round(ratio, 2) <= limit else "**miss**"  # as the tables show it: 2 decimals


# ---------------------------------------------------------------------------------------------- rendering


def _f(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if math.isinf(value):
        return "inf"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.{digits}g}"


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def _cell(row: dict[str, Any] | None, metric: str, ratio_key: str | None, unit: str = "") -> str:
    if row is None:
        return ""
    status = row.get("status")
    if status == "skipped":
        return "skipped"
    if status == "error":
        first = (row.get("error") or "error").splitlines()[0]
        return "error: " + first[:60].replace("|", "/")
    value = _metric(row, metric)
    text = _f(value) + unit
    if ratio_key:
        ratio = row.get("ratios", {}).get(ratio_key)
        if ratio is not None and row["provider"] not in ("lora", "lora+compile"):
            text += f" ({_x(ratio)})"
    return text


def _runs_table(rows: list[dict[str, Any]]) -> list[str]:
    runs: OrderedDict[str, dict[str, Any]] = OrderedDict()
    suites: dict[str, set[str]] = {}
    for row in sorted(rows, key=lambda r: r.get("meta", {}).get("timestamp", "")):
        run_id = row.get("run_id", "")
        runs.setdefault(run_id, row.get("meta", {}))
        suites.setdefault(run_id, set()).add(row["suite"])
    lines = [
        "| run | date (UTC) | GPU | driver | CUDA | torch | triton | peft | transformers | dorafactors | commit | suites | reps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run_id, m in runs.items():
        commit = (m.get("git_commit") or "")[:10] or f"src {m.get('source_sha', '?')}"
        if m.get("git_dirty"):
            commit += " (dirty)"
        order = [s for s in SUITE_ORDER if s in suites[run_id]]
        lines.append(
            f"| `{run_id}` | {m.get('timestamp', '')} | {m.get('gpu') or m.get('device', '')} | {m.get('driver') or '—'} "
            f"| {m.get('cuda') or '—'} | {m.get('torch')} | {m.get('triton') or '—'} | {m.get('peft')} "
            f"| {m.get('transformers')} | {m.get('dorafactors')} | {commit} | {', '.join(order)} "
            f"| {m.get('reps')} (heavy {m.get('heavy_reps')}"
            f"{', rounds ' + str(m['rounds']) if m.get('rounds', 1) > 1 else ''}) |"
        )
    return lines


def _index(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, dict[str, Any]]]:
    table: dict[tuple[str, str], dict[str, dict[str, Any]]] = OrderedDict()
    for row in rows:
        table.setdefault((row["suite"], row["case"]), {})[row["provider"]] = row
    return table


def _targets_table(rows: list[dict[str, Any]], quick: bool) -> list[str]:
    index = _index(rows)
    lines = [
        "| target | case | LoRA ms/MiB | stock | dorafactors | dorafactors / LoRA | host, device, loop / LoRA | "
        + " | ".join(LIMIT_SOURCES)
        + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(LIMIT_SOURCES),
    ]
    for label, suite, case, metric, limits in TARGETS:
        name = case(quick) if callable(case) else case
        by_provider = index.get((suite, name), {})
        key = "ms" if metric == "ms" else "peak_extra_mib"
        ratio_key = "ms_vs_lora" if metric == "ms" else "peak_vs_lora"
        df = by_provider.get("dorafactors")
        ratio = df.get("ratios", {}).get(ratio_key) if df and df.get("status") == "ok" else None
        verdicts = [
            f"<= {_x(limits[src])} {_status(ratio, limits[src])}" if src in limits else "" for src in LIMIT_SOURCES
        ]
        split = ""  # where the row has them (layer, decode, model training): what bounds the call
        if metric == "ms" and df and df.get("status") == "ok":
            ratios = df.get("ratios", {})
            parts = [ratios.get(f"{kind}_vs_lora") for kind in ("host", "device", "loop")]
            if any(part is not None for part in parts):
                split = ", ".join(_x(part) for part in parts)
        lines.append(
            f"| {label} | `{suite}:{name}` | {_cell(by_provider.get('lora'), key, None) or '—'} "
            f"| {_cell(by_provider.get('stock'), key, ratio_key) or '—'} | {_cell(df, key, None) or '—'} "
            f"| {_x(ratio)} | {split} | " + " | ".join(verdicts) + " |"
        )
    return lines


def _facts(rows: Sequence[dict[str, Any] | None], key: str, *, metric: bool = False) -> str:
    """``a / b / c``: a metric (``metric``) or an ``impl`` entry of each row, ``—`` where absent."""
    values = []
    for row in rows:
        value = _metric(row, key) if metric else (row or {}).get("impl", {}).get(key)
        values.append("—" if value is None else str(value) if isinstance(value, int) else _f(float(value)))
    return " / ".join(values)


def _compiled_targets_table(rows: list[dict[str, Any]]) -> list[str]:
    """Issue 17's targets: compiled dorafactors vs compiled LoRA and compiled stock, with the rows' compile
    facts (compile time, graph breaks, recompiles after the warm-up call)."""
    index = _index([r for r in rows if r.get("optional")])
    if not any(p.endswith("+compile") for by in index.values() for p in by):
        return []
    lines = [
        "### Targets under torch.compile",
        "",
        "Compiled dorafactors against compiled LoRA (limit) and compiled stock (must be below 1.00x), same run "
        "and backend/mode; compile time is the first call's; recompiles count graphs compiled after it. "
        "In rows marked ‡ dorafactors was timed in turn with LoRA (their `timer` says how: "
        "`benchmarks/README.md`), in the others by `do_bench` alone. A stock cell marked § was timed alone, "
        "after that timing in turn: its ratio compares timings taken at different moments on a host whose "
        "speed drifts.",
        "",
        "| target | case | LoRA compiled ms | stock compiled | dorafactors compiled | / LoRA compiled | limit "
        "| / stock compiled | compile s (LoRA / stock / dorafactors) | graph breaks (same) | recompiles (same) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, suite, name, limit in COMPILED_TARGETS:
        by = index.get((suite, name), {})
        if not by:
            continue
        lora, stock, df = (by.get(p + "+compile") for p in ("lora", "stock", "dorafactors"))
        ok = df is not None and df.get("status") == "ok"
        vs_lora = df.get("ratios", {}).get("ms_vs_lora") if ok else None
        vs_stock = df.get("ratios", {}).get("ms_vs_stock") if ok else None
        ahead = "" if vs_stock is None else (" **pass**" if vs_stock < 1.0 else " **miss**")
        trio = (lora, stock, df)
        in_turn = ok and "in turn" in str(df.get("metrics", {}).get("timer", ""))
        stock_alone = (
            in_turn
            and stock is not None
            and stock.get("status") == "ok"
            and "in turn" not in str(stock.get("metrics", {}).get("timer", ""))
        )
        stock_cell = (_cell(stock, "ms", "ms_vs_lora") or "—") + (" §" if stock_alone else "")
        lines.append(
            f"| {label}{' ‡' if in_turn else ''} | `{suite}:{name}` | {_cell(lora, 'ms', None) or '—'} | {stock_cell} "
            f"| {_cell(df, 'ms', None) or '—'} | {_x(vs_lora)} | <= {_x(limit)} {_status(vs_lora, limit)} "
            f"| {_x(vs_stock)}{ahead} | {_facts(trio, 'compile_s', metric=True)} | {_facts(trio, 'graph_breaks')} "
            f"| {_facts(trio, 'recompiles_after_warmup')} |"
        )
    return [*lines, ""]


def _providers_in(cases: dict[tuple[str, str], dict[str, dict[str, Any]]]) -> list[str]:
    present = {p for by in cases.values() for p in by}
    return [p for p in PROVIDER_ORDER if p in present] + sorted(present - set(PROVIDER_ORDER))


def _paths_note(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, set[str]] = {}
    for row in rows:
        for key in (
            "df_norm_path",
            "df_compose_fused",
            "df_compose_fused_infer",
            "df_compose_fused_train",
            "df_infer_fold",
            "decode_mode",
        ):
            value = row.get("impl", {}).get(key)
            if value is not None:
                seen.setdefault(key, set()).add(str(value))
    if not seen:
        return []
    text = "; ".join(f"`{k}` = {', '.join(sorted(v))}" for k, v in sorted(seen.items()))
    return [f"What ran (from the rows' `impl`): {text}.", ""]


def _timing_suite(suite: str, rows: list[dict[str, Any]]) -> list[str]:
    cases = _index([r for r in rows if r["suite"] == suite])
    if not cases:
        return []
    providers = _providers_in(cases)
    ms_cols = [p for p in providers]
    lines = [
        "Time, ms (median; in brackets: ratio to LoRA of the same run)",
        "",
        "| case | " + " | ".join(PROVIDER_LABEL.get(p, p) for p in ms_cols) + " | dorafactors / stock |",
        "|---|" + "---|" * (len(ms_cols) + 1),
    ]
    for (_, name), by in cases.items():
        df = by.get("dorafactors")
        vs_stock = df.get("ratios", {}).get("ms_vs_stock") if df else None
        cells = [_cell(by.get(p), "ms", "ms_vs_lora") for p in ms_cols]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_x(vs_stock)} |")
    has_peak = any(_metric(r, "peak_extra_mib") is not None for by in cases.values() for r in by.values())
    if has_peak:
        lines += [
            "",
            "Peak extra memory, MiB (in brackets: ratio to LoRA)",
            "",
            "| case | " + " | ".join(PROVIDER_LABEL.get(p, p) for p in ms_cols) + " |",
            "|---|" + "---|" * len(ms_cols),
        ]
        for (_, name), by in cases.items():
            cells = [_cell(by.get(p), "peak_extra_mib", "peak_vs_lora") for p in ms_cols]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += _per_call_table(
        cases,
        ms_cols,
        "host_us",
        "Host time to enqueue one call, µs (median; the device idle at the start of each call; in brackets: "
        "ratio to LoRA)",
    )
    lines += _per_call_table(
        cases,
        ms_cols,
        "device_us",
        "Device time of one call, µs (its work run back to back on the device: no host time, no launch gaps; "
        "in brackets: ratio to LoRA)",
    )
    lines += _per_call_table(
        cases,
        ms_cols,
        "loop_us",
        "Time per call of calls made back to back, µs (a loop of such calls: the host enqueues each while the "
        "device runs the ones before; a host-bound call costs its host time here; in brackets: ratio to LoRA)",
    )
    compile_rows = [r for by in cases.values() for r in by.values() if _metric(r, "compile_s") is not None]
    if compile_rows:
        parts = [
            f"{r['case']} {PROVIDER_LABEL.get(r['provider'], r['provider'])}: {_f(_metric(r, 'compile_s'))} s"
            + (f" ({r['impl']['graph_breaks']} graph breaks)" if "graph_breaks" in r.get("impl", {}) else "")
            + (
                f" ({r['impl']['recompiles_after_warmup']} recompiles after warm-up)"
                if r.get("impl", {}).get("recompiles_after_warmup")
                else ""
            )
            for r in compile_rows
        ]
        lines += ["", "Compile time (first call, not in the timings): " + "; ".join(parts) + "."]
    return [*lines, ""]


def _per_call_table(
    cases: dict[tuple[str, str], dict[str, dict[str, Any]]], providers: list[str], metric: str, title: str
) -> list[str]:
    """A table of ``metric`` (``host_us`` / ``device_us`` / ``loop_us``) per case and provider, with the ratio to
    LoRA (``host_vs_lora`` ...); only the providers and cases that have it; none if no row has it."""
    columns = [p for p in providers if any(_metric(by.get(p), metric) is not None for by in cases.values())]
    if not columns:
        return []
    ratio_key = metric.removesuffix("_us") + "_vs_lora"
    lines = [
        "",
        title,
        "",
        "| case | " + " | ".join(PROVIDER_LABEL.get(p, p) for p in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for (_, name), by in cases.items():
        if any(_metric(by.get(p), metric) is not None for p in columns):
            lines.append(f"| {name} | " + " | ".join(_cell(by.get(p), metric, ratio_key) for p in columns) + " |")
    return lines


def _norm_suite(rows: list[dict[str, Any]]) -> list[str]:
    cases = _index([r for r in rows if r["suite"] == "norm"])
    if not cases:
        return []
    lines = [
        "Time, ms (in brackets: ratio to the bf16 `W @ A.T` GEMM floor); relative error against fp64; peak extra MiB",
        "",
        "| case | GEMM floor | stock | dorafactors cold | dorafactors warm | cold / stock | rel. err stock | rel. err dorafactors | peak MiB stock | peak MiB dorafactors cold |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (_, name), by in cases.items():
        cold = by.get("dorafactors_cold")
        lines.append(
            f"| {name} | {_cell(by.get('gemm_floor'), 'ms', None)} | {_cell(by.get('stock'), 'ms', 'ms_vs_gemm_floor')} "
            f"| {_cell(cold, 'ms', 'ms_vs_gemm_floor')} | {_cell(by.get('dorafactors_warm'), 'ms', 'ms_vs_gemm_floor')} "
            f"| {_x(cold.get('ratios', {}).get('ms_vs_stock') if cold else None)} "
            f"| {_f(_metric(by.get('stock'), 'rel_err_vs_fp64'), 2)} | {_f(_metric(cold, 'rel_err_vs_fp64'), 2)} "
            f"| {_f(_metric(by.get('stock'), 'peak_extra_mib'))} | {_f(_metric(cold, 'peak_extra_mib'))} |"
        )
    return [*lines, ""]


def _compose_suite(rows: list[dict[str, Any]]) -> list[str]:
    cases = _index([r for r in rows if r["suite"] == "compose"])
    if not cases:
        return []
    lines: list[str] = []
    for (_, name), by in cases.items():
        if name.startswith("copy/"):
            lines.append(f"Device-to-device copy bandwidth ({name}): {_cell(by.get('copy'), 'gbps', None)} GB/s.")
            lines.append("")
    lines += [
        "ms and nominal GB/s (see `benchmarks/suites/compose.py`); in brackets: dorafactors' share of the copy bandwidth at the same size",
        "",
        "| case | copy GB/s | eager ms | eager GB/s | dorafactors ms | dorafactors GB/s | dorafactors / eager | rel. err eager | rel. err dorafactors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (_, name), by in cases.items():
        if name.startswith("copy/"):
            continue
        df = by.get("dorafactors")
        share = df.get("ratios", {}).get("gbps_vs_copy") if df else None
        df_gbps = _cell(df, "gbps", None) + (f" ({share:.0%})" if share is not None else "")
        lines.append(
            f"| {name} | {_cell(by.get('copy'), 'gbps', None)} | {_cell(by.get('eager'), 'ms', None)} "
            f"| {_cell(by.get('eager'), 'gbps', None)} | {_cell(df, 'ms', None)} | {df_gbps} "
            f"| {_x(df.get('ratios', {}).get('ms_vs_eager') if df else None)} "
            f"| {_f(_metric(by.get('eager'), 'rel_err_vs_fp64'), 2)} | {_f(_metric(df, 'rel_err_vs_fp64'), 2)} |"
        )
    return [*lines, ""]


def render(rows: list[dict[str, Any]], sources: Sequence[Path]) -> str:
    """The whole RESULTS.md text for ``rows`` (ratios must already be set)."""
    per_device = latest_rows(rows)
    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "# dorafactors benchmark results",
        "",
        f"Generated {now} by `python -m benchmarks report` from: "
        + ", ".join(f"`{_rel(p)}`" for p in sources)
        + ". Do not edit by hand: re-run the report.",
        "",
        "Providers run in one process on the same base weights and the same non-identity adapters "
        "(lora_B ~ N(0, 0.01)); timings are `triton.testing.do_bench` medians (L2 flushed); "
        "every ratio compares rows of the same run. Training rows mark the adapter weights as written before "
        "every call, so dorafactors recomputes its norm as after an optimizer step; inference and decode rows "
        "let it reuse the norm of frozen weights. How to read and reproduce: `benchmarks/README.md`.",
        "",
    ]
    ordered = sorted(per_device, key=lambda label: ("CPU" in label, label))
    for label in ordered:
        dev_rows = per_device[label]
        quick = any(r.get("meta", {}).get("quick") for r in dev_rows)
        out += [f"## {label}", ""]
        if quick or "CPU" in label:
            out += [
                "> **Smoke run on CPU (`--quick`, tiny shapes). These numbers say nothing about performance; "
                "they only show that every case and provider runs.**",
                "",
            ]
        out += [*_runs_table(dev_rows), ""]
        out += _paths_note(dev_rows)
        out += [
            "### Targets",
            "",
            "Ratio of dorafactors to plain LoRA in the same run (r=384, lora_alpha=2r; `bf16` = base and adapters "
            "bf16; `PEFT default dtypes` = bf16 base, fp32 adapters; `NF4 base` = bitsandbytes 4-bit base, fp32 adapters, "
            "LoRA on the same base). Limits from issues 5 and 15 and from anchors.md. `host, device, loop / LoRA` "
            "(layer and decode rows; host and loop on model training rows): the same ratio for the host time to enqueue one call, for the device time of "
            "one call and for the time per call of calls made back to back (what a loop of them sees); a call whose "
            "device ratio is near 1 and whose wall ratio follows the host's is bound by host time. The wall time "
            "of one such call starts after the L2 flush before it, which hides the host time spent while the flush "
            "runs from every provider alike: its ratio overstates the host-time ratio, which the loop's shows.",
            "",
            *_targets_table(dev_rows, quick),
            "",
            *_compiled_targets_table(dev_rows),
        ]
        for suite in SUITE_ORDER:
            if suite == "norm":
                body = _norm_suite(dev_rows)
            elif suite == "compose":
                body = _compose_suite(dev_rows)
            else:
                body = _timing_suite(suite, dev_rows)
            if body:
                out += [f"### {suite}", "", *body]
        problems = [r for r in dev_rows if r.get("status") in ("error", "skipped")]
        if problems:
            out += [
                "### Errors and skipped cases",
                "",
                "| suite:case | provider | status | reason |",
                "|---|---|---|---|",
            ]
            for r in problems:
                text = (r.get("error") or r.get("reason") or "").splitlines()[0][:160].replace("|", "/")
                out.append(f"| `{r['suite']}:{r['case']}` | {r['provider']} | {r['status']} | {text} |")
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def write_report(files: Sequence[Path], output: Path, *, update_json: bool = True) -> Path:
    """Compute ratios for every file (written back unless ``update_json=False``) and write ``output``."""
    all_rows: list[dict[str, Any]] = []
    for path in files:
        data = load_results(path)
        add_ratios(data["rows"])
        if update_json:
            write_results(path, data["rows"])
        all_rows.extend(data["rows"])
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render(all_rows, files))
    return output
