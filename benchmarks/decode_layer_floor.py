#!/usr/bin/env python
"""What bounds eager one-layer decode: the decode suite's ``layer/DxD/tokens=N`` cases timed in turn for PEFT's
LoRA and dorafactors layers, dorafactors with its never-stale check skipped, and bare calls of the same
operations without any layer around them.

    python benchmarks/decode_layer_floor.py                 # 4096^2 and 8192^2 at 1 token, 8192^2 at 16 (~1 min)
    python benchmarks/decode_layer_floor.py --cases 4096:1
    python benchmarks/decode_layer_floor.py --dry-run-cpu   # checks the script (tiny, not a measurement)
    OUT=/some/dir python benchmarks/decode_layer_floor.py   # also writes $OUT/decode_layer_floor.json

One bias-free ``dim x dim`` Linear, bf16 base and adapters, r=384, the harness's non-identity adapters, eval,
``no_grad``, ``tokens`` rows (the decode suite's layer cases). Variants, on the same base weight:

* ``lora``: PEFT's LoRA Linear;
* ``dorafactors``: PEFT's LoRA Linear with dorafactors' DoRA layer (as shipped: the decode fold served from its
  cache, ``layers/linear.py:_cached_fold_output``, after checking that nothing it was computed from changed);
* ``dorafactors-unchecked``: the same model with that function replaced, for these calls, by the same
  operations on the fold cached before the timing, checking nothing. Correct here only because nothing
  writes the weights between the calls: what the call would cost if the never-stale check were free, never
  a mode to run (the function's swap around each call and its reads through module attributes are timed
  with it, so this floor is if anything too high);
* ``lora-bare``: ``W x + s B (A x)`` as plain ``F.linear`` calls (PEFT's LoRA operations, no module calls);
* ``dorafactors-bare``: the fold's operations called directly (``W x``, ``A x``, then
  ``autograd/folded.py:folded_dora_output``): bitwise the layer's output.

``dorafactors / dorafactors-unchecked`` is what the check costs a call; ``dorafactors-bare / lora-bare``
shows whether the operations themselves cost more than LoRA's (they launch as many kernels).

Timing, per case: ``harness.ratios_in_turn`` as ``compiled_decode_floor.py`` (turns of one untimed and four
timed calls per variant, the order reversed every other turn, the device idle and L2 flushed before each
timed call): ``ms`` (CUDA events), ``ms_p20``, ``host_ms`` (until the call returned); and :func:`loops_in_turn`:
``loop_us``, calls made back to back (what a decode loop sees: a host-bound call costs its host time, which
the L2 flush before each event-timed call partly hides). Each with its ratio to ``lora``'s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import providers as P  # noqa: E402  (after the path set-up of a script run)
from benchmarks.harness import Settings, collect_metadata, ratios_in_turn, sync  # noqa: E402
from dorafactors.autograd.folded import folded_dora_output  # noqa: E402
from dorafactors.layers import linear  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--cases", default="4096:1,8192:1,8192:16", help="dim:tokens, comma-separated")
parser.add_argument("--rank", type=int, default=384)
parser.add_argument("--turns", type=int, default=60, help="turns of one untimed and four timed calls")
parser.add_argument("--loop-turns", type=int, default=30, help="turns of the back-to-back loops")
parser.add_argument("--loop-calls", type=int, default=20, help="calls per variant and loop turn")
parser.add_argument("--dry-run-cpu", action="store_true")

TIMED_PER_TURN = 4


def _lora_layer(model: torch.nn.Module) -> torch.nn.Module:
    """PEFT's LoRA Linear of a one-layer model."""
    return next(m for m in model.modules() if hasattr(m, "lora_A"))


def cached_fold(model: torch.nn.Module) -> Any:
    """The decode fold the dorafactors ``model``'s layer holds after a no-grad call (``FoldedLoraB``)."""
    layer = _lora_layer(model)
    fold_cache = layer.lora_magnitude_vector["default"].__dict__["_df_fold_cache_obj"]
    return fold_cache.peek("default")


@contextlib.contextmanager
def check_skipped(fold: Any, calls: list[int]):
    """Within: ``linear._cached_fold_output`` answers from ``fold`` without checking anything (counting its
    calls in ``calls[0]``): the same operations as its hit."""
    checked = linear._cached_fold_output

    def unchecked(module, active_adapter, x, result):
        calls[0] += 1
        weight_a = module.lora_A[active_adapter].weight
        return folded_dora_output(F.linear(x, weight_a), fold, result)

    linear._cached_fold_output = unchecked
    try:
        yield
    finally:
        linear._cached_fold_output = checked


def bare_steps(models: dict[str, torch.nn.Module], x: torch.Tensor, fold: Any) -> dict[str, Callable[[], Any]]:
    """``lora-bare`` and ``dorafactors-bare`` (module docstring) on the tensors of the two models' layers."""
    lora = _lora_layer(models["lora"])
    weight = lora.base_layer.weight
    lora_A, lora_B = lora.lora_A["default"].weight, lora.lora_B["default"].weight
    scaling = float(lora.scaling["default"])
    dora_A = _lora_layer(models["dorafactors"]).lora_A["default"].weight

    def lora_bare() -> torch.Tensor:
        with torch.no_grad():
            return F.linear(x, weight) + F.linear(F.linear(x, lora_A), lora_B) * scaling

    def dora_bare() -> torch.Tensor:
        with torch.no_grad():
            return folded_dora_output(F.linear(x, dora_A), fold, F.linear(x, weight))

    return {"lora-bare": lora_bare, "dorafactors-bare": dora_bare}


