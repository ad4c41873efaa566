"""``python -m benchmarks tune``: re-derive the dispatch constants and launch-heuristic choices on this GPU.

Each part times what one decision depends on, derives the value that fits the measurements best and prints
it beside the value in the code (it edits nothing; copy a value over by hand, then re-run the tests):

* ``norm``: ``dispatch/rules.py`` ``NORM_GEMM_MIN_DIN_RANK`` / ``NORM_GEMM_MIN_MACS`` (the one-pass kernel
  against the GEMM path, per shape, bf16 adapters), ``NORM_GEMM_FP32_MIN_MACS`` (the same for fp32 adapters
  on a bf16 W) and ``kernels/row_norm_plan.py`` ``SPLIT_MIN_STEPS``, ``GRAM_SHARE``,
  ``GEMM_PATH_LOOP`` (the configs each candidate value gives, summed over the shapes). Device time from a
  CUDA-graph replay: the norm runs once per optimizer step beside the GPU-bound GEMMs of the model.
* ``compose``: ``dispatch/rules.py`` ``FUSED_BACKWARD_MIN_COLS`` / ``FUSED_BACKWARD_MIN_ELEMENTS`` (the fused
  training compose, forward that saves ``inner`` + one-pass backward, against PyTorch's eager composition,
  per rows x columns) and ``kernels/compose.py`` ``BACKWARD_PROGRAMS_PER_SM`` (the one-pass backward per
  candidate). The thresholds guard launch overhead, so that timing includes the host (``do_bench``).
* ``fold``: ``dispatch/rules.py`` ``INFERENCE_FOLD_MAX_ROWS``: a no-grad PEFT Linear call with the folded
  composition against the compose kernel, per token count (``do_bench``: decode calls are host-bound).

A derived value replaces the current one only where it saves more than ``NOISE`` of the best total time on
the measured cases; ties keep the current value. With ``$OUT`` set, ``$OUT/tune.json`` gets the
measurements and the derived values. The derivations are pure functions, tested on the CPU
(``tests/benchmarks/test_tune.py``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: A candidate must beat the current value by more than this share of the best total time to replace it.
NOISE = 0.02

PARTS = ("norm", "compose", "fold")

NORM_PATH_SHAPES = (
    *((4096, 4096, r) for r in (16, 64, 128, 256, 384, 512, 768)),
    (2048, 8192, 384),
    (8192, 8192, 384),
    (14336, 4096, 384),
    (4096, 14336, 384),
    (8192, 8192, 768),
    (8192, 28672, 16),
    (8192, 28672, 384),
)
#: Shapes of the fp32-adapter path choice (bf16 W, fp32 A and B: PEFT's default dtypes).
NORM_FP32_PATH_SHAPES = (
    (1024, 1024, 16),
    (2048, 2048, 64),
    (1024, 4096, 384),
    *((4096, 4096, r) for r in (16, 64, 384)),
    (14336, 4096, 384),
    (4096, 14336, 384),
    (8192, 8192, 384),
    (8192, 28672, 384),
)
#: Shapes of the config choices (128-wide rank tiles: what SPLIT_MIN_STEPS and GRAM_SHARE govern).
NORM_CONFIG_SHAPES = ((4096, 4096, 384), (8192, 8192, 384), (14336, 4096, 384), (4096, 14336, 384), (8192, 8192, 768))
SPLIT_MIN_STEPS_CANDIDATES = (8, 16, 32, 64, 128)
GRAM_SHARE_CANDIDATES = (2, 4, 8)
GEMM_PATH_LOOP_CANDIDATES = ((4, 32, 3), (4, 32, 4), (4, 64, 2), (8, 32, 3), (8, 64, 2))
COMPOSE_ROWS = (1, 16, 128, 1024, 4096)
COMPOSE_COLS = (256, 512, 1024, 2048, 4096, 8192)
PROGRAMS_PER_SM_CANDIDATES = (4, 8, 16, 32)
BACKWARD_SHAPES = ((4096, 8192), (8192, 8192), (16384, 8192), (8192, 4096), (8192, 14336))
FOLD_ROWS = (1, 4, 16, 64, 128, 256, 512, 1024)
SCALING = 2.0


# --------------------------------------------------------------------------------------------- derivations


@dataclasses.dataclass
class Decision:
    """One constant: where it lives, its value in the code, the value the measurements support, and why."""

    name: str
    where: str
    current: Any
    derived: Any
    evidence: str


def powers_of_two_around(values: Iterable[float]) -> list[int]:
    """Every power of two from half the smallest to twice the largest of ``values`` (threshold candidates)."""
    vals = [v for v in values if v > 0]
    lo = max(0, math.floor(math.log2(min(vals))) - 1)
    hi = math.ceil(math.log2(max(vals))) + 1
    return [1 << k for k in range(lo, hi + 1)]


def regret(samples: Sequence[dict[str, float]], takes_alt: Callable[[dict[str, float]], bool]) -> float:
    """Time lost against the per-sample best when ``takes_alt(sample)`` picks ``alt_ms`` over ``base_ms``."""
    return sum((s["alt_ms"] if takes_alt(s) else s["base_ms"]) - min(s["alt_ms"], s["base_ms"]) for s in samples)


def _pick(candidates: Sequence[Any], cost: Callable[[Any], float], current: Any, scale: float) -> tuple[Any, float]:
    """The candidate of least ``cost``; ``current`` unless another saves more than ``NOISE * scale``."""
    costs = {c: cost(c) for c in candidates}
    best = min(costs, key=lambda c: (costs[c], c != current))
    if current in costs and costs[current] - costs[best] <= NOISE * scale:
        return current, costs[current]
    return best, costs[best]


def fit_thresholds(
    samples: Sequence[dict[str, float]], current: tuple[int, int], both: bool
) -> tuple[tuple[int, int], float]:
    """Thresholds ``(tx, ty)`` of the rule "alternative path if ``x >= tx`` and (``both``) / or ``y >= ty``",
    fitted to samples ``{x, y, base_ms, alt_ms}``: the pair of powers of two (or the current pair) that loses
    the least time against the per-sample best; returns it and that time (ms).

    The GEMM norm path is an "or" rule (``d_in * r``, ``d_out * d_in * r``), the fused training compose an
    "and" rule (columns, elements).
    """
    xs = [*powers_of_two_around(s["x"] for s in samples), current[0]]
    ys = [*powers_of_two_around(s["y"] for s in samples), current[1]]
    pairs = sorted({(a, b) for a in xs for b in ys})
    combine = all if both else any

    def cost(p: tuple[int, int]) -> float:
        return regret(samples, lambda s: combine((s["x"] >= p[0], s["y"] >= p[1])))

    return _pick(pairs, cost, current, sum(min(s["alt_ms"], s["base_ms"]) for s in samples))


def fit_min_threshold(samples: Sequence[dict[str, float]], current: int) -> tuple[int, float]:
    """``T`` of the rule "alternative path for ``y >= T``" (one size threshold), fitted to ``{y, base_ms,
    alt_ms}``: the power of two (or the current value) that loses the least time against the per-sample best."""
    candidates = sorted({*powers_of_two_around(s["y"] for s in samples), current})

    def cost(t: int) -> float:
        return regret(samples, lambda s: s["y"] >= t)

    return _pick(candidates, cost, current, sum(min(s["alt_ms"], s["base_ms"]) for s in samples))


def fit_max_rows(samples: Sequence[dict[str, float]], current: int) -> tuple[int, float]:
    """``T`` of the rule "alternative path for ``rows <= T``" (the inference fold), fitted to ``{rows, ...}``."""
    candidates = sorted({0, current, *(int(s["rows"]) for s in samples)})

    def cost(t: int) -> float:
        return regret(samples, lambda s: s["rows"] <= t)

    return _pick(candidates, cost, current, sum(min(s["alt_ms"], s["base_ms"]) for s in samples))


def best_value(times: dict[Any, float], current: Any) -> tuple[Any, float]:
    """The candidate value of least total time ``times[value]``; ``current`` within the noise."""
    return _pick(list(times), times.__getitem__, current, min(times.values()))


def derive(measurements: dict[str, Any], current: dict[str, Any]) -> list[Decision]:
    """Every decision the measurements of :func:`measure` support (parts that were not measured are left out)."""
    out: list[Decision] = []
    norm = measurements.get("norm")
    if norm:
        samples = [dict(s, x=s["d_in"] * s["rank"], y=s["d_out"] * s["d_in"] * s["rank"]) for s in norm["paths"]]
        cur = (current["NORM_GEMM_MIN_DIN_RANK"], current["NORM_GEMM_MIN_MACS"])
        (tx, ty), lost = fit_thresholds(samples, cur, both=False)
        note = f"one-pass vs GEMM path on {len(samples)} shapes; {lost * 1e3:.1f} us lost to the rule"
        out.append(Decision("NORM_GEMM_MIN_DIN_RANK", "dispatch/rules.py", cur[0], tx, note))
        out.append(Decision("NORM_GEMM_MIN_MACS", "dispatch/rules.py", cur[1], ty, note))
        if norm.get("fp32_paths"):
            samples = [dict(s, y=s["d_out"] * s["d_in"] * s["rank"]) for s in norm["fp32_paths"]]
            cur_fp32 = current["NORM_GEMM_FP32_MIN_MACS"]
            value, lost = fit_min_threshold(samples, cur_fp32)
            note = f"fp32 adapters, one-pass vs GEMM path on {len(samples)} shapes; {lost * 1e3:.1f} us lost to the rule"  # fmt: skip
            out.append(Decision("NORM_GEMM_FP32_MIN_MACS", "dispatch/rules.py", cur_fp32, value, note))
        for name in ("SPLIT_MIN_STEPS", "GRAM_SHARE", "GEMM_PATH_LOOP"):
            times = {_as_value(k): v for k, v in norm["configs"][name].items()}
            value, total = best_value(times, current[name])
            note = f"{total * 1e3:.1f} us summed over {len(NORM_CONFIG_SHAPES)} shapes (current {times.get(current[name], float('nan')) * 1e3:.1f})"
            out.append(Decision(name, "kernels/row_norm_plan.py", current[name], value, note))
    compose = measurements.get("compose")
    if compose:
        samples = [dict(s, x=s["cols"], y=s["rows"] * s["cols"]) for s in compose["fused_backward"]]
        cur = (current["FUSED_BACKWARD_MIN_COLS"], current["FUSED_BACKWARD_MIN_ELEMENTS"])
        (tc, te), lost = fit_thresholds(samples, cur, both=True)
        note = f"fused vs eager training compose on {len(samples)} shapes; {lost * 1e3:.1f} us lost to the rule"
        out.append(Decision("FUSED_BACKWARD_MIN_COLS", "dispatch/rules.py", cur[0], tc, note))
        out.append(Decision("FUSED_BACKWARD_MIN_ELEMENTS", "dispatch/rules.py", cur[1], te, note))
        times = {int(k): v for k, v in compose["programs_per_sm"].items()}
        value, total = best_value(times, current["BACKWARD_PROGRAMS_PER_SM"])
        note = f"one-pass backward: {total * 1e3:.1f} us summed over {len(BACKWARD_SHAPES)} shapes"
        out.append(Decision("BACKWARD_PROGRAMS_PER_SM", "kernels/compose.py", current["BACKWARD_PROGRAMS_PER_SM"], value, note))  # fmt: skip
    fold = measurements.get("fold")
    if fold:
        value, lost = fit_max_rows(fold, current["INFERENCE_FOLD_MAX_ROWS"])
        note = f"fold vs compose kernel at {len(fold)} token counts; {lost * 1e3:.1f} us lost to the rule"
        out.append(Decision("INFERENCE_FOLD_MAX_ROWS", "dispatch/rules.py", current["INFERENCE_FOLD_MAX_ROWS"], value, note))  # fmt: skip
    return out


def jsonable(obj: Any) -> Any:
    """``obj`` with every dict key a string (candidate values are ints or int tuples); :func:`derive` reads
    both forms."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def _as_value(key: Any) -> Any:
    """JSON turns tuple keys into strings; the candidate values are ints or int tuples."""
    if isinstance(key, str):
        parts = [int(p) for p in key.strip("()[] ").split(",") if p.strip()]
        return parts[0] if len(parts) == 1 else tuple(parts)
    return key


