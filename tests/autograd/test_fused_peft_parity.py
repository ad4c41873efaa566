"""Patched PEFT DoRA models on the fused kernels give stock PEFT's outputs and gradients (fp32, rel 1e-5).

The kernels run on the GPU, or without one on the CPU interpreter (``PEFT_DORA_FUSED=1``,
``PEFT_DORA_FUSED_BACKWARD=1``); every case asserts that they really ran. ``lora_dropout > 0`` in training is PEFT's ``base_result=None`` path (base
recomputed in column chunks, composed by the fused kernel, fused one-pass backward).
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

import dorafactors
from dorafactors.dispatch import config
from dorafactors.kernels import compose as kc
from tests._tolerances import TOLERANCES, assert_close_verbose

F32 = torch.float32
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def fused(monkeypatch):
    monkeypatch.setenv("PEFT_DORA_FUSED", "1")
    monkeypatch.setenv("PEFT_DORA_FUSED_BACKWARD", "1")
    config.invalidate_cache()


class _ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv1x1 = torch.nn.Conv2d(8, 5, 1)
        self.fc = torch.nn.Linear(5 * 6 * 6, 24)

    def forward(self, x):
        h = torch.relu(self.conv1x1(torch.relu(self.conv(x))))
        return self.fc(h.flatten(1))


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(32, 96)
        self.down = torch.nn.Linear(96, 40, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


CASES = {
    "mlp": (_MLP, ["up", "down"], (3, 7, 32)),
    "conv": (_ConvNet, ["conv", "conv1x1", "fc"], (2, 3, 6, 6)),
}


def _models(kind: str, dropout: float):
    cls, targets, _ = CASES[kind]
    torch.manual_seed(0)
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, use_dora=True, init_lora_weights=False, lora_dropout=dropout
    )
    stock = get_peft_model(cls().to(DEVICE), cfg)
    with torch.no_grad():  # magnitude away from ||W + sBA|| as well, so g != 1
        for name, p in stock.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.3 * torch.rand_like(p))
    ours = copy.deepcopy(stock)
    dorafactors.patch(ours)
    return stock, ours


def _close(actual, expected, name):
    rtol, atol = TOLERANCES[F32]
    assert_close_verbose(actual, expected, rtol=rtol, atol=atol * max(1.0, expected.abs().max().item()), name=name)


def _forward_backward(model, x, seed):
    torch.manual_seed(seed)  # the same dropout masks for both models
    out = model(x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("kind", sorted(CASES))
def test_training_matches_stock_peft(kind, dropout):
    stock, ours = _models(kind, dropout)
    x = torch.randn(CASES[kind][2], generator=torch.Generator().manual_seed(1)).to(DEVICE)
    stock.train()
    ours.train()
    want, want_grads = _forward_backward(stock, x, seed=2)
    before = dict(kc.launch_counts)
    got, got_grads = _forward_backward(ours, x, seed=2)
    launched = {k: v - before.get(k, 0) for k, v in kc.launch_counts.items()}
    n_layers = len(CASES[kind][1])
    forward = launched.get("compose_fwd", 0) + launched.get("compose_fwd_inplace", 0)
    assert forward >= n_layers, f"every DoRA layer composes on the kernel: {launched}"
    backward = sum(launched.get(k, 0) for k in ("compose_bwd", "compose_bwd_rows", "compose_bwd_lora_b"))
    assert backward == n_layers, launched
    _close(got, want, "output")
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        _close(got_grads[name], grad, f"grad {name}")


@pytest.mark.parametrize("kind", sorted(CASES))
def test_inference_matches_stock_peft(kind):
    stock, ours = _models(kind, 0.1)
    x = torch.randn(CASES[kind][2], generator=torch.Generator().manual_seed(3)).to(DEVICE)
    stock.eval()
    ours.eval()
    before = dict(kc.launch_counts)
    with torch.no_grad():
        want, got = stock(x), ours(x)
    launched = sum(kc.launch_counts[k] - before.get(k, 0) for k in ("compose_fwd", "compose_fwd_inplace"))
    assert launched == len(CASES[kind][1])  # the layers compose in place into their LoRA output
    _close(got, want, "output")


def test_frozen_magnitude_training_matches_stock_peft():
    stock, ours = _models("mlp", 0.0)
    for m in (stock, ours):
        for name, p in m.named_parameters():
            if "lora_magnitude_vector" in name:
                p.requires_grad_(False)
        m.train()
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    want, want_grads = _forward_backward(stock, x, seed=5)
    before = dict(kc.launch_counts)
    got, got_grads = _forward_backward(ours, x, seed=5)
    launched = sum(kc.launch_counts[k] - before.get(k, 0) for k in ("compose_bwd", "compose_bwd_lora_b"))
    assert launched == 2
    assert kc.launch_counts["sum_partials"] == before.get("sum_partials", 0), "no magnitude gradient computed"
    _close(got, want, "output")
    for name, grad in want_grads.items():
        _close(got_grads[name], grad, f"grad {name}")
