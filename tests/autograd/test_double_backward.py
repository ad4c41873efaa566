"""Second-order gradients (``create_graph=True``, a gradient penalty) are exact on every path.

The custom Functions save ``g`` (connected to the magnitude) and ``inner``; while a graph is being created
their backward is plain autograd ops, and ``inner`` is a Function output so that a double backward reaches
``lora`` / ``base`` / ``x`` through it. Covered: fp64 ``gradgradcheck`` of the composition and of the
``base_result=None`` (dropout) Function; the Triton forward (interpreter on CPU) against an fp64 truth; the
``torch.library`` ops eagerly; and a gradient penalty through the public API (patched PEFT model vs stock
PEFT built unpatched in the same process) for every layer kind, trainable and frozen magnitude, both paths.
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from dorafactors.autograd import recompute_base
from dorafactors.autograd.compose import dora_compose
from dorafactors.autograd.recompute_base import compose_recompute_base
from dorafactors.dispatch import config
from dorafactors.kernels import compose as kc
from tests._models import LayerCase, build_triplet, make_input
from tests._tolerances import StockFidelity, assert_close_verbose, assert_dtype_close

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def _set_env(monkeypatch, **env) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config.invalidate_cache()


PATH_ENV = {
    "reference": {"PEFT_DORA_FUSED": "0"},
    "fused": {"PEFT_DORA_FUSED": "1", "PEFT_DORA_FUSED_BACKWARD": "1"},
}


def _launches() -> dict[str, int]:
    return dict(kc.launch_counts)


def _delta(before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in kc.launch_counts.items() if v != before.get(k, 0)}


def _forward_launches(delta: dict[str, int]) -> int:
    """Forward compose kernels launched: out of place, or in place into the node's own LoRA output (Linear)."""
    return delta.get("compose_fwd", 0) + delta.get("compose_fwd_inplace", 0)


def _compose_inputs(shape, channel_dim, dtype, requires=(True, True, True), seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    lora = torch.randn(shape, generator=gen, dtype=F64).to(device, dtype)
    base = (2 * torch.randn(shape, generator=gen, dtype=F64)).to(device, dtype)
    g = (0.5 + torch.rand(shape[channel_dim], generator=gen, dtype=F64)).to(device, dtype)
    return tuple(t.requires_grad_(r) for t, r in zip((lora, base, g), requires))


def _plain_compose(lora, base, g, scaling, channel_dim):
    shape = [1] * lora.dim()
    shape[channel_dim] = -1
    g = g.view(shape)
    return (g - 1) * base + g * (scaling * lora)


# ------------------------------------------------------------------------------------------------ functional


@pytest.mark.parametrize("requires", [(True, True, True), (True, True, False), (False, True, True)])
@pytest.mark.parametrize(("shape", "channel_dim"), [((2, 3, 5), -1), ((2, 4, 3, 2), 1)])
def test_compose_gradgradcheck_fp64(shape, channel_dim, requires, monkeypatch):
    """fp64 composition: first and second derivatives exact in lora, base and g (trainable or frozen)."""
    _set_env(monkeypatch, **PATH_ENV["reference"])
    inputs = _compose_inputs(shape, channel_dim, F64, requires)

    def fn(lora, base, g):
        return dora_compose(lora, base, g, 0.7, channel_dim=channel_dim)

    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


@pytest.mark.parametrize("weight_dtype", [F64, F32], ids=["W-fp64", "W-fp32-chunked"])
@pytest.mark.parametrize("requires_scale", [True, False])
def test_recompute_base_gradgradcheck_fp64(requires_scale, weight_dtype, monkeypatch):
    """The ``base_result=None`` Function (PEFT's dropout path): exact second derivatives in x, lora and g."""
    _set_env(monkeypatch, **PATH_ENV["reference"])
    monkeypatch.setattr(recompute_base, "forward_chunk_columns", lambda *a: 3)  # several column chunks
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 7, generator=gen, dtype=F64).requires_grad_()
    weight = torch.randn(8, 7, generator=gen, dtype=F64).div_(3).to(weight_dtype)
    lora = torch.randn(2, 3, 8, generator=gen, dtype=F64).requires_grad_()
    scale = (0.5 + torch.rand(8, generator=gen, dtype=F64)).requires_grad_(requires_scale)

    def fn(x, lora, scale):
        return compose_recompute_base(x, weight, lora, scale, 0.7)

    assert gradcheck(fn, (x, lora, scale))
    assert gradgradcheck(fn, (x, lora, scale))