def current_values() -> dict[str, Any]:
    """The values the code holds now."""
    from dorafactors.dispatch import rules
    from dorafactors.kernels import compose, row_norm_plan

    names = (
        "NORM_GEMM_MIN_DIN_RANK",
        "NORM_GEMM_MIN_MACS",
        "NORM_GEMM_FP32_MIN_MACS",
        "FUSED_BACKWARD_MIN_COLS",
        "FUSED_BACKWARD_MIN_ELEMENTS",
    )
    out = {n: getattr(rules, n) for n in (*names, "INFERENCE_FOLD_MAX_ROWS")}
    out.update({n: getattr(row_norm_plan, n) for n in ("SPLIT_MIN_STEPS", "GRAM_SHARE", "GEMM_PATH_LOOP")})
    out["BACKWARD_PROGRAMS_PER_SM"] = compose.BACKWARD_PROGRAMS_PER_SM
    return out


def report(decisions: Sequence[Decision]) -> str:
    lines = [f"{'constant':28} {'in':26} {'current':>18} {'derived':>18}  evidence"]
    for d in decisions:
        mark = "" if d.derived == d.current else "  <- change"
        lines.append(f"{d.name:28} {d.where:26} {d.current!s:>18} {d.derived!s:>18}  {d.evidence}{mark}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- measurements


def _graph_ms(fn: Callable[[], Any]) -> float:
    from triton.testing import do_bench_cudagraph

    fn()
    return float(do_bench_cudagraph(fn, rep=20, return_mode="median"))


def _bench_ms(fn: Callable[[], Any]) -> float:
    from triton.testing import do_bench

    fn()
    return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))


