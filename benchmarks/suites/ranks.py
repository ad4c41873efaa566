"""Rank sweep on the model suite's Llama-shaped model, all bf16: one training step per call.

Training step = ``zero_grad`` + forward + backward (loss on all 4096 tokens) + AdamW step; peak extra
memory of one step. r in {16, 64, 128, 256, 384, 512, 768}, lora_alpha = 2r.
"""

from __future__ import annotations

from typing import Any

from .. import providers as P
from ..harness import OVERHEAD_CALLS, Case, Settings, provider_rows
from . import model as M
from ._workloads import Workload, measure

RANKS = (16, 64, 128, 256, 384, 512, 768)
QUICK_RANKS = (4, 8, 16)


def cases(settings: Settings) -> list[Case]:
    ranks = QUICK_RANKS if settings.quick else RANKS
    workload = Workload("train_step")
    seq = M.spec(settings).seq
    out = []
    lora, stock = M._PRIOR_MS[("bf16", "train")]
    for priority, r in enumerate(ranks):
        scale = 1.0 + r / 768  # priors grow with the rank (stock's dense norm work is ~linear in r)
        est = (lora + stock + (lora + stock) / 2) * scale * (settings.reps + OVERHEAD_CALLS) / 1e3
        est += M.BUILD_S * len(P.BASE_PROVIDERS)
        out.append(
            Case(
                suite="ranks",
                name=f"bf16/train_step/r={r}",
                params=M.model_params(settings, "bf16", r, workload),
                providers=P.BASE_PROVIDERS,
                run=_runner(r, seq, workload),
                est_s=est,
                priority=priority,
            )
        )
    return out


def _runner(r: int, seq: int, workload: Workload):
    def run(settings: Settings) -> list[dict[str, Any]]:
        models = M.model_set(settings, "bf16", r, P.BASE_PROVIDERS)
        ids = M.token_ids(settings, 1, seq)[0]
        inputs = {"ids": ids}
        return provider_rows(
            P.BASE_PROVIDERS, lambda p: measure(settings, models, p, workload, inputs), settings.device
        )

    return run
