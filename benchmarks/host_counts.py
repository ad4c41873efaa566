"""Count what one PEFT Linear call costs the host, per provider: Python calls, torch ops, allocations, launches.

    python -m benchmarks.host_counts                       # PyTorch paths (what runs on a CPU)
    TRITON_INTERPRET=1 PEFT_DORA_FUSED=1 python -m benchmarks.host_counts   # the Triton kernel paths
    python -m benchmarks.host_counts --json out.json
    python -m benchmarks.host_counts --time                # also wall time per call on this CPU
    python -m benchmarks.host_counts --compiled 28         # also a compiled decode call of 28 layers

Counts do not depend on the machine (only on the code path), so they are measured on the CPU with tiny
shapes; host *time* per call is a GPU-machine number (the ``host_us`` column of the ``layer`` and
``decode`` suites). Two workloads, for plain LoRA, stock PEFT DoRA and dorafactors, bf16 base and adapters:

* ``train``: one bias-free Linear, forward + backward in train mode, ``x`` requiring a gradient, the adapter
  weights marked as written before the call (dorafactors recomputes its norm, as after an optimizer step);
* ``decode``: eval, ``no_grad``, one token.

``--compiled N`` also times, per provider, an Inductor-compiled one-token ``no_grad`` call of ``N`` stacked bf16
Linear layers (the host work of compiled decode, here with the CPU doing the tiny matmuls too), reports the
host time of dorafactors' norm op (``dorafactors::refresh_weight_norms``) per call, and, with the providers
called in turn, the time of a call right after another compiled model's against the calls after it
(:func:`switch_costs`: what the decode suite's timing in turn leaves untimed).

``--time`` also times one call per provider on this CPU (wall microseconds, the providers interleaved in every
round so that a drift of the machine's speed reaches them alike; the median over the rounds). With these tiny
shapes a call is mostly host work, so the times and their ratios show the host-time gap of the code path on
this CPU; what a GPU host pays is the ``host_us`` column of the GPU suites.

Per call: ``python_calls`` (function calls cProfile sees, backward included: autograd runs on this thread),
``torch_ops`` (ATen operators that reach the dispatcher below autograd: ``TorchDispatchMode``),
``allocations`` (operator outputs that share no input's storage: new tensors) and ``triton_launches`` (Triton kernel launches;
0 on the PyTorch paths).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import pstats
import statistics
import sys
import time
from collections import Counter
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["count_call", "main"]


class _OpCounter(TorchDispatchMode):
    """Counts ATen operators and the tensors they allocate (outputs whose storage no input shares)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.allocations = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops[str(func.overloadpacket.__name__)] += 1
        out = func(*args, **kwargs)
        inputs = {_storage(t) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and _storage(t) not in inputs:
                self.allocations += 1
        return out


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _triton_launches(stats: pstats.Stats) -> int:
    """Kernel launches in a cProfile run: calls of Triton's launch entry (``JITFunction.run`` on a GPU,
    ``InterpretedFunction.run`` under the interpreter)."""
    total = 0
    for (filename, _line, name), (_cc, ncalls, *_rest) in stats.stats.items():  # type: ignore[attr-defined]
        if name == "run" and "triton" in filename and ("jit.py" in filename or "interpreter.py" in filename):
            total += ncalls
    return total


_STUBBED_LAUNCHES = [0]


@contextlib.contextmanager
def _interpreted_kernels_stubbed():
    """Under ``TRITON_INTERPRET=1``, launches count but do not execute: the interpreter's own Python and
    tensor work is not what a GPU launch costs the host (outputs hold garbage meanwhile: counts only)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        yield
        return
    original = InterpretedFunction.run

    def run(self, *args, **kwargs):
        _STUBBED_LAUNCHES[0] += 1

    InterpretedFunction.run = run
    try:
        yield
    finally:
        InterpretedFunction.run = original


def count_call(step, calls: int = 3) -> dict[str, Any]:
    """Per-call counts of ``step`` (after two warm-up calls)."""
    step()
    step()
    with torch.autograd.set_multithreading_enabled(False), _interpreted_kernels_stubbed():
        prof = cProfile.Profile()
        stubbed = _STUBBED_LAUNCHES[0]
        prof.enable()
        for _ in range(calls):
            step()
        prof.disable()
        stubbed = _STUBBED_LAUNCHES[0] - stubbed
        stats = pstats.Stats(prof)
        counter = _OpCounter()
        with counter:
            for _ in range(calls):
                step()
    return {
        "python_calls": stats.total_calls / calls,  # type: ignore[attr-defined]
        "torch_ops": sum(counter.ops.values()) / calls,
        "allocations": counter.allocations / calls,
        "triton_launches": (_triton_launches(stats) + stubbed) / calls,
        "top_ops": {k: v / calls for k, v in counter.ops.most_common(12)},
    }


_WORKLOADS = (("train", 64), ("decode", 1))
_PROVIDERS = ("lora", "stock", "dorafactors")


def _step(provider: str, workload: str, dim: int, rank: int, tokens: int):
    from benchmarks import providers

    base = providers.one_linear_base(dim, dim, torch.device("cpu"), torch.bfloat16)
    model = providers.build_peft(
        base, provider, r=rank, alpha=2 * rank, targets=("proj",), autocast_adapter_dtype=False, seed=0
    )
    train = workload == "train"
    model.train(train)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, dim, generator=gen).to(torch.bfloat16).requires_grad_(train)
    grad = torch.randn(tokens, dim, generator=gen).to(torch.bfloat16)
    adapters = providers.adapter_tensors(model)
    params = providers.trainable(model)
    if train:
        providers.stepped_by_an_optimizer(params)

    def step() -> None:
        if not train:
            with torch.no_grad():
                model(x)
            return
        for p in (*params, x):
            p.grad = None
        providers.bump_adapter_versions(adapters)
        model(x).backward(grad)

    return step


def time_calls(steps: dict[str, Any], rounds: int = 7, calls: int = 2000) -> dict[str, float]:
    """Wall microseconds per call of each step: per round, the mean over ``calls`` calls of each step in turn
    (the steps interleaved); the median over ``rounds`` rounds. Autograd's multithreading is off, as for
    the counts (the backward then runs on this thread), and the interpreter's launches are stubbed."""
    samples: dict[str, list[float]] = {name: [] for name in steps}
    with torch.autograd.set_multithreading_enabled(False), _interpreted_kernels_stubbed():
        for step in steps.values():
            for _ in range(max(1, calls // 10)):
                step()
        for _ in range(rounds):
            for name, step in steps.items():
                start = time.perf_counter()
                for _ in range(calls):
                    step()
                samples[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: statistics.median(values) for name, values in samples.items()}


def switch_costs(steps: dict[str, Any], turns: int = 100, calls: int = 4) -> dict[str, tuple[float, float]]:
    """Per step, ``(first, warm)``: median wall microseconds of its first call right after another step's and of
    its later calls (``calls`` per turn in all), over ``turns`` turns of every step in turn. For compiled
    models that share code the first call pays for the switch (Dynamo's cache entries of the shared frames are
    the other models' first; cold CPU caches), which the decode suite's timing in turn leaves untimed."""
    first: dict[str, list[float]] = {name: [] for name in steps}
    warm: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for turn in range(turns):
        for name in names if turn % 2 == 0 else names[::-1]:
            for call in range(calls):
                start = time.perf_counter()
                steps[name]()
                (first if call == 0 else warm)[name].append((time.perf_counter() - start) * 1e6)
    return {name: (statistics.median(first[name]), statistics.median(warm[name])) for name in names}


class _LinearStack(torch.nn.Module):
    """``layers`` bias-free ``dim x dim`` Linear layers applied in turn (``layers.<i>``)."""

    def __init__(self, layers: int, dim: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(dim, dim, bias=False) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def compiled_decode_steps(layers: int, dim: int = 128, rank: int = 16) -> dict[str, Any]:
    """Per provider, a no-grad one-token call of ``layers`` stacked bf16 Linear layers (DoRA/LoRA on each)
    compiled by Inductor (``dynamic=False``) and warmed up: the host work of compiled decode on this CPU.
    The providers stay compiled side by side (``providers.compiled_alongside``); stock PEFT, whose forward
    breaks the graph (its dequantize check), is compiled last, after the models that share its frames."""
    from benchmarks import providers

    torch._dynamo.reset()
    steps: dict[str, Any] = {}
    base = _LinearStack(layers, dim).to(torch.bfloat16)
    targets = tuple(f"layers.{i}" for i in range(layers))
    for provider in sorted(_PROVIDERS, key=lambda name: name == "stock"):
        model = providers.build_peft(
            base, provider, r=rank, alpha=2 * rank, targets=targets, autocast_adapter_dtype=False, seed=0
        ).eval()
        compiled, _ = providers.compiled_alongside(model, provider, "inductor")
        x = torch.randn(1, dim, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)

        def step(compiled=compiled, x=x) -> None:
            with torch.no_grad():
                compiled(x)

        for _ in range(3):
            step()
        steps[provider] = step
    return {provider: steps[provider] for provider in _PROVIDERS}


def merged_norm_op_us(step, calls: int = 200) -> float:
    """Own host microseconds per call of ``dorafactors::refresh_weight_norms`` in ``step`` (``torch.profiler``)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            step()
    return sum(e.self_cpu_time_total for e in prof.key_averages() if "refresh_weight_norm" in e.key) / calls


def run(dim: int = 128, rank: int = 16) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for workload, tokens in _WORKLOADS:
        out[workload] = {}
        for provider in _PROVIDERS:
            out[workload][provider] = count_call(_step(provider, workload, dim, rank, tokens))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the counts to this file")
    parser.add_argument("--time", action="store_true", help="also time one call per provider on this CPU")
    parser.add_argument("--calls", type=int, default=2000, help="calls per provider and round of --time")
    parser.add_argument(
        "--compiled",
        type=int,
        metavar="LAYERS",
        help="also time a compiled (Inductor) one-token no-grad call of LAYERS stacked Linear layers per provider",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = run()
    keys = ("python_calls", "torch_ops", "allocations", "triton_launches")
    for workload, by_provider in result.items():
        print(f"=== {workload}: per call")
        print(f"{'provider':>12} " + " ".join(f"{k:>16}" for k in keys))
        for provider, counts in by_provider.items():
            print(f"{provider:>12} " + " ".join(f"{counts[k]:16.1f}" for k in keys))
        print(f"    dorafactors ops: {by_provider['dorafactors']['top_ops']}")
    if args.time:
        for workload, tokens in _WORKLOADS:
            steps = {provider: _step(provider, workload, 128, 16, tokens) for provider in _PROVIDERS}
            times = time_calls(steps, calls=args.calls)
            print(f"=== {workload}: wall us per call on this CPU (median of rounds; ratio to LoRA)")
            for provider, us in times.items():
                print(f"{provider:>12} {us:10.2f} us  {us / times['lora']:5.2f}x")
                result[workload][provider]["cpu_us"] = us
    if args.compiled:
        steps = compiled_decode_steps(args.compiled)
        times = time_calls(steps, calls=max(1, args.calls // 10))
        op_us = merged_norm_op_us(steps["dorafactors"])
        print(f"=== compiled decode, {args.compiled} layers: wall us per call on this CPU (ratio to LoRA)")
        for provider, us in times.items():
            print(f"{provider:>12} {us:10.2f} us  {us / times['lora']:5.2f}x")
        print(f"    dorafactors' norm op: {op_us:.2f} us of host time per call")
        switched = switch_costs(steps)
        print("    in turn: first call after another model's / the calls after it, us (ratio to LoRA)")
        for provider, (first_us, warm_us) in switched.items():
            lora_first, lora_warm = switched["lora"]
            print(
                f"{provider:>12} {first_us:10.2f} us  {first_us / lora_first:5.2f}x"
                f"   {warm_us:10.2f} us  {warm_us / lora_warm:5.2f}x"
            )
        result["compiled_decode"] = {p: {"cpu_us": us} for p, us in times.items()}
        result["compiled_decode"]["dorafactors"]["norm_op_us"] = op_us
        for provider, (first_us, warm_us) in switched.items():
            result["compiled_decode"][provider].update(first_after_switch_us=first_us, warm_in_turn_us=warm_us)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
