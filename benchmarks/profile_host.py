#!/usr/bin/env python
"""Where the time of one PEFT DoRA Linear call goes, on one GPU: host clock, cProfile, device kernels.

    python benchmarks/profile_host.py            # ~1 minute on an H100/H200
    python benchmarks/profile_host.py --launch-only   # only the single operations (last section below)
    python benchmarks/profile_host.py --dry-run-cpu   # checks the script on the CPU (tiny, not a measurement)
    python benchmarks/profile_host.py --ops           # also the host operators with most own time, per provider
    OUT=/some/dir python benchmarks/profile_host.py   # also writes $OUT/profile_host.json

Two workloads, each for plain LoRA, stock PEFT DoRA and dorafactors (bf16 base and adapters, r=384,
non-identity adapters):

* ``decode``: eval, ``no_grad``, one token through an 8192x8192 Linear;
* ``train``: forward + backward of a 4096x4096 Linear at 4096 tokens, the adapters marked as written
  before every call (so dorafactors recomputes its norm, as after an optimizer step).

For the train workload also the host time of its phases, per provider (``phases``): the forward with the
adapters marked as written (dorafactors recomputes its norm), the forward without (the norm served from the
cache), the backward (the whole call less the first forward), the whole call with autograd's multithreading
off (the backward then runs on the calling thread: the difference is what the device thread's handoff and
its slower Python cost) and, for dorafactors, the norm recomputation alone (the layer's ``_forward_norm``
after the mark), it and the whole call with the norm's CUDA-graph replay off (``norm/replay.py``), and the
whole call with the magnitude divided by autograd before the training node instead of inside it
(``rules.magnitude_division_outside_node``).

Last, the host cost of single operations (a PyTorch op, the compose kernel's host function with kept
compiled kernels launched directly and with plain ``kernel[grid]`` launches, ``dora_compose``).

Per provider: ``host_us`` (wall time of N back-to-back calls without synchronizing, divided by N: what the
Python side costs when the GPU keeps up), ``sync_us`` (the same with the final synchronize),
``device_us`` (sum of the CUDA kernel times of one call, from ``torch.profiler``), and for dorafactors the
top cProfile entries by own time and the kernels of one call. ``--ops``: per provider and workload, the
operators and autograd nodes with the most own host time per call (``torch.profiler``, CPU activity only; the
profiler's own overhead inflates every entry alike).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.common import cprofile_text, host_us_per_call  # noqa: E402  (after the path set-up of a script run)

#: "cpu" only to check the script without a GPU (``--dry-run-cpu``: tiny shapes, PyTorch paths).
DEVICE = "cuda"
SMALL = False
OPS = False  # --ops


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _model(provider: str, dim: int, rank: int, dtype: torch.dtype) -> nn.Module:
    """The layer suite's model: one bias-free ``dim x dim`` Linear, the harness's non-identity adapters."""
    from benchmarks import providers

    base = providers.one_linear_base(dim, dim, torch.device(DEVICE), dtype)
    return providers.build_peft(
        base, provider, r=rank, alpha=2 * rank, targets=("proj",), autocast_adapter_dtype=False, seed=0
    )


def _step_fn(model: nn.Module, x: torch.Tensor, train: bool):
    from benchmarks import providers

    adapters = providers.adapter_tensors(model)
    if train:
        providers.stepped_by_an_optimizer(providers.trainable(model))

    def step():
        if not train:
            with torch.no_grad():
                return model(x)
        providers.bump_adapter_versions(adapters)  # "the optimizer wrote the adapters": norm recomputed
        out = model(x)
        out.backward(torch.ones_like(out))
        return None

    return step


def _kernels(step, calls: int = 5) -> tuple[float, list[tuple[str, float, int]]]:
    from torch.profiler import ProfilerActivity, profile

    step()
    _sync()
    activity = ProfilerActivity.CUDA if DEVICE == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(calls):
            step()
        _sync()
    rows = []
    total = 0.0
    for e in prof.key_averages():
        dev = getattr(e, "device_time_total", None) if DEVICE == "cuda" else e.self_cpu_time_total
        if dev is None:
            dev = getattr(e, "cuda_time_total", 0.0)
        if dev <= 0 or e.key.startswith("ProfilerStep"):
            continue
        if DEVICE == "cuda" and e.device_type is not None and "CUDA" not in str(e.device_type):
            continue
        rows.append((e.key[:90], dev / calls, e.count // calls))
        total += dev / calls
    rows.sort(key=lambda r: -r[1])
    return total, rows[:12]


def _host_ops(step, calls: int = 20, top: int = 24) -> list[tuple[str, float, float, int]]:
    """The ``top`` host events by own CPU time per call: ``(name, self_us, total_us, count)`` per call."""
    from torch.profiler import ProfilerActivity, profile

    step()
    _sync()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            step()
        _sync()
    rows = [
        (e.key[:80], e.self_cpu_time_total / calls, e.cpu_time_total / calls, e.count // calls)
        for e in prof.key_averages()
        if not e.key.startswith("ProfilerStep")
    ]
    rows.sort(key=lambda r: -r[1])
    return rows[:top]


def _cprofile(step, calls: int = 200) -> str:
    """cProfile of ``calls`` steps, the 18 functions with the most own time (``common.cprofile_text``)."""
    return cprofile_text(step, calls, _sync, top=18)


def launch_costs(calls: int = 500) -> dict[str, float]:
    """Host microseconds per call (no synchronize) of single operations, 1 x 8192 bf16: a PyTorch op, the
    compose kernel's host function (with kept compiled kernels launched directly, and with every launch
    through ``kernel[grid]``), ``dora_compose``, the compiled norm op on a cache hit (8192 x 4096, r=384);
    what a Triton launch and a DoRA layer's opaque op in a compiled graph cost on this machine."""
    from dorafactors.autograd import norm_op
    from dorafactors.autograd.compose import dora_compose
    from dorafactors.kernels import compose as kc
    from dorafactors.kernels.launch import fast_launches

    n = 128 if SMALL else 8192
    dt = torch.bfloat16
    lora = torch.randn(1, n, device=DEVICE, dtype=dt)
    base = torch.randn(1, n, device=DEVICE, dtype=dt)
    g = torch.rand(n, device=DEVICE) + 0.5
    # the compiled norm op on a cache hit (what a compiled graph pays per DoRA layer and forward)
    rank = 16 if SMALL else 384
    weight = torch.nn.Parameter(torch.randn(n, n if SMALL else 4096, device=DEVICE, dtype=dt), requires_grad=False)
    lora_A = torch.nn.Parameter(torch.randn(rank, weight.shape[1], device=DEVICE, dtype=dt))
    lora_B = torch.nn.Parameter(torch.randn(n, rank, device=DEVICE, dtype=dt))
    magnitude = torch.nn.Parameter(torch.rand(n, device=DEVICE, dtype=dt) + 0.5)
    norm = torch.rand(n, device=DEVICE) + 0.5
    fns = {
        "torch.add": lambda: torch.add(lora, base),
        "torch.empty_like": lambda: torch.empty_like(lora),
        "clone of a [d_out] fp32 norm": lambda: norm.clone(),
        "mul by 1.0 of a [d_out] fp32 norm": lambda: torch.mul(norm, 1.0),
        "cached_weight_norm op body, cache hit, without the dispatcher": lambda: norm_op._cached_weight_norm_impl(
            magnitude, weight, lora_A, lora_B, 2.0, "linear", True, False
        ),
        "dora_compose (no grad)": lambda: dora_compose(lora, base, g, 2.0),
        "cached_weight_norm op, cache hit": lambda: norm_op.cached_weight_norm(
            magnitude, weight, lora_A, lora_B, 2.0, "linear", True, False
        ),
    }
    if DEVICE == "cuda":
        fns["compose kernel host function"] = lambda: kc.compose_forward_unchecked(lora, base, g, 2.0, -1, dt, False)
    with torch.no_grad():
        out = {name: host_us_per_call(fn, calls, _sync, warmup=20)[0] for name, fn in fns.items()}
        if DEVICE == "cuda":
            with fast_launches(False):
                compose = fns["compose kernel host function"]
                out["compose kernel host function, plain kernel[grid] launch"] = host_us_per_call(
                    compose, calls, _sync, warmup=20
                )[0]
    return out