def _penalty_grads(fn, inputs, seed=5):
    """Gradient of ``sum(grad(loss, leaves)^2)`` w.r.t. the ``inputs`` that require grad; the loss is linear +
    quadratic in ``fn(*inputs)`` (the linear part's ``d_out`` requires no grad, the quadratic part's does)."""
    leaves = [t for t in inputs if t.requires_grad]
    out = fn(*inputs)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(out.device)
    loss = (out.to(F64) * probe).sum() + 0.25 * out.to(F64).square().sum()
    firsts = torch.autograd.grad(loss, leaves, create_graph=True)
    penalty = sum(d.to(F64).square().sum() for d in firsts)
    return torch.autograd.grad(penalty, leaves)


@pytest.mark.parametrize("requires", [(True, True, True), (True, True, False)], ids=["trainable-g", "frozen-g"])
@pytest.mark.parametrize(("shape", "channel_dim"), [((3, 40), -1), ((2, 4, 3, 2), 1)])
def test_fused_compose_second_order_matches_fp64(shape, channel_dim, requires, monkeypatch):
    """The Triton training forward (interpreter on CPU): second-order gradients equal an fp64 truth."""
    _set_env(monkeypatch, **PATH_ENV["fused"])
    inputs = _compose_inputs(shape, channel_dim, F32, requires, device=DEVICE)
    truth = [t.detach().to(F64).requires_grad_(t.requires_grad) for t in inputs]
    before = _launches()
    got = _penalty_grads(lambda lo, b, g: dora_compose(lo, b, g, 0.7, channel_dim=channel_dim), inputs)
    assert _delta(before).get("compose_fwd") == 1, "the kernel forward ran"
    want = _penalty_grads(lambda lo, b, g: _plain_compose(lo, b, g, 0.7, channel_dim), truth)
    assert len(got) == sum(requires)
    for name, a, e in zip(("lora", "base", "g"), got, want):
        assert_close_verbose(a, e, rtol=1e-5, atol=1e-5 * e.abs().max().item(), name=name)


def test_library_ops_second_order_matches_fp64(monkeypatch):
    """The ``torch.library`` ops (what ``torch.compile`` traces), called eagerly with ``create_graph=True``."""
    _set_env(monkeypatch, **PATH_ENV["fused"])
    from dorafactors.autograd import ops  # noqa: F401  (registers torch.ops.dorafactors.*)

    inputs = _compose_inputs((3, 16), -1, F32, device=DEVICE)
    truth = [t.detach().to(F64).requires_grad_() for t in inputs]
    got = _penalty_grads(lambda lo, b, g: torch.ops.dorafactors.compose_and_inner(lo, b, g, 0.7, -1, F32)[0], inputs)
    want = _penalty_grads(lambda lo, b, g: _plain_compose(lo, b, g, 0.7, -1), truth)
    for name, a, e in zip(("lora", "base", "g"), got, want):
        assert_close_verbose(a, e, rtol=1e-5, atol=1e-5 * e.abs().max().item(), name=name)


# ------------------------------------------------------------------------------------------------ public API


def _gradient_penalty(model, x, *, loss_kind: str) -> dict[str, torch.Tensor]:
    """Final gradients of a gradient penalty ``sum_p ||d loss / d p||^2`` over every trainable parameter and
    the (float) input; the loss is linear (``d_out`` constant) or quadratic in the output."""
    model.train()
    model.zero_grad(set_to_none=True)
    x = x.detach().clone()
    if x.is_floating_point():
        x.requires_grad_(True)
    out = model(x)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(11), dtype=F64).to(out.device)
    loss = (out.to(F64) * probe).sum()
    if loss_kind == "quadratic":
        loss = loss + 0.25 * out.to(F64).square().sum()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    leaves = [p for _, p in named] + ([x] if x.requires_grad else [])
    firsts = torch.autograd.grad(loss, leaves, create_graph=True)
    penalty = sum(d.to(F64).square().sum() for d in firsts)
    penalty.backward()
    grads = {n: p.grad.detach().clone() for n, p in named}
    if x.requires_grad:
        grads["<input>"] = x.grad.detach().clone()
    assert all(g is not None for g in grads.values())
    return grads


