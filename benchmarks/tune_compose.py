#!/usr/bin/env python
"""Measure and tune the fused DoRA compose kernels on one GPU (finishes in under ~3 minutes on an H100).

    python benchmarks/tune_compose.py                 # full sweep, bf16
    python benchmarks/tune_compose.py --quick         # 4 shapes, for a smoke run
    OUT=/some/dir python benchmarks/tune_compose.py   # also writes $OUT/compose_tuning.json

What it reports:

1. Device-to-device copy bandwidth (``dst.copy_(src)``, bytes read + written): the roofline.
2. For rows x cols in {1, 16, 2048, 4096, 8192, 16384, 32768} x {4096, 8192, 14336, 28672}: every compose
   kernel variant through its production entry point (autotuned config, cached after the first call):
   out-of-place forward, forward + inner, in-place forward, one-pass backward (d_lora, d_base, d_g) and the
   frozen-magnitude backward (d_lora, d_base), plus the PyTorch eager reference (``compose_reference.py``,
   what runs when the kernels are off) for forward and backward. Times are ``triton.testing.do_bench``
   medians (L2 flushed before every run). Bytes are counted honestly: every tensor the operation must read
   once plus every tensor it must write once (``g`` and the d_g partials included); the eager columns use
   the same nominal bytes, so their GB/s is an *effective* figure (they move more). For rows <= 16 the
   device time is also taken from a CUDA graph (``do_bench_cudagraph``): there ``do_bench`` includes the
   host's launch time, which is the point of the host-overhead section.
   The autotuner's timings of every candidate config are kept in the JSON (``configs``).
3. Host overhead of a whole PEFT Linear forward at one token (eval, 8192 x 8192, bf16, r=384, adapters
   bf16): plain LoRA, stock PEFT DoRA, dorafactors DoRA. "host us" = wall time of N back-to-back calls
   without synchronizing, divided by N (what the Python side costs); "sync us" = the same with the final
   synchronize; "do_bench" and "graph" = device time per call with and without host gaps.

The compact table is printed last.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import host_us_per_call  # noqa: E402  (after the path set-up of a script run)

ROWS = (1, 16, 2048, 4096, 8192, 16384, 32768)
COLS = (4096, 8192, 14336, 28672)
QUICK = ((1, 8192), (2048, 4096), (8192, 8192), (16384, 8192))
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEADLINE_S = 130.0  # stop the sweep here (whatever is left is reported as skipped), then the host section
#: "cpu" only for ``--dry-run-cpu`` (Triton interpreter, tiny shapes, wall-clock timing): checks this script.
DEVICE = "cuda"


def _bench(fn, rep=40, warmup=10) -> float:
    if DEVICE == "cpu":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def _bench_graph(fn) -> float | None:
    if DEVICE == "cpu":
        return None
    from triton.testing import do_bench_cudagraph

    try:
        return float(do_bench_cudagraph(fn, rep=20, return_mode="median"))
    except Exception as exc:  # capture can fail (e.g. a sync inside fn); report, do not abort
        print(f"  (cuda graph failed: {type(exc).__name__}: {exc})")
        return None


def _empty_cache() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def copy_bandwidth() -> dict:
    n = 1 << 29 if DEVICE == "cuda" else 1 << 16  # 1 GiB of bf16 per tensor
    src = torch.empty(n, dtype=torch.bfloat16, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src), rep=100)
    nbytes = 2 * n * src.element_size()
    return {"bytes": nbytes, "ms": ms, "GBps": _gbps(nbytes, ms)}


def _config_timings(tuner) -> dict[str, float]:
    """The autotuner's median time per candidate config in its last tuning round."""
    timings = getattr(tuner, "configs_timings", None) or {}
    out = {}
    for cfg, t in timings.items():
        name = f"{cfg.kwargs['BLOCK_R']}x{cfg.kwargs['BLOCK_C']}/w{cfg.num_warps}/s{cfg.num_stages}"
        out[name] = float(t[0] if isinstance(t, (list, tuple)) else t)
    return out


def _chosen(tuned, comprehensive: bool, key_prefix: tuple) -> str | None:
    for key, (br, bc, w, s) in tuned.chosen[comprehensive].items():
        if key[: len(key_prefix)] == key_prefix:
            return f"{br}x{bc}/w{w}/s{s}"
    return None


