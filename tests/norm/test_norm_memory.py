"""The norm never allocates a [d_out, d_in] temporary (nor a d_in x d_in identity), and the chunked
working set stays inside PEFT_DORA_NORM_CHUNK_MB. Measured op by op with a TorchDispatchMode."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import dorafactors
from dorafactors.dispatch import config
from dorafactors.norm import engine
from tests._alloc import AllocationTracker


def _factors(d_out, d_in, rank, w_dtype, lora_dtype, *, transpose=False):
    gen = torch.Generator().manual_seed(0)
    w = (
        torch.randn(d_in, d_out, generator=gen).to(w_dtype).T
        if transpose
        else torch.randn(d_out, d_in, generator=gen).to(w_dtype)
    )
    a = (torch.randn(rank, d_in, generator=gen) / d_in**0.5).to(lora_dtype)
    b = (0.1 * torch.randn(d_out, rank, generator=gen)).to(lora_dtype)
    return w, a, b


@pytest.mark.parametrize(
    ("w_dtype", "lora_dtype", "transpose"),
    [
        (torch.bfloat16, torch.bfloat16, False),
        (torch.bfloat16, torch.float32, True),
        (torch.float32, torch.float32, False),
    ],
    ids=["bf16", "bf16-fp32-adapters-transposed", "fp32"],
)
def test_norm_respects_budget_and_never_allocates_dense(monkeypatch, w_dtype, lora_dtype, transpose):
    monkeypatch.setenv("PEFT_DORA_NORM_CHUNK_MB", "16")
    config.invalidate_cache()
    d_out, d_in, rank = 2048, 8192, 64
    w, a, b = _factors(d_out, d_in, rank, w_dtype, lora_dtype, transpose=transpose)
    budget = config.get_dora_norm_threshold_bytes()
    with AllocationTracker() as cold:
        norm = engine.weight_norm(w, a, b, 0.7)
    sumsq = engine.weight_sumsq(w)
    with AllocationTracker() as warm:
        engine.weight_norm(w, a, b, 0.7, cached_sumsq=sumsq)
    for tracker in (cold, warm):
        assert tracker.largest_numel < d_out * d_in, tracker.allocations
        assert tracker.peak_bytes <= budget, f"peak {tracker.peak_bytes} > budget {budget}"
        assert len(tracker.allocations) > 10  # it really chunked (several column blocks)
    truth = (w.double() + 0.7 * b.double() @ a.double()).norm(dim=1)
    torch.testing.assert_close(norm.double(), truth, rtol=2**-23, atol=0)  # fp64 sums, one fp32 rounding


def test_dense_path_for_small_d_in_stays_in_row_blocks(monkeypatch):
    monkeypatch.setenv("PEFT_DORA_NORM_CHUNK_MB", "16")
    config.invalidate_cache()
    d_out, d_in, rank = 8192, 256, 512  # d_in <= r: the exact dense form
    w, a, b = _factors(d_out, d_in, rank, torch.float32, torch.float32)
    assert engine.norm_path(w, a, b) == "dense"
    with AllocationTracker() as tracker:
        norm = engine.weight_norm(w, a, b, 1.3)
    # Here B [d_out, r] is itself larger than the dense delta; the blocks must stay below the budget.
    assert tracker.largest_numel < max(d_out * d_in, b.numel()) // 2
    assert tracker.peak_bytes <= config.get_dora_norm_threshold_bytes()
    truth = (w.double() + 1.3 * b.double() @ a.double()).norm(dim=1)
    torch.testing.assert_close(norm.double(), truth, rtol=2**-23, atol=0)


@pytest.mark.parametrize("dropout", [False, True], ids=["base_result", "recompute_base"])
def test_layer_forward_backward_has_no_dense_temporary(monkeypatch, dropout):
    """The whole PEFT DoRA Linear forward and backward: no identity, no B@A, no full copy of W."""
    monkeypatch.setenv("PEFT_DORA_FWD_CHUNK_MB", "16")
    config.invalidate_cache()
    d_in, d_out, tokens = 1024, 4096, 64

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(d_in, d_out).to(torch.bfloat16)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    with dorafactors.patched():
        model = get_peft_model(
            Net(),
            LoraConfig(
                r=16,
                target_modules=["proj"],
                use_dora=True,
                init_lora_weights=False,
                lora_dropout=0.1 if dropout else 0.0,
            ),
        )
    model.train()
    x = torch.randn(tokens, d_in, dtype=torch.bfloat16, requires_grad=True)
    with AllocationTracker() as tracker:
        model(x).float().square().sum().backward()
    assert tracker.largest_numel < d_out * d_in, sorted(tracker.allocations, key=lambda a: -a[1])[:3]
    assert not [op for op, _, _ in tracker.allocations if "eye" in op]  # no identity matrix either
