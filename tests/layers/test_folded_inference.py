"""The folded decode path (``autograd/folded.py``): taken exactly where it applies, as close to fp64 truth as
stock PEFT and as the kernel/reference path, and never stale after any change of what it folds in.
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from hypothesis import given
from torch import nn

from dorafactors.autograd.folded import (
    FOLD_BIAS_ERROR_ULPS,
    fold_scale_into_lora_B,
    folded_dora_extra,
    folded_dora_output,
    max_fold_gain,
)
from dorafactors.dispatch import config, rules
from tests._models import LayerCase, build_triplet, layer_cases, make_input
from tests._tolerances import StockFidelity, assert_dtype_close, rel_error

TIGHT = (torch.float32, torch.float64)
HALF = (torch.bfloat16, torch.float16)


def _dora(model) -> list:
    return [m for m in model.modules() if type(m).__name__ == "DoraLinearLayer"]


def _fold_entries(model) -> list:
    return [entry[-1] for layer in _dora(model) for entry in layer._df_fold_cache._entries.values()]


def _folds(model) -> int:
    """Folds built and cached (a declined fold, ``()``, is not one)."""
    return sum(1 for value in _fold_entries(model) if value != ())


def _declined(model) -> int:
    """Layers/adapters whose fold ``fold_scale_into_lora_B`` declined (remembered in the fold cache)."""
    return sum(1 for value in _fold_entries(model) if value == ())


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
    # the path under test was taken once per adapter, or declined where it would not be accurate (the
    # draws here put |g - 1| up to ~600: scaling 0 or 40 against a magnitude initialized at scaling 1)
    assert _folds(ours) + _declined(ours) == case.adapters
    assert_dtype_close(out_o, _no_grad_eval(stock, x), dtype, name=f"{case.kind} folded output")
    assert_dtype_close(_no_grad_eval(ours, x), out_o, dtype, name="second call (served from the fold cache)")


@pytest.mark.parametrize("fp32_adapters", [False, True], ids=["all-half", "fp32-adapters"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("kind", ["linear", "gpt2_conv1d"])
def test_fold_half_not_worse_than_stock_or_the_unfolded_path(kind, dtype, fp32_adapters, monkeypatch) -> None:
    """bf16/fp16 decode: the fold is as close to fp64 truth as stock PEFT and as our unfolded composition."""
    fidelity = StockFidelity(f"{kind} folded vs stock")
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
            err, _ = fidelity.add(f"seed {seed} {extra}", folded, out_s, ref, dtype)
            ratios_unfolded.append(math.log(err / max(rel_error(unfolded, ref), 1e-300)))
    fidelity.assert_geomean()
    # Not a fidelity statement (stock is the standard): the fold rounds ``s * B`` once more than the unfolded
    # path, measured 1.006-1.049x its error (geometric mean, all-half adapters), so it stays within 10% of it.
    assert math.exp(sum(ratios_unfolded) / len(ratios_unfolded)) <= 1.10


@pytest.mark.parametrize(
    ("dtype", "fp32_adapters", "expected"),
    [
        (torch.bfloat16, False, torch.bfloat16),
        (torch.float16, False, torch.float16),
        (torch.bfloat16, True, torch.float32),
        (torch.float32, False, torch.float32),
    ],
    ids=["bf16", "fp16", "bf16-base-fp32-adapters", "fp32"],
)
def test_decode_fold_keeps_g_minus_1_in_the_calls_dtype(dtype, fp32_adapters, expected) -> None:
    """The layer passes the base output's dtype to the fold: all-half decode caches ``g - 1`` in that dtype
    (a same-dtype ``addcmul_`` per call), fp32 adapters keep it in fp32."""
    case = LayerCase(kind="linear", d_in=24, d_out=40, rank=4, batch=(1, 3), seed=2)
    _, ours, _ = build_triplet(case, dtype, fp32_adapters=fp32_adapters)
    _no_grad_eval(ours, make_input(case, dtype))
    (folded,) = [value for value in _fold_entries(ours) if value != ()]
    assert folded[2].dtype == expected


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


def test_eval_variant_composes_the_output_without_calling_the_magnitude_module(monkeypatch) -> None:
    """In evaluation our variant returns ``result + extra`` itself (the layer's ``forward`` called directly, on
    ``folded_dora_output`` or, above the fold's rows, the composition: no call of the magnitude module), equal
    to stock's within rounding; a forward hook on the magnitude module, or a PEFT variant keyword that is set,
    sends the call through PEFT's forward (the module runs)."""
    from dorafactors.layers.linear import DoraLinearLayer

    calls = []

    def counted(self, *args, **kwargs):  # a call of the module (nn.Module.__call__: hooks run)
        calls.append(kwargs.get("base_result") is not None)
        return nn.Module.__call__(self, *args, **kwargs)

    monkeypatch.setattr(DoraLinearLayer, "__call__", counted)
    for bias in (True, False):
        stock, ours, x = _linear_pair(bias=bias)
        out = _no_grad_eval(ours, x)
        assert calls == [] and _folds(ours) == 1, bias
        assert_dtype_close(out, _no_grad_eval(stock, x), torch.float32, name=f"variant output, bias={bias}")
        # more rows than the fold takes: the layer's composition, still without a module call
        gen = torch.Generator().manual_seed(4)
        wide = torch.randn(rules.INFERENCE_FOLD_MAX_ROWS + 1, x.shape[-1], generator=gen).to(x.device)
        wide_out = _no_grad_eval(ours, wide)
        assert calls == [] and _folds(ours) == 1, bias
        assert_dtype_close(wide_out, _no_grad_eval(stock, wide), torch.float32, name=f"composed output, bias={bias}")

        target = ours.base_model.model.target
        seen = []
        handle = target.lora_magnitude_vector["default"].register_forward_hook(lambda *args, seen=seen: seen.append(1))
        hooked = _no_grad_eval(ours, x)
        handle.remove()
        assert calls == [True] and seen == [1]  # the module ran, on the fold (base_result given)
        assert_dtype_close(hooked, out, torch.float32, name="module path")
        calls.clear()

        variant = target.lora_variant["default"]
        args = dict(active_adapter="default", x=x, result=target.base_layer(x))
        with torch.no_grad():
            variant.forward(target, **args, alora_offsets=None)
            assert calls == []
            variant.forward(target, **args, alora_offsets=[0])
            assert calls == [True]
        calls.clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fold_keeps_stocks_nonfinite_pattern_for_an_infinite_input(dtype) -> None:
    """An infinite input makes ``result`` infinite; stock's ``result + (g - 1) * result + ...`` is then NaN
    where ``g < 1`` and infinite where ``g > 1``. The variant's folded sum keeps that pattern exactly (a
    ``g * result`` form would give inf on every such row)."""
    stock, ours, x = _linear_pair(dtype=dtype, bias=False)
    with torch.no_grad():
        for model in (stock, ours):  # g < 1 on even rows, g > 1 on odd ones
            magnitude = model.base_model.model.target.lora_magnitude_vector["default"].weight
            factor = torch.tensor([0.5, 1.5], dtype=magnitude.dtype, device=magnitude.device).repeat(
                magnitude.numel() // 2
            )
            magnitude.mul_(factor)
    x = x.clone()
    x[0, 0, 3] = torch.inf
    out_s = _no_grad_eval(stock, x)
    out_o = _no_grad_eval(ours, x)
    assert _folds(ours) == 1
    assert out_s[0, 0].isnan().any() and out_s[0, 0].isinf().any()  # the case has both patterns
    assert torch.equal(out_o.isnan(), out_s.isnan()) and torch.equal(out_o.isinf(), out_s.isinf())
    finite = out_s.isfinite()
    assert_dtype_close(out_o[finite], out_s[finite], dtype, name="finite entries")


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


@pytest.mark.parametrize("which", ["lora_A", "lora_B"])
def test_an_instance_forward_on_an_adapter_module_is_called_not_bypassed(which) -> None:
    """accelerate's ``add_hook_to_module`` (device placement, offloading) wraps a module's ``forward`` on the
    instance. Such a ``lora_A`` / ``lora_B`` is called as a module on every path that would otherwise apply its
    weight directly: once per forward on the fold (eval) and in training, where the output and the gradients
    still equal stock's (stock also calls it on the identity it pushes through ``A`` and ``B`` for its norm)."""
    import functools

    seen = []

    def wrap(module):
        plain = module.forward

        def forward(module, *args, **kwargs):
            seen.append(module)
            return plain(*args, **kwargs)

        module.forward = functools.partial(forward, module)  # as accelerate does

    stock, ours, x = _linear_pair()
    for model in (stock, ours):
        wrap(getattr(model.base_model.model.target, which)["default"])
    ref = _no_grad_eval(stock, x)
    ours_module = getattr(ours.base_model.model.target, which)["default"]
    seen.clear()
    for _ in range(2):  # the first call builds the fold, the second is served from it
        assert_dtype_close(_no_grad_eval(ours, x), ref, torch.float32, name=f"eval, {which} wrapped")
    assert seen == [ours_module] * 2
    for model in (stock, ours):
        model.train()
        model(x).square().sum().backward()
    seen.clear()
    ours.zero_grad()
    ours(x).square().sum().backward()
    assert seen == [ours_module]
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    for name, param in stock.named_parameters():
        if param.requires_grad:
            assert_dtype_close(grads[name], param.grad, torch.float32, name=f"grad {name}, {which} wrapped")


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


# ------------------------------------------------------------------------------------------------ zero-norm rows


def _zero_rows_model(dtype, bias: bool):
    """Stock and ours where rows 0 and 3 of ``W`` and ``lora_B`` are zero (the norm is clamped to eps, so
    ``g = m / eps`` is 1e6-1e12) and those rows keep a trained magnitude and a non-zero bias."""
    case = LayerCase(kind="linear", d_in=16, d_out=8, rank=4, bias=bias, batch=(300,), scaling=0.8)
    stock, ours, _ = build_triplet(case, dtype)
    for model in (stock, ours):
        target = model.base_model.model.target
        with torch.no_grad():
            for row in (0, 3):
                target.base_layer.weight[row].zero_()
                target.lora_B["default"].weight[row].zero_()
                target.lora_magnitude_vector["default"].weight[row] = 1.3
                if bias:
                    target.base_layer.bias[row] = 0.7 - row
    return stock, ours, make_input(case, dtype)


def _check_zero_rows_on_every_path(dtype, bias: bool, monkeypatch) -> None:
    stock, ours, x = _zero_rows_model(dtype, bias)
    small = x[:4]
    outs = {"fold": _no_grad_eval(ours, small)}
    assert _folds(ours) == (0 if bias else 1) and _declined(ours) == (1 if bias else 0)
    for name, fused in (("300 rows, reference", "0"), ("300 rows, kernel", "1")):
        with monkeypatch.context() as m:
            m.setenv("PEFT_DORA_FUSED", fused)
            config.invalidate_cache()
            outs[name] = _no_grad_eval(ours, x)[:4]
        config.invalidate_cache()
    ours.eval()
    outs["grad path"] = ours(small.clone().requires_grad_()).detach()
    bias_rows = ours.base_model.model.target.base_layer.bias
    expected = bias_rows[[0, 3]].detach() if bias else torch.zeros(2, dtype=dtype, device=x.device)
    for name, out in outs.items():
        assert out.dtype == dtype
        assert torch.equal(out[:, [0, 3]], expected.expand(4, 2)), f"{name}: {out[:, [0, 3]]}"
        assert_dtype_close(out, outs["grad path"], dtype, name=f"{name} vs grad path")
    stock_out = _no_grad_eval(stock, small)
    assert torch.isnan(stock_out[:, [0, 3]]).all()  # stock's 0/0: the path-consistent value is the bias
    others = [1, 2, 4, 5, 6, 7]
    assert_dtype_close(outs["fold"][:, others], stock_out[:, others], dtype, name="other rows vs stock")


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_zero_norm_rows_agree_on_every_path(dtype, bias, monkeypatch) -> None:
    """A zero row of ``W`` and ``B`` outputs exactly its bias on every path: the fold (<= 256 rows), the
    300-row call on the reference and on the kernel (interpreter), and the gradient path. Stock PEFT
    divides by the zero norm there (NaN); every other row matches stock."""
    _check_zero_rows_on_every_path(dtype, bias, monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_gpu_zero_norm_rows_agree_on_every_path(dtype, bias, monkeypatch) -> None:
    """The same on CUDA (cuBLAS fold, compiled compose kernel)."""
    import tests._models as models

    monkeypatch.setattr(models, "DEVICE", torch.device("cuda"))
    _check_zero_rows_on_every_path(dtype, bias, monkeypatch)


@pytest.mark.parametrize(
    ("lora_dtype", "bias_dtype"),
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.float32, torch.bfloat16),
        (torch.float64, torch.float64),
    ],
    ids=str,
)
def test_fold_declines_exactly_beyond_its_error_bound(lora_dtype, bias_dtype) -> None:
    """Inside the bound the fold stays within ``FOLD_BIAS_ERROR_ULPS * eps * |bias|`` of the exact value even
    where the output is the bias alone (``x = 0``), with ``g - 1`` in 16 bits where ``B`` and the result
    share that dtype; one step beyond it, and for a non-finite ``g``, it declines. Without a bias there is no
    cancellation and any finite ``g`` folds."""
    gen = torch.Generator().manual_seed(0)
    cdt = torch.float64 if torch.float64 in (lora_dtype, bias_dtype) else torch.float32
    limit = max_fold_gain(lora_dtype, bias_dtype, cdt)
    n = 4096
    bias = (3 * torch.randn(n, generator=gen, dtype=torch.float64)).to(bias_dtype)
    lora_B = torch.randn(n, 2, generator=gen, dtype=torch.float64).to(lora_dtype)
    g = (1 + limit * (2 * torch.rand(n, generator=gen, dtype=torch.float64) - 1)).to(cdt)
    folded = fold_scale_into_lora_B(lora_B, g, 0.7, bias, result_dtype=bias_dtype)
    assert folded is not None
    narrow = lora_dtype == bias_dtype and lora_dtype.itemsize == 2
    assert folded[2].dtype == (lora_dtype if narrow else cdt)
    result = bias.unsqueeze(0)  # W x + bias at x = 0
    hidden = torch.zeros(1, 2, dtype=lora_dtype)
    for out in (result + folded_dora_extra(hidden, folded, result), folded_dora_output(hidden, folded, result)):
        err = (out.to(torch.float64) - bias.to(torch.float64)).abs()
        assert (err <= FOLD_BIAS_ERROR_ULPS * torch.finfo(bias_dtype).eps * bias.to(torch.float64).abs()).all()
    beyond = g.clone()
    beyond[7] = 1 + 1.01 * limit
    assert fold_scale_into_lora_B(lora_B, beyond, 0.7, bias) is None
    assert fold_scale_into_lora_B(lora_B, beyond, 0.7, torch.where(torch.arange(n) == 7, 0, bias)) is not None
    for bad in (float("inf"), float("nan")):
        g_bad = g.clone()
        g_bad[5] = bad
        assert fold_scale_into_lora_B(lora_B, g_bad, 0.7, None) is None
    huge = torch.full((n,), 1e12, dtype=cdt)
    assert fold_scale_into_lora_B(lora_B * 0, huge, 0.7, None) is not None
    if lora_dtype == torch.float16:  # (g * s) B overflows fp16
        assert fold_scale_into_lora_B(lora_B, huge, 0.7, None) is None