def sweep_shape(R: int, C: int, dtype: torch.dtype, copy_gbps: float, comprehensive: bool) -> dict:
    from dorafactors.dispatch import config
    from dorafactors.kernels import compose as kc
    from dorafactors.kernels import compose_launch as kl
    from dorafactors.kernels.compose_reference import compose_backward_reference, compose_forward_reference

    assert config.autotune_comprehensive() == comprehensive
    es = torch.tensor([], dtype=dtype).element_size()
    gen = torch.Generator(device=DEVICE).manual_seed(R * 100003 + C)
    lora = torch.randn(R, C, device=DEVICE, generator=gen).to(dtype)
    base = torch.randn(R, C, device=DEVICE, generator=gen).to(dtype)
    d_out = torch.randn(R, C, device=DEVICE, generator=gen).to(dtype)
    g = 0.9 + 0.2 * torch.rand(C, device=DEVICE, generator=gen)
    s = 0.5
    n = R * C
    row = {"rows": R, "cols": C, "dtype": str(dtype).replace("torch.", "")}

    # correctness spot check against the reference before timing anything (this call tunes fwd_inner)
    row["autotune_ms"] = {}
    tuner = kl._FWD.tuner(comprehensive)
    tuner.configs_timings = None
    out, inner = kc.compose_forward_unchecked(lora, base, g, s, -1, dtype, True)
    _sync()
    if tuner.configs_timings:
        row["autotune_ms"]["fwd_inner"] = _config_timings(tuner)
    ref, ref_inner = compose_forward_reference(lora, base, g, s, save_inner=True)
    row["max_abs_err_vs_reference"] = max(
        float((out.float() - ref.float()).abs().max()), float((inner.float() - ref_inner.float()).abs().max())
    )
    ref = ref_inner = out = None  # free before timing

    groups, _ = kc._row_groups(R, C, lora.device, kc._ROW_GRANULE)
    part_bytes = groups * C * 4 * 2  # partial sums written once and read once
    cases = {
        "fwd": (lambda: kc.compose_forward_unchecked(lora, base, g, s, -1, dtype, False), 3 * n * es + 4 * C),
        "fwd_inner": (lambda: kc.compose_forward_unchecked(lora, base, g, s, -1, dtype, True), 4 * n * es + 4 * C),
        "inplace": (lambda: kc.compose_forward_(lora, base, g, s), 3 * n * es + 4 * C),
        "bwd": (
            lambda: kc.compose_backward_unchecked(d_out, g, inner, s, -1, dtype, dtype, True, True, True),
            4 * n * es + 4 * C * 2 + part_bytes,
        ),
        "bwd_frozen": (
            lambda: kc.compose_backward_unchecked(d_out, g, None, s, -1, dtype, dtype, True, True, False),
            3 * n * es + 4 * C,
        ),
        "eager_fwd": (lambda: compose_forward_reference(lora, base, g, s), 3 * n * es + 4 * C),
        "eager_bwd": (
            lambda: compose_backward_reference(d_out, g, inner, s, lora_dtype=dtype, base_dtype=dtype),
            4 * n * es + 4 * C * 2,
        ),
    }
    tuned_of = {"fwd": kl._FWD, "fwd_inner": kl._FWD, "inplace": kl._FWD_INPLACE, "bwd": kl._BWD_COLS}
    tuned_of["bwd_frozen"] = kl._BWD_COLS
    for name, (fn, nbytes) in cases.items():
        tuner = tuned_of[name].tuner(comprehensive) if name in tuned_of else None
        if tuner is not None:
            tuner.configs_timings = None
        fn()  # autotune (first call of this key) and compile outside the timing
        _sync()
        if tuner is not None and tuner.configs_timings:
            row["autotune_ms"][name] = _config_timings(tuner)
        ms = _bench(fn)
        entry = {"ms": ms, "bytes": nbytes, "GBps": _gbps(nbytes, ms), "pct_copy": 100 * _gbps(nbytes, ms) / copy_gbps}
        if R <= 16:
            graph_ms = _bench_graph(fn)
            entry["graph_ms"] = graph_ms
        row[name] = entry
    bucket = kl._row_bucket(R)
    row["config_fwd"] = _chosen(kl._FWD, comprehensive, (C, bucket, False, False))
    row["config_fwd_inner"] = _chosen(kl._FWD, comprehensive, (C, bucket, False, True))
    row["config_inplace"] = _chosen(kl._FWD_INPLACE, comprehensive, (C, bucket, False, False))
    row["config_bwd"] = _chosen(kl._BWD_COLS, comprehensive, (C, bucket, True, True, True))
    row["config_bwd_frozen"] = _chosen(kl._BWD_COLS, comprehensive, (C, bucket, True, True, False))
    row["row_groups"] = groups
    return row


