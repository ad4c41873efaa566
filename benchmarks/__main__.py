"""Command line: ``python -m benchmarks {run,plan,report,plot,tune} ...`` (``--help`` on each)."""

from __future__ import annotations

import argparse
import datetime as _dt
import fnmatch
import re
import sys
import warnings
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _settings(args: argparse.Namespace):
    from .harness import Settings

    return Settings.make(
        quick=args.quick,
        reps=args.reps,
        heavy_reps=args.heavy_reps,
        compile=not args.no_compile,
        compile_mode=args.compile_mode,
        device=args.device,
        seed=args.seed,
        rounds=args.rounds,
    )


def _select(args: argparse.Namespace, settings):
    from .suites import build_cases, parse_suites

    cases = build_cases(parse_suites(args.suite), settings)
    if args.case:
        cases = [c for c in cases if any(fnmatch.fnmatch(c.key, pat) or pat in c.key for pat in args.case)]
    return cases


def _default_out(settings) -> Path:
    import torch

    date = _dt.date.today().strftime("%Y%m%d")
    name = torch.cuda.get_device_name(settings.device) if settings.cuda else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if settings.quick:
        return RESULTS_DIR / "quick" / f"{slug}-{date}.json"
    return RESULTS_DIR / f"{slug}-{date}.json"


