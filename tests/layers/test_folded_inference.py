"""The folded decode path (``autograd/folded.py``): taken exactly where it applies, as close to fp64 truth as
stock PEFT and as the kernel/reference path, and never stale after any change of what it folds in.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given

from dorafactors.dispatch import config, rules
from tests._models import LayerCase, build_triplet, layer_cases, make_input
from tests._tolerances import assert_dtype_close, assert_not_worse, rel_error

TIGHT = (torch.float32, torch.float64)
HALF = (torch.bfloat16, torch.float16)


def _dora(model) -> list:
    return [m for m in model.modules() if type(m).__name__ == "DoraLinearLayer"]


def _folds(model) -> int:
    return sum(len(layer._df_fold_cache) for layer in _dora(model))


def _no_grad_eval(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("dtype", TIGHT, ids=str)
@given(case=layer_cases(kinds=("linear", "gpt2_conv1d")))
def test_fold_matches_stock(case: LayerCase, dtype: torch.dtype) -> None:
    """Every small shape, scaling (0 and negative included), bias on/off, 1-2 adapters: ours == stock."""
    stock, ours, _ = build_triplet(case, dtype)
    x = make_input(case, dtype)
    out_o = _no_grad_eval(ours, x)
    assert _folds(ours) == case.adapters  # the path under test was taken, once per adapter
    assert_dtype_close(out_o, _no_grad_eval(stock, x), dtype, name=f"{case.kind} folded output")
    assert_dtype_close(_no_grad_eval(ours, x), out_o, dtype, name="second call (served from the fold cache)")


@pytest.mark.parametrize("fp32_adapters", [False, True], ids=["all-half", "fp32-adapters"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("kind", ["linear", "gpt2_conv1d"])
def test_fold_half_not_worse_than_stock_or_the_unfolded_path(kind, dtype, fp32_adapters, monkeypatch) -> None:
    """bf16/fp16 decode: the fold is as close to fp64 truth as stock PEFT and as our unfolded composition."""
    ratios_stock: list[float] = []
    ratios_unfolded: list[float] = []
    for seed in range(4):
        for extra in (dict(), dict(adapters=2, scaling=2.0), dict(bias=False)):
            case = LayerCase(kind=kind, d_in=96, d_out=256, rank=8, batch=(4, 16), seed=seed, **extra)
            stock, ours, truth = build_triplet(case, dtype, fp32_adapters=fp32_adapters)
            x = make_input(case, dtype)
            folded = _no_grad_eval(ours, x)
            assert _folds(ours) == case.adapters
            with monkeypatch.context() as m:
                m.setattr(rules, "INFERENCE_FOLD_MAX_ROWS", 0)
                unfolded = _no_grad_eval(ours, x)
            ref = _no_grad_eval(truth, x.to(torch.float64))
            out_s = _no_grad_eval(stock, x)
            assert folded.dtype == out_s.dtype
            assert_not_worse(folded, out_s, ref, dtype, name=f"{kind} folded vs stock")
            err = rel_error(folded, ref)
            ratios_stock.append(math.log(err / rel_error(out_s, ref)))
            ratios_unfolded.append(math.log(err / max(rel_error(unfolded, ref), 1e-300)))
    # geometric means: the fold must not be worse than stock, and within 10% of the unfolded path
    assert math.exp(sum(ratios_stock) / len(ratios_stock)) <= 1.001
    assert math.exp(sum(ratios_unfolded) / len(ratios_unfolded)) <= 1.10


def _linear_pair(dtype=torch.float32, bias=True):
    case = LayerCase(kind="linear", d_in=24, d_out=40, rank=4, bias=bias, batch=(2, 3), scaling=0.8)
    stock, ours, _ = build_triplet(case, dtype)
    return stock, ours, make_input(case, dtype)


def test_fold_cache_follows_every_change_of_what_it_folds() -> None:
    """In-place edits of magnitude, B, A, W and bias, a scaling change and an optimizer step: each one
    is seen on the next no-grad call (output == stock), and an unchanged layer is served from the cache."""
    stock, ours, x = _linear_pair()
    _no_grad_eval(ours, x)
    layer = _dora(ours)[0]
    hits = layer._df_fold_cache.hits

    def target(model):
        return model.base_model.model.target

    edits = {
        "magnitude": lambda t: t.lora_magnitude_vector["default"].weight.mul_(1.1),
        "lora_B": lambda t: t.lora_B["default"].weight.add_(0.05),
        "lora_A": lambda t: t.lora_A["default"].weight.mul_(0.9),
        "W": lambda t: t.base_layer.weight.mul_(1.05),
        "bias": lambda t: t.base_layer.bias.add_(0.3),
        "scaling": lambda t: t.set_scale("default", 0.5),
    }
    for name, edit in edits.items():
        with torch.no_grad():
            edit(target(stock))
            edit(target(ours))
        assert_dtype_close(_no_grad_eval(ours, x), _no_grad_eval(stock, x), torch.float32, name=f"after {name}")
    assert layer._df_fold_cache.hits == hits  # every call after an edit rebuilt the fold
    _no_grad_eval(ours, x)
    assert layer._df_fold_cache.hits == hits + 1

    # a fused optimizer writes parameters without bumping their version counters
    for model in (stock, ours):
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=0.1, fused=True) if torch.cuda.is_available() else None
        opt = opt or torch.optim.SGD(params, lr=0.1)
        model(x.requires_grad_(False)).square().sum().backward()
        opt.step()
    assert_dtype_close(_no_grad_eval(ours, x), _no_grad_eval(stock, x), torch.float32, name="after a step")


def test_fold_freed_by_train_and_by_clear() -> None:
    _, ours, x = _linear_pair()
    _no_grad_eval(ours, x)
    assert _folds(ours) == 1
    ours.train()
    assert _folds(ours) == 0
    _no_grad_eval(ours, x)
    import dorafactors

    dorafactors.clear_norm_caches(ours)
    assert _folds(ours) == 0


def test_fold_not_taken_where_it_does_not_apply(monkeypatch) -> None:
    stock, ours, x = _linear_pair()
    ours.eval()
    # a gradient to record
    ours(x)
    assert _folds(ours) == 0
    # more rows than the limit
    monkeypatch.setattr(rules, "INFERENCE_FOLD_MAX_ROWS", 5)
    _no_grad_eval(ours, x)  # 6 rows
    assert _folds(ours) == 0
    monkeypatch.setattr(rules, "INFERENCE_FOLD_MAX_ROWS", 6)
    _no_grad_eval(ours, x)
    assert _folds(ours) == 1
    ours.train()
    # the norm cache switched off / the kernels forced on
    for name, value in (("PEFT_DORA_NORM_CACHE", "0"), ("PEFT_DORA_FUSED", "1")):
        with monkeypatch.context() as m:
            m.setenv(name, value)
            config.invalidate_cache()
            out = _no_grad_eval(ours, x)
            assert _folds(ours) == 0, name
        config.invalidate_cache()
        assert_dtype_close(out, _no_grad_eval(stock, x), torch.float32, name=name)
        ours.train()


def test_a_hook_on_lora_B_still_runs() -> None:
    """The fold bypasses ``lora_B``'s module call, so a hooked ``lora_B`` keeps the unfolded path."""
    stock, ours, x = _linear_pair()
    lora_B = ours.base_model.model.target.lora_B["default"]
    seen = []
    handle = lora_B.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    out = _no_grad_eval(ours, x)
    handle.remove()
    assert seen == [torch.Size([2, 3, 40])] and _folds(ours) == 0
    assert_dtype_close(out, _no_grad_eval(stock, x), torch.float32, name="hooked lora_B")