def _norm_inputs(d_out: int, d_in: int, rank: int, adapter_dtype: torch.dtype | None = None):
    import torch

    from dorafactors.kernels.row_norm import triton_row_sumsq

    dtype = torch.bfloat16 if adapter_dtype is None else adapter_dtype
    g = torch.Generator(device="cuda").manual_seed(d_out + d_in + rank)
    W = (torch.randn(d_out, d_in, device="cuda", generator=g) * 0.02).bfloat16()
    A = (torch.randn(rank, d_in, device="cuda", generator=g) / math.sqrt(d_in)).to(dtype)
    B = (torch.randn(d_out, rank, device="cuda", generator=g) * 0.01).to(dtype)
    return W, A, B, triton_row_sumsq(W)


def _time_norm_paths(
    shapes: Iterable[tuple[int, int, int]], adapter_dtype: torch.dtype | None
) -> list[dict[str, float]]:
    """The one-pass kernel (``base_ms``) against the GEMM path (``alt_ms``) per shape, adapters in
    ``adapter_dtype`` (None: bf16) on a bf16 W; device time from CUDA-graph replays."""
    from dorafactors.kernels.row_norm import gemm_weight_norm_sq, triton_weight_norm_sq

    label = "" if adapter_dtype is None else f", {str(adapter_dtype).removeprefix('torch.')} adapters"
    rows = []
    for d_out, d_in, rank in shapes:
        W, A, B, sumsq = _norm_inputs(d_out, d_in, rank, adapter_dtype)
        one_pass = functools.partial(triton_weight_norm_sq, W, A, B, SCALING, cached_sumsq=sumsq, eps=1e-6)
        gemm = functools.partial(gemm_weight_norm_sq, W, A, B, SCALING, cached_sumsq=sumsq, eps=1e-6)
        row = {"d_out": d_out, "d_in": d_in, "rank": rank, "base_ms": _graph_ms(one_pass), "alt_ms": _graph_ms(gemm)}
        print(f"norm path{label} {d_out}x{d_in} r{rank}: one-pass {row['base_ms'] * 1e3:.1f} us, GEMM path {row['alt_ms'] * 1e3:.1f} us", flush=True)  # fmt: skip
        rows.append(row)
    return rows


