"""Norm suite: the row norm ``||W + s B A||`` (the per-step DoRA weight norm) on its own.

Providers:

* ``gemm_floor``: the plain bf16 ``W @ A.T`` GEMM (the factored norm's main product): the floor;
* ``stock``: what stock PEFT runs in every forward: ``lora_B(lora_A(eye(d_in))).T`` (PEFT's FSDP-safe
  identity trick), cast to the activation dtype (= adapter dtype), ``W.to(that dtype)``, then PEFT's own
  ``DoraLinearLayer.get_weight_norm`` (``W + s * lora_weight``, ``torch.linalg.norm``);
* ``dorafactors_cold``: ``dorafactors.norm.engine.weight_norm(W, A, B, s)``, computing ``||W||^2`` too;
* ``dorafactors_warm``: the same with ``cached_sumsq`` (``||W||^2`` cached, as after the first step).

W is bf16 ``[d_out, d_in]`` (N(0, 0.02)), A ``[r, d_in]`` (PEFT's kaiming-uniform range), B ``[d_out, r]``
~ N(0, 0.01), s = 2 (alpha = 2r), ``no_grad``. Metrics: time, peak extra memory of one call, relative
error ``||n - n64|| / ||n64||`` against the fp64 norm.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .. import providers as P
from ..harness import MICRO_REPS, OVERHEAD_CALLS, Case, Settings, bench, peak_extra_mib, provider_rows

PROVIDERS = ("gemm_floor", "stock", "dorafactors_cold", "dorafactors_warm")

#: (d_out, d_in, r, adapter dtype)
SHAPES = (
    (4096, 4096, 384, "bf16"),
    (8192, 8192, 384, "bf16"),
    (14336, 4096, 384, "bf16"),
    (4096, 14336, 384, "bf16"),
    (8192, 28672, 384, "bf16"),
    (8192, 8192, 768, "bf16"),
    (4096, 4096, 16, "bf16"),
    (4096, 4096, 64, "bf16"),
    (4096, 4096, 128, "bf16"),
    (4096, 4096, 256, "bf16"),
    (4096, 4096, 512, "bf16"),
    (4096, 4096, 768, "bf16"),
    (28672, 8192, 384, "bf16"),
    (4096, 4096, 384, "fp32"),
    (8192, 28672, 384, "fp32"),
)
QUICK_SHAPES = ((64, 64, 8, "bf16"), (96, 160, 16, "bf16"), (64, 64, 8, "fp32"))

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _estimate(d_out: int, d_in: int, r: int) -> float:
    """Prior (s) for the whole case on an H100: GEMM/copy roofline per provider x calls + fp64 truth."""
    tflops, tbs = 600e12, 2.5e12
    floor = 2 * d_out * d_in * r / tflops
    stock = 2 * 2 * d_in * d_in * r / tflops + 2 * d_out * d_in * r / tflops + 3 * 2 * d_out * d_in / tbs
    df = 2 * floor + 2 * d_out * d_in / tbs
    per_call = floor + stock + 2 * df + 4 * 0.25e-3  # + L2 flush per call
    fp64 = 2 * d_out * d_in * r / 50e12 + 8 * 4 * d_out * d_in / tbs
    return per_call * (MICRO_REPS + OVERHEAD_CALLS) + fp64 + 0.3


def cases(settings: Settings) -> list[Case]:
    out = []
    for priority, (d_out, d_in, r, adt) in enumerate(QUICK_SHAPES if settings.quick else SHAPES):
        name = f"{d_out}x{d_in}/r={r}" + ("/fp32-adapters" if adt == "fp32" else "")
        out.append(
            Case(
                suite="norm",
                name=name,
                params={
                    "d_out": d_out,
                    "d_in": d_in,
                    "r": r,
                    "scaling": 2.0,
                    "weight_dtype": "bf16",
                    "adapter_dtype": adt,
                },
                providers=PROVIDERS,
                run=_runner(d_out, d_in, r, _DTYPES[adt]),
                est_s=_estimate(d_out, d_in, r),
                priority=priority,
            )
        )
    return out


@torch.no_grad()
def _truth(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """fp64 ``||W + s B A||_row``, in row blocks (bounded memory)."""
    a64 = a.double()
    parts = []
    for start in range(0, w.shape[0], 2048):
        rows = slice(start, start + 2048)
        parts.append((w[rows].double() + s * (b[rows].double() @ a64)).norm(dim=1))
    return torch.cat(parts)


def _rel_error(value: torch.Tensor, truth: torch.Tensor) -> float:
    v = value.double()
    if not torch.isfinite(v).all():
        return math.inf
    return float((v - truth).norm() / truth.norm())


def _runner(d_out: int, d_in: int, r: int, adapter_dtype: torch.dtype):
    def run(settings: Settings) -> list[dict[str, Any]]:
        from dorafactors.norm import engine

        dev = settings.device
        gen = torch.Generator(device=dev).manual_seed(settings.seed + d_out * 7 + d_in * 13 + r)
        s = 2.0
        w = (torch.randn(d_out, d_in, generator=gen, device=dev) * 0.02).to(torch.bfloat16)
        bound = 1.0 / math.sqrt(d_in)
        a = torch.empty(r, d_in, device=dev).uniform_(-bound, bound, generator=gen).to(adapter_dtype)
        b = (torch.randn(d_out, r, generator=gen, device=dev) * 0.01).to(adapter_dtype)
        truth = _truth(w, a, b, s)
        stock_layer = P.STOCK_DORA_LINEAR(fan_in_fan_out=False)
        a_floor = a.to(torch.bfloat16)

        def stock_norm() -> torch.Tensor:
            eye = torch.eye(d_in, device=dev, dtype=a.dtype)
            lora_weight = F.linear(F.linear(eye, a), b).T.to(adapter_dtype)
            return stock_layer.get_weight_norm(w.to(adapter_dtype), lora_weight.detach(), s)

        sumsq: list[torch.Tensor] = []

        def fns(provider: str):
            if provider == "gemm_floor":
                return lambda: w @ a_floor.T
            if provider == "stock":
                return stock_norm
            if provider == "dorafactors_cold":
                return lambda: engine.weight_norm(w, a, b, s)
            if provider == "dorafactors_warm":
                if not sumsq:
                    sumsq.append(engine.weight_sumsq(w))
                return lambda: engine.weight_norm(w, a, b, s, cached_sumsq=sumsq[0])
            raise ValueError(provider)

        def measure(provider: str):
            fn = fns(provider)
            with torch.no_grad():
                value = fn()
                metrics = bench(fn, settings)
                metrics["peak_extra_mib"] = peak_extra_mib(fn, settings)
            impl: dict[str, Any] = {}
            if provider != "gemm_floor":
                metrics["rel_err_vs_fp64"] = _rel_error(value, truth)
                impl["out_dtype"] = str(value.dtype).replace("torch.", "")
            if provider.startswith("dorafactors"):
                impl["df_norm_path"] = engine.norm_path(w, a, b)
            metrics["weight_mib"] = w.numel() * w.element_size() / 2**20
            return metrics, impl

        return provider_rows(PROVIDERS, measure, dev)

    return run