def _train_phases(model: nn.Module, x: torch.Tensor, whole_us: float, calls: int) -> dict[str, float]:
    """Host microseconds of the phases of one train call (module docstring); ``whole_us``: the whole call's."""
    from benchmarks import providers

    adapters = providers.adapter_tensors(model)

    def forward_written():
        providers.bump_adapter_versions(adapters)
        model(x)

    phases = {
        "forward, adapters written": host_us_per_call(forward_written, calls, _sync)[0],
        "forward, adapters unchanged": host_us_per_call(lambda: model(x), calls, _sync)[0],
    }
    phases["backward"] = whole_us - phases["forward, adapters written"]
    # PyTorch runs a CUDA backward on autograd's device thread, where Python (a custom Function's backward)
    # runs slower than on the main thread: the same call with that thread handoff off shows what it costs
    with torch.autograd.set_multithreading_enabled(False):
        phases["whole call, autograd multithreading off"] = host_us_per_call(_step_fn(model, x, True), calls, _sync)[0]
    layer = next((m for m in model.modules() if hasattr(m, "lora_magnitude_vector")), None)
    dora = None if layer is None else layer.lora_magnitude_vector._modules.get("default")  # LoRA: none
    if dora is not None and hasattr(dora, "_forward_norm"):  # a dorafactors layer

        def norm():
            providers.bump_adapter_versions(adapters)
            with torch.no_grad():
                dora._forward_norm(
                    layer.base_layer,
                    layer.lora_A["default"],
                    layer.lora_B["default"],
                    layer.scaling["default"],
                    "default",
                    gather_modules=(),
                )

        phases["norm recomputation"] = host_us_per_call(norm, calls, _sync)[0]
        from dorafactors.norm.replay import replay_disabled

        with replay_disabled():
            phases["norm recomputation, replay off"] = host_us_per_call(norm, calls, _sync)[0]
            phases["whole call, replay off"] = host_us_per_call(_step_fn(model, x, True), calls, _sync)[0]
        from dorafactors.dispatch.rules import magnitude_division_outside_node

        with magnitude_division_outside_node():
            step = _step_fn(model, x, True)
            phases["whole call, division outside the node"] = host_us_per_call(step, calls, _sync)[0]
        phases["whole call, again"] = host_us_per_call(_step_fn(model, x, True), calls, _sync)[0]
    return phases