BWD_GROUP_SHAPES = ((8192, 8192), (16384, 8192), (4096, 8192), (8192, 4096), (8192, 14336), (32768, 8192))


def sweep_bwd_groups(values, dtype, copy_gbps: float) -> list[dict]:
    """The one-pass and frozen backward for each ``BACKWARD_PROGRAMS_PER_SM`` in ``values`` (re-tuned each time).

    The row-group count sets how many programs the backward grid has (and the d_g partials' size), which
    the autotuner cannot vary: this is the knob it leaves to measurement.
    """
    from dorafactors.kernels import compose as kc
    from dorafactors.kernels import compose_launch as kl

    default = kc.BACKWARD_PROGRAMS_PER_SM
    shapes = BWD_GROUP_SHAPES if DEVICE == "cuda" else ((64, 300),)
    rows = []
    try:
        for R, C in shapes:
            es = torch.tensor([], dtype=dtype).element_size()
            gen = torch.Generator(device=DEVICE).manual_seed(R * 7 + C)
            d_out = torch.randn(R, C, device=DEVICE, generator=gen).to(dtype)
            inner = torch.randn(R, C, device=DEVICE, generator=gen).to(dtype)
            g = 0.9 + 0.2 * torch.rand(C, device=DEVICE, generator=gen)
            n = R * C
            # for reference, a copy moving the one-pass backward's bytes (read 2n, write 2n); its graph replay
            # is no yardstick (at 1 GiB and above it read ~35% slower than do_bench on an H200, s10 run 1)
            src = torch.empty(2 * n, dtype=dtype, device=DEVICE).normal_()
            copy_ms = _bench(functools.partial(torch.empty_like(src).copy_, src), rep=100)
            del src
            same_size_copy = {"bytes": 4 * n * es, "ms": copy_ms}
            for value in values:
                kc.BACKWARD_PROGRAMS_PER_SM = value
                kc.reset_tuning()
                groups, _ = kc._row_groups(R, C, d_out.device, kc._ROW_GRANULE)
                row = {"rows": R, "cols": C, "programs_per_sm": value, "row_groups": groups}
                row["same_size_copy"] = same_size_copy
                for name, need_g, nbytes in (
                    ("bwd", True, 4 * n * es + 4 * C * 2 + groups * C * 4 * 2),
                    ("bwd_frozen", False, 3 * n * es + 4 * C),
                ):
                    fn = functools.partial(
                        kc.compose_backward_unchecked,
                        *(d_out, g, inner if need_g else None, 0.5, -1, dtype, dtype, True, True, need_g),
                    )
                    fn()
                    _sync()
                    ms = _bench(fn)
                    row[name] = {"ms": ms, "GBps": _gbps(nbytes, ms), "pct_copy": 100 * _gbps(nbytes, ms) / copy_gbps}
                    graph_ms = _bench_graph(fn)
                    if graph_ms:  # device time only (graph replay), against the same 1 GiB copy rate
                        row[name].update(graph_ms=graph_ms, pct_copy_graph=100 * _gbps(nbytes, graph_ms) / copy_gbps)
                    row["config_" + name] = _chosen(kl._BWD_COLS, False, (C, kl._row_bucket(R), True, True, need_g))
                rows.append(row)
                graph = row["bwd"].get("pct_copy_graph")
                print(
                    f"  bwd {R}x{C} programs/SM {value:3d} groups {groups:4d}: one-pass "
                    f"{row['bwd']['pct_copy']:5.1f}% ({row['bwd']['ms'] * 1e3:6.1f} us, {row['config_bwd']}), "
                    f"frozen {row['bwd_frozen']['pct_copy']:5.1f}%"
                    + (f"; device time {row['bwd']['graph_ms'] * 1e3:6.1f} us = {graph:5.1f}%" if graph else ""),
                    flush=True,
                )
            _empty_cache()
    finally:
        kc.BACKWARD_PROGRAMS_PER_SM = default
        kc.reset_tuning()
    return rows