def measure_norm(quick: bool) -> dict[str, Any]:
    import torch

    from dorafactors.kernels import row_norm_plan
    from dorafactors.kernels.row_norm import gemm_weight_norm_sq, triton_weight_norm_sq

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    paths = _time_norm_paths(NORM_PATH_SHAPES[::3] if quick else NORM_PATH_SHAPES, None)
    fp32_paths = _time_norm_paths(NORM_FP32_PATH_SHAPES[::3] if quick else NORM_FP32_PATH_SHAPES, torch.float32)
    configs: dict[str, dict[str, float]] = {"SPLIT_MIN_STEPS": {}, "GRAM_SHARE": {}, "GEMM_PATH_LOOP": {}}
    timed: dict[tuple, float] = {}  # one timing per (shape, path, config): candidates often give the same config
    for shape in NORM_CONFIG_SHAPES[:2] if quick else NORM_CONFIG_SHAPES:
        W, A, B, sumsq = _norm_inputs(*shape)

        def time_config(path: str, cfg, shape=shape, W=W, A=A, B=B, sumsq=sumsq) -> float:
            key = (shape, path, dataclasses.astuple(cfg))
            if key not in timed:
                fn = triton_weight_norm_sq if path == "one_pass" else gemm_weight_norm_sq
                timed[key] = _graph_ms(functools.partial(fn, W, A, B, SCALING, cached_sumsq=sumsq, eps=1e-6, kernel_config=cfg))  # fmt: skip
            return timed[key]

        for value in SPLIT_MIN_STEPS_CANDIDATES:
            cfg = row_norm_plan.one_pass_config(*shape, False, sms, split_min_steps=value)
            _add(configs["SPLIT_MIN_STEPS"], value, time_config("one_pass", cfg))
        for value in GRAM_SHARE_CANDIDATES:
            cfg = row_norm_plan.one_pass_config(*shape, False, sms, gram_share=value)
            _add(configs["GRAM_SHARE"], value, time_config("one_pass", cfg))
        for value in GEMM_PATH_LOOP_CANDIDATES:
            cfg = row_norm_plan.gemm_path_config(*shape, sms, loop=value)
            _add(configs["GEMM_PATH_LOOP"], value, time_config("gemm", cfg))
        print(f"norm configs {shape}: {len(timed)} configs timed so far", flush=True)
    return {"paths": paths, "fp32_paths": fp32_paths, "configs": configs}


