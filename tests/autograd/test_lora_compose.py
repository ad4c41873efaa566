"""The Linear training node with ``lora_B`` inside (``autograd/lora_compose.py``) and the bf16x3 split GEMM of
the dropout recompute (``kernels/split_matmul.py``).

* the split is exact (kernel under the interpreter and reference), keeps non-finite values, never overflows;
* function level, where no bf16 rounding of PEFT's output hides fp32-level errors: the node's output and
  every gradient (``x``, ``A``, ``B``, ``g``) are at least as close to an fp64 truth as stock PEFT's formula
  (its fp32 recompute ``F.linear(x, W.float())``, its ``inner``), with the split GEMM forced on and off, on
  the PyTorch path and on the kernels, in PEFT's default dtypes, all-bf16 and fp32;
* layer level (a patched PEFT model against stock built unpatched): every dtype setup, dropout on and off,
  through the kernels (interpreter), and the memory it saves for backward (one base-output-sized tensor in the
  base output's dtype, not ``inner`` in fp32);
* fp64 ``gradgradcheck`` of the node, and the launches of one training call.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import dorafactors
import tests._models
from dorafactors.autograd.lora_compose import dora_linear_compose
from dorafactors.dispatch import config, rules
from dorafactors.kernels import compose as kc
from dorafactors.kernels import split_matmul as sm
from tests._models import LayerCase, TinyLM, build_triplet, make_input, run_forward_backward
from tests._tolerances import StockFidelity, assert_as_close_as_stock, assert_dtype_close

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
ON_GPU = torch.cuda.is_available()
#: Where the kernel-path tests put their tensors: the GPU when there is one (the kernels then compile), else the
#: CPU, where ``tests/conftest.py`` has the interpreter run them.
KERNEL_DEVICE = torch.device("cuda" if ON_GPU else "cpu")

PATH_ENV = {
    "reference": {"PEFT_DORA_FUSED": "0"},
    "kernels": {"PEFT_DORA_FUSED": "1", "PEFT_DORA_FUSED_BACKWARD": "1"},
}

#: dtype setups: (base weight, adapters, activation entering the layer)
SETUPS = {
    "peft-default": (BF16, F32),  # bf16 base, fp32 adapters: PEFT casts x to fp32 before the dropout
    "all-bf16": (BF16, BF16),
    "fp32": (F32, F32),
}


def _set_env(monkeypatch, path: str) -> None:
    for name, value in PATH_ENV[path].items():
        monkeypatch.setenv(name, value)
    config.invalidate_cache()


def _device(path: str) -> torch.device:
    return KERNEL_DEVICE if path == "kernels" else torch.device("cpu")


def _split_mode(split: bool | None):
    return rules.forced_split_matmul(split) if split is not None else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------------ the split


def _wide_range_fp32(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mantissa = torch.randn(n, generator=gen, dtype=F64)
    exponent = torch.randint(-90, 100, (n,), generator=gen).to(F64)  # every part a normal number: |x| > 2^-103
    return (mantissa * torch.pow(2.0, exponent)).to(F32)


@pytest.mark.parametrize("path", ["reference", "kernels"])
def test_split_is_exact_and_keeps_non_finite_values(path, monkeypatch):
    _set_env(monkeypatch, path)
    x = _wide_range_fp32(37 * 45, seed=1).view(37, 45)
    x[0, :4] = torch.tensor([float("inf"), float("-inf"), float("nan"), torch.finfo(F32).max])
    x[1, :3] = torch.tensor([-torch.finfo(F32).max, 0.0, -0.0])
    x = x.to(_device(path))
    before = sm.split_counts["split"]
    parts = sm.split_bf16x3(x[:, 1:])  # a row-strided view
    assert sm.split_counts["split"] == before + 1
    assert parts.dtype == BF16 and parts.shape == (37, 3 * 44)
    lo, mid, hi = parts.float().view(37, 3, 44).unbind(1)
    finite = torch.isfinite(x[:, 1:])
    total = lo.double() + mid.double() + hi.double()
    assert torch.equal(total[finite], x[:, 1:].double()[finite]), "hi + mid + lo == x for every finite x"
    assert torch.isfinite(hi[finite]).all(), "no part overflows, FLT_MAX included"
    assert torch.equal(hi[~finite].isnan(), x[:, 1:][~finite].isnan()) and torch.equal(
        hi[~finite].nan_to_num(0.0), x[:, 1:][~finite].nan_to_num(0.0)
    )
    assert not lo[~finite].any() and not mid[~finite].any()
    # each part carries at most 8 significant bits of the next: |mid| <= ulp_bf16(hi), |lo| <= ulp_bf16(mid)
    big = finite & (x[:, 1:].abs() > 1e-30)
    assert (mid[big].abs() <= hi[big].abs() * 2**-7).all() and (lo[big].abs() <= mid[big].abs() * 2**-7).all()
    reference = sm.split_bf16x3_reference(x[:, 1:].contiguous())
    torch.testing.assert_close(parts, reference, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("path", ["reference", "kernels"])
def test_split_recompute_in_column_chunks(path, monkeypatch):
    """The base output and the input gradient through the split GEMM, chunked (the tripled weight per chunk,
    each chunk written into its columns of the output): as close to fp64 as the fp32 GEMM on ``W``'s upcast."""
    from dorafactors.autograd import recompute_base

    _set_env(monkeypatch, path)
    monkeypatch.setattr(recompute_base, "forward_chunk_columns", lambda *a: 7)
    monkeypatch.setattr(config, "get_dora_fwd_threshold_bytes", lambda: 6 * 48 * 5)  # 5 columns of [W; W; W]
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(30, 40, generator=gen) * 1.2345).to(_device(path))
    weight = torch.randn(48, 40, generator=gen).to(BF16).to(_device(path))
    d_base = torch.randn(30, 48, generator=gen).to(_device(path))
    before = dict(sm.split_counts)
    with rules.forced_split_matmul(True):
        recompute = recompute_base.BaseRecompute(x, weight)
        assert recompute.split and recompute.chunk == 7
        base = recompute.full()
        with torch.no_grad():
            d_x = recompute_base.base_input_grad(d_base, weight, F32)
    assert sm.split_counts["linear"] - before.get("linear", 0) == 7  # ceil(48 / 7) chunks
    assert sm.split_counts["matmul"] - before.get("matmul", 0) == 1
    for got, fp32, truth in (
        (base, x @ weight.float().t(), x.double() @ weight.double().t()),
        (d_x, d_base @ weight.float(), d_base.double() @ weight.double()),
    ):
        assert got.dtype == F32
        StockFidelity("split GEMM").add("result", got, fp32, truth)