def _short(name: str) -> str:
    return ".".join(name.split(".")[-3:])


def _freeze_magnitudes(*models) -> None:
    for model in models:
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.requires_grad_(False)


CASES = {
    "linear": LayerCase(kind="linear", d_in=6, d_out=5, rank=2, batch=(2, 3), scaling=0.8),
    "linear-dropout": LayerCase(kind="linear", d_in=6, d_out=5, rank=2, batch=(3,), dropout=True, scaling=1.5),
    "gpt2_conv1d": LayerCase(kind="gpt2_conv1d", d_in=5, d_out=4, rank=2, batch=(3,)),
    "conv1d": LayerCase(kind="conv1d", d_in=2, d_out=3, rank=2, batch=(2,), spatial=5),
    "conv2d-groups": LayerCase(kind="conv2d", d_in=4, d_out=4, rank=2, groups=2, batch=(1,), spatial=5),
    "embedding": LayerCase(kind="embedding", d_in=7, d_out=4, rank=2, batch=(5,)),
}


@pytest.mark.parametrize(
    ("dtype", "magnitude", "loss_kind"),
    [
        (F64, "trainable", "linear"),
        (F64, "trainable", "quadratic"),
        (F64, "frozen", "quadratic"),
        (F32, "trainable", "quadratic"),
    ],
)
@pytest.mark.parametrize("case_name", sorted(CASES))
def test_gradient_penalty_matches_stock(case_name, dtype, magnitude, loss_kind, monkeypatch):
    """Patched PEFT model vs stock PEFT built unpatched in this process: every final gradient equal.

    The linear loss is the case that used to be silently wrong (its ``d_out`` requires no grad, so
    ``once_differentiable`` did not raise and the dependence of ``d_lora`` / ``d_base`` on ``g`` was lost)."""
    _set_env(monkeypatch, **PATH_ENV["reference"])
    case = CASES[case_name]
    stock, ours, _ = build_triplet(case, dtype)
    if magnitude == "frozen":
        _freeze_magnitudes(stock, ours)
    x = make_input(case, dtype)
    want = _gradient_penalty(stock, x, loss_kind=loss_kind)
    got = _gradient_penalty(ours, x, loss_kind=loss_kind)
    assert got.keys() == want.keys()
    for name in want:
        assert_dtype_close(got[name], want[name], dtype, name=f"{case_name} {_short(name)}")


@pytest.mark.parametrize("magnitude", ["trainable", "frozen"])
@pytest.mark.parametrize("case_name", ["linear", "linear-dropout", "conv1d"])
def test_gradient_penalty_fused_matches_stock(case_name, magnitude, monkeypatch):
    """The same through the Triton kernels (CPU interpreter): forward kernel, differentiable backward."""
    _set_env(monkeypatch, **PATH_ENV["fused"])
    case = CASES[case_name]
    stock, ours, _ = build_triplet(case, F32)
    if magnitude == "frozen":
        _freeze_magnitudes(stock, ours)
    x = make_input(case, F32)
    want = _gradient_penalty(stock, x, loss_kind="quadratic")
    before = _launches()
    got = _gradient_penalty(ours, x, loss_kind="quadratic")
    assert _forward_launches(_delta(before)) >= 1, "the kernel forward ran"
    for name in want:
        assert_dtype_close(got[name], want[name], F32, name=f"{case_name} {_short(name)}")


def _bf16_fidelity(case_name: str, seeds: range, small: bool = True) -> StockFidelity:
    """Every final gradient and seed recorded for the fidelity criterion's geometric mean against the fp64
    truth (``small``: the case at 16 -> 12 features, else at its own size)."""
    fidelity = StockFidelity(case_name, per_tensor=False)  # the mean alone (tests/_tolerances.py)
    for seed in seeds:
        size = {"d_in": 16, "d_out": 12} if small else {}
        case = LayerCase(**{**CASES[case_name].__dict__, **size, "seed": seed})
        stock, ours, truth = build_triplet(case, BF16)
        x = make_input(case, BF16)
        ref = _gradient_penalty(truth, x.to(F64), loss_kind="quadratic")
        want = _gradient_penalty(stock, x, loss_kind="quadratic")
        got = _gradient_penalty(ours, x, loss_kind="quadratic")
        for name in want:
            fidelity.add(f"seed {seed} {_short(name)}", got[name], want[name], ref[name], BF16)
    return fidelity


