#!/usr/bin/env python
"""What the never-stale norm check costs compiled decode: compiled LoRA and dorafactors timed in turn, and
dorafactors once more with its merged norm op's check skipped (the floor of the compiled graph without it).

    python benchmarks/compiled_decode_floor.py                      # bf16 and PEFT-default, 1 token (~2 min)
    python benchmarks/compiled_decode_floor.py --with-stock         # also with compiled stock beside them
    python benchmarks/compiled_decode_floor.py --dry-run-cpu --backend aot_eager   # checks the script
    OUT=/some/dir python benchmarks/compiled_decode_floor.py        # also writes $OUT/compiled_decode_floor.json

The decode suite's ``model/<setup>/tokens=N`` case (eval, ``no_grad``, N new tokens on a KV cache of 512,
Inductor's default mode), compiled once per provider side by side (``providers.compiled_alongside``), then
timed as the decode suite times it (``harness.bench_in_turn``: turns of one untimed and four timed calls per
variant, the order reversed every other turn, the device idle and L2 flushed before each timed call):

* ``lora``: compiled LoRA;
* ``dorafactors``: compiled dorafactors as shipped;
* ``dorafactors-unchecked``: the same compiled model, its merged norm op
  (``dorafactors::refresh_weight_norms``) answering "nothing changed" without comparing anything (its memo
  check, ``norm_op._merged_memo_holds``, replaced for these calls). That is what the op would cost if the
  check were free: correct here only because nothing writes the weights between the calls, never a mode to
  run. The op still runs (its dispatch of the layers' tensors, its settings read).

``--with-stock`` also compiles stock (last) and times two phases: the three variants with stock compiled but
not called, then LoRA, dorafactors and stock in turn (what the decode suite did before it timed stock alone).

Per setup and phase (``rows["<setup>/<phase>"]``), per variant: ``ms`` (median of the CUDA-event times),
``ms_p20``, ``host_ms`` (median time until the call returned), and their ratios to LoRA;
``unchecked_calls[<setup>]``: merged-op checks the floor variant skipped (0 when no graph merged its norm
ops, e.g. another backend than Inductor: then the floor is not measured).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import providers as P  # noqa: E402  (after the path set-up of a script run)
from benchmarks.harness import Settings, collect_metadata, ratios_in_turn  # noqa: E402
from benchmarks.suites import model as M  # noqa: E402
from benchmarks.suites._workloads import Workload, _decode_fn  # noqa: E402
from dorafactors.autograd import norm_op  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--setups", default="bf16,peft-default", help="dtype setups of the model suite")
parser.add_argument("--tokens", type=int, default=1)
parser.add_argument("--turns", type=int, default=60, help="turns of one untimed and four timed calls")
parser.add_argument("--with-stock", action="store_true")
parser.add_argument("--backend", default="inductor")
parser.add_argument("--dry-run-cpu", action="store_true")

TIMED_PER_TURN = 4


class _SkippedCheck:
    """While ``on``, the merged norm op's memo check answers "nothing changed" and counts the calls."""

    def __init__(self) -> None:
        self.on = False
        self.calls = 0
        self._check = norm_op._merged_memo_holds

    def __call__(self, *args: Any, **kwargs: Any) -> bool:
        if self.on:
            self.calls += 1
            return True
        return self._check(*args, **kwargs)

    @contextlib.contextmanager
    def installed(self):
        norm_op._merged_memo_holds = self
        try:
            yield self
        finally:
            norm_op._merged_memo_holds = self._check


def time_in_turn(variants: dict[str, Any], settings: Settings, turns: int) -> dict[str, dict[str, float]]:
    """Per variant, its calls timed in turn with the others' by the decode suite's timing
    (``harness.bench_in_turn``: per turn one untimed and :data:`TIMED_PER_TURN` timed calls each, reversed
    every other turn; the variants are warm already): ``ms``, ``ms_p20``, ``host_ms`` and each one's ratio to
    ``"lora"``'s. ``variants``: name -> ``(step, context)``, ``context`` a context-manager factory entered
    around each of that variant's calls."""

    def in_context(step: Any, context: Any) -> Any:
        def call() -> None:
            with context():
                step()

        return call

    fns = {name: in_context(step, context) for name, (step, context) in variants.items()}
    return ratios_in_turn(fns, settings, turns=turns, per_turn=TIMED_PER_TURN)


def main() -> None:
    args = parser.parse_args()
    settings = Settings.make(quick=args.dry_run_cpu, device="cpu" if args.dry_run_cpu else None)
    context = 32 if args.dry_run_cpu else 512
    turns = 2 if args.dry_run_cpu else args.turns
    skipped = _SkippedCheck()
    report: dict[str, Any] = {
        "meta": collect_metadata(settings),
        "tokens": args.tokens,
        "turns": turns,
        "rows": {},
        "unchecked_calls": {},
    }
    names = ("lora", "dorafactors", "stock") if args.with_stock else ("lora", "dorafactors")
    with skipped.installed():
        for setup in args.setups.split(","):
            models = M.model_set(settings, setup, M.rank(settings), names)
            inputs = {
                "context_ids": M.token_ids(settings, 1, context, salt=11)[0],
                "new_ids": M.token_ids(settings, 1, args.tokens, salt=12)[0],
            }
            workload = Workload("decode", new_tokens=args.tokens, context=context)
            torch._dynamo.reset()
            steps = {}
            for name in names:  # stock last, as the decode suite compiles it
                model = P.get_model(models, name)
                model.eval()
                runner, _ = P.compiled_alongside(model, name, args.backend, None)
                steps[name], _ = _decode_fn(runner, model, inputs, workload)
                for _ in range(3):
                    steps[name]()

            @contextlib.contextmanager
            def unchecked():
                skipped.on = True
                try:
                    yield
                finally:
                    skipped.on = False

            plain = contextlib.nullcontext
            pair = {
                "lora": (steps["lora"], plain),
                "dorafactors": (steps["dorafactors"], plain),
                "dorafactors-unchecked": (steps["dorafactors"], unchecked),
            }
            phases = {"stock compiled, not called" if args.with_stock else "pair": pair}
            if args.with_stock:
                phases["stock in turn"] = {
                    "lora": (steps["lora"], plain),
                    "dorafactors": (steps["dorafactors"], plain),
                    "stock": (steps["stock"], plain),
                }
            before = skipped.calls
            for phase, variants in phases.items():
                rows = time_in_turn(variants, settings, turns)
                report["rows"][f"{setup}/{phase}"] = rows
                for name, row in rows.items():
                    print(
                        f"{setup}, {args.tokens} token(s) [{phase}] {name:22s} {row['ms']:.3f} ms "
                        f"({row['ms_vs_lora']:.3f}x), p20 {row['ms_p20_vs_lora']:.3f}x, "
                        f"host {row['host_ms_vs_lora']:.3f}x"
                    )
            report["unchecked_calls"][setup] = skipped.calls - before
            print(f"{setup}: merged-op checks skipped by the floor variant: {skipped.calls - before}")
            del steps, models
            torch._dynamo.reset()
    out = os.environ.get("OUT")
    if out:
        Path(out, "compiled_decode_floor.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