def test_split_gemm_takes_the_rules_path():
    """The rule: only fp32 inputs with bf16 weights, never on the CPU unless forced, never fp16 weights."""
    x = torch.randn(4, 8)
    assert not rules.split_matmul_ok(x, torch.randn(8, 8, dtype=BF16), 2**40)[0]  # CPU: fp32 GEMM is native
    with rules.forced_split_matmul(True):
        assert rules.split_matmul_ok(x, torch.randn(8, 8, dtype=BF16), 1)[0]
        assert not rules.split_matmul_ok(x, torch.randn(8, 8, dtype=torch.float16), 1)[0]
        assert not rules.split_matmul_ok(x.to(BF16), torch.randn(8, 8, dtype=BF16), 1)[0]
        assert not rules.split_matmul_ok(x, torch.randn(8, 8), 1)[0]


# ------------------------------------------------------------------------------------------------ function level


def _operands(setup: str, *, dropout: bool, seed: int, tokens=(2, 24), d_in=40, d_out=48, rank=6):
    """Base weight, adapters, magnitude scale and the layer's input as PEFT hands them to DoRA."""
    w_dtype, a_dtype = SETUPS[setup]
    gen = torch.Generator().manual_seed(seed)
    x_in = torch.randn(*tokens, d_in, generator=gen).to(w_dtype)  # the model's activation
    x = x_in.to(a_dtype)  # PEFT's cast to the adapter dtype
    if dropout:
        keep = torch.rand(x.shape, generator=gen) >= 0.1
        x = x * keep.to(x.dtype) * torch.tensor(1 / 0.9, dtype=x.dtype)  # nn.Dropout: x * mask * fp(1 / (1 - p))
    weight = (torch.randn(d_out, d_in, generator=gen) / d_in**0.5).to(w_dtype)
    lora_a = (torch.randn(rank, d_in, generator=gen) / d_in**0.5).to(a_dtype)
    lora_b = (0.3 * torch.randn(d_out, rank, generator=gen)).to(a_dtype)
    scale = (1.0 + 0.25 * torch.randn(d_out, generator=gen)).to(F32 if a_dtype != F64 else F64)
    base = None if dropout else F.linear(x_in, weight)  # the base layer's output (no bias)
    return x, weight, lora_a, lora_b, scale, base


def _stock_formula(x, weight, lora_a, lora_b, scale, base, scaling):
    """Stock PEFT's ``DoraLinearLayer.forward`` arithmetic (its order of operations and dtypes: its magnitude
    scale has the magnitude's dtype, ``promote(W, A)``)."""
    scale = scale.to(torch.promote_types(weight.dtype, lora_a.dtype))
    lora = F.linear(F.linear(x, lora_a), lora_b)
    if base is None:
        base = F.linear(x, weight.to(x.dtype))
    return (scale - 1) * base + scale * lora * scaling


def _ours(x, weight, lora_a, lora_b, scale, base, scaling, bf16_origin_scale=None):
    h = F.linear(x, lora_a)
    if base is None:
        return dora_linear_compose(h, lora_b, scale, scaling, x=x, weight=weight, bf16_origin_scale=bf16_origin_scale)
    return dora_linear_compose(h, lora_b, scale, scaling, base=base)


def _run(fn, operands, probe, scaling, upcast: bool = False):
    x, weight, lora_a, lora_b, scale, base = operands
    if upcast:
        x, weight, lora_a, lora_b, scale = (t.to(F64) for t in (x, weight, lora_a, lora_b, scale))
        base = None if base is None else base.to(F64)
    leaves = [t.detach().clone().requires_grad_() for t in (x, lora_a, lora_b, scale)]
    x, lora_a, lora_b, scale = leaves
    if base is not None:
        base = base.detach().clone().requires_grad_()
        leaves.append(base)
    out = fn(x, weight, lora_a, lora_b, scale, base, scaling)
    (out.to(F64) * probe).sum().backward()
    names = ("output", "x", "lora_A", "lora_B", "g", "base")
    return dict(zip(names, [out.detach(), *(t.grad for t in leaves)]))


def _fidelity_case(setup: str, path: str, *, dropout: bool, seed: int) -> tuple[tuple, torch.Tensor]:
    """One seed's operands on the path's device and an fp64 ``d_out`` probe exactly representable in the
    node's output dtype."""
    operands = _operands(setup, dropout=dropout, seed=seed)
    operands = tuple(None if t is None else t.to(_device(path)) for t in operands)
    out_dtype = torch.promote_types(operands[2].dtype, (operands[0] if dropout else operands[5]).dtype)
    probe = torch.randn((*operands[0].shape[:-1], operands[3].shape[0]), generator=torch.Generator().manual_seed(9))
    return operands, probe.to(out_dtype).to(F64).to(_device(path))


def _add_seed(fidelity: StockFidelity, seed: int, ours: dict, stock: dict, truth: dict) -> None:
    """Adds one seed's output and gradients (ours, stock's, fp64's) to the fidelity record; dtypes must match."""
    for name, want in truth.items():
        got, ref = ours[name], stock[name]
        assert got.dtype == ref.dtype, name
        fidelity.add(f"seed {seed} {name}", got, ref, want)