@pytest.mark.parametrize("case_name", ["linear", "linear-dropout"])
def test_gradient_penalty_bf16_not_worse_than_stock(case_name, monkeypatch):
    """bf16: the second-order gradients are at least as close to the fp64 truth as stock PEFT's.

    A second-order gradient in bf16 passes through many roundings outside dorafactors (PEFT's bf16
    ``lora_A``/``lora_B``/base layers) and through ``g``, which both implementations quantize to bf16
    precision (stock: a bf16 norm; ours: the fp32 norm rounded to the bf16 magnitude's dtype, so that an
    untrained adapter is the identity). Single draws therefore scatter both ways: measured 0.20x to 5.7x,
    all four gradients of one seed moving together with the draw of ``g``'s roundings (on the H200 up to
    5.4x at 4.2 u on a 10-element gradient). The geometric mean over 20 seeds and every gradient is the stable measure of "at
    least as close as stock" (0.91 and 0.94 here). A structural error (a missing second-order term) is not a precision question: the fp64 and fp32
    tests above catch it exactly. The kernel forward rounds exactly as the reference, so the fused path is
    covered by the fp32 tests above and by the GPU test below; conv runs the same Function with
    ``channel_dim=1`` (fp64/fp32 above).
    """
    _set_env(monkeypatch, **PATH_ENV["reference"])
    _bf16_fidelity(case_name, range(20)).assert_geomean()


@pytest.mark.parametrize("path", ["reference", "fused"])
def test_compiled_double_backward_raises_or_matches_stock(path, monkeypatch):
    """Under ``torch.compile`` a gradient penalty is never silently wrong: PyTorch's compiled backward cannot
    be differentiated again and raises (as for stock PEFT); if a later PyTorch supports it, it must match."""
    _set_env(monkeypatch, **PATH_ENV[path])
    case = CASES["linear"]
    stock, ours, _ = build_triplet(case, F32)
    x = make_input(case, F32)
    want = _gradient_penalty(stock, x, loss_kind="quadratic")
    torch._dynamo.reset()
    try:
        with torch._functorch.config.patch(decompose_custom_triton_ops=ON_GPU):
            compiled = torch.compile(ours, backend="aot_eager")
            got = _gradient_penalty(compiled, x, loss_kind="quadratic")
    except RuntimeError as err:
        assert "double backward" in str(err)
    else:
        for name in want:
            assert_dtype_close(got[name].cpu(), want[name].cpu(), F32, name=_short(name))
    finally:
        torch._dynamo.reset()


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("case_name", ["linear", "linear-dropout", "conv1d", "conv2d-groups"])
def test_gpu_gradient_penalty_on_the_kernels(case_name, dtype, monkeypatch):
    """CUDA kernels (forced training compose): fp32 equal to stock; bf16 at least as close to fp64 as stock,
    by the fidelity criterion over 12 seeds (single draws scatter both ways: see the CPU bf16 test)."""
    import tests._models as models

    monkeypatch.setattr(models, "DEVICE", torch.device("cuda"))
    _set_env(monkeypatch, **PATH_ENV["fused"])
    case = CASES[case_name]
    stock, ours, _ = build_triplet(case, dtype)
    x = make_input(case, dtype)
    want = _gradient_penalty(stock, x, loss_kind="quadratic")
    before = _launches()
    got = _gradient_penalty(ours, x, loss_kind="quadratic")
    assert _forward_launches(_delta(before)) >= 1
    if dtype == F32:
        for name in want:
            assert_dtype_close(got[name], want[name], F32, name=f"{case_name} {_short(name)}")
        return
    fidelity = _bf16_fidelity(case_name, range(12), small=False)
    print(f"\n{case_name}: geometric mean ratio {fidelity.geomean():.3f}")
    fidelity.assert_geomean()
