#!/usr/bin/env python
"""Where the time of one compiled decode call of the model suite goes, per provider: host, device, operators.

    python benchmarks/profile_compiled.py                  # ~2 minutes on an H100/H200
    python benchmarks/profile_compiled.py --tokens 1 --mode max-autotune-no-cudagraphs
    python benchmarks/profile_compiled.py --mode reduce-overhead   # CUDA graphs, on a StaticCache
    python benchmarks/profile_compiled.py --setup peft-default     # bf16 base, fp32 adapters
    python benchmarks/profile_compiled.py --dry-run-cpu    # checks the script on the CPU (tiny, not a measurement)
    python benchmarks/profile_compiled.py --tokens 1 --rounds 7   # host time in 7 interleaved rounds
    OUT=/some/dir python benchmarks/profile_compiled.py     # also writes $OUT/profile_compiled.json

The decode suite's ``model/<setup>/tokens=N`` case (``--setup``, default bf16; eval, ``no_grad``, N new tokens
on a KV cache of 512, ``torch.compile(dynamic=False)``) for compiled LoRA and compiled dorafactors
(``--providers`` adds stock). ``--layer D``: instead, the layer suite's one bias-free ``D x D`` bf16 Linear
(r=384), a ``no_grad`` call of ``--tokens`` rows (``--layer 4096 --tokens 4096``: the compiled
``layer:4096->4096/infer`` case), with the norms each dorafactors layer computed during the profiled calls
(0 when every call is served from the layer's cache).
Per provider: ``host_us`` (wall time of back-to-back calls without synchronizing, per call: what the Python
side costs while the device keeps up), ``sync_us`` (the same with the final synchronize), ``device_us``
(the sum of the CUDA kernel times of one call, from ``torch.profiler``), ``kernels`` (launches per call), and
the operators with the most own host time and the most device time per call.

``--rounds N`` (N > 1): every provider is compiled first (kept warm side by side: ``providers.compiled_alongside``;
LoRA and dorafactors only, whose models compile without graph breaks), then ``host_us`` and ``sync_us`` are
timed in N rounds, the providers interleaved (round ``i`` in the given order, the next reversed), and each row
keeps its median round and every round (``host_us_rounds``): the host's speed drifts by up to 2x within
seconds on some GPU machines, which a single back-to-back timing per provider attributes to whichever ran then.
"""

from __future__ import annotations

import argparse
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
from benchmarks.common import cprofile_text, host_us_per_call  # noqa: E402
from benchmarks.harness import Settings, collect_metadata  # noqa: E402
from benchmarks.suites import layer as L  # noqa: E402
from benchmarks.suites import model as M  # noqa: E402
from benchmarks.suites._workloads import Workload, _decode_fn  # noqa: E402