@pytest.mark.parametrize("split", [None, True], ids=["rule", "split-forced"])
@pytest.mark.parametrize("dropout", [False, True], ids=["base_result", "dropout"])
@pytest.mark.parametrize("setup", sorted(SETUPS))
@pytest.mark.parametrize("path", ["reference", "kernels"])
def test_node_at_least_as_close_to_fp64_as_stock(path, setup, dropout, split, monkeypatch):
    """Output and every gradient of 4 seeds, against fp64, by the fidelity criterion (``StockFidelity``).

    At this level nothing rounds the output to bf16 afterwards, so fp32-level differences in the base
    recompute and in the magnitude gradient show (a two-part split of the fp32 input fails here)."""
    _set_env(monkeypatch, path)
    scaling = 1.7
    fidelity = StockFidelity(f"{path} {setup}")
    for seed in range(4):
        operands, probe = _fidelity_case(setup, path, dropout=dropout, seed=seed)
        splits_before = sm.split_counts["linear"]
        with _split_mode(split):
            ours = _run(_ours, operands, probe, scaling)
        split_ran = sm.split_counts["linear"] > splits_before
        assert split_ran == (bool(split) and dropout and setup == "peft-default"), "the split GEMM ran iff allowed"
        stock = _run(_stock_formula, operands, probe, scaling)
        truth = _run(_stock_formula, operands, probe, scaling, upcast=True)
        _add_seed(fidelity, seed, ours, stock, truth)
    fidelity.assert_geomean()


def _ours_whole(x, weight, lora_a, lora_b, scale, base, scaling):
    return dora_linear_compose(F.linear(x, lora_a), lora_b, scale, scaling, base=base, add_base=True)


def _stock_whole(x, weight, lora_a, lora_b, scale, base, scaling):
    """PEFT's variant output ``result + extra`` (a bias-free base layer: ``result`` is the base output)."""
    return base + _stock_formula(x, weight, lora_a, lora_b, scale, base, scaling)


@pytest.mark.parametrize("setup", sorted(SETUPS))
@pytest.mark.parametrize("path", ["reference", "kernels"])
def test_whole_output_at_least_as_close_to_fp64_as_stock(path, setup, monkeypatch):
    """``add_base=True``: the node's ``result + extra`` and every gradient, ``result``'s (the sum of its two
    paths, ``base`` here) included, against fp64 by the fidelity criterion; on the kernel path the forward
    kernel writes the sum (one launch, no add)."""
    _set_env(monkeypatch, path)
    scaling = 1.7
    fidelity = StockFidelity(f"whole {path} {setup}")
    for seed in range(4):
        operands, probe = _fidelity_case(setup, path, dropout=False, seed=seed)
        before = kc.launch_counts["compose_fwd_inplace"]
        ours = _run(_ours_whole, operands, probe, scaling)
        launched = kc.launch_counts["compose_fwd_inplace"] - before
        assert launched == (1 if path == "kernels" else 0), launched
        stock = _run(_stock_whole, operands, probe, scaling)
        truth = _run(_stock_whole, operands, probe, scaling, upcast=True)
        _add_seed(fidelity, seed, ours, stock, truth)
    fidelity.assert_geomean()


@pytest.mark.parametrize("path", ["reference", "kernels"])
def test_whole_output_keeps_stocks_non_finite_classes(path, monkeypatch):
    """An infinite ``result`` where ``g < 1`` is NaN in PEFT's ``result + extra`` (``inf - inf``), and an infinite
    ``d_out`` there is NaN in ``result``'s gradient (autograd sums ``d_out`` and ``(g - 1) d_out``): the whole
    output keeps both, where ``g * result`` and ``g * d_out`` would give +-inf."""
    _set_env(monkeypatch, path)
    operands = [t.to(_device(path)) for t in _operands("fp32", dropout=False, seed=3)]
    base, scale = operands[5].clone(), operands[4].clone()
    scale[:24] = 0.5  # g < 1 on half of the columns, g > 1 on most of the rest
    scale[24:] = 1.5
    base[0, 1, 20:28] = float("inf")
    base[1, 2, 20:28] = float("-inf")
    operands[4], operands[5] = scale, base
    probe = torch.randn(2, 24, 48, generator=torch.Generator().manual_seed(1), dtype=F64)
    probe[0, 3, 20:28] = float("inf")
    probe[1, 4, 20:28] = float("-inf")
    probe = probe.to(_device(path))
    ours = _run(_ours_whole, operands, probe, 0.5)
    stock = _run(_stock_whole, operands, probe, 0.5)
    for name in ("output", "base"):
        assert torch.equal(ours[name].isnan(), stock[name].isnan()), (path, name)
        assert torch.equal(ours[name].isinf(), stock[name].isinf()), (path, name)
    assert ours["output"][0, 1, 20:24].isnan().all() and ours["output"][0, 1, 24:28].isinf().all()
    assert ours["base"][0, 3, 20:24].isnan().all() and ours["base"][0, 3, 24:28].isinf().all()


def test_whole_output_gradgradcheck_fp64(monkeypatch):
    """First and second derivatives of the whole-output node are exact (fp64) in base, h, B and g."""
    _set_env(monkeypatch, "reference")
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(2, 3, 7, generator=gen, dtype=F64).requires_grad_()
    h = torch.randn(2, 3, 4, generator=gen, dtype=F64).requires_grad_()
    lora_b = torch.randn(7, 4, generator=gen, dtype=F64).requires_grad_()
    scale = (0.5 + torch.rand(7, generator=gen, dtype=F64)).requires_grad_()

    def fn(base, h, lora_b, scale):
        return dora_linear_compose(h, lora_b, scale, 0.7, base=base, add_base=True)

    assert gradcheck(fn, (base, h, lora_b, scale))
    assert gradgradcheck(fn, (base, h, lora_b, scale))


def test_whole_output_needs_the_base_output():
    h, lora_b, scale = torch.randn(3, 4), torch.randn(5, 4), torch.ones(5)
    with pytest.raises(ValueError, match="add_base=True"):
        dora_linear_compose(h, lora_b, scale, 1.0, x=torch.randn(3, 6), weight=torch.randn(5, 6), add_base=True)


#: ``nn.Dropout``'s fp32 factor for ``p = 0.1``, as ``_operands`` applies it.
_DROPOUT_SCALE = float(torch.tensor(1 / 0.9, dtype=F32))