def run(workload: str) -> dict:
    dtype = torch.bfloat16
    if workload == "decode":
        dim, tokens, train, calls = 8192, 1, False, 400
    else:
        dim, tokens, train, calls = 4096, 4096, True, 60
    if SMALL:
        dim, tokens, calls = 128, min(tokens, 64), 20
    x = torch.randn(1, tokens, dim, device=DEVICE, dtype=dtype, requires_grad=train)
    out: dict = {}
    for name in ("lora", "stock", "dorafactors"):
        model = _model(name, dim, 16 if SMALL else 384, dtype)
        model.train(train)
        step = _step_fn(model, x, train)
        host, sync = host_us_per_call(step, calls, _sync)
        device, kernels = _kernels(step)
        entry = {"host_us": host, "sync_us": sync, "device_us": device, "kernels": kernels}
        if train:
            entry["phases"] = _train_phases(model, x, host, calls)
        if OPS:
            entry["host_ops"] = _host_ops(step)
        if name == "dorafactors":
            entry["cprofile"] = _cprofile(step, max(50, calls // 2))
        out[name] = entry
        del model, step
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return out


def main() -> int:
    global DEVICE, SMALL, OPS
    OPS = "--ops" in sys.argv
    if "--dry-run-cpu" in sys.argv:
        DEVICE, SMALL = "cpu", True
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)"
    result = {"gpu": gpu, "torch": torch.__version__}
    workloads = () if "--launch-only" in sys.argv else ("decode", "train")
    for workload in workloads:
        result[workload] = run(workload)
    result["launch"] = launch_costs()
    for workload in workloads:
        print(f"\n=== {workload}: us per call (host = no sync; device = sum of kernel times)")
        for name in ("lora", "stock", "dorafactors"):
            e = result[workload][name]
            print(f"{name:>12}: host {e['host_us']:8.1f}  +sync {e['sync_us']:8.1f}  device {e['device_us']:8.1f}")
            for phase, us in e.get("phases", {}).items():
                print(f"{'':>14}host {us:8.1f}  {phase}")
        for name in ("lora", "dorafactors"):
            print(f"--- kernels of one {workload} call, {name} (us, launches)")
            for key, us, n in result[workload][name]["kernels"]:
                print(f"  {us:8.1f} {n:3d}  {key}")
        for name in ("lora", "dorafactors") if OPS else ():
            print(f"--- host ops of one {workload} call, {name} (own us, total us, count)")
            for key, own, total, n in result[workload][name]["host_ops"]:
                print(f"  {own:8.1f} {total:8.1f} {n:3d}  {key}")
        print(f"--- cProfile, dorafactors {workload}")
        print(result[workload]["dorafactors"]["cprofile"])
    print("\n=== host us per call of single operations (1 x 8192 bf16, no synchronize)")
    for name, us in result["launch"].items():
        print(f"  {us:8.1f}  {name}")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "profile_host.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