def sweep(shapes, dtype, copy_gbps, comprehensive, t_start) -> list[dict]:
    rows = []
    for R, C in shapes:
        if time.perf_counter() - t_start > DEADLINE_S:
            rows.append({"rows": R, "cols": C, "skipped": "time budget"})
            continue
        try:
            row = sweep_shape(R, C, dtype, copy_gbps, comprehensive)
        except torch.OutOfMemoryError:
            row = {"rows": R, "cols": C, "skipped": "out of memory"}
        _empty_cache()
        rows.append(row)
        done = row.get("fwd", {}).get("GBps")
        status = f"fwd {done:.0f} GB/s" if done else row.get("skipped", "")
        print(f"  {R:>6} x {C:<6} {status}", flush=True)
    return rows


def _peft_linear(use_dora: bool, patched: bool, dim: int, rank: int, dtype):
    from peft import LoraConfig, get_peft_model

    import dorafactors

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(dim, dim, bias=False, device=DEVICE, dtype=dtype)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"], use_dora=use_dora, init_lora_weights=False)
    with dorafactors.patched() if patched else contextlib.nullcontext():
        model = get_peft_model(One(), cfg)
    return model.to(dtype).eval()


def host_overhead(dtype, calls: int = 300, dim: int = 8192, rank: int = 384) -> dict:
    """Per-call host and device time of one PEFT Linear forward at one token."""
    from dorafactors.autograd.compose import dora_compose
    from dorafactors.kernels import compose as kc

    x = torch.randn(1, 1, dim, device=DEVICE, dtype=dtype)
    out = {}
    for name, use_dora, patched in (("lora", False, False), ("stock_dora", True, False), ("dorafactors", True, True)):
        model = _peft_linear(use_dora, patched, dim, rank, dtype)
        with torch.no_grad():
            host_us, sync_us = host_us_per_call(lambda m=model: m(x), calls, _sync, warmup=20)
            entry = {
                "host_us": host_us,
                "sync_us": sync_us,
                "do_bench_ms": _bench(lambda m=model: m(x), rep=50),
                "graph_ms": _bench_graph(lambda m=model: m(x)),
            }
        out[name] = entry
        del model
        _empty_cache()
    # the compose call alone, as the layer makes it (1 x dim, g fp32), host clock
    lora = torch.randn(1, 1, dim, device=DEVICE, dtype=dtype)
    base = torch.randn(1, 1, dim, device=DEVICE, dtype=dtype)
    g = torch.rand(dim, device=DEVICE) + 0.5
    with torch.no_grad():
        for label, fn in (
            ("dora_compose_call", lambda: dora_compose(lora, base, g, 2.0)),
            ("kernel_host_function", lambda: kc.compose_forward_unchecked(lora, base, g, 2.0, -1, dtype, False)),
            ("torch_empty_like", lambda: torch.empty_like(lora)),
        ):
            out[label] = {"host_us": host_us_per_call(fn, calls, _sync, warmup=50)[0]}
    return out


def _fmt_pct(entry) -> str:
    if not isinstance(entry, dict) or "GBps" not in entry:
        return "-"
    return f"{entry['GBps']:6.0f} ({entry['pct_copy']:3.0f}%)"


