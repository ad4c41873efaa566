"""Layer suite: one bias-free Linear per anchors.md shape, 4096 tokens, bf16 base and adapters, r=384, alpha 2r.

* ``fwd_bwd``: train mode, ``y = layer(x)`` with ``x.requires_grad`` (a layer inside a network also
  produces dX), ``y.backward(dY)``; adapter weights marked as written before every call (so dorafactors
  recomputes its norm every call, as after an optimizer step);
* ``infer``: eval, ``no_grad``. ``dorafactors`` may serve its cached norm (weights frozen);
  ``dorafactors_cold`` is the same model with the cache defeated on every call.

The eager cases measure their providers in ``--rounds`` interleaved rounds (default 3) and keep each
provider's median round (``harness.provider_rows``): a single layer's call is host-bound at the smaller
shapes, and the host CPU's speed drifts.

Optional: ``torch.compile`` of LoRA, stock and dorafactors on the 4096x4096 layer (compile time recorded as
``compile_s``).
"""

from __future__ import annotations

from typing import Any

import torch

from .. import providers as P
from ..common import (
    DECODE_LAYER,
    DECODE_LAYER_SMALL,
    LAYER_SHAPES,
    QUICK_DECODE_LAYER,
    QUICK_DECODE_LAYER_SMALL,
    QUICK_LAYER_SHAPES,
)
from ..harness import MICRO_REPS, OVERHEAD_CALLS, Case, Settings, provider_rows
from ._workloads import Workload, measure

#: (d_in, d_out) of anchors.md, and the --quick stand-ins.
SHAPES = LAYER_SHAPES
QUICK_SHAPES = QUICK_LAYER_SHAPES

#: Priors (ms per call on an H100; anchors.md) for the estimates only: (lora, stock) per (shape, mode).
_PRIOR_MS = {
    ((4096, 4096), "infer"): (0.29, 0.67),
    ((4096, 4096), "fwd_bwd"): (0.40, 1.17),
    ((8192, 8192), "infer"): (0.96, 2.05),
    ((8192, 8192), "fwd_bwd"): (1.14, 2.53),
    ((4096, 14336), "infer"): (0.9, 2.0),
    ((4096, 14336), "fwd_bwd"): (1.22, 2.82),
    ((14336, 4096), "infer"): (0.8, 1.8),
    ((14336, 4096), "fwd_bwd"): (0.98, 2.24),
}
BUILD_S = 1.5  # three single-layer PEFT models, prior
COMPILE_S = 25.0  # one compiled single layer (forward, or forward+backward), prior
MICRO_CALLS = MICRO_REPS + OVERHEAD_CALLS + 3  # calls of a sub-ms measurement (+ flush time)


def shapes(settings: Settings):
    return QUICK_SHAPES if settings.quick else SHAPES


def tokens(settings: Settings) -> int:
    return 64 if settings.quick else 4096


def rank(settings: Settings) -> int:
    return 16 if settings.quick else 384


def decode_shape(settings: Settings, small: bool = False) -> int:
    if small:
        return QUICK_DECODE_LAYER_SMALL if settings.quick else DECODE_LAYER_SMALL
    return QUICK_DECODE_LAYER if settings.quick else DECODE_LAYER


def layer_params(settings: Settings, d_in: int, d_out: int, n_tokens: int, r: int) -> dict[str, Any]:
    return {
        "d_in": d_in,
        "d_out": d_out,
        "tokens": n_tokens,
        "r": r,
        "lora_alpha": 2 * r,
        "bias": False,
        "base_dtype": "bf16",
        "adapter_dtype": "bf16",
        "setup": "bf16",
    }


def layer_set(settings: Settings, d_in: int, d_out: int, r: int, providers) -> dict[str, Any]:
    base = P.one_linear_base(d_in, d_out, settings.device, torch.bfloat16, settings.seed)

    def build(provider: str):
        return P.build_peft(
            base, provider, r=r, alpha=2 * r, targets=("proj",), autocast_adapter_dtype=False, seed=settings.seed
        )

    return LAYER_POOL.get(("linear", d_in, d_out, r, settings.seed), build, providers)


LAYER_POOL = P.ModelPool(slots=2)


def _inputs(settings: Settings, d_in: int, d_out: int, n_tokens: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device=settings.device).manual_seed(settings.seed + d_in * 31 + d_out)
    kw = {"device": settings.device, "dtype": torch.bfloat16}
    x = torch.randn(n_tokens, d_in, generator=gen, **kw)
    return {
        "x": x,
        "x_grad": x.clone().requires_grad_(True),
        "grad_out": torch.randn(n_tokens, d_out, generator=gen, **kw),
    }


def rounds(settings: Settings, providers) -> int:
    """Interleaved rounds of a single-layer case: ``settings.rounds`` for eager providers (a single layer's
    call is short enough for the host to bound it), 1 for compiled ones (each round would compile again)."""
    return 1 if any(p.endswith("+compile") for p in providers) else settings.rounds


def runner(d_in: int, d_out: int, n_tokens: int, r: int, workload: Workload, providers):
    def run(settings: Settings) -> list[dict[str, Any]]:
        models = layer_set(settings, d_in, d_out, r, P.models_needed(providers))
        inputs = _inputs(settings, d_in, d_out, n_tokens)
        return provider_rows(
            providers,
            lambda p: measure(settings, models, p, workload, inputs),
            settings.device,
            rounds=rounds(settings, providers),
        )

    return run


def cases(settings: Settings) -> list[Case]:
    r = rank(settings)
    n = tokens(settings)
    out: list[Case] = []
    eager = {"fwd_bwd": P.BASE_PROVIDERS, "infer": (*P.BASE_PROVIDERS, "dorafactors_cold")}
    priority = 0
    for mode in ("fwd_bwd", "infer"):
        for (d_in, d_out), prior in zip(shapes(settings), SHAPES):
            providers = eager[mode]
            workload = Workload("layer_fwd_bwd" if mode == "fwd_bwd" else "layer_infer")
            lora, stock = _PRIOR_MS[(prior, mode)]
            est = (
                sum((lora, stock, (lora + stock) / 2, stock)[: len(providers)]) * MICRO_CALLS / 1e3 * settings.rounds
                + BUILD_S
            )
            out.append(
                Case(
                    suite="layer",
                    name=f"{d_in}->{d_out}/{mode}",
                    params={**layer_params(settings, d_in, d_out, n, r), "workload": mode},
                    providers=providers,
                    run=runner(d_in, d_out, n, r, workload, providers),
                    est_s=est,
                    priority=priority,
                )
            )
            priority += 1
    compiled = ("lora+compile", "stock+compile", "dorafactors+compile")
    d_in, d_out = shapes(settings)[0]
    for mode in ("fwd_bwd", "infer"):
        workload = Workload("layer_fwd_bwd" if mode == "fwd_bwd" else "layer_infer")
        out.append(
            Case(
                suite="layer",
                name=f"{d_in}->{d_out}/{mode}",
                params={**layer_params(settings, d_in, d_out, n, r), "workload": mode},
                providers=compiled,
                run=runner(d_in, d_out, n, r, workload, compiled),
                est_s=COMPILE_S * len(compiled) + BUILD_S,
                optional=True,
                priority=priority,
            )
        )
        priority += 1
    return out
