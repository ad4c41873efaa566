"""PEFT's dropout path with its default dtypes through our ``DoraLinearVariant`` (``layers/linear.py``).

The variant tells the layer when the dropped-out fp32 input is an exact copy of a bf16 activation times
``nn.Dropout``'s factor; the base output is then recomputed with one bf16 GEMM on the recovered bf16 input
(``autograd/recompute_base.py``). Checked here:

* a patched PEFT model with a real ``nn.Dropout``: output and every gradient at least as close to fp64 as
  stock PEFT's (same mask: same RNG seed), and the recovered path is what ran (kernels under the interpreter);
* every condition of the proof (``bf16_dropout_scale``): where one fails the layer gets no scale and keeps the
  split GEMM of the fp32 input;
* the variant class is rebound while patched, kept by a model built then, converted and reverted by
  ``patch(model)`` / ``unpatch()``.
"""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import variants as peft_variants
from torch import nn

import dorafactors
import tests._models
from dorafactors.dispatch import config, rules
from dorafactors.kernels import split_matmul as sm
from dorafactors.layers import DoraLinearVariant
from dorafactors.layers.linear import bf16_dropout_scale
from tests._models import LayerCase, build_triplet, make_input, run_forward_backward
from tests._tolerances import assert_as_close_as_stock

BF16, F32, F64 = torch.bfloat16, torch.float32, torch.float64
P = 0.1
ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")


class _ReplayDropout(nn.Module):
    """The truth model's dropout: the mask stock's ``nn.Dropout`` drew, times the same fp32 factor, in fp64."""

    def __init__(self, source: nn.Dropout) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None
        source.register_forward_hook(self._record)

    def _record(self, _module, args, out) -> None:
        self.mask = (out != 0) | (args[0] == 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.mask is not None, "run the stock model first"
        factor = float(torch.tensor(1 / (1 - P), dtype=F32))
        return x * self.mask.to(x.dtype) * factor


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict)]


def _triplet(monkeypatch) -> tuple[nn.Module, nn.Module, nn.Module, LayerCase]:
    """bf16 base, fp32 adapters (PEFT's default), a real ``nn.Dropout(P)`` in stock and ours, the replayed mask
    in the fp64 truth."""
    monkeypatch.setattr(tests._models, "DEVICE", DEVICE)
    case = LayerCase(kind="linear", d_in=40, d_out=48, rank=6, batch=(2, 16), dropout=True, scaling=1.5)
    stock, ours, truth = build_triplet(case, BF16, fp32_adapters=True)
    for s_layer, o_layer, t_layer in zip(_lora_layers(stock), _lora_layers(ours), _lora_layers(truth)):
        for name in s_layer.lora_dropout:
            s_layer.lora_dropout[name] = nn.Dropout(P)
            o_layer.lora_dropout[name] = nn.Dropout(P)
            t_layer.lora_dropout[name] = _ReplayDropout(s_layer.lora_dropout[name])
    return stock, ours, truth, case


@pytest.mark.parametrize("path", ["reference", "kernels"])
def test_dropout_with_a_bf16_activation_is_as_close_to_fp64_as_stock(path, monkeypatch):
    monkeypatch.setenv("PEFT_DORA_FUSED", "1" if path == "kernels" else "0")
    config.invalidate_cache()
    stock, ours, truth, case = _triplet(monkeypatch)
    assert all(type(v) is DoraLinearVariant for m in _lora_layers(ours) for v in m.lora_variant.values())
    x = make_input(case, BF16)
    before = dict(sm.split_counts)
    torch.manual_seed(5)
    with rules.forced_split_matmul(True):
        out_o, grads_o = run_forward_backward(ours, x, train=True)
    ran = {k: v - before.get(k, 0) for k, v in sm.split_counts.items() if v != before.get(k, 0)}
    assert ran == {"recovered": 1, "split": 1, "matmul": 1}, ran
    torch.manual_seed(5)  # the same mask
    out_s, grads_s = run_forward_backward(stock, x, train=True)
    out_t, grads_t = run_forward_backward(truth, x.to(F64), train=True)
    triples = {"output": (out_o, out_s, out_t)}
    triples.update({name: (grads_o[name], grads_s[name], grads_t[name]) for name in grads_t})
    assert len(triples) == 5  # output, x, A, B, magnitude
    assert_as_close_as_stock(triples, BF16, what="PEFT default dtypes, nn.Dropout")


