#!/usr/bin/env python
"""When each kernel of one timed PEFT Linear call is enqueued and when it runs, per provider, on one GPU.

    python benchmarks/profile_timeline.py                      # decode, 8192x8192, 1 token
    python benchmarks/profile_timeline.py --dim 4096 --tokens 1
    python benchmarks/profile_timeline.py --workload train --dim 4096 --tokens 4096
    python benchmarks/profile_timeline.py --dry-run-cpu        # checks the script on the CPU (no timeline)

The wall-clock rows of the suites time a call as ``triton.testing.do_bench`` does: L2 flushed (a memset of
256 MB), a CUDA event, the call, a CUDA event. A call's wall time is then neither its host time nor its
device time alone: the flush hides the host work enqueued while it runs, and a kernel enqueued after the
device went idle starts late. This script repeats that loop under ``torch.profiler`` (CPU and CUDA
activities) and prints, for the median repetition of each provider, every kernel of the call: when the
host enqueued it and when it started and ended on the device, in microseconds from the end of the flush,
and the gap the device waited for it. Same models as ``profile_host.py`` (bf16 base and adapters, r=384,
non-identity adapters; ``train``: the adapters marked as written before every call).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROVIDERS = ("lora", "stock", "dorafactors")


def _events(trace: dict) -> tuple[list[dict], list[dict], dict[int, dict]]:
    """(kernels, memsets and copies on the device; the ``rep<i>`` annotations; runtime and driver launch calls
    by correlation id) of a chrome trace as ``torch.profiler`` exports it."""
    device, marks, launches = [], [], {}
    for e in trace.get("traceEvents", []):
        if e.get("ph") != "X":
            continue
        cat = e.get("cat", "")
        if cat in ("kernel", "gpu_memset", "gpu_memcpy"):
            device.append(e)
        elif cat == "user_annotation" and str(e.get("name", "")).startswith("rep"):
            marks.append(e)
        elif cat in ("cuda_runtime", "cuda_driver"):
            corr = e.get("args", {}).get("correlation")
            if corr is not None:
                launches[corr] = e
    return device, marks, launches


def _is_flush(event: dict) -> bool:
    """The L2 flush: a memset, or the fill kernel ``zero_`` runs."""
    return event.get("cat") == "gpu_memset" or "fill" in str(event.get("name", "")).lower()


def timelines(trace: dict, wall_us: list[float]) -> list[dict]:
    """Per ``rep<i>`` annotation of ``trace`` (in time order): the device work enqueued inside it, each kernel's
    enqueue (end of its launch call), start and end on the device, in microseconds from the end of the flush
    enqueued before the annotation, and how long the device sat idle before it (``waited``); the host's entry
    and return from the call; the rep's ``wall_us``. Reps without a flush or without device work are left out.
    """
    dev, marks, launches = _events(trace)
    marks = sorted(marks, key=lambda e: e["ts"])
    out = []
    for i, mark in enumerate(marks):
        t0, t1 = mark["ts"], mark["ts"] + mark["dur"]
        prev_t1 = marks[i - 1]["ts"] + marks[i - 1]["dur"] if i else float("-inf")
        mine, flush_end = [], None
        for e in dev:
            launch = launches.get(e.get("args", {}).get("correlation"))
            if launch is None:
                continue
            if t0 <= launch["ts"] <= t1:
                mine.append((launch, e))
            elif prev_t1 < launch["ts"] < t0 and _is_flush(e):
                end = e["ts"] + e["dur"]
                flush_end = end if flush_end is None else max(flush_end, end)
        if not mine or flush_end is None:
            continue
        mine.sort(key=lambda le: le[1]["ts"])
        rows, prev_end = [], flush_end
        for launch, e in mine:
            rows.append(
                {
                    "kernel": e["name"][:70],
                    "enqueued": launch["ts"] + launch["dur"] - flush_end,
                    "start": e["ts"] - flush_end,
                    "end": e["ts"] + e["dur"] - flush_end,
                    "waited": max(0.0, e["ts"] - prev_end),
                }
            )
            prev_end = max(prev_end, e["ts"] + e["dur"])
        out.append(
            {
                "wall_us": wall_us[i] if i < len(wall_us) else None,
                "host_start": t0 - flush_end,
                "host_end": t1 - flush_end,
                "kernels": rows,
            }
        )
    return out


def _timeline(step, reps: int, device: torch.device) -> list[dict]:
    """Per repetition: flush, then the call between two CUDA events, as do_bench; the events of each call."""
    from torch.profiler import ProfilerActivity, profile, record_function

    cache = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    walls = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(reps):
            cache.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with record_function(f"rep{i}"):
                start.record()
                step()
                end.record()
            walls.append((start, end))
        torch.cuda.synchronize()
    wall_us = [s.elapsed_time(e) * 1e3 for s, e in walls]
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    return timelines(trace, wall_us)


def run(workload: str, dim: int, tokens: int, reps: int) -> dict:
    from benchmarks.profile_host import _model, _step_fn

    device = torch.device("cuda")
    result = {}
    for provider in PROVIDERS:
        model = _model(provider, dim, 384, torch.bfloat16).train(workload == "train")
        x = torch.randn(tokens, dim, device=device, dtype=torch.bfloat16, requires_grad=workload == "train")
        reps_out = _timeline(_step_fn(model, x, workload == "train"), reps, device)
        reps_out.sort(key=lambda r: r["wall_us"] or 0.0)
        median = reps_out[len(reps_out) // 2] if reps_out else None
        result[provider] = {
            "wall_us_median": statistics.median(r["wall_us"] for r in reps_out) if reps_out else None,
            "median_rep": median,
        }
        del model
        torch.cuda.empty_cache()
    return result


def _print(result: dict) -> None:
    for provider, r in result.items():
        rep = r["median_rep"]
        print(f"== {provider}: wall {r['wall_us_median']:.1f} us (median rep below; times in us from the flush's end)")
        if rep is None:
            continue
        print(f"   host: call entered {rep['host_start']:.1f}, returned {rep['host_end']:.1f}")
        for k in rep["kernels"]:
            print(
                f"   {k['kernel']:70s} enq {k['enqueued']:8.1f} start {k['start']:8.1f} "
                f"end {k['end']:8.1f} waited {k['waited']:6.1f}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=("decode", "train"), default="decode")
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--reps", type=int, default=25)
    parser.add_argument("--json", help="also write the timelines to this file")
    parser.add_argument("--dry-run-cpu", action="store_true", help="check the script's imports on the CPU")
    args = parser.parse_args(argv)
    if args.dry_run_cpu:
        from benchmarks.profile_host import _model, _step_fn  # noqa: F401

        print("ok: imports resolve (no timeline without a GPU)")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to profile", file=sys.stderr)
        return 1
    result = run(args.workload, args.dim, args.tokens, args.reps)
    _print(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