def _add(table: dict, key: Any, ms: float) -> None:
    table[key] = table.get(key, 0.0) + ms


def measure_compose(quick: bool) -> dict[str, Any]:
    import torch

    from dorafactors.kernels import compose as kc
    from dorafactors.kernels.compose_reference import compose_backward_reference, compose_forward_reference

    dt = torch.bfloat16
    fused_backward = []
    for rows in COMPOSE_ROWS[::2] if quick else COMPOSE_ROWS:
        for cols in COMPOSE_COLS[::2] if quick else COMPOSE_COLS:
            g = torch.Generator(device="cuda").manual_seed(rows * 7 + cols)
            lora, base, d_out = (torch.randn(rows, cols, device="cuda", generator=g).to(dt) for _ in range(3))
            scale = 0.9 + 0.2 * torch.rand(cols, device="cuda", generator=g)

            def fused(lora=lora, base=base, scale=scale, d_out=d_out):
                _, inner = kc.compose_forward_unchecked(lora, base, scale, 0.5, -1, dt, True)
                return kc.compose_backward_unchecked(d_out, scale, inner, 0.5, -1, dt, dt, True, True, True)

            def eager(lora=lora, base=base, scale=scale, d_out=d_out):
                _, inner = compose_forward_reference(lora, base, scale, 0.5, save_inner=True)
                return compose_backward_reference(d_out, scale, inner, 0.5, lora_dtype=dt, base_dtype=dt)

            row = {"rows": rows, "cols": cols, "base_ms": _bench_ms(eager), "alt_ms": _bench_ms(fused)}
            print(f"compose {rows}x{cols}: eager {row['base_ms'] * 1e3:.1f} us, fused {row['alt_ms'] * 1e3:.1f} us", flush=True)  # fmt: skip
            fused_backward.append(row)
    per_sm: dict[int, float] = {}
    default = kc.BACKWARD_PROGRAMS_PER_SM
    try:
        for rows, cols in BACKWARD_SHAPES[:2] if quick else BACKWARD_SHAPES:
            g = torch.Generator(device="cuda").manual_seed(rows + cols)
            d_out, inner = (torch.randn(rows, cols, device="cuda", generator=g).to(dt) for _ in range(2))
            scale = 0.9 + 0.2 * torch.rand(cols, device="cuda", generator=g)
            for value in PROGRAMS_PER_SM_CANDIDATES:
                kc.BACKWARD_PROGRAMS_PER_SM = value
                kc.reset_tuning()
                fn = functools.partial(kc.compose_backward_unchecked, d_out, scale, inner, 0.5, -1, dt, dt, True, True, True)  # fmt: skip
                _add(per_sm, value, _graph_ms(fn))
            print(f"compose backward {rows}x{cols}: programs per SM timed", flush=True)
    finally:
        kc.BACKWARD_PROGRAMS_PER_SM = default
        kc.reset_tuning()
    return {"fused_backward": fused_backward, "programs_per_sm": per_sm}