def _plain_case(monkeypatch) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """A patched model in training, its LoRA layer, an fp32 input as PEFT's variant sees it and a bf16 result."""
    _, ours, _, case = _triplet(monkeypatch)
    ours.train()
    layer = _lora_layers(ours)[0]
    x = make_input(case, BF16)
    return ours, layer, x.float(), layer.base_layer(x)


def test_the_scale_is_given_only_where_the_input_is_proven_bf16(monkeypatch):
    ours, layer, x, result = _plain_case(monkeypatch)
    adapter = next(iter(layer.lora_dropout))
    factor = bf16_dropout_scale(layer, adapter, x, result)
    assert factor == float(torch.tensor(1 / (1 - P), dtype=F32))

    def rejected() -> bool:
        return bf16_dropout_scale(layer, adapter, x, result) is None

    assert bf16_dropout_scale(layer, adapter, x, result.float()) is None  # a result PEFT already promoted
    assert bf16_dropout_scale(layer, adapter, x.to(BF16), result) is None  # not PEFT's fp32 cast
    layer.lora_dropout[adapter].eval()  # the dropout is the identity, the factor would be wrong
    assert rejected()
    layer.lora_dropout[adapter].train()
    ours.eval()
    assert rejected()
    ours.train()
    with torch.autocast(x.device.type, dtype=BF16):
        assert rejected()
    handle = layer.base_layer.register_forward_pre_hook(lambda _, args: args)
    assert rejected()
    handle.remove()
    layer.base_layer.forward = layer.base_layer.forward  # an instance forward may cast its input
    assert rejected()
    del layer.base_layer.forward
    with torch.device(x.device):  # a torch-function mode
        assert rejected()
    monkeypatch.setattr(nn.Linear, "forward", lambda self, inp: torch.nn.functional.linear(inp.to(BF16), self.weight))
    assert rejected()
    monkeypatch.undo()
    assert not rejected()
    original = layer.lora_dropout[adapter]
    for other in (nn.Dropout(0.0), nn.Dropout(1.0), type("MyDropout", (nn.Dropout,), {})(P), nn.Identity()):
        layer.lora_dropout[adapter] = other.train()
        assert rejected(), other
    layer.lora_dropout[adapter] = original
    assert not rejected()
    with torch.no_grad():
        layer.base_layer.weight.data = layer.base_layer.weight.data.float()
    assert rejected()  # an fp32 base weight: F.linear takes an fp32 activation, nothing is proven


def test_a_rejected_call_keeps_the_split_of_the_fp32_input(monkeypatch):
    ours, layer, _, _ = _plain_case(monkeypatch)
    adapter = next(iter(layer.lora_dropout))
    layer.lora_dropout[adapter] = type("MyDropout", (nn.Dropout,), {})(P)
    x = torch.randn(2, 16, layer.base_layer.in_features).to(DEVICE, BF16).requires_grad_()
    before = dict(sm.split_counts)
    with rules.forced_split_matmul(True):
        ours(x).float().sum().backward()
    ran = {k: v - before.get(k, 0) for k, v in sm.split_counts.items() if v != before.get(k, 0)}
    assert ran == {"split": 2, "linear": 1, "matmul": 1}, ran


def test_variant_class_follows_patching():
    from tests.test_patching import _model

    stock_model = _model()
    assert all(type(v) is peft_variants.DoraLinearVariant for v in _variants(stock_model))
    with dorafactors.patched():
        assert peft_variants.DoraLinearVariant is DoraLinearVariant
        built = _model()
    assert peft_variants.DoraLinearVariant is not DoraLinearVariant  # restored
    assert _variants(built) and all(type(v) is DoraLinearVariant for v in _variants(built))
    dorafactors.patch(stock_model)
    try:
        assert all(type(v) is DoraLinearVariant for v in _variants(stock_model))
        assert all(isinstance(v, peft_variants.DoraLinearVariant) for v in _variants(stock_model))
    finally:
        dorafactors.unpatch()
    assert all(type(v) is peft_variants.DoraLinearVariant for v in _variants(stock_model))


def _variants(model: nn.Module) -> list[object]:
    return [
        v
        for m in model.modules()
        for v in getattr(m, "lora_variant", {}).values()
        if isinstance(v, peft_variants.DoraLinearVariant) and not isinstance(v, peft_variants.DoraEmbeddingVariant)
    ]