def _profile(step, device: torch.device, calls: int, top: int) -> dict[str, Any]:
    """Per-call device time, kernel launches and the operators with the most own host time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    events = prof.key_averages()
    device_us = 0.0
    kernels = 0
    for e in events:
        if getattr(e, "device_type", None) is not None and "CUDA" in str(e.device_type):
            device_us += e.self_device_time_total
            kernels += e.count
    host_ops = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    device_ops = sorted(events, key=lambda e: getattr(e, "self_device_time_total", 0.0), reverse=True)[:top]
    return {
        "device_us": round(device_us / calls, 1),
        "kernels": kernels / calls,
        "top_host_ops": [
            {"op": e.key, "calls": e.count / calls, "self_cpu_us": round(e.self_cpu_time_total / calls, 1)}
            for e in host_ops
        ],
        "top_device_ops": [
            {"op": e.key, "calls": e.count / calls, "self_device_us": round(e.self_device_time_total / calls, 1)}
            for e in device_ops
            if getattr(e, "self_device_time_total", 0.0) > 0
        ],
    }


def _no_grad_call(runner, x: torch.Tensor):
    def step() -> None:
        with torch.no_grad():
            runner(x)

    return step


def _norm_computations(model: torch.nn.Module) -> int:
    """Norms the model's dorafactors DoRA layers computed so far (0 for other providers)."""
    return sum(m.norm_computations for m in model.modules() if hasattr(m, "norm_computations"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument(
        "--mode",
        default=None,
        help="torch.compile mode (default: Inductor's default); reduce-overhead (CUDA graphs) decodes on a "
        "StaticCache, as the decode suite does",
    )
    parser.add_argument("--setup", default="bf16", choices=sorted(M.SETUPS), help="dtype setup of the model suite")
    parser.add_argument("--providers", default="lora,dorafactors")
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--top", type=int, default=14)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager on the CPU dry run)")
    parser.add_argument("--cprofile", action="store_true", help="also the Python functions with most own time")
    parser.add_argument("--dry-run-cpu", action="store_true")
    parser.add_argument("--layer", type=int, default=None, help="profile one D x D Linear's no-grad call instead")
    parser.add_argument("--rounds", type=int, default=1, help="time the host in this many interleaved rounds")
    args = parser.parse_args()
    if args.rounds > 1 and "stock" in args.providers.split(","):
        parser.error(
            "--rounds keeps the providers compiled side by side: lora and dorafactors only (stock breaks the graph)"
        )
    settings = Settings.make(quick=args.dry_run_cpu, device="cpu" if args.dry_run_cpu else None)
    device = settings.device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    names = tuple(args.providers.split(","))
    if args.layer:
        models = L.layer_set(settings, args.layer, args.layer, L.rank(settings), names)
        x = torch.randn(args.tokens, args.layer, device=device, dtype=torch.bfloat16)
    else:
        models = M.model_set(settings, args.setup, M.rank(settings), names)
        ctx = 32 if args.dry_run_cpu else 512
        inputs = {
            "context_ids": M.token_ids(settings, 1, ctx, salt=11)[0],
            "new_ids": M.token_ids(settings, 1, args.tokens, salt=12)[0],
        }
        workload = Workload("decode", new_tokens=args.tokens, context=ctx)
    calls = 3 if args.dry_run_cpu else args.calls
    rounds = max(1, args.rounds)

    def compiled_step(name: str):
        model = P.get_model(models, name)
        model.eval()
        if rounds > 1:
            runner, _ = P.compiled_alongside(model, name, args.backend, args.mode)
        else:
            runner, _ = P.compiled(model, args.backend, args.mode)
        if args.layer:
            step, mode = _no_grad_call(runner, x), f"layer {args.layer}, {args.tokens} rows"
        else:
            step, mode = _decode_fn(runner, model, inputs, workload, static=args.mode == "reduce-overhead")
        for _ in range(3):
            step()
        sync()
        return model, step, mode

    timed: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    built: dict[str, tuple[Any, Any, str]] = {}
    if rounds > 1:
        torch._dynamo.reset()
        for name in names:
            built[name] = compiled_step(name)
        before = P.dynamo_stats()
        for i in range(rounds):
            for name in names if i % 2 == 0 else names[::-1]:
                timed[name].append(host_us_per_call(built[name][1], calls, sync))
        after = P.dynamo_stats()
        if before and after:  # a provider recompiling during the rounds would time compilation, not calls
            print(f"graphs compiled during the rounds: {after['graphs'] - before['graphs']} (0 expected)")
    rows: dict[str, Any] = {}
    for name in names:
        model, step, mode = built[name] if rounds > 1 else compiled_step(name)
        norms_before = _norm_computations(model)
        if rounds == 1:
            timed[name].append(host_us_per_call(step, calls, sync))
        host, with_sync = sorted(timed[name])[(len(timed[name]) - 1) // 2]  # the median round by host time
        row = {"host_us": round(host, 1), "sync_us": round(with_sync, 1), "decode_mode": mode}
        if rounds > 1:
            row["host_us_rounds"] = [round(h, 1) for h, _ in timed[name]]
            row["sync_us_rounds"] = [round(s, 1) for _, s in timed[name]]
        row.update(_profile(step, device, min(calls, 10), args.top))
        row["norms_computed"] = _norm_computations(model) - norms_before
        if args.cprofile:
            row["cprofile"] = cprofile_text(step, calls, sync, args.top)
        rows[name] = row
        print(
            f"== {name}+compile ({args.mode or 'default'}), {args.tokens} tokens: host {row['host_us']} us, "
            f"synced {row['sync_us']} us, device {row['device_us']} us, {row['kernels']:.0f} kernels, "
            f"{row['norms_computed']} norms computed in the timed and profiled calls"
        )
        if rounds > 1:
            print(f"   host us per round: {row['host_us_rounds']}")
        for op in row["top_host_ops"]:
            print(f"   {op['self_cpu_us']:9.1f} us  x{op['calls']:<6g} {op['op'][:90]}")
        for op in row["top_device_ops"]:
            print(f"   device {op['self_device_us']:9.1f} us  x{op['calls']:<6g} {op['op'][:90]}")
        if "cprofile" in row:
            print("\n".join(row["cprofile"].splitlines()[: args.top + 12]))
    out = os.environ.get("OUT")
    if out:
        Path(out, "profile_compiled.json").write_text(
            json.dumps(
                {
                    "meta": collect_metadata(settings),
                    "tokens": args.tokens,
                    "mode": args.mode,
                    "setup": args.setup,
                    "layer": args.layer,
                    "rounds": rounds,
                    "rows": rows,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