def measure_fold(quick: bool, dim: int = 4096, rank: int = 384) -> list[dict[str, float]]:
    import torch
    from peft import LoraConfig, get_peft_model

    import dorafactors
    from dorafactors.dispatch import rules

    class One(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(dim, dim, bias=False, device="cuda", dtype=torch.bfloat16)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"], use_dora=True, init_lora_weights=False)
    with dorafactors.patched():
        model = get_peft_model(One(), cfg).to(torch.bfloat16).eval()
    out = []
    default = rules.INFERENCE_FOLD_MAX_ROWS
    try:
        for rows in FOLD_ROWS[::2] if quick else FOLD_ROWS:
            x = torch.randn(1, rows, dim, device="cuda", dtype=torch.bfloat16)
            times = {}
            for name, limit in (("alt_ms", 1 << 30), ("base_ms", 0)):
                rules.INFERENCE_FOLD_MAX_ROWS = limit
                with torch.no_grad():
                    times[name] = _bench_ms(lambda x=x: model(x))
            out.append({"rows": rows, **times})
            print(f"fold {rows} tokens: fold {times['alt_ms'] * 1e3:.1f} us, kernel {times['base_ms'] * 1e3:.1f} us", flush=True)  # fmt: skip
    finally:
        rules.INFERENCE_FOLD_MAX_ROWS = default
    return out


def measure(parts: Sequence[str], quick: bool) -> dict[str, Any]:
    runners = {"norm": measure_norm, "compose": measure_compose, "fold": measure_fold}
    return {part: runners[part](quick) for part in parts}


# --------------------------------------------------------------------------------------------- command


def run(parts: Sequence[str], quick: bool, measure_fn: Callable[..., dict[str, Any]] = measure) -> int:
    """Measure ``parts``, print the derived values beside the current ones, save ``$OUT/tune.json``."""
    measurements = measure_fn(parts, quick)
    current = current_values()
    decisions = derive(measurements, current)
    print()
    print(report(decisions))
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "tune.json"
        payload = {"measurements": jsonable(measurements), "decisions": [dataclasses.asdict(d) for d in decisions]}
        path.write_text(json.dumps(payload, indent=1))
        print(f"wrote {path}", file=sys.stderr)
    return 0


def main(args) -> int:
    parts = [p.strip() for p in args.only.split(",") if p.strip()] if args.only else list(PARTS)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        print(f"unknown part(s) {unknown}: --only takes a comma list of {', '.join(PARTS)}", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print("python -m benchmarks tune measures kernels on a CUDA GPU", file=sys.stderr)
        return 2
    return run(parts, args.quick)