def print_table(result: dict) -> None:
    print()
    print(f"GPU: {result['device']}  torch {result['torch']}  triton {result['triton']}  dtype {result['dtype']}")
    cb = result["copy"]
    print(f"device-to-device copy: {cb['GBps']:.0f} GB/s (read + write)")
    print()
    cols = ("fwd", "fwd_inner", "inplace", "bwd", "bwd_frozen", "eager_fwd", "eager_bwd")
    header = f"{'rows x cols':>15} | " + " | ".join(f"{c:>14}" for c in cols) + " | fwd cfg / bwd cfg"
    print("GB/s (% of copy bandwidth); eager columns: effective GB/s at the fused kernels' byte count")
    print(header)
    print("-" * len(header))
    for row in result["compose"]:
        shape = f"{row['rows']:>6} x {row['cols']:<6}"
        if "skipped" in row:
            print(f"{shape} | skipped: {row['skipped']}")
            continue
        cells = " | ".join(f"{_fmt_pct(row.get(c)):>14}" for c in cols)
        print(f"{shape} | {cells} | {row.get('config_fwd')} / {row.get('config_bwd')}")
    small = [r for r in result["compose"] if "skipped" not in r and r["rows"] <= 16]
    if small:
        print()
        print("small shapes, microseconds per call: do_bench (incl. host launch) / CUDA graph (device only)")
        for row in small:
            parts = []
            for c in ("fwd", "fwd_inner", "bwd", "eager_fwd"):
                e = row[c]
                graph = e.get("graph_ms")
                parts.append(f"{c} {e['ms'] * 1e3:6.1f} / {graph * 1e3 if graph else float('nan'):5.1f}")
            print(f"{row['rows']:>6} x {row['cols']:<6} | " + " | ".join(parts))
    host = result.get("host")
    if host:
        print()
        print("one PEFT Linear 8192x8192 forward at 1 token (eval, r=384, all bf16), microseconds per call")
        print(f"{'':>14} | {'host':>7} | {'+sync':>7} | {'do_bench':>8} | {'graph':>7}")
        for name in ("lora", "stock_dora", "dorafactors"):
            e = host[name]
            graph = e["graph_ms"] * 1e3 if e.get("graph_ms") else float("nan")
            print(
                f"{name:>14} | {e['host_us']:7.1f} | {e['sync_us']:7.1f} | {e['do_bench_ms'] * 1e3:8.1f} | {graph:7.1f}"
            )
        lora = host["lora"]
        ours = host["dorafactors"]
        print(
            f"dorafactors / LoRA: host {ours['host_us'] / lora['host_us']:.2f}x, "
            f"do_bench {ours['do_bench_ms'] / lora['do_bench_ms']:.2f}x (target <= 1.2x)"
        )
        for label in ("dora_compose_call", "kernel_host_function", "torch_empty_like"):
            print(f"  {label}: {host[label]['host_us']:.1f} us host per call")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 shapes instead of 28")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--no-host", action="store_true", help="skip the PEFT host-overhead section")
    parser.add_argument(
        "--comprehensive", action="store_true", help="autotune over the full grid (DORA_AUTOTUNE_COMPREHENSIVE=1)"
    )
    parser.add_argument(
        "--bwd-groups",
        default="",
        help="comma-separated BACKWARD_PROGRAMS_PER_SM values: only sweep the backward's row-group count",
    )
    parser.add_argument("--dry-run-cpu", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    global DEVICE
    if args.dry_run_cpu:  # exercise the script's plumbing on Triton's CPU interpreter (numbers meaningless)
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ["PEFT_DORA_FUSED"] = "1"
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        print("tune_compose.py needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.comprehensive:
        os.environ["DORA_AUTOTUNE_COMPREHENSIVE"] = "1"
    import triton

    from dorafactors.dispatch import config

    config.invalidate_cache()
    t_start = time.perf_counter()
    dtype = DTYPES[args.dtype]
    result = {
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (Triton interpreter dry run)",
        "sms": torch.cuda.get_device_properties(0).multi_processor_count if DEVICE == "cuda" else 0,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "dtype": args.dtype,
        "comprehensive": args.comprehensive,
    }
    print("copy bandwidth ...", flush=True)
    result["copy"] = copy_bandwidth()
    _empty_cache()
    # columns 8192 first: the acceptance shapes (8192 x 8192 and larger) must fit in the time budget
    shapes = QUICK if args.quick else [(r, c) for c in sorted(COLS, key=lambda c: c != 8192) for r in ROWS]
    if DEVICE == "cpu":
        shapes = [(1, 64), (37, 300)]
    if args.bwd_groups:
        values = [int(v) for v in args.bwd_groups.split(",")]
        print(f"backward row-group sweep, programs per SM {values} ...", flush=True)
        result["bwd_groups"] = sweep_bwd_groups(values, dtype, result["copy"]["GBps"])
        out_dir = os.environ.get("OUT")
        if out_dir:
            (Path(out_dir) / "compose_bwd_groups.json").write_text(json.dumps(result, indent=1))
        return 0
    print(f"compose sweep over {len(shapes)} shapes ...", flush=True)
    result["compose"] = sweep(shapes, dtype, result["copy"]["GBps"], args.comprehensive, t_start)
    if not args.no_host:
        print("host overhead (PEFT Linear, 1 token) ...", flush=True)
        try:
            if DEVICE == "cpu":  # plumbing check only; fp32 keeps the norm on its PyTorch path
                result["host"] = host_overhead(torch.float32, calls=5, dim=64, rank=4)
            else:
                result["host"] = host_overhead(dtype)
        except Exception as exc:
            result["host_error"] = f"{type(exc).__name__}: {exc}"
            print(f"  host section failed: {result['host_error']}")
    result["elapsed_s"] = time.perf_counter() - t_start
    out_dir = os.environ.get("OUT")
    if out_dir:
        path = Path(out_dir) / "compose_tuning.json"
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")
    print_table(result)
    print(f"\nelapsed {result['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
