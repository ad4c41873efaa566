"""NaN and Inf in the weights, the adapters, the magnitude or the input: outputs and every gradient have
stock PEFT's non-finite pattern (positions of NaN, +Inf and -Inf), on the PyTorch path and on the kernels.

The defined behaviour (``norm/engine.py``): the norm of a row is NaN / +Inf exactly where the dense IEEE
evaluation of ``||W + s * (B @ A)||_row`` is. Stock PEFT's Linear layers do not quite compute that: they form
``B @ A`` as ``lora_B(lora_A(eye))``, whose ``0 * inf`` products turn one infinity of ``lora_A`` into NaN in
every row (a by-product of the identity matrix, not of DoRA). For infinities in ``lora_A`` of a Linear the
reference is therefore stock PEFT with ``B @ A`` formed directly (``lora_B.weight @ lora_A.weight``, as stock
does for Conv and Embedding); every other case is compared with unmodified stock PEFT.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tests._models
from dorafactors.dispatch import config, rules
from dorafactors.kernels import compose as kc
from dorafactors.norm import engine
from tests._models import LayerCase, build_triplet, make_input, run_forward_backward

NAN, INF = float("nan"), float("inf")
LINEAR_KINDS = ("linear", "gpt2_conv1d")
ON_GPU = torch.cuda.is_available()


def _class(t: torch.Tensor) -> torch.Tensor:
    """0 finite, 1 NaN, 2 +Inf, 3 -Inf."""
    t = t.detach().to(torch.float64).cpu()
    c = torch.zeros(t.shape, dtype=torch.int8)
    c[torch.isnan(t)] = 1
    c[t == INF] = 2
    c[t == -INF] = 3
    return c


def _assert_same_pattern(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    cg, cw = _class(got), _class(want)
    if not torch.equal(cg, cw):
        where = (cg != cw).nonzero().tolist()[:6]
        raise AssertionError(f"{name}: non-finite pattern differs at {where}: ours {cg.tolist()} stock {cw.tolist()}")


def _factors(model, kind: str) -> dict[str, torch.Tensor]:
    target = model.base_model.model.target
    if kind == "embedding":
        a, b = target.lora_embedding_A["default"], target.lora_embedding_B["default"]
    else:
        a, b = target.lora_A["default"].weight, target.lora_B["default"].weight
    return {"W": target.base_layer.weight, "A": a, "B": b, "m": target.lora_magnitude_vector["default"].weight}


def _direct_lora_product(stock) -> None:
    """Stock PEFT's Linear DoRA with ``B @ A`` formed directly instead of through ``lora_A(eye)``."""
    for module in stock.modules():
        if type(module).__name__ == "DoraLinearLayer":
            module.get_lora_weight = lambda lora_A, lora_B, adapter_name=None: lora_B.weight @ lora_A.weight


def _poison(model, kind: str, source: str, index: int, value: float, x: torch.Tensor) -> torch.Tensor:
    if source == "x":
        x = x.clone()
        x.view(-1)[index % x.numel()] = value
        return x
    tensor = _factors(model, kind)[source]
    with torch.no_grad():
        tensor.view(-1)[index % tensor.numel()] = value
    return x


def _compare_with_stock(case: LayerCase, dtype, source: str, index: int, value: float, mode: str) -> None:
    stock, ours, _ = build_triplet(case, dtype)
    if case.kind in LINEAR_KINDS and source == "A" and math.isinf(value):
        _direct_lora_product(stock)
    x = make_input(case, dtype)
    results = []
    for model in (stock, ours):
        x_model = _poison(model, case.kind, source, index, value, x)
        if mode == "no-grad":
            model.eval()
            with torch.no_grad():
                results.append((model(x_model), {}))
        else:
            results.append(run_forward_backward(model, x_model, train=mode == "train"))
    (out_s, grads_s), (out_o, grads_o) = results
    _assert_same_pattern(out_o, out_s, "output")
    assert grads_o.keys() == grads_s.keys()
    for name in grads_s:
        _assert_same_pattern(grads_o[name], grads_s[name], name.split("base_model.model.")[-1])