def cmd_plan(args: argparse.Namespace) -> int:
    from .harness import calibrated_estimates, order_cases

    settings = _settings(args)
    cases = order_cases(_select(args, settings))
    measured = calibrated_estimates(args.calibrate, settings.quick) if args.calibrate else {}
    total = 0.0
    per_suite: dict[str, float] = {}
    print(f"{'#':>3}  {'case':58} {'providers':44} {'est s':>7} {'cum s':>7}")
    for i, case in enumerate(cases, 1):
        est = case.estimate(measured)
        if (case.optional and not settings.compile) or (settings.quick and case.skip_quick):
            est = 0.0
        total += est
        per_suite[case.suite + (" (compile)" if case.optional else "")] = (
            per_suite.get(case.suite + (" (compile)" if case.optional else ""), 0.0) + est
        )
        src = "*" if case.key in measured else ""
        print(f"{i:>3}  {case.key:58} {','.join(case.providers)[:44]:44} {est:7.1f}{src:1} {total:7.0f}")
    print()
    for suite, seconds in per_suite.items():
        print(f"  {suite:18} ~{seconds:6.0f} s")
    print(f"  {'total':18} ~{total:6.0f} s (~{total / 60:.1f} min) + ~20 s start-up (imports, base model)")
    if measured:
        print("  (* = measured wall time of an earlier run; the rest are priors)")
    else:
        print("  estimates are priors for an H100 at default sizes (anchors.md numbers + rooflines), not measurements")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    from .harness import ResultsFile, calibrated_estimates, run_cases

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    settings = _settings(args)
    if not settings.quick and not settings.cuda:
        print("no CUDA device: use --quick for the CPU smoke run (default sizes need a GPU)", file=sys.stderr)
        return 2
    cases = _select(args, settings)
    if not cases:
        print("no case matches --suite/--case", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else _default_out(settings)
    results = ResultsFile(out)
    estimates = calibrated_estimates(args.calibrate, settings.quick) if args.calibrate else None
    print(
        f"dorafactors benchmarks: {len(cases)} cases on {settings.device}"
        f"{' (' + torch.cuda.get_device_name(settings.device) + ')' if settings.cuda else ''}, "
        f"reps={settings.reps}, heavy reps={settings.heavy_reps}, quick={settings.quick}, "
        f"compile={'on (' + settings.compile_backend + ', ' + (settings.compile_mode or 'default') + ')' if settings.compile else 'off'}, budget={args.time_budget or 'none'} -> {out}",
        file=sys.stderr,
    )
    from . import providers

    def cleanup() -> None:
        providers.POOL.clear()
        from .suites import layer

        layer.LAYER_POOL.clear()
        providers.clear_bases()

    summary = run_cases(
        cases,
        settings,
        results,
        time_budget=args.time_budget,
        argv=sys.argv[1:] if args.argv is None else args.argv,
        progress=not args.no_progress,
        estimates=estimates,
        on_finish=cleanup,
    )
    counts = summary["counts"]
    print(
        f"done in {summary['wall_s']:.0f} s: {counts.get('ok', 0)} ok, {counts.get('error', 0)} error, "
        f"{counts.get('skipped', 0)} skipped rows -> {out} (run {summary['run_id']})\n"
        f"next: python -m benchmarks report {out} && python -m benchmarks plot {out}",
        file=sys.stderr,
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    files = [Path(f) for f in args.files] or sorted(RESULTS_DIR.glob("*.json"))
    if not files:
        print(f"no results files given and none in {RESULTS_DIR}", file=sys.stderr)
        return 2
    target = write_report(files, Path(args.output), update_json=not args.no_update_json)
    print(f"wrote {target}", file=sys.stderr)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .plot import plot_file

    written = []
    for f in args.files:
        written += plot_file(Path(f), Path(args.outdir) if args.outdir else None)
    for path in written:
        print(path)
    return 0 if written else 1


def cmd_tune(args: argparse.Namespace) -> int:
    from .tune import main as tune_main

    return tune_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def selection(p: argparse.ArgumentParser) -> None:
        p.add_argument("--suite", default="all", help="all, or a comma list of: model,decode,layer,norm,compose,ranks")
        p.add_argument(
            "--case",
            action="append",
            default=[],
            help="only cases whose key (suite:name) matches this glob/substring; repeatable",
        )
        p.add_argument("--quick", action="store_true", help="tiny CPU-sized shapes (smoke run, < 60 s on 2 CPU cores)")
        p.add_argument(
            "--reps", type=int, default=None, help="timed calls per measurement (default 20; 3 with --quick)"
        )
        p.add_argument(
            "--heavy-reps",
            type=int,
            default=None,
            help="timed calls of the gradient-accumulation steps (default 8; 3 with --quick)",
        )
        p.add_argument(
            "--rounds",
            type=int,
            default=None,
            help="interleaved rounds of the host-bound cases (eager layer and decode cases; median round kept; "
            "default 3, 1 with --quick)",
        )
        p.add_argument("--no-compile", action="store_true", help="skip the optional torch.compile cases")
        p.add_argument(
            "--compile-mode",
            default=None,
            choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs"),
            help="torch.compile mode of the compiled providers on a GPU (default: Inductor's default mode)",
        )
        p.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument(
            "--calibrate",
            nargs="*",
            default=[],
            help="earlier results files: use their measured case times as estimates",
        )

    run = sub.add_parser("run", help="run suites, append rows to a JSON results file")
    selection(run)
    run.add_argument(
        "--out",
        default=None,
        help="results file (appended to if it exists); default benchmarks/results/<gpu>-<date>.json",
    )
    run.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="skip (and record) the cases whose estimate no longer fits; interrupt a case still running at S + max(30, 0.15 S)",
    )
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--argv", default=None, help=argparse.SUPPRESS)
    run.set_defaults(func=cmd_run)

    plan = sub.add_parser("plan", help="list the cases in run order with estimated H100 seconds")
    selection(plan)
    plan.set_defaults(func=cmd_plan)

    report = sub.add_parser("report", help="compute ratios (same run only) and write RESULTS.md")
    report.add_argument("files", nargs="*", help="results files (default: benchmarks/results/*.json)")
    report.add_argument("--output", default=str(RESULTS_DIR / "RESULTS.md"))
    report.add_argument(
        "--no-update-json", action="store_true", help="do not write the ratio fields back into the files"
    )
    report.set_defaults(func=cmd_report)

    plot = sub.add_parser("plot", help="PNG charts from a results file")
    plot.add_argument("files", nargs="+")
    plot.add_argument("--outdir", default=None, help="default: <results dir>/plots/")
    plot.set_defaults(func=cmd_plot)

    tune = sub.add_parser(
        "tune",
        help="re-derive the dispatch constants and launch-heuristic choices on this GPU; prints the values",
    )
    tune.add_argument("--only", default="", help="comma list of parts: norm, compose, fold (default: all)")
    tune.add_argument("--quick", action="store_true", help="fewer shapes (a smoke run of the command)")
    tune.set_defaults(func=cmd_tune)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "argv", None) is None and argv is not None and args.command == "run":
        args.argv = list(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