def test_adapter_modules_are_read_as_attribute_access_would() -> None:
    """The eval path reads PEFT's per-adapter modules from ``_modules`` (no ``nn.Module.__getattr__``): the very
    modules attribute access gives, None for an adapter a container lacks, and attribute access itself where
    an instance attribute shadows the registered container."""
    from dorafactors.layers.linear import _adapter_module

    _, ours, _ = _linear_pair()
    target = ours.base_model.model.target
    for name in ("lora_A", "lora_B", "lora_dropout", "lora_magnitude_vector"):
        assert _adapter_module(target, name, "default") is getattr(target, name)["default"]
        assert _adapter_module(target, name, "absent") is None
    shadow = nn.ModuleDict({"default": nn.Identity()})
    object.__setattr__(target, "lora_dropout", shadow)  # bypasses nn.Module.__setattr__: shadows _modules
    try:
        assert _adapter_module(target, "lora_dropout", "default") is shadow["default"]
        assert _adapter_module(target, "lora_dropout", "absent") is None
    finally:
        del target.__dict__["lora_dropout"]
    assert _adapter_module(target, "lora_dropout", "default") is target.lora_dropout["default"]


# ------------------------------------------------------------------------------------- the cached fold's fast path

_SERVED = [False, True, True]  # the first call stores the fold (general path), the next two are served from it
_LEFT = [False, False, False]