@pytest.mark.parametrize("path", ["reference", "kernels"])
def test_recovered_bf16_input_at_least_as_close_to_fp64_as_stock(path, monkeypatch):
    """PEFT's default dtypes with dropout, the input known to be ``fp32(x0 * c)`` of a bf16 ``x0``: the forward
    recompute is one bf16 GEMM on ``bf16(x / c)`` (no split of ``x``; ``d_base`` is still split), and the output
    and every gradient are at least as close to fp64 as stock's fp32 recompute."""
    _set_env(monkeypatch, path)
    scaling = 1.7
    fidelity = StockFidelity(f"{path} recovered bf16 input")
    for seed in range(4):
        operands = _operands("peft-default", dropout=True, seed=seed)
        operands = tuple(None if t is None else t.to(_device(path)) for t in operands)
        probe = torch.randn((*operands[0].shape[:-1], operands[3].shape[0]), generator=torch.Generator().manual_seed(9))
        probe = probe.to(F64).to(_device(path))
        before = dict(sm.split_counts)
        with rules.forced_split_matmul(True):
            ours = _run(lambda *args: _ours(*args, bf16_origin_scale=_DROPOUT_SCALE), operands, probe, scaling)
        ran = {k: v - before.get(k, 0) for k, v in sm.split_counts.items() if v != before.get(k, 0)}
        assert ran == {"recovered": 1, "split": 1, "matmul": 1}, ran  # forward: one GEMM; backward: d_base split
        stock = _run(_stock_formula, operands, probe, scaling)
        truth = _run(_stock_formula, operands, probe, scaling, upcast=True)
        for name, want in truth.items():
            assert ours[name].dtype == stock[name].dtype, name
            fidelity.add(f"seed {seed} {name}", ours[name], stock[name], want)
    fidelity.assert_geomean()


@pytest.mark.parametrize("p", [0.05, 0.1, 0.3, 0.5, 0.9])
def test_bf16_input_is_recovered_exactly_from_torch_dropout(p):
    """``bf16(dropout(fp32(x0)) / c)`` is ``x0`` or 0 bit for bit, for bf16 values across the whole range
    (subnormals, the largest finite values whose product with ``c`` stays finite, both signs), with PyTorch's
    own dropout."""
    from dorafactors.autograd.recompute_base import bf16_from_dropped

    gen = torch.Generator().manual_seed(3)
    bits = torch.randint(-(2**15), 2**15, (64, 512), generator=gen, dtype=torch.int32).to(torch.int16)
    x0 = bits.view(BF16)
    c = float(torch.tensor(1 / (1 - p), dtype=F32))
    x0 = torch.where(torch.isfinite(x0.float() * c), x0, torch.zeros((), dtype=BF16))
    dropped = nn.Dropout(p).train()(x0.float())
    kept = dropped != 0
    recovered = bf16_from_dropped(dropped, c)
    assert torch.equal(recovered[kept].view(torch.int16), x0[kept].view(torch.int16))
    assert torch.equal(recovered[~kept].float().abs(), torch.zeros_like(recovered[~kept].float()))
    assert kept.float().mean().item() == pytest.approx(1 - p, abs=0.02)


@pytest.mark.parametrize("divisor", [False, True], ids=["g", "magnitude-and-divisor"])
@pytest.mark.parametrize("requires_scale", [True, False], ids=["trainable-g", "frozen-g"])
@pytest.mark.parametrize(
    ("dropout", "weight_dtype"),
    [(False, F64), (True, F64), (True, F32)],
    ids=["base_result", "dropout", "dropout-W-fp32"],
)
def test_node_gradgradcheck_fp64(dropout, weight_dtype, requires_scale, divisor, monkeypatch):
    """First and second derivatives of the node are exact (fp64), in x / base, h, B and g (or the magnitude,
    divided inside the node); with an fp32 ``W`` the recomputed base output is built in column chunks (the
    weight cast per chunk)."""
    _set_env(monkeypatch, "reference")
    monkeypatch.setattr("dorafactors.autograd.recompute_base.forward_chunk_columns", lambda *a: 3)
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(2, 3, 4, generator=gen, dtype=F64).requires_grad_()
    lora_b = torch.randn(7, 4, generator=gen, dtype=F64).requires_grad_()
    scale = (0.5 + torch.rand(7, generator=gen, dtype=F64)).requires_grad_(requires_scale)
    div = (0.5 + torch.rand(7, generator=gen, dtype=F64)) if divisor else None
    if dropout:
        x = torch.randn(2, 3, 5, generator=gen, dtype=F64).requires_grad_()
        weight = (torch.randn(7, 5, generator=gen, dtype=F64) / 3).to(weight_dtype)

        def fn(first, h, lora_b, scale):
            return dora_linear_compose(h, lora_b, scale, 0.7, x=first, weight=weight, divisor=div)

        first = x
    else:
        first = torch.randn(2, 3, 7, generator=gen, dtype=F64).requires_grad_()

        def fn(first, h, lora_b, scale):
            return dora_linear_compose(h, lora_b, scale, 0.7, base=first, divisor=div)

    inputs = (first, h, lora_b, scale)
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


def test_infinite_magnitude_gives_stocks_non_finite_classes(monkeypatch):
    """``d_B = (g s) M`` would turn stock's NaN (infinite terms of both signs over the tokens) into +-inf;
    rows with an infinite ``g s`` take the unfactored sum on both paths."""
    for path in ("reference", "kernels"):
        _set_env(monkeypatch, path)
        operands = [t.to(_device(path)) for t in _operands("fp32", dropout=False, seed=2)]
        operands[4] = operands[4].clone()
        operands[4][[3, 5]] = torch.tensor([float("inf"), float("-inf")], device=operands[4].device)
        probe = torch.randn(2, 24, 48, generator=torch.Generator().manual_seed(1), dtype=F64).to(_device(path))
        ours = _run(_ours, operands, probe, 0.5)
        stock = _run(_stock_formula, operands, probe, 0.5)
        for name in ("lora_B", "lora_A", "x", "base"):
            assert torch.equal(ours[name].isnan(), stock[name].isnan()), (path, name)
            assert torch.equal(ours[name].isinf(), stock[name].isinf()), (path, name)
        assert ours["lora_B"][3].isnan().any() and ours["lora_B"][5].isnan().any()


