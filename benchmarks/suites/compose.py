"""Compose suite: ``out = (g - 1) * base + g * (s * lora)`` on its own, next to the device copy bandwidth.

Providers:

* ``eager``: stock PEFT's expression verbatim, all bf16 (``(g - 1) * base + g * lora * s`` with a bf16
  ``g``, as the all-bf16 stock layer computes it), autograd for the backward;
* ``dorafactors``: ``dorafactors.autograd.compose.dora_compose(lora, base, g, s)`` with an fp32 ``g``
  (it dispatches to the Triton kernel on GPU when that is available; ``impl.df_compose_fused`` says so);
* ``copy``: ``dst.copy_(src)`` of one rows x cols bf16 tensor: the attainable bandwidth at that size.

``fwd``: forward only (no grad). ``fwd_bwd``: lora, base and g require grad; forward + ``backward(dY)``.
GB/s use nominal traffic (bf16 elements of rows x cols): fwd 3 tensors (read lora, base; write out),
fwd+bwd 8 (+ save inner, read dY and inner, write dlora, dbase), copy 2. Inputs are not rotated: do_bench
flushes L2 before every timed call. ``rel_err_vs_fp64`` is measured on the first <= 1024 rows.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..harness import MICRO_REPS, OVERHEAD_CALLS, Case, Settings, bench, peak_extra_mib, provider_rows

PROVIDERS = ("eager", "dorafactors", "copy")

#: (rows, cols)
SHAPES = (
    (4096, 4096),
    (4096, 14336),
    (8192, 8192),
    (1, 4096),
    (1, 8192),
    (16, 8192),
    (512, 4096),
    (2048, 4096),
    (4096, 512),
    (4096, 28672),
    (16384, 8192),
    (32768, 512),
    (32768, 8192),
    (16384, 28672),
)
QUICK_SHAPES = ((1, 64), (64, 128), (256, 512))
COPY_BYTES = 1 << 30
QUICK_COPY_BYTES = 1 << 24


def _estimate(rows: int, cols: int, mode: str) -> float:
    n_bytes = rows * cols * 2
    tensors = 3 if mode == "fwd" else 8
    eager = (6 if mode == "fwd" else 20) * n_bytes / 2.5e12
    df = tensors * n_bytes / 2.5e12
    copy = 2 * n_bytes / 2.5e12
    per_call = eager + df + copy + 3 * 0.25e-3
    return per_call * (MICRO_REPS + OVERHEAD_CALLS) + 0.2 + 40 * n_bytes / 2.5e12


def cases(settings: Settings) -> list[Case]:
    out = []
    priority = 0
    copy_bytes = QUICK_COPY_BYTES if settings.quick else COPY_BYTES
    out.append(
        Case(
            suite="compose",
            name=f"copy/{copy_bytes >> 20}MiB",
            params={"bytes": copy_bytes, "dtype": "bf16"},
            providers=("copy",),
            run=_copy_runner(copy_bytes),
            est_s=0.5,
            priority=priority,
        )
    )
    for mode in ("fwd", "fwd_bwd"):
        for rows, cols in QUICK_SHAPES if settings.quick else SHAPES:
            priority += 1
            out.append(
                Case(
                    suite="compose",
                    name=f"{rows}x{cols}/{mode}",
                    params={
                        "rows": rows,
                        "cols": cols,
                        "mode": mode,
                        "activation_dtype": "bf16",
                        "g_dtype": "fp32 (eager: bf16, as all-bf16 stock)",
                        "scaling": 2.0,
                    },
                    providers=PROVIDERS,
                    run=_runner(rows, cols, mode),
                    est_s=_estimate(rows, cols, mode),
                    priority=priority,
                )
            )
    return out


def _copy_runner(n_bytes: int):
    def run(settings: Settings) -> list[dict[str, Any]]:
        def measure(provider: str):
            src = torch.empty(n_bytes // 2, device=settings.device, dtype=torch.bfloat16).normal_()
            dst = torch.empty_like(src)
            metrics = bench(lambda: dst.copy_(src), settings)
            metrics["gbps"] = 2 * n_bytes / (metrics["ms"] * 1e-3) / 1e9
            return metrics, {}

        return provider_rows(("copy",), measure, settings.device)

    return run


def _runner(rows: int, cols: int, mode: str):
    def run(settings: Settings) -> list[dict[str, Any]]:
        from dorafactors.autograd import compose as C

        dev = settings.device
        s = 2.0
        gen = torch.Generator(device=dev).manual_seed(settings.seed + rows * 3 + cols)
        lora = torch.randn(rows, cols, generator=gen, device=dev).to(torch.bfloat16)
        base = torch.randn(rows, cols, generator=gen, device=dev).to(torch.bfloat16)
        g32 = 1.0 + 0.05 * torch.randn(cols, generator=gen, device=dev)
        g16 = g32.to(torch.bfloat16)
        elem = 2
        nominal = (3 if mode == "fwd" else 8) * rows * cols * elem
        truth_rows = min(rows, 1024)
        truth = (g32.double() - 1) * base[:truth_rows].double() + g32.double() * (s * lora[:truth_rows].double())

        def eager(lo, ba, g):
            return (g - 1) * ba + g * lo * s

        def dorafactors(lo, ba, g):
            return C.dora_compose(lo, ba, g, s)

        def measure(provider: str):
            impl: dict[str, Any] = {}
            if provider == "copy":
                dst = torch.empty_like(base)
                metrics = bench(lambda: dst.copy_(base), settings)
                metrics["gbps"] = 2 * rows * cols * elem / (metrics["ms"] * 1e-3) / 1e9
                return metrics, impl
            f, g = (eager, g16) if provider == "eager" else (dorafactors, g32)
            if provider == "dorafactors":
                impl.update(_fused_paths(lora, base, g32, training=mode == "fwd_bwd"))
            with torch.no_grad():
                value = f(lora[:truth_rows], base[:truth_rows], g)
            rel = float((value.double() - truth).norm() / truth.norm())
            if mode == "fwd":

                def fn():
                    with torch.no_grad():
                        return f(lora, base, g)

                grads = None
            else:
                lo = lora.clone().requires_grad_(True)
                ba = base.clone().requires_grad_(True)
                gg = g.clone().requires_grad_(True)
                d_out = torch.randn(rows, cols, generator=gen, device=dev).to(torch.bfloat16)
                grads = [lo, ba, gg]

                def fn():
                    f(lo, ba, gg).backward(d_out)

            metrics = bench(fn, settings, grad_to_none=grads)
            metrics["peak_extra_mib"] = peak_extra_mib(fn, settings, grad_to_none=grads)
            metrics["gbps"] = nominal / (metrics["ms"] * 1e-3) / 1e9
            metrics["rel_err_vs_fp64"] = rel if math.isfinite(rel) else math.inf
            return metrics, impl

        return provider_rows(PROVIDERS, measure, dev)

    return run


def _fused_paths(lora: torch.Tensor, base: torch.Tensor, g: torch.Tensor, *, training: bool) -> dict[str, Any]:
    try:
        from dorafactors.autograd import fused

        return {"df_compose_fused": bool(fused.available_for(lora, base, g, -1, training=training))}
    except Exception as exc:
        return {"df_compose_fused": f"unknown ({type(exc).__name__})"}
