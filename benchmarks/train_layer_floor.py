#!/usr/bin/env python
"""What bounds a host-bound DoRA training call: the layer suite's ``fwd_bwd`` case timed in turn for PEFT's
LoRA and dorafactors layers and for bare calls of the same operations without any layer around them.

    python benchmarks/train_layer_floor.py                  # 4096x4096, 4096 tokens, r=384, bf16 (~1 min)
    python benchmarks/train_layer_floor.py --dim 8192 --tokens 1024
    python benchmarks/train_layer_floor.py --dry-run-cpu    # checks the script (tiny, not a measurement)
    OUT=/some/dir python benchmarks/train_layer_floor.py    # also writes $OUT/train_layer_floor.json

One bias-free ``dim x dim`` Linear, bf16 base and adapters, the harness's non-identity adapters, forward of
``x`` (requiring a gradient) and backward of ``dY``, the adapters marked as written before every call (the norm
is recomputed, as after an optimizer step). Variants, all on the same tensors (``W``, ``A``, ``B``, the
magnitude ``m`` of the dorafactors model):

* ``lora``: PEFT's LoRA Linear;
* ``dorafactors``: PEFT's LoRA Linear with dorafactors' DoRA layer (as shipped);
* ``lora-bare``: ``W x + s B (A x)`` as plain ``F.linear`` calls (PEFT's LoRA operations without its module
  calls and checks);
* ``dorafactors-bare``: what dorafactors' layer launches on such a call, called directly: the base and
  ``lora_A`` GEMMs, the norm recomputation from the cached ``||W||^2`` (the engine's kernels, replayed from a
  CUDA graph as the layer replays them: ``norm/replay.py``) with the magnitude's divisor, and the training
  node with ``lora_B`` inside (``autograd/lora_compose.py``: its forward kernel, its backward's ``M`` GEMM,
  kernel and ``d_h`` GEMM). No module call, cache, stamp or dispatch check of the layer: a floor for any
  Python layer that launches these kernels, never a mode to run (nothing here would notice a change of the
  weights' layout, an autocast region or a sharded parameter);
* ``dorafactors-bare-cached-norm``: the same with the norm computed once, before the timing (the training
  node and the GEMMs alone).

``dorafactors - dorafactors-bare`` against ``lora - lora-bare`` is what the layers' Python costs beyond
PEFT's own; ``dorafactors-bare / lora-bare`` bounds what removing all of it could reach with these launches.

Timing: ``harness.ratios_in_turn`` (``bench_in_turn``), as the decode suite times its compiled pairs (turns of one untimed and four
timed calls per variant, the order reversed every other turn, the device idle and L2 flushed before each
timed call): ``ms`` (CUDA events), ``ms_p20``, ``host_ms`` (until the call returned) and their ratios to
``lora``'s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import providers as P  # noqa: E402  (after the path set-up of a script run)
from benchmarks.harness import Settings, collect_metadata, ratios_in_turn  # noqa: E402
from dorafactors.autograd.lora_compose import dora_linear_compose  # noqa: E402
from dorafactors.norm import engine  # noqa: E402
from dorafactors.norm.replay import NormReplay  # noqa: E402
from dorafactors.norm.scale import scale_divisor  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--dim", type=int, default=4096)
parser.add_argument("--tokens", type=int, default=4096)
parser.add_argument("--rank", type=int, default=384)
parser.add_argument("--turns", type=int, default=40, help="turns of one untimed and four timed calls")
parser.add_argument("--dry-run-cpu", action="store_true")

TIMED_PER_TURN = 4


def _lora_layer(model: torch.nn.Module) -> torch.nn.Module:
    """PEFT's LoRA Linear of a one-layer model."""
    return next(m for m in model.modules() if hasattr(m, "lora_A"))