@st.composite
def poisoned_cases(draw, kinds=("linear", "gpt2_conv1d", "conv1d", "conv2d", "embedding")):
    kind = draw(st.sampled_from(kinds))
    sources = ["W", "A", "B", "m"] + (["x"] if kind != "embedding" else [])
    common = dict(
        rank=draw(st.sampled_from([1, 2, 3])),
        scaling=draw(st.sampled_from([0.0, -1.5, 0.7, 2.0])),
        seed=draw(st.integers(0, 1000)),
        bias=draw(st.booleans()),
    )
    if kind in LINEAR_KINDS:
        case = LayerCase(
            kind=kind,
            d_in=draw(st.sampled_from([1, 3, 6])),
            d_out=draw(st.sampled_from([1, 4, 5])),
            batch=draw(st.sampled_from([(3,), (2, 2)])),
            dropout=draw(st.booleans()),
            **common,
        )
    elif kind == "embedding":
        case = LayerCase(
            kind=kind, d_in=draw(st.sampled_from([3, 7])), d_out=draw(st.sampled_from([2, 5])), batch=(4,), **common
        )
    else:
        case = LayerCase(
            kind=kind,
            d_in=draw(st.sampled_from([1, 2])),
            d_out=draw(st.sampled_from([2, 3])),
            kernel=draw(st.sampled_from([1, 3])),
            spatial=4,
            batch=(2,),
            **common,
        )
    return dict(
        case=case,
        source=draw(st.sampled_from(sources)),
        index=draw(st.integers(0, 10_000)),
        value=draw(st.sampled_from([NAN, INF, -INF])),
        mode=draw(st.sampled_from(["train", "eval", "no-grad"])),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@given(drawn=poisoned_cases())
def test_nonfinite_pattern_matches_stock(drawn, dtype) -> None:
    """One NaN / +Inf / -Inf in W, lora_A, lora_B, the magnitude or the input (PyTorch path; the no-grad
    Linear calls take the folded decode path)."""
    _compare_with_stock(dtype=dtype, **drawn)


KERNEL_CASES = {
    "linear": LayerCase(kind="linear", d_in=6, d_out=5, rank=2, batch=(3,), scaling=0.7),
    # a bias-free base layer without dropout: the training node composes PEFT's result + extra itself
    "linear-no-bias": LayerCase(kind="linear", d_in=6, d_out=5, rank=2, batch=(3,), scaling=0.7, bias=False),
    "linear-dropout": LayerCase(kind="linear", d_in=6, d_out=5, rank=2, batch=(3,), dropout=True),
    "conv1d": LayerCase(kind="conv1d", d_in=2, d_out=3, rank=2, batch=(2,), spatial=4),
}


@pytest.mark.parametrize(
    ("source", "value"),
    [("W", INF), ("A", INF), ("B", -INF), ("B", NAN), ("m", INF), ("x", NAN)],
    ids=["W-inf", "A-inf", "B-neginf", "B-nan", "m-inf", "x-nan"],
)
@pytest.mark.parametrize("case_name", sorted(KERNEL_CASES))
def test_nonfinite_pattern_matches_stock_on_the_kernels(case_name, source, value, monkeypatch) -> None:
    """The same through the Triton norm and compose kernels (the GPU, else the CPU interpreter; bf16, since the
    norm kernel takes half-precision weights), training forward and backward."""
    monkeypatch.setattr(tests._models, "DEVICE", torch.device("cuda" if ON_GPU else "cpu"))
    monkeypatch.setenv("PEFT_DORA_FUSED", "1")
    monkeypatch.setenv("PEFT_DORA_FUSED_BACKWARD", "1")
    config.invalidate_cache()
    before = dict(kc.launch_counts)
    _compare_with_stock(KERNEL_CASES[case_name], torch.bfloat16, source, 4, value, "train")
    launched = sum(kc.launch_counts[k] - before.get(k, 0) for k in ("compose_fwd", "compose_fwd_inplace"))
    assert launched > 0, "the compose kernel ran"


@pytest.mark.parametrize("mode", ["train", "no-grad"])
@pytest.mark.parametrize("value", [INF, -INF])
def test_an_inf_in_the_base_weight_stays_local(value, mode) -> None:
    """The reported case: one infinity in ``W`` made all of ``lora_A.grad`` and ``x.grad`` NaN (the factored
    norm of its row was NaN, so ``g`` was); stock's norm is +Inf there, ``g = 0``, and the damage stays in
    that row and column."""
    case = LayerCase(kind="linear", d_in=6, d_out=5, rank=2, batch=(3,))
    _compare_with_stock(case, torch.float32, "W", 7, value, mode)
    _, ours, _ = build_triplet(case, torch.float32)
    x = make_input(case, torch.float32)
    _poison(ours, "linear", "W", 7, value, x)  # W[1, 1]
    _, grads = run_forward_backward(ours, x, train=True)
    lora_A = next(g for n, g in grads.items() if "lora_A" in n)
    assert torch.isfinite(lora_A).all()
    bad_columns = (~torch.isfinite(grads["<input>"])).nonzero()[:, -1].unique().tolist()
    assert bad_columns == [1], bad_columns


# ------------------------------------------------------------------------------------------------ the engine


def _engine_factors(d_out, d_in, rank, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=gen, dtype=torch.float64).to(dtype)
    a = (torch.randn(rank, d_in, generator=gen, dtype=torch.float64) / d_in**0.5).to(dtype)
    b = (0.5 * torch.randn(d_out, rank, generator=gen, dtype=torch.float64)).to(dtype)
    return w, a, b


def _dense_norm(w, a, b, scaling):
    """The definition: ``||W + s * (B @ A)||_row`` evaluated densely in fp64 (IEEE throughout)."""
    return (w.double() + scaling * (b.double() @ a.double())).norm(dim=1)


ENGINE_PATHS = {
    # name: (device, weight dtype, adapter dtype (None: W's), env, forced GEMM thresholds)
    "torch": ("cpu", torch.float32, None, {"PEFT_DORA_FUSED": "0"}, False),
    "triton": ("cuda" if ON_GPU else "cpu", torch.bfloat16, None, {"PEFT_DORA_FUSED": "1"}, False),
    # fp32 A on the one-pass kernel: ||A_k|| for the in-kernel repair comes from the host, not the gram programs
    "triton-fp32-adapters": (
        "cuda" if ON_GPU else "cpu",
        torch.bfloat16,
        torch.float32,
        {"PEFT_DORA_FUSED": "1"},
        False,
    ),
    "gemm": ("cuda" if ON_GPU else "cpu", torch.bfloat16, None, {"PEFT_DORA_FUSED": "1"}, True),
    # PEFT's default dtypes: A's exact bf16 parts through the GEMMs (kernels/row_norm.py::fp32_adapter_gemms)
    "gemm-fp32-adapters": ("cuda" if ON_GPU else "cpu", torch.bfloat16, torch.float32, {"PEFT_DORA_FUSED": "1"}, True),
}


@pytest.mark.parametrize("cached", [False, True], ids=["cold", "cached-sumsq"])
@pytest.mark.parametrize("path", sorted(ENGINE_PATHS))
def test_engine_norm_has_the_dense_class_for_one_nonfinite_entry(path, cached, monkeypatch) -> None:
    """Every single NaN / +Inf / -Inf position in W, A and B, scaling 0.7 and 0: the norm is finite, NaN or
    +Inf exactly where the dense norm is (and equal to it where finite). On the kernel paths with a non-zero
    scaling the repair runs inside the norm kernel (the PyTorch repair is never called)."""
    device, dtype, adapter_dtype, env, force_gemm = ENGINE_PATHS[path]
    torch_repairs = []
    repair = engine._dense_class_of_nonfinite_rows
    monkeypatch.setattr(
        engine, "_dense_class_of_nonfinite_rows", lambda *args: torch_repairs.append(args[3]) or repair(*args)
    )
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config.invalidate_cache()
    if force_gemm:
        monkeypatch.setattr(rules, "NORM_GEMM_MIN_DIN_RANK", 0)
        monkeypatch.setattr(rules, "NORM_GEMM_FP32_MIN_MACS", 0)
    d_out, d_in, rank = 5, 9, 3  # d_in > r: the factored paths
    for scaling in (0.7, 0.0):
        for source in ("W", "A", "B"):
            numel = {"W": d_out * d_in, "A": rank * d_in, "B": d_out * rank}[source]
            # every position on the PyTorch path; first, middle and last under the (slow) interpreter
            indices = range(numel) if device == "cuda" or path == "torch" else (0, numel // 2, numel - 1)
            for value in (NAN, INF, -INF):
                for index in indices:
                    w, a, b = _engine_factors(d_out, d_in, rank, adapter_dtype or dtype, seed=index)
                    w = w.to(dtype)
                    {"W": w, "A": a, "B": b}[source].view(-1)[index] = value
                    w, a, b = w.to(device), a.to(device), b.to(device)
                    assert engine.norm_path(w, a, b) == path.removesuffix("-fp32-adapters")
                    sumsq = engine.weight_sumsq(w) if cached else None
                    finite = None if sumsq is None else engine.weight_rows_finite(sumsq)
                    got = engine.weight_norm(w, a, b, scaling, cached_sumsq=sumsq, weight_rows_finite=finite)
                    want = _dense_norm(w.cpu(), a.cpu(), b.cpu(), scaling)
                    label = f"{source}[{index}]={value} s={scaling}"
                    _assert_same_pattern(got, want, label)
                    ok = torch.isfinite(want)
                    torch.testing.assert_close(got.double().cpu()[ok], want[ok], rtol=1e-5, atol=1e-6, msg=label)
        in_kernel = path != "torch" and scaling != 0.0
        assert bool(torch_repairs) != in_kernel, (path, scaling, len(torch_repairs))
        torch_repairs.clear()


def test_engine_where_two_infinities_meet_gives_inf() -> None:
    """The documented limit of the row probe: ``W_ij = +inf`` and ``s (B A)_ij = -inf`` in the same element
    make the dense row NaN; the engine reports +Inf (both row sums are +Inf). Infinities that do not meet in
    one element are exact."""
    w, a, b = _engine_factors(4, 6, 2, torch.float32)
    b[1].zero_()
    b[1, 0] = -INF
    a[0, 2] = 1.0
    w[1, 2] = INF  # meets -inf * 1.0 in element (1, 2)
    assert torch.isnan(_dense_norm(w, a, b, 1.0)[1])
    assert engine.weight_norm(w, a, b, 1.0)[1] == INF
    w[1, 2] = 0.5
    w[2, 3] = INF  # another row: no meeting
    got, want = engine.weight_norm(w, a, b, 1.0), _dense_norm(w, a, b, 1.0)
    _assert_same_pattern(got[2:], want[2:], "rows that do not meet")


def test_linear_stock_turns_an_inf_in_lora_A_into_nan_everywhere() -> None:
    """Why Linear infinities in lora_A are compared against the direct product: unmodified stock PEFT's norm
    is NaN in every row (``lora_A(eye)`` multiplies the infinity by the identity's zeros), ours follows the
    dense definition (+Inf where ``B_ik != 0``)."""
    case = LayerCase(kind="linear", d_in=5, d_out=4, rank=2, batch=(3,))
    stock, ours, _ = build_triplet(case, torch.float32)
    for model in (stock, ours):
        _poison(model, "linear", "A", 3, INF, None)
    dora = stock.base_model.model.target.lora_magnitude_vector["default"]
    target = stock.base_model.model.target
    lora_weight = dora.get_lora_weight(target.lora_A["default"], target.lora_B["default"])
    assert torch.isnan(dora.get_weight_norm(target.base_layer.weight, lora_weight.detach(), 1.0)).all()
    factors = _factors(ours, "linear")
    norm = engine.weight_norm(factors["W"].detach(), factors["A"].detach(), factors["B"].detach(), 1.0)
    assert (norm == INF).all()  # every B_i0 != 0 here


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@settings(max_examples=40)
@given(drawn=poisoned_cases())
def test_gpu_nonfinite_pattern_matches_stock(drawn, dtype) -> None:
    """CUDA: the compiled norm and compose kernels, cuBLAS, the decode fold."""
    import tests._models as models

    with pytest.MonkeyPatch.context() as m:
        m.setattr(models, "DEVICE", torch.device("cuda"))
        _compare_with_stock(dtype=dtype, **drawn)