@pytest.mark.parametrize(
    ("need_base", "need_b", "need_h", "need_g"),
    [(True, True, True, True), (False, True, True, True), (True, False, False, True), (False, True, True, False)],
)
def test_backward_kernel_matches_the_references_across_tiles(need_base, need_b, need_h, need_g, monkeypatch):
    """``_compose_bwd_lora_b_kernel`` with small forced tiles (several row groups and column tiles, a rank that
    is not a multiple of the finishing tile): every output equals the references to fp32 rounding, and the
    integer tickets are back to zero."""
    from dorafactors.autograd import fused
    from dorafactors.kernels._triton_utils import tickets_all_zero

    gen = torch.Generator().manual_seed(5)
    tokens, d_out, rank = 200, 150, 37
    d_out_grad = torch.randn(2, tokens // 2, d_out, generator=gen)
    base = torch.randn(2, tokens // 2, d_out, generator=gen).to(BF16)
    h = torch.randn(tokens, rank, generator=gen)
    weight_b = torch.randn(d_out, rank, generator=gen)
    g = 1 + 0.3 * torch.randn(d_out, generator=gen)
    m = d_out_grad.reshape(-1, d_out).t() @ h
    d_out_grad, base, h, weight_b, g, m = (t.to(KERNEL_DEVICE) for t in (d_out_grad, base, h, weight_b, g, m))
    kwargs = dict(base_dtype=BF16, need_base=need_base, need_b=need_b, need_g=need_g)
    kwargs["scaled_b_dtype"] = F32 if need_h else None
    args = (d_out_grad, g, base if need_g else None, m, weight_b, h, 0.8)
    _set_env(monkeypatch, "reference")
    want = fused.compose_backward_lora_b(*args, **kwargs)
    _set_env(monkeypatch, "kernels")
    before = kc.launch_counts["compose_bwd_lora_b"]
    with kc.forced_config(bwd=(8, 32, 4, 1)):
        got = fused.compose_backward_lora_b(*args, **kwargs)
    assert kc.launch_counts["compose_bwd_lora_b"] == before + 1
    assert tickets_all_zero()
    for name, a, e in zip(("d_base", "d_B", "(g s) B", "d_g"), got, want):
        assert (a is None) == (e is None), name
        if a is not None:
            assert a.dtype == e.dtype, name
            torch.testing.assert_close(a, e, rtol=2e-6, atol=2e-6 * e.abs().max().item(), msg=name)


# ------------------------------------------------------------------------------------------------ the division


def _magnitude_and_divisor(d_out: int, dtype: torch.dtype, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A trained-looking magnitude and its divisor (``scale_divisor`` of a row norm): inexact quotients, and a
    few rows where the magnitude is its divisor (``g == 1`` exactly)."""
    from dorafactors.norm.scale import scale_divisor

    gen = torch.Generator().manual_seed(seed)
    norm = (0.5 + 3 * torch.rand(d_out, generator=gen, dtype=F64)).to(F32)
    divisor = scale_divisor(norm, dtype, norm.device)
    magnitude = (norm * (1 + 0.2 * torch.randn(d_out, generator=gen))).to(dtype)
    magnitude[:4] = divisor[:4].to(dtype)
    return magnitude.to(device), divisor.to(device)


def _node_grads(operands, magnitude, divisor, probe, scaling, *, inside: bool, add_base: bool):
    """Output and gradients of the node with ``g = magnitude / divisor`` divided inside it (``inside``) or by
    autograd before it (what the layer did before the node took the division)."""
    x, weight, lora_a, lora_b, _, base = operands
    leaves = [t.detach().clone().requires_grad_() for t in (x, lora_a, lora_b, magnitude)]
    x, lora_a, lora_b, magnitude = leaves
    if base is not None:
        base = base.detach().clone().requires_grad_()
        leaves.append(base)
    h = F.linear(x, lora_a)
    scale, div = (magnitude, divisor) if inside else (magnitude / divisor, None)
    kwargs = dict(base=base, add_base=add_base) if base is not None else dict(x=x, weight=weight)
    out = dora_linear_compose(h, lora_b, scale, scaling, divisor=div, **kwargs)
    (out.to(F64) * probe).sum().backward()
    names = ("output", "x", "lora_A", "lora_B", "magnitude", "base")
    return dict(zip(names, [out.detach(), *(t.grad for t in leaves)]))


@pytest.mark.parametrize("magnitude_dtype", [BF16, torch.float16, F32], ids=str)
@pytest.mark.parametrize(
    ("dropout", "add_base"), [(False, False), (False, True), (True, False)], ids=["extra", "whole", "dropout"]
)
@pytest.mark.parametrize("setup", sorted(SETUPS))
@pytest.mark.parametrize("path", ["reference", "kernels"])
def test_node_divides_the_magnitude_bitwise_as_autograd(path, setup, dropout, add_base, magnitude_dtype, monkeypatch):
    """``divisor=``: the node's output and every gradient, the magnitude's in its own dtype, are bitwise those
    of autograd's ``m / divisor`` handed to the node as ``g``: the kernels divide in fp32 rounded to nearest
    (on a GPU ``div_rn``, not Triton's approximate ``/``) and round the magnitude's gradient once.

    Both runs take the same tiles: the fp32 sums of ``d_g`` follow the tile shape, and each kernel variant is
    autotuned on its own (so an fp32 magnitude's gradient may differ in its last bits between the two)."""
    _set_env(monkeypatch, path)
    device = _device(path)
    operands = tuple(None if t is None else t.to(device) for t in _operands(setup, dropout=dropout, seed=3))
    out_dtype = torch.promote_types(operands[2].dtype, (operands[0] if dropout else operands[5]).dtype)
    probe = torch.randn((2, 24, 48), generator=torch.Generator().manual_seed(4)).to(out_dtype).to(F64).to(device)
    magnitude, divisor = _magnitude_and_divisor(48, magnitude_dtype, seed=5, device=device)
    before = dict(kc.launch_counts)
    with kc.forced_config(fwd=(4, 32, 4, 1), bwd=(8, 32, 4, 1)):
        inside = _node_grads(operands, magnitude, divisor, probe, 1.7, inside=True, add_base=add_base)
    launched = {k: v - before.get(k, 0) for k, v in kc.launch_counts.items() if v != before.get(k, 0)}
    if path == "kernels":
        assert launched.get("compose_bwd_lora_b") == 1, launched
        if not dropout:
            assert launched.get("compose_fwd_inplace") == 1, launched
    else:
        assert not launched, launched
    with kc.forced_config(fwd=(4, 32, 4, 1), bwd=(8, 32, 4, 1)):
        outside = _node_grads(operands, magnitude, divisor, probe, 1.7, inside=False, add_base=add_base)
    assert inside.keys() == outside.keys()
    assert inside["magnitude"].dtype == magnitude_dtype
    for name, got in inside.items():
        want = outside[name]
        assert got.dtype == want.dtype, name
        assert torch.equal(got, want), f"{name}: max |diff| {(got.double() - want.double()).abs().max().item():.3e}"


def test_node_divisor_must_be_a_detached_vector_like_the_magnitude():
    operands = _operands("fp32", dropout=False, seed=0)
    x, _, lora_a, lora_b, _, base = operands
    magnitude = torch.ones(48, requires_grad=True)
    h = F.linear(x, lora_a)
    wrong = [torch.ones(48, requires_grad=True), torch.ones(47), torch.ones(1, 48), torch.ones(48, device="meta")]
    for divisor in wrong:
        with pytest.raises(ValueError, match="divisor is a detached"):
            dora_linear_compose(h, lora_b, magnitude, 1.0, base=base, divisor=divisor)


# ------------------------------------------------------------------------------------------------ layer level


def _layer_case(setup: str, dropout: bool, bias: bool = True) -> tuple[LayerCase, torch.dtype, bool]:
    w_dtype, a_dtype = SETUPS[setup]
    case = LayerCase(kind="linear", d_in=40, d_out=48, rank=6, batch=(2, 16), dropout=dropout, scaling=1.5, bias=bias)
    return case, w_dtype, a_dtype != w_dtype


@pytest.mark.parametrize(
    ("dropout", "bias"),
    [(False, True), (False, False), (True, True)],
    ids=["base_result", "base_result-whole-output", "dropout"],
)
@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_layer_on_the_kernels_matches_stock(setup, dropout, bias, monkeypatch):
    """A patched PEFT model through the kernels (interpreter; the split GEMM forced where its dtypes allow)
    against stock PEFT and fp64: fp32 equal to stock, half precision at least as close to fp64 as stock. A
    bias-free base layer without dropout takes the whole-output node (PEFT's sum composed in the kernel)."""
    _set_env(monkeypatch, "kernels")
    monkeypatch.setattr(tests._models, "DEVICE", KERNEL_DEVICE)
    case, dtype, fp32_adapters = _layer_case(setup, dropout, bias)
    stock, ours, truth = build_triplet(case, dtype, fp32_adapters=fp32_adapters)
    x = make_input(case, dtype)
    before = dict(kc.launch_counts)
    with rules.forced_split_matmul(True):
        out_o, grads_o = run_forward_backward(ours, x, train=True)
    launched = {k: v - before.get(k, 0) for k, v in kc.launch_counts.items()}
    assert launched.get("compose_fwd_inplace", 0) == 1 and launched.get("compose_bwd_lora_b", 0) == 1, launched
    out_s, grads_s = run_forward_backward(stock, x, train=True)
    if dtype == F32:
        assert_dtype_close(out_o, out_s, F32, name="output")
        for name in grads_s:
            assert_dtype_close(grads_o[name], grads_s[name], F32, name=name)
        return
    out_t, grads_t = run_forward_backward(truth, x.to(F64), train=True)
    triples = {"output": (out_o, out_s, out_t)}
    triples.update({name: (grads_o[name], grads_s[name], grads_t[name]) for name in grads_t})
    assert_as_close_as_stock(triples, dtype, what=setup)


def _node_under(out: torch.Tensor) -> str:
    """Name of the autograd node that produced ``out``, looking through PEFT's final dtype cast."""
    fn = out.grad_fn
    if type(fn).__name__ == "ToCopyBackward0":
        fn = fn.next_functions[0][0]
    return type(fn).__name__


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_training_variant_returns_the_nodes_whole_output(setup, monkeypatch):
    """Training without dropout on a bias-free base layer: PEFT's ``result + extra`` is the training node's
    own output (no ``AddBackward0``). A hook on the magnitude module or a bias on the base layer takes the
    sum as PEFT does it, with the same values."""
    _set_env(monkeypatch, "reference")
    w_dtype, a_dtype = SETUPS[setup]
    x = torch.randn(2, 16, 64).to(w_dtype).requires_grad_()
    model = _peft_model(64, 96, w_dtype, dora=True, autocast=a_dtype != w_dtype, dropout=0.0)
    with torch.no_grad():
        model.base_model.model.proj.lora_B["default"].weight.normal_(0.0, 0.1)
    whole = model(x)
    assert _node_under(whole) == "_LoraComposeFunctionBackward"
    layer = model.base_model.model.proj.lora_magnitude_vector["default"]
    handle = layer.register_forward_hook(lambda module, args, output: None)
    summed = model(x)
    handle.remove()
    assert _node_under(summed) == "AddBackward0"
    assert_dtype_close(whole, summed, w_dtype, name="output")
    proj = model.base_model.model.proj.base_layer
    proj.bias = nn.Parameter(torch.zeros(96, dtype=w_dtype), requires_grad=False)
    with_bias = model(x)
    assert _node_under(with_bias) == "AddBackward0"
    assert_dtype_close(with_bias, summed, w_dtype, name="output with a zero bias")
    proj = model.base_model.model.proj
    with pytest.raises(ValueError, match="needs base_result"):
        adapters = {"lora_A": proj.lora_A["default"], "lora_B": proj.lora_B["default"]}
        layer(x, **adapters, scaling=1.0, base_layer=proj.base_layer, add_base_result=True)


def _graph_node_names(out: torch.Tensor) -> set[str]:
    """Names of every autograd node ``out`` was computed through."""
    seen, stack, names = set(), [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("setup", sorted(SETUPS))
@pytest.mark.parametrize("path", ["reference", "kernels"])
def test_layer_divides_the_magnitude_in_the_node_bitwise_as_autograd(path, setup, dropout, monkeypatch):
    """A patched PEFT model's training call: the node takes ``m / divisor`` (no ``DivBackward0`` in the graph),
    and the output and every gradient (the input's, the adapters', the magnitude's) are bitwise those of the
    magnitude divided by autograd before the node (``rules.magnitude_division_outside_node``)."""
    _set_env(monkeypatch, path)
    device = _device(path)
    w_dtype, a_dtype = SETUPS[setup]
    model = _peft_model(64, 96, w_dtype, dora=True, autocast=a_dtype != w_dtype, dropout=dropout).to(device)
    proj = model.base_model.model.proj
    with torch.no_grad():
        magnitude = proj.lora_magnitude_vector["default"].weight
        magnitude.mul_(1 + 0.2 * torch.randn(magnitude.shape, generator=torch.Generator().manual_seed(3)).to(device))
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(4)).to(device, w_dtype).requires_grad_()
    results = {}
    for outside in (False, True):
        model.zero_grad(set_to_none=True)
        x.grad = None
        torch.manual_seed(1)  # the same dropout mask
        with rules.magnitude_division_outside_node() if outside else contextlib.nullcontext():
            out = model(x)
        assert ("DivBackward0" in _graph_node_names(out)) == outside
        out.float().square().sum().backward()
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        assert any("lora_magnitude_vector" in name for name in grads)
        results[outside] = {"output": out.detach(), "x": x.grad, **grads}
    inside, outside = results[False], results[True]
    assert inside.keys() == outside.keys()
    for name, got in inside.items():
        assert got.dtype == outside[name].dtype, name
        assert torch.equal(got, outside[name]), name


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("path", ["reference", "kernels"])
def test_training_with_the_node_division_is_bitwise_autograds(path, dtype, dropout, checkpointing, monkeypatch):
    """Three AdamW steps of two accumulated micro-batches (activation checkpointing on and off): every parameter
    after training is bitwise the same whether the node divides the magnitude or autograd does."""
    _set_env(monkeypatch, path)
    device = _device(path)
    config_ = LoraConfig(
        r=4, target_modules=["q", "up", "down"], use_dora=True, init_lora_weights=False, lora_dropout=dropout
    )
    finals = []
    for outside in (False, True):
        torch.manual_seed(0)
        with dorafactors.patched():
            model = get_peft_model(TinyLM().to(dtype), config_).to(device)
        model.base_model.model.checkpointing = checkpointing
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model.train()
        with rules.magnitude_division_outside_node() if outside else contextlib.nullcontext():
            for step in range(3):
                for micro in range(2):
                    ids = torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(step * 2 + micro))
                    (model(ids.to(device)).float().logsumexp(-1).mean() / 2).backward()
                opt.step()
                opt.zero_grad()
        finals.append({name: p.detach().clone() for name, p in model.named_parameters()})
    trained, reference = finals
    moved = [name for name in trained if "lora_magnitude_vector" in name]
    assert moved, "no magnitude was trained"
    for name, value in trained.items():
        assert torch.equal(value, reference[name]), name


class _Net(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x):
        return self.proj(x)


def _saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward, parameters and the input excluded."""
    known = {p.untyped_storage().data_ptr() for p in model.parameters()} | {x.untyped_storage().data_ptr()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in known:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    out.float().sum().backward()
    return sum(seen.values())


def _peft_model(d_in, d_out, w_dtype, *, dora: bool, autocast: bool, dropout: float, magnitude: bool = True):
    torch.manual_seed(0)
    config = LoraConfig(r=8, target_modules=["proj"], use_dora=dora, init_lora_weights=False, lora_dropout=dropout)
    with dorafactors.patched() if dora else contextlib.nullcontext():
        model = get_peft_model(_Net(d_in, d_out).to(w_dtype), config, autocast_adapter_dtype=autocast)
    for name, p in model.named_parameters():
        if "lora_magnitude_vector" in name:
            p.requires_grad_(magnitude)
    return model.train()


@pytest.mark.parametrize(
    ("setup", "dropout", "magnitude", "extra_bytes_per_element"),
    [
        ("peft-default", 0.0, True, 2),  # the bf16 base output (was inner in fp32: 4)
        ("all-bf16", 0.0, True, 2),
        ("fp32", 0.0, True, 4),
        ("peft-default", 0.0, False, 0),  # frozen magnitude: nothing activation-sized
        ("peft-default", 0.1, True, 4),  # the recomputed base output, in the dropped-out input's fp32
        ("all-bf16", 0.1, True, 2),
    ],
)
def test_saved_for_backward_is_the_floor(setup, dropout, magnitude, extra_bytes_per_element, monkeypatch):
    """Beyond what LoRA itself saves, a DoRA Linear saves one ``[tokens, d_out]`` tensor in the base output's
    dtype with a trainable magnitude (the floor), none with a frozen one; ``h = A x`` is shared with LoRA's."""
    _set_env(monkeypatch, "reference")
    w_dtype, a_dtype = SETUPS[setup]
    d_in, d_out, tokens = 64, 96, 128
    x = torch.randn(tokens, d_in).to(w_dtype).requires_grad_()
    sizes = {}
    for dora in (False, True):
        model = _peft_model(
            d_in, d_out, w_dtype, dora=dora, autocast=a_dtype != w_dtype, dropout=dropout, magnitude=magnitude
        )
        torch.manual_seed(1)  # the same dropout mask for both
        sizes[dora] = _saved_activation_bytes(model, x)
    extra = sizes[True] - sizes[False]
    floor = tokens * d_out * extra_bytes_per_element
    vectors = 4 * 8 * d_out  # a few [d_out] vectors (g, the norm)
    assert floor <= extra <= floor + vectors, f"DoRA saves {extra} bytes beyond LoRA, floor {floor}"


@pytest.mark.parametrize("bf16_input", [True, False], ids=["bf16-activation", "fp32-activation-cast-by-a-hook"])
def test_one_training_call_launches(bf16_input, monkeypatch):
    """PEFT default dtypes with dropout, on the kernels: in-place compose, the base output recomputed from the
    recovered bf16 input (one GEMM; the split of the fp32 input where the input's origin is unknown, here
    an fp32 activation that a hook on the base layer casts to bf16), the split of d_base, one backward launch for d_base, d_B, (g s) B and d_g; no d_lora, no
    inner, no second launch."""
    _set_env(monkeypatch, "kernels")
    model = _peft_model(64, 96, BF16, dora=True, autocast=True, dropout=0.1).to(KERNEL_DEVICE)
    x = torch.randn(32, 64).to(KERNEL_DEVICE, BF16).requires_grad_()
    if not bf16_input:
        model.base_model.model.proj.base_layer.register_forward_pre_hook(lambda _, args: (args[0].to(BF16),))
        x = x.detach().float().requires_grad_()  # an fp32 activation the base layer's hook casts to bf16
    before, splits = dict(kc.launch_counts), dict(sm.split_counts)
    with rules.forced_split_matmul(True):
        model(x).float().sum().backward()
    launched = {k: v - before.get(k, 0) for k, v in kc.launch_counts.items() if v != before.get(k, 0)}
    assert launched == {"compose_fwd_inplace": 1, "compose_bwd_lora_b": 1}, launched
    split = {k: v - splits.get(k, 0) for k, v in sm.split_counts.items() if v != splits.get(k, 0)}
    if bf16_input:
        assert split == {"recovered": 1, "split": 1, "matmul": 1}, split
    else:
        assert split == {"split": 2, "linear": 1, "matmul": 1}, split


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
def test_gpu_recovered_bf16_input_at_least_as_close_to_fp64_as_stock(monkeypatch):
    """CUDA, default dispatch, PEFT's default dtypes with the input known to come from bf16: the forward
    recompute is one cuBLAS bf16 GEMM with an fp32 result, and the output and every gradient are at least as
    close to fp64 as stock's formula (fp32 GEMMs with TF32 off)."""
    _set_env(monkeypatch, "kernels")
    scaling = 1.7
    fidelity = StockFidelity("recovered bf16 input")
    for seed in range(2):
        operands = _operands("peft-default", dropout=True, seed=seed, tokens=(4, 512), d_in=1024, d_out=1536, rank=64)
        operands = tuple(None if t is None else t.cuda() for t in operands)
        probe = torch.randn(4, 512, 1536, device="cuda").to(F64)
        before = sm.split_counts["recovered"]
        ours = _run(lambda *args: _ours(*args, bf16_origin_scale=_DROPOUT_SCALE), operands, probe, scaling)
        assert sm.split_counts["recovered"] > before, "the recovered input's GEMM ran"
        stock = _run(_stock_formula, operands, probe, scaling)
        truth = _run(_stock_formula, operands, probe, scaling, upcast=True)
        for name, want in truth.items():
            fidelity.add(f"seed {seed} {name}", ours[name], stock[name], want)
    fidelity.assert_geomean()


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dropout", [False, True], ids=["base_result", "dropout"])
@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_gpu_node_at_least_as_close_to_fp64_as_stock(setup, dropout, monkeypatch):
    """CUDA, default dispatch (kernels, the split GEMM by its rule at a size above its threshold): output and
    every gradient at least as close to fp64 as stock's formula (fp32 GEMMs with TF32 off)."""
    _set_env(monkeypatch, "kernels")
    scaling = 1.7
    fidelity = StockFidelity(setup)
    for seed in range(2):
        operands = _operands(setup, dropout=dropout, seed=seed, tokens=(4, 512), d_in=1024, d_out=1536, rank=64)
        operands = tuple(None if t is None else t.cuda() for t in operands)
        out_dtype = torch.promote_types(operands[2].dtype, (operands[0] if dropout else operands[5]).dtype)
        probe = torch.randn(4, 512, 1536, device="cuda").to(out_dtype).to(F64)
        before = sm.split_counts["linear"]
        ours = _run(_ours, operands, probe, scaling)
        if dropout and setup == "peft-default":
            assert sm.split_counts["linear"] > before, "the split GEMM ran"
        stock = _run(_stock_formula, operands, probe, scaling)
        truth = _run(_stock_formula, operands, probe, scaling, upcast=True)
        for name, want in truth.items():
            fidelity.add(f"seed {seed} {name}", ours[name], stock[name], want)
    fidelity.assert_geomean()


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("setup", ["peft-default", "all-bf16"])
def test_gpu_layer_peak_memory_is_the_floor(setup):
    """Peak extra memory of one training call: DoRA minus LoRA at most one base-output-sized tensor in the base
    output's dtype, plus the norm's and the node's small temporaries."""
    w_dtype, a_dtype = SETUPS[setup]
    d_in, d_out, tokens = 2048, 4096, 4096
    x = torch.randn(tokens, d_in, device="cuda").to(w_dtype).requires_grad_()
    peaks = {}
    for dora in (False, True):
        model = _peft_model(d_in, d_out, w_dtype, dora=dora, autocast=a_dtype != w_dtype, dropout=0.0).cuda()
        model(x).float().sum().backward()  # warm-up (kernels, caches)
        for p in model.parameters():
            p.grad = None
        x.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        model(x).float().sum().backward()
        torch.cuda.synchronize()
        peaks[dora] = torch.cuda.max_memory_allocated() - before
        del model
        x.grad = None
        torch.cuda.empty_cache()
    extra = peaks[True] - peaks[False]
    assert extra <= tokens * d_out * 2 + 8 * 2**20, f"DoRA peak {peaks[True]} vs LoRA {peaks[False]}: +{extra}"
