"""transformers' ``Conv1D`` (``fan_in_fan_out=True``) on PEFT's dropout path, where the layer recomputes the base
output from the dropped-out input: the base weight enters as a transposed view of itself
(``DoraLinearLayer._oriented_base_weight``), not as PEFT's ``transpose()``, whose new Parameter is a leaf of its
own that requires a gradient.

* the backward accumulates into the model's own tensors only (no weight gradient computed for a temporary);
* a trainable base weight gets its whole gradient: that of the same layer in ``nn.Linear`` layout, where the
  weight is used as it is, in stock PEFT at fp64;
* ``torch.compile(fullgraph=True)`` traces it.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

import dorafactors
from tests._models import Holder
from tests._tolerances import assert_dtype_close

D_IN, D_OUT, RANK = 12, 10, 4


class _MaskDropout(nn.Module):
    """A dropout with a fixed mask (deterministic, and traceable: a buffer times the input)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        keep = torch.rand(3, D_IN, generator=torch.Generator().manual_seed(seed)) >= 0.3
        self.register_buffer("mask", keep.to(torch.float32) / 0.7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask.to(x.dtype)


def _peft(layer: nn.Module, *, fan_in_fan_out: bool, patched: bool) -> nn.Module:
    config = LoraConfig(
        r=RANK,
        lora_alpha=RANK,
        target_modules=["target"],
        use_dora=True,
        init_lora_weights=False,
        lora_dropout=0.1,
        fan_in_fan_out=fan_in_fan_out,
    )
    with dorafactors.patched() if patched else contextlib.nullcontext():
        model = get_peft_model(Holder(copy.deepcopy(layer)), config)
    target = model.base_model.model.target
    target.lora_dropout["default"] = _MaskDropout(seed=4)
    return model


def _conv1d_pair(train_base: bool) -> tuple[nn.Module, nn.Module]:
    """(ours on a ``Conv1D``, stock fp64 on the same layer as an ``nn.Linear``): identical non-identity adapters."""
    torch.manual_seed(0)
    conv = Conv1D(D_OUT, D_IN)  # weight [d_in, d_out]
    nn.init.normal_(conv.weight, std=0.3)
    nn.init.normal_(conv.bias, std=0.3)
    linear = nn.Linear(D_IN, D_OUT)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    ours = _peft(conv, fan_in_fan_out=True, patched=True)
    truth = _peft(linear, fan_in_fan_out=False, patched=False).to(torch.float64)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        adapters = {}
        for name, param in ours.named_parameters():
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=gen))
            elif "lora_magnitude_vector" in name:
                param.mul_(1.0 + 0.25 * torch.randn(param.shape, generator=gen))
            if "lora_" in name:
                adapters[name] = param.detach().clone()
        for name, param in truth.named_parameters():
            if name in adapters:
                param.copy_(adapters[name])
    for model in (ours, truth):
        model.base_model.model.target.base_layer.weight.requires_grad_(train_base)
        model.train()
    return ours, truth


def _forward_backward(model: nn.Module, x: torch.Tensor, call=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and every gradient of ``sum(out * probe)``; ``call``: what runs ``model`` (default: itself)."""
    model.zero_grad(set_to_none=True)
    out = (call or model)(x.to(next(model.parameters()).dtype))
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (out.to(torch.float64) * probe).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _accumulated_leaves(out: torch.Tensor) -> list[torch.Tensor]:
    """The tensors a backward from ``out`` accumulates gradients into (its graph's ``AccumulateGrad`` nodes)."""
    leaves, seen, stack = [], set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.append(node.variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


@pytest.mark.parametrize("train_base", [False, True], ids=["frozen-base", "trainable-base"])
def test_conv1d_dropout_path_backward_reaches_the_models_own_tensors_only(train_base):
    ours, _ = _conv1d_pair(train_base)
    x = torch.randn(3, D_IN, generator=torch.Generator().manual_seed(2), requires_grad=True)
    out = ours(x)
    own = {id(p) for p in ours.parameters() if p.requires_grad} | {id(x)}
    leaves = _accumulated_leaves(out)
    assert leaves and all(id(leaf) in own for leaf in leaves), [tuple(t.shape) for t in leaves]


def test_a_trainable_conv1d_base_weight_gets_the_gradient_of_its_linear_twin():
    """fp32 ``Conv1D`` layer against stock PEFT's fp64 ``nn.Linear`` layout of the same weights: output and every
    gradient, the base weight's included (transposed back)."""
    ours, truth = _conv1d_pair(train_base=True)
    x = torch.randn(3, D_IN, generator=torch.Generator().manual_seed(2))
    out, grads = _forward_backward(ours, x)
    expected, expected_grads = _forward_backward(truth, x)
    assert_dtype_close(out, expected, torch.float32, name="output")
    assert set(grads) == set(expected_grads)
    for name, grad in grads.items():
        want = expected_grads[name]
        if name.endswith("base_layer.weight"):
            want = want.T  # Conv1D stores [d_in, d_out]
        assert_dtype_close(grad, want, torch.float32, name=name)


@pytest.mark.parametrize("backend", ["aot_eager"])
def test_conv1d_dropout_path_compiles_with_fullgraph(backend):
    ours, _ = _conv1d_pair(train_base=False)
    x = torch.randn(3, D_IN, generator=torch.Generator().manual_seed(2))
    eager, eager_grads = _forward_backward(ours, x)
    torch._dynamo.reset()
    compiled = torch.compile(lambda inputs: ours(inputs), backend=backend, fullgraph=True)
    out, grads = _forward_backward(ours, x, compiled)
    assert_dtype_close(out, eager, torch.float32, name="compiled output")
    assert set(grads) == set(eager_grads)
    for name, grad in grads.items():
        assert_dtype_close(grad, eager_grads[name], torch.float32, name=f"compiled {name}")