def bare_steps(model: torch.nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> dict[str, Any]:
    """The bare variants (module docstring) on the tensors of the dorafactors ``model``'s layer."""
    layer = _lora_layer(model)
    weight = layer.base_layer.weight
    lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    magnitude = layer.lora_magnitude_vector["default"].weight
    scaling = float(layer.scaling["default"])
    sumsq = engine.weight_sumsq(weight)  # ||W||^2, as the layer's sum-of-squares cache computes it
    rows_finite = engine.weight_rows_finite(sumsq)
    replay = NormReplay()
    values = (scaling, rows_finite, magnitude.dtype)  # every plain value compute() depends on

    def compute() -> torch.Tensor:
        norm = engine.weight_norm(weight, lora_A, lora_B, scaling, cached_sumsq=sumsq, weight_rows_finite=rows_finite)
        return torch.stack((norm, scale_divisor(norm, magnitude.dtype, norm.device)))

    def capturable() -> bool:
        return engine.norm_path(weight, lora_A, lora_B) in ("gemm", "triton")

    def divisor() -> torch.Tensor:
        with torch.no_grad():
            out = replay.run(compute, (weight, lora_A, lora_B, sumsq), values, capturable)
        return out[1]

    fixed = divisor()
    params = (lora_A, lora_B, magnitude, x)

    def forward(div: torch.Tensor | None) -> torch.Tensor:
        base = F.linear(x, weight)
        h = F.linear(x, lora_A)
        div = divisor() if div is None else div
        return dora_linear_compose(h, lora_B, magnitude, scaling, base=base, add_base=True, divisor=div)

    def step(div: torch.Tensor | None) -> None:
        for p in params:
            p.grad = None
        forward(div).backward(grad_out)

    return {
        "dorafactors-bare": lambda: step(None),
        "dorafactors-bare-cached-norm": lambda: step(fixed),
        "forward": lambda: forward(None),
    }


def bare_matches_layer(model: torch.nn.Module, bare: Any, x: torch.Tensor, grad_out: torch.Tensor) -> float:
    """The largest difference between the dorafactors layer's call and the bare one (output and the gradients
    of ``x``, ``A``, ``B`` and the magnitude), relative to each tensor's largest magnitude: the floor computes
    what the layer computes."""
    layer = _lora_layer(model)
    tensors = (
        x,
        layer.lora_A["default"].weight,
        layer.lora_B["default"].weight,
        layer.lora_magnitude_vector["default"].weight,
    )
    results = []
    for call in (lambda: model(x), bare):
        for t in tensors:
            t.grad = None
        out = call()
        out.backward(grad_out)
        results.append([out.detach().float(), *(t.grad.float() for t in tensors)])
    return max(((a - b).abs().max() / a.abs().max().clamp_min(1e-30)).item() for a, b in zip(results[0], results[1]))


def lora_bare_step(model: torch.nn.Module, x: torch.Tensor, grad_out: torch.Tensor):
    """``W x + s B (A x)`` on the tensors of the LoRA ``model``'s layer."""
    layer = _lora_layer(model)
    weight = layer.base_layer.weight
    lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scaling = float(layer.scaling["default"])

    def step() -> None:
        for p in (lora_A, lora_B, x):
            p.grad = None
        out = F.linear(x, weight) + F.linear(F.linear(x, lora_A), lora_B) * scaling
        out.backward(grad_out)

    return step


def peft_step(model: torch.nn.Module, x: torch.Tensor, grad_out: torch.Tensor):
    """The layer suite's ``fwd_bwd`` call of a PEFT model: the adapters marked as written, then fwd + bwd."""
    adapters = P.adapter_tensors(model)
    params = P.trainable(model)
    P.stepped_by_an_optimizer(params)

    def step() -> None:
        for p in (*params, x):
            p.grad = None
        P.bump_adapter_versions(adapters)
        model(x).backward(grad_out)

    return step


def main() -> None:
    args = parser.parse_args()
    settings = Settings.make(quick=args.dry_run_cpu, device="cpu" if args.dry_run_cpu else None)
    dim, tokens, rank = (64, 32, 8) if args.dry_run_cpu else (args.dim, args.tokens, args.rank)
    turns = 2 if args.dry_run_cpu else args.turns
    base = P.one_linear_base(dim, dim, settings.device, torch.bfloat16, settings.seed)
    models = {
        name: P.build_peft(
            base, name, r=rank, alpha=2 * rank, targets=("proj",), autocast_adapter_dtype=False, seed=settings.seed
        )
        for name in ("lora", "dorafactors")
    }
    gen = torch.Generator(device=settings.device).manual_seed(settings.seed)
    kw = {"device": settings.device, "dtype": torch.bfloat16}
    x = torch.randn(tokens, dim, generator=gen, **kw).requires_grad_(True)
    grad_out = torch.randn(tokens, dim, generator=gen, **kw)
    for model in models.values():
        model.train(True)
    fns = {
        "lora": peft_step(models["lora"], x, grad_out),
        "dorafactors": peft_step(models["dorafactors"], x, grad_out),
        "lora-bare": lora_bare_step(models["lora"], x, grad_out),
    }
    bare = bare_steps(models["dorafactors"], x, grad_out)
    bare_forward = bare.pop("forward")
    fns.update(bare)
    mismatch = bare_matches_layer(models["dorafactors"], bare_forward, x, grad_out)
    print(f"dorafactors-bare against the layer: largest relative difference {mismatch:.3g}")
    for fn in fns.values():  # warm: kernels compiled, the norm's graph captured (after two eager runs)
        for _ in range(3):
            fn()
    rows = ratios_in_turn(fns, settings, turns=turns, per_turn=TIMED_PER_TURN)
    for name, row in rows.items():
        print(
            f"{dim}x{dim}, {tokens} tokens, r={rank} {name:30s} {row['ms']:.3f} ms ({row['ms_vs_lora']:.3f}x), "
            f"p20 {row['ms_p20_vs_lora']:.3f}x, host {row['host_ms']:.3f} ms ({row['host_ms_vs_lora']:.3f}x)"
        )
    report = {
        "meta": collect_metadata(settings),
        "dim": dim,
        "tokens": tokens,
        "rank": rank,
        "turns": turns,
        "bare_vs_layer_max_rel_diff": mismatch,
        "rows": rows,
    }
    out = os.environ.get("OUT")
    if out:
        Path(out, "train_layer_floor.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