def loops_in_turn(fns: dict[str, Callable[[], Any]], settings: Settings, turns: int, calls: int) -> dict[str, float]:
    """Per function (warm already), microseconds per call of ``calls`` calls made back to back, from the first
    call's start until the device finished the last (``harness.loop_us``), median over ``turns`` turns of every
    function in turn (the order reversed every other turn)."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for turn in range(turns):
        for name in names if turn % 2 == 0 else names[::-1]:
            fn = fns[name]
            fn()
            sync(settings.device)
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            sync(settings.device)
            samples[name].append((time.perf_counter() - t0) / calls * 1e6)
    return {name: statistics.median(values) for name, values in samples.items()}


def run_case(settings: Settings, dim: int, tokens: int, rank: int, args: argparse.Namespace) -> dict[str, Any]:
    base = P.one_linear_base(dim, dim, settings.device, torch.bfloat16, settings.seed)
    models = {
        name: P.build_peft(
            base, name, r=rank, alpha=2 * rank, targets=("proj",), autocast_adapter_dtype=False, seed=settings.seed
        ).eval()
        for name in ("lora", "dorafactors")
    }
    gen = torch.Generator(device=settings.device).manual_seed(settings.seed + dim * 31 + dim)
    x = torch.randn(tokens, dim, generator=gen, device=settings.device, dtype=torch.bfloat16)

    def call(model: torch.nn.Module) -> Callable[[], torch.Tensor]:
        def step() -> torch.Tensor:
            with torch.no_grad():
                return model(x)

        return step

    shipped = call(models["dorafactors"])
    reference = shipped()  # builds and caches the fold
    fold = cached_fold(models["dorafactors"])
    if not fold:  # None (no entry) or the empty tuple of a declined fold
        raise RuntimeError("the dorafactors layer cached no decode fold for this case (see dispatch/rules.py)")
    unchecked_calls = [0]

    def unchecked() -> torch.Tensor:
        with check_skipped(fold, unchecked_calls):
            return shipped()

    fns: dict[str, Callable[[], Any]] = {
        "lora": call(models["lora"]),
        "dorafactors": shipped,
        "dorafactors-unchecked": unchecked,
        **bare_steps(models, x, fold),
    }
    same = {name: bool(torch.equal(fns[name](), reference)) for name in ("dorafactors-unchecked", "dorafactors-bare")}
    if not all(same.values()):
        raise RuntimeError(f"a floor variant computed something else than the layer: {same}")
    for fn in fns.values():
        for _ in range(3):
            fn()
    unchecked_calls[0] = 0
    turns = 2 if settings.quick else args.turns
    rows = ratios_in_turn(fns, settings, turns=turns, per_turn=TIMED_PER_TURN)
    loop_turns, loop_calls = (2, 3) if settings.quick else (args.loop_turns, args.loop_calls)
    loops = loops_in_turn(fns, settings, loop_turns, loop_calls)
    for name, row in rows.items():
        row["loop_us"] = loops[name]
        row["loop_us_vs_lora"] = loops[name] / loops["lora"]
    return {
        "dim": dim,
        "tokens": tokens,
        "rank": rank,
        "turns": turns,
        "loop_turns": loop_turns,
        "loop_calls": loop_calls,
        "unchecked_calls": unchecked_calls[0],
        "floors_bitwise_the_layer": same,
        "rows": rows,
    }


def main() -> None:
    args = parser.parse_args()
    settings = Settings.make(quick=args.dry_run_cpu, device="cpu" if args.dry_run_cpu else None)
    cases = [tuple(int(v) for v in case.split(":")) for case in args.cases.split(",")]
    rank = args.rank
    if args.dry_run_cpu:
        cases, rank = [(64, 1)], 8
    report: dict[str, Any] = {"meta": collect_metadata(settings), "cases": {}}
    for dim, tokens in cases:
        result = run_case(settings, dim, tokens, rank, args)
        report["cases"][f"{dim}x{dim}/tokens={tokens}"] = result
        for name, row in result["rows"].items():
            print(
                f"{dim}x{dim}, {tokens} token(s), r={rank} {name:22s} {row['ms']:.4f} ms ({row['ms_vs_lora']:.3f}x), "
                f"p20 {row['ms_p20_vs_lora']:.3f}x, host {row['host_ms'] * 1e3:.1f} us ({row['host_ms_vs_lora']:.3f}x), "
                f"loop {row['loop_us']:.1f} us ({row['loop_us_vs_lora']:.3f}x)"
            )
        if settings.cuda:
            torch.cuda.empty_cache()
    out = os.environ.get("OUT")
    if out:
        Path(out, "decode_layer_floor.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
