"""Host work per training call of a Linear DoRA layer: what a call with a cached norm may skip, bitwise.

Gradient accumulation runs several forwards per optimizer step on one cached norm. The half-precision
magnitude's divisor (the norm rounded to the magnitude's dtype, ``norm.scale.scale_divisor``) is a function of
that norm alone, so the layer keeps it with the norm instead of rounding it again per call; the outputs and
gradients must stay bitwise those of a layer that recomputes everything on every call.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import dorafactors
from dorafactors.norm.scale import magnitude_scale
from tests._lifecycle import stepped_by_an_optimizer

DIM, RANK, TOKENS = 24, 4, 6


class _CastsOf(TorchDispatchMode):
    """Counts ``_to_copy`` ops whose input shares ``tensor``'s storage."""

    def __init__(self, tensor: torch.Tensor) -> None:
        super().__init__()
        self.ptr = tensor.untyped_storage().data_ptr()
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten._to_copy and isinstance(args[0], torch.Tensor):
            self.casts += int(args[0].untyped_storage().data_ptr() == self.ptr)
        return func(*args, **(kwargs or {}))


def _model(dtype: torch.dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(DIM, DIM, bias=False)).to(dtype)
    config = LoraConfig(r=RANK, lora_alpha=8, target_modules=["0"], use_dora=True, init_lora_weights=False)
    with dorafactors.patched():
        model = get_peft_model(base, config, autocast_adapter_dtype=False)
    with torch.no_grad():  # a trained magnitude: g != 1
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1.0 + 0.1 * torch.rand_like(param))
    return model


def _layer(model: nn.Module) -> nn.Module:
    return model.base_model.model[0].lora_magnitude_vector["default"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_accumulation_forward_does_not_round_the_cached_norm_again(dtype):
    model = _model(dtype)
    stepped_by_an_optimizer(model)  # training forwards then cache the norm
    x = torch.randn(TOKENS, DIM, dtype=dtype, requires_grad=True)
    model(x).sum().backward()  # computes and caches the norm
    layer = _layer(model)
    (norm,) = [entry[2] for entry in layer._df_norm_cache._entries.values()]
    with _CastsOf(norm) as counter:
        out = model(x)
    assert counter.casts == 0, "the cached norm was rounded to the magnitude's dtype again"
    # the scale the layer used is bitwise m / round(norm)
    expected = magnitude_scale(layer.weight.detach().reshape(-1), norm)
    assert torch.equal(layer._magnitude_scale(layer.weight, norm).detach(), expected)
    out.sum().backward()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_accumulation_and_steps_bitwise_as_recomputed_every_call(dtype):
    """Two micro-batches per step, three optimizer steps: bitwise the same outputs and gradients as a copy
    whose caches are cleared before every call (so nothing is reused), the divisor never stale."""
    cached, fresh = _model(dtype), _model(dtype)
    opt_c = torch.optim.SGD([p for p in cached.parameters() if p.requires_grad], lr=1e-2)
    opt_f = torch.optim.SGD([p for p in fresh.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        for _ in range(2):
            x = torch.randn(TOKENS, DIM, generator=gen).to(dtype)
            dorafactors.clear_norm_caches(fresh)
            out_c, out_f = cached(x), fresh(x)
            assert torch.equal(out_c, out_f)
            out_c.float().sum().backward()
            out_f.float().sum().backward()
        for (name, p_c), p_f in zip(cached.named_parameters(), fresh.parameters()):
            if p_c.requires_grad:
                assert torch.isfinite(p_c.grad).all(), name
                assert torch.equal(p_c.grad, p_f.grad), name
        opt_c.step()
        opt_f.step()
        opt_c.zero_grad()
        opt_f.zero_grad()
    # two in the first step (no optimizer had stepped the adapters yet: each training forward computes the norm),
    # then one per step: the second micro-batch hits the cache
    assert _layer(cached).norm_computations == 4


def test_divisor_memo_is_dropped_with_the_caches():
    model = _model(torch.bfloat16)
    x = torch.randn(TOKENS, DIM, dtype=torch.bfloat16, requires_grad=True)
    model(x).sum().backward()
    layer = _layer(model)
    assert "_df_divisor_memo" in layer.__dict__
    dorafactors.clear_norm_caches(model)
    assert "_df_divisor_memo" not in layer.__dict__


def test_base_layer_shortcut_is_pefts_get_base_layer():
    """The decode path's ``_base_layer_of`` answers PEFT's ``get_base_layer()`` from ``_modules`` for a plain
    ``nn.Linear`` base, and defers to PEFT wherever the walk could go further (a base that has a
    ``base_layer`` of its own, as a wrapped layer does, or is not a plain ``nn.Linear``)."""
    from dorafactors.layers.linear import _base_layer_of

    lora_layer = _model(torch.float32).base_model.model[0]
    assert _base_layer_of(lora_layer) is lora_layer.get_base_layer() is lora_layer._modules["base_layer"]

    inner = nn.Linear(DIM, DIM)
    for name in ("module", "buffer", "attribute"):
        wrapped = nn.Linear(DIM, DIM)
        if name == "module":
            wrapped.base_layer = inner
        elif name == "buffer":
            wrapped.register_buffer("base_layer", torch.zeros(1))
        else:
            wrapped.__dict__["base_layer"] = inner
        lora_layer._modules["base_layer"] = wrapped
        assert _base_layer_of(lora_layer) is lora_layer.get_base_layer(), name
        assert _base_layer_of(lora_layer) is not wrapped, name

    class Subclassed(nn.Linear):
        pass

    lora_layer._modules["base_layer"] = Subclassed(DIM, DIM)
    assert _base_layer_of(lora_layer) is lora_layer.get_base_layer() is lora_layer._modules["base_layer"]