def _fast_path_setups() -> dict:
    """``name -> (setup, served)``: ``setup(model, x)`` changes something after the first no-grad call (which
    stores the fold) and returns ``(call, undo)``; ``served``: which of three calls the fast path
    (``linear._cached_fold_output``) serves. Every other call it must leave to the general path."""
    import peft.tuners.lora.dora as peft_dora
    from torch.nn.modules import module as module_mod

    import dorafactors.distributed

    def target(model):
        return model.base_model.model.target

    def after_first(change, call=None):
        """Calls: a plain no-grad one, then ``change(model, x)`` (returns an undo), then ``call`` (default:
        plain) twice."""

        def setup(model, x):
            undo = []

            def first():
                out = _no_grad_eval(model, x)
                undo.append(change(model, x))
                return out

            calls = iter([first])
            later = call(model, x) if call else (lambda: _no_grad_eval(model, x))
            return (lambda: next(calls, later)()), (lambda: undo and undo[0] and undo[0]())

        return setup

    def hook(which):
        def change(model, x):
            t = target(model)
            module = {"lora_A": t.lora_A, "lora_B": t.lora_B, "magnitude": t.lora_magnitude_vector}[which]["default"]
            return module.register_forward_hook(lambda *args: None).remove

        return change

    def global_hook(model, x):
        return module_mod.register_module_forward_pre_hook(lambda *args: None).remove

    def env(name, value):
        def change(model, x):
            saved = os.environ.get(name)
            os.environ[name] = value
            config.invalidate_cache()

            def undo():
                if saved is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = saved
                config.invalidate_cache()

            return undo

        return change

    def setattr_undo(obj, name, value):
        saved = getattr(obj, name)
        setattr(obj, name, value)
        return lambda: setattr(obj, name, saved)

    def stock_caching_used_then_off(model, x):
        undo = setattr_undo(peft_dora, "ENABLE_DORA_CACHING", True)
        _no_grad_eval(model, x)  # fills PEFT's _dora_cache, which the next call (caching off) must clear
        undo()
        return None

    def frozen(model, x):
        for p in model.parameters():
            p.requires_grad_(False)

    def base_weight_trainable(model, x):
        frozen(model, x)
        target(model).base_layer.weight.requires_grad_(True)

    def grad_mode_call(model, x):
        return lambda: model.eval()(x).detach()

    def frozen_then_input_grad(model, x):
        frozen(model, x)
        first = after_first(lambda m, x: None, lambda m, x: lambda: m.eval()(x.detach().requires_grad_(True)).detach())
        return first(model, x)

    def inference_mode_call(model, x):
        def call():
            model.eval()
            with torch.inference_mode():
                return model(x).clone()

        return call

    def autocast_call(model, x):
        def call():
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                return _no_grad_eval(model, x)

        return call

    def vmap_call(model, x):
        def call():
            model.eval()
            with torch.no_grad():
                return torch.func.vmap(lambda row: model(row[None])[0])(x.reshape(-1, x.shape[-1]))

        return call

    def edit_lora_B(model, x):
        with torch.no_grad():
            target(model).lora_B["default"].weight.mul_(1.01)

    def shadow_lora_A(model, x):
        t = target(model)
        object.__setattr__(t, "lora_A", nn.ModuleDict({"default": t._modules["lora_A"]["default"]}))
        return lambda: t.__dict__.pop("lora_A")

    def container_subclass(model, x):
        t = target(model)
        plain = t._modules["lora_A"]

        halved = copy.deepcopy(plain["default"])
        with torch.no_grad():
            halved.weight.mul_(0.5)

        class Adapters(nn.ModuleDict):  # a container whose lookup serves another module than it holds
            def __getitem__(self, key):
                return halved

        t._modules["lora_A"] = Adapters(dict(plain.items()))
        return lambda: t._modules.__setitem__("lora_A", plain)

    def lora_B_bias(model, x):
        lora_B = target(model).lora_B["default"]
        lora_B.bias = nn.Parameter(torch.full((lora_B.out_features,), 0.1, device=lora_B.weight.device))

    def subclassed(which):
        def change(model, x):
            t = target(model)
            module = {"lora_A": t.lora_A, "lora_B": t.lora_B, "magnitude": t.lora_magnitude_vector}[which]["default"]
            cls = type(module)

            class Halved(cls):  # a subclass whose forward differs: only calling it gives its output
                def forward(self, *args, **kwargs):
                    return cls.forward(self, *args, **kwargs) * 0.5

            module.__class__ = Halved
            return lambda: setattr(module, "__class__", cls)

        return change

    def instance_forward(which):
        def change(model, x):
            t = target(model)
            module = {"lora_A": t.lora_A, "lora_B": t.lora_B, "magnitude": t.lora_magnitude_vector}[which]["default"]
            plain = module.forward
            module.forward = lambda *args, **kwargs: plain(*args, **kwargs) * 0.5  # what a module call then runs
            return lambda: module.__dict__.pop("forward")

        return change

    def rows_limit(model, x):
        return setattr_undo(rules, "INFERENCE_FOLD_MAX_ROWS", x.numel() // x.shape[-1] - 1)

    def nothing(model, x):
        return None

    return {
        "plain": (after_first(nothing), _SERVED),
        "grad mode, frozen adapters": (after_first(frozen, grad_mode_call), [False, False, True]),  # a new signature
        "frozen adapters, trainable base weight": (after_first(base_weight_trainable), _SERVED),
        "inference mode": (after_first(nothing, inference_mode_call), _SERVED),
        "grad mode, frozen adapters, input requiring grad": (frozen_then_input_grad, _LEFT),
        "grad mode, trainable adapters": (after_first(nothing, grad_mode_call), _LEFT),
        "torch.func.vmap": (after_first(nothing, vmap_call), _LEFT),
        "autocast": (after_first(nothing, autocast_call), _LEFT),
        "hook on lora_A": (after_first(hook("lora_A")), _LEFT),
        "hook on lora_B": (after_first(hook("lora_B")), _LEFT),
        "hook on the magnitude module": (after_first(hook("magnitude")), _LEFT),
        "global module hook": (after_first(global_hook), _LEFT),
        "verify mode": (after_first(env("PEFT_DORA_NORM_CACHE", "verify")), _LEFT),
        "norm cache off": (after_first(env("PEFT_DORA_NORM_CACHE", "0")), _LEFT),
        "PEFT's DoRA caching on": (
            after_first(lambda m, x: setattr_undo(peft_dora, "ENABLE_DORA_CACHING", True)),
            _LEFT,
        ),
        "PEFT's DoRA caching used, then off": (after_first(stock_caching_used_then_off), [False, False, True]),
        "a process group": (
            after_first(lambda m, x: setattr_undo(dorafactors.distributed, "process_group_active", lambda: True)),
            _LEFT,
        ),
        "more rows than the fold takes": (after_first(rows_limit), _LEFT),
        "lora_B edited in place": (after_first(edit_lora_B), [False, False, True]),
        "lora_A shadowed by an instance attribute": (after_first(shadow_lora_A), _LEFT),
        "lora_A in a ModuleDict subclass": (after_first(container_subclass), _LEFT),
        "lora_B given a bias": (after_first(lora_B_bias), _LEFT),
        "lora_A of a subclass": (after_first(subclassed("lora_A")), _LEFT),
        "lora_B of a subclass": (after_first(subclassed("lora_B")), _LEFT),
        "the magnitude module of a subclass": (after_first(subclassed("magnitude")), _LEFT),
        "an instance forward on the magnitude module": (after_first(instance_forward("magnitude")), _LEFT),
        "an instance forward on lora_A": (after_first(instance_forward("lora_A")), _LEFT),
        "an instance forward on lora_B": (after_first(instance_forward("lora_B")), _LEFT),
    }


@pytest.mark.parametrize("kind", ["linear", "gpt2_conv1d"])
@pytest.mark.parametrize("setup_name", list(_fast_path_setups()))
def test_fast_fold_path_serves_what_the_general_path_would(kind, setup_name, monkeypatch) -> None:
    """Three calls per situation, with the fast path and with it switched off: bitwise the same outputs, the
    same fold-cache hits and misses, the same folds stored and the same PEFT ``_dora_cache``; the fast path
    serves exactly the calls of the common case (every other one it leaves to the general path, which then
    runs the hooks, fills or clears PEFT's cache, verifies, gathers or recomputes)."""
    from dorafactors.layers import linear

    setup, expected = _fast_path_setups()[setup_name]
    fast = linear._cached_fold_output
    runs = {}
    for enabled in (True, False):
        served: list[bool] = []

        def counted(*args, _enabled=enabled, _served=served):
            out = fast(*args) if _enabled else None
            _served.append(out is not None)
            return out

        monkeypatch.setattr(linear, "_cached_fold_output", counted)
        case = LayerCase(kind=kind, d_in=24, d_out=40, rank=4, batch=(2, 3), scaling=0.8, seed=3)
        _, ours, _ = build_triplet(case, torch.float32)
        x = make_input(case, torch.float32)
        call, undo = setup(ours, x)
        try:
            outs = [call() for _ in range(3)]
        finally:
            undo()
        layer = _dora(ours)[0]
        fold = layer._df_fold_cache
        stock_cache = sorted(layer.__dict__.get("_dora_cache") or {})
        runs[enabled] = (outs, fold.hits, fold.misses, _fold_entries(ours), stock_cache, served)
    (outs, hits, misses, entries, stock_cache, served), off = runs[True], runs[False]
    assert served[-3:] == expected
    assert not any(off[-1])
    for i, (a, b) in enumerate(zip(outs, off[0])):
        assert torch.equal(a, b), f"call {i}"
    assert (hits, misses, stock_cache) == (off[1], off[2], off[4])
    assert len(entries) == len(off[3])
    for a, b in zip(entries, off[3]):
        assert a == () == b or all(torch.equal(u, v) for u, v in zip(a, b) if u is not None)