def test_a_hook_on_lora_A_still_runs_on_the_fold() -> None:
    """The fold applies a plain ``lora_A`` as ``F.linear``; a hooked one is called as a module (its hook
    runs once per forward) and the fold is still taken."""
    stock, ours, x = _linear_pair()
    seen = []
    lora_A = ours.base_model.model.target.lora_A["default"]
    handle = lora_A.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    out = _no_grad_eval(ours, x)
    out_again = _no_grad_eval(ours, x)
    handle.remove()
    assert seen == [torch.Size([2, 3, 4])] * 2 and _folds(ours) == 1
    assert torch.equal(out, out_again)
    assert_dtype_close(out, _no_grad_eval(stock, x), torch.float32, name="hooked lora_A")


def test_parameters_held_as_plain_attributes_are_still_found() -> None:
    """FSDP1 (flat parameters) takes module parameters out of ``_parameters`` and sets them as plain
    attributes. The fold path's direct ``_parameters`` reads must fall back to ``getattr``, not raise."""
    stock, ours, x = _linear_pair()
    target = ours.base_model.model.target
    for module in (target.lora_A["default"], target.lora_B["default"], target.base_layer):
        for name in ("weight", "bias"):
            value = module._parameters.pop(name, None)
            module.__dict__[name] = value
    ref = _no_grad_eval(stock, x)
    assert_dtype_close(_no_grad_eval(ours, x), ref, torch.float32, name="eval, no grad")
    ours.eval()
    out = ours(x)  # grad mode on, x does not require grad: the requires-grad probe reads the factors
    assert out.requires_grad
    assert_dtype_close(out.detach(), ref, torch.float32, name="eval, grad mode")
