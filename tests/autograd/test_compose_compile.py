"""``torch.compile(fullgraph=True)`` runs the Triton compose kernels inside the compiled graph.

CPU: the kernels run on Triton's interpreter, which cannot be recorded into a graph, so the ops stay opaque
to AOTAutograd (``decompose_custom_triton_ops=False``) and the ``aot_eager`` backend executes them, i.e. their
interpreted kernels, when the compiled graph runs; ``launch_counts`` proves the launches. ``fullgraph=True``
proves there is no graph break anywhere in the traced model.
GPU (``gpu`` marker): the Inductor backend with the ops decomposed, and the generated code must contain the
kernels.
"""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

import dorafactors
from dorafactors.autograd import compose
from dorafactors.autograd.compose import dora_compose
from dorafactors.dispatch import config, rules
from dorafactors.kernels import compose as kc
from tests._models import LayerCase, build_triplet, make_input, run_forward_backward
from tests._tolerances import HALF, TOLERANCES, StockFidelity, assert_close_verbose

F32 = torch.float32
ON_GPU = torch.cuda.is_available()


@pytest.fixture
def fused(monkeypatch):
    monkeypatch.setenv("PEFT_DORA_FUSED", "1")
    monkeypatch.setenv("PEFT_DORA_FUSED_BACKWARD", "1")
    config.invalidate_cache()


@pytest.fixture
def compile_setup(monkeypatch):
    """Fresh Dynamo state; on CPU keep the Triton ops opaque (see the module docstring)."""
    torch._dynamo.reset()
    if ON_GPU:
        yield "inductor"
    else:
        with torch._functorch.config.patch(decompose_custom_triton_ops=False):
            yield "aot_eager"
    torch._dynamo.reset()


def _launches():
    return dict(kc.launch_counts)


def _delta(before):
    return {k: v - before.get(k, 0) for k, v in kc.launch_counts.items() if v != before.get(k, 0)}


def _close(actual, expected, name):
    rtol, atol = TOLERANCES[F32]
    assert_close_verbose(actual, expected, rtol=rtol, atol=atol * max(1.0, expected.abs().max().item()), name=name)


# ------------------------------------------------------------------------------------------------ functional


@pytest.mark.parametrize("channel_dim", [-1, 1])
@pytest.mark.parametrize("trainable_magnitude", [True, False])
def test_compiled_dora_compose_runs_the_kernels(channel_dim, trainable_magnitude, fused, compile_setup):
    device = "cuda" if ON_GPU else "cpu"
    gen = torch.Generator().manual_seed(0)
    shape = (3, 5, 40) if channel_dim == -1 else (2, 6, 5, 7)
    lora = torch.randn(shape, generator=gen).to(device).requires_grad_()
    base = torch.randn(shape, generator=gen).to(device).requires_grad_()
    g = (0.6 + 0.8 * torch.rand(shape[channel_dim], generator=gen)).to(device).requires_grad_(trainable_magnitude)

    def fn(lo, ba, gg):
        return dora_compose(lo, ba, gg, 0.7, channel_dim=channel_dim) * 2.0

    eager = fn(lora, base, g)
    eager_grads = torch.autograd.grad(eager.square().sum(), [t for t in (lora, base, g) if t.requires_grad])
    compiled = torch.compile(fn, fullgraph=True, backend=compile_setup)
    with torch.no_grad():
        before = _launches()
        out = compiled(lora, base, g)
        if not ON_GPU:  # plain ops Inductor can fuse with what follows: no opaque kernel in inference
            assert _delta(before) == {}, "inference graph traces the composition as plain ops"
    _close(out, eager.detach(), "inference out")
    before = _launches()
    out = compiled(lora, base, g)
    grads = torch.autograd.grad(out.square().sum(), [t for t in (lora, base, g) if t.requires_grad])
    if not ON_GPU:
        launched = _delta(before)
        assert launched.get("compose_fwd") == 1
        assert launched.get("compose_bwd", 0) + launched.get("compose_bwd_rows", 0) == 1
        assert ("sum_partials" in launched) == trainable_magnitude
    _close(out.detach(), eager.detach(), "training out")
    for name, got, want in zip(("d_lora", "d_base", "d_g"), grads, eager_grads):
        _close(got, want, name)


@pytest.mark.parametrize("backward_mode", ["auto", "1"])
def test_compiled_training_traces_the_composition_unless_forced(backward_mode, monkeypatch, compile_setup):
    """Compiled training: by default the composition and its backward are traced as plain ops (Inductor fuses
    them); ``PEFT_DORA_FUSED_BACKWARD=1`` keeps the Triton kernels. Both equal the eager result."""
    monkeypatch.setenv("PEFT_DORA_FUSED", "1")
    if backward_mode == "auto":
        monkeypatch.delenv("PEFT_DORA_FUSED_BACKWARD", raising=False)
    else:
        monkeypatch.setenv("PEFT_DORA_FUSED_BACKWARD", backward_mode)
    config.invalidate_cache()
    device = "cuda" if ON_GPU else "cpu"
    gen = torch.Generator().manual_seed(1)
    lora = torch.randn(4, 48, generator=gen).to(device).requires_grad_()
    base = torch.randn(4, 48, generator=gen).to(device).requires_grad_()
    g = (0.6 + 0.8 * torch.rand(48, generator=gen)).to(device).requires_grad_()

    def fn(lo, ba, gg):
        return dora_compose(lo, ba, gg, 0.7) * 2.0

    eager = fn(lora, base, g)
    eager_grads = torch.autograd.grad(eager.square().sum(), (lora, base, g))
    compiled = torch.compile(fn, fullgraph=True, backend=compile_setup)
    before = _launches()
    out = compiled(lora, base, g)
    grads = torch.autograd.grad(out.square().sum(), (lora, base, g))
    if not ON_GPU:
        launched = _delta(before)
        assert ("compose_fwd" in launched) == (backward_mode == "1"), launched
    _close(out.detach(), eager.detach(), "training out")
    for name, got, want in zip(("d_lora", "d_base", "d_g"), grads, eager_grads):
        _close(got, want, name)


@pytest.mark.skipif(ON_GPU, reason="interpreter-only guard")
def test_interpreter_ops_refuse_to_be_decomposed(fused):
    """Under the interpreter a decomposed op would trace to a graph without its kernel: it must raise instead."""
    torch._dynamo.reset()
    lora, base, g = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8), torch.rand(8) + 0.5  # training ops
    compiled = torch.compile(lambda a, b, c: dora_compose(a, b, c, 0.5), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="decompose_custom_triton_ops"):
        compiled(lora, base, g)
    torch._dynamo.reset()


def test_compiled_reference_path_has_no_graph_break(monkeypatch, compile_setup):
    """With the kernels off the composition still traces in one graph."""
    monkeypatch.setenv("PEFT_DORA_FUSED", "0")
    config.invalidate_cache()
    lora = torch.randn(4, 8, requires_grad=True)
    base, g = torch.randn(4, 8), (torch.rand(8) + 0.5).requires_grad_()
    before = _launches()
    out = torch.compile(lambda a, b, c: dora_compose(a, b, c, 0.5), fullgraph=True, backend="aot_eager")(lora, base, g)
    out.sum().backward()
    assert _delta(before) == {}
    assert g.grad is not None and lora.grad is not None


def test_constant_marker_is_torchs():
    """``rules.constant_while_compiling`` marks functions exactly as ``torch._dynamo.assume_constant_result``."""

    def a():
        return 0

    def b():
        return 0

    assert vars(rules.constant_while_compiling(a)) == vars(torch._dynamo.assume_constant_result(b)) != {}


# ------------------------------------------------------------------------------------------------ PEFT models


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = torch.nn.Linear(8 * 6 * 6, 48)
        self.fc2 = torch.nn.Linear(48, 24)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(h)))


def _peft_models(device):
    torch.manual_seed(0)
    base = _Net().to(device)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["conv", "fc1", "fc2"], use_dora=True, init_lora_weights=False)
    stock = get_peft_model(base, cfg)
    with torch.no_grad():  # the magnitude away from its init value as well (g != 1)
        for name, p in stock.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.3 * torch.rand_like(p))
    ours = copy.deepcopy(stock)
    dorafactors.patch(ours)
    return stock, ours


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_compiled_patched_peft_model(mode, fused, compile_setup):
    """A real patched PEFT DoRA model (Conv2d + Linear) under ``torch.compile(fullgraph=True)``."""
    device = "cuda" if ON_GPU else "cpu"
    stock, ours = _peft_models(device)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1)).to(device)
    for m in (stock, ours):
        m.train(mode == "train")
    compiled = torch.compile(ours, fullgraph=True, backend=compile_setup)
    before = _launches()
    if mode == "eval":
        with torch.no_grad():
            want, got = stock(x), compiled(x)
        if not ON_GPU:
            assert _delta(before) == {}, "inference traces the composition as plain ops (fused by Inductor)"
        _close(got, want, "eval out")
        return
    want = stock(x)
    want.square().sum().backward()
    got = compiled(x)
    got.square().sum().backward()
    if not ON_GPU:
        launched = _delta(before)
        assert launched.get("compose_fwd") == 3
        assert launched.get("compose_bwd", 0) + launched.get("compose_bwd_rows", 0) == 3
    _close(got.detach(), want.detach(), "train out")
    stock_grads = dict(stock.named_parameters())
    for name, p in ours.named_parameters():
        if p.requires_grad:
            _close(p.grad, stock_grads[name].grad, f"grad {name}")


@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["no-dropout", "dropout"])
def test_compiled_training_traces_no_custom_autograd_function(dropout, monkeypatch):
    """By default compiled training traces plain differentiable ops, not the eager path's custom autograd
    Functions (Dynamo traces a Function's forward and backward itself; torch 2.11's trace of the composition
    Function lost every adapter gradient on CUDA). Same gradients as eager, dropout's recompute path included."""
    from dorafactors.autograd import compose, lora_compose, recompute_base

    monkeypatch.setenv("PEFT_DORA_FUSED", "1")
    monkeypatch.delenv("PEFT_DORA_FUSED_BACKWARD", raising=False)
    config.invalidate_cache()
    traced: list[str] = []
    for cls in (compose._ComposeFunction, lora_compose._LoraComposeFunction, recompute_base._RecomputeBaseCompose):
        original = cls.forward

        def forward(ctx, *args, _original=original, _name=cls.__name__):
            traced.append(_name)
            return _original(ctx, *args)

        monkeypatch.setattr(cls, "forward", staticmethod(forward))
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(16, 24, bias=False), torch.nn.ReLU(), torch.nn.Linear(24, 8))
    cfg = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["0", "2"], use_dora=True, init_lora_weights=False
    )
    with dorafactors.patched():
        model = get_peft_model(base, cfg)
    x = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    params = [p for p in model.parameters() if p.requires_grad]
    torch._dynamo.reset()
    try:
        with torch._functorch.config.patch(decompose_custom_triton_ops=False):
            compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
            torch.manual_seed(2)
            compiled(x).square().sum().backward()
        assert traced == [], f"compiled training traced custom autograd Functions: {traced}"
        got = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        torch.manual_seed(2)  # the same dropout mask
        model(x).square().sum().backward()
    finally:
        torch._dynamo.reset()
    for p, g in zip(params, got):
        _close(g, p.grad, "compiled gradient")


def test_compiled_conv_and_linear_training_by_default_match_stock(monkeypatch, compile_setup):
    """The default compiled training path (plain traced ops) on a Conv2d + Linear PEFT model: the same output
    and gradients as stock PEFT."""
    _compiled_default_training_matches_stock(monkeypatch, compile_setup)


@pytest.mark.gpu
def test_gpu_compiled_conv_and_linear_training_by_default_match_stock(monkeypatch, compile_setup):
    """The same under Inductor on CUDA (where torch 2.11's trace of the composition's autograd Function
    dropped every adapter gradient)."""
    _compiled_default_training_matches_stock(monkeypatch, compile_setup)


def _compiled_default_training_matches_stock(monkeypatch, compile_setup) -> None:
    monkeypatch.setenv("PEFT_DORA_FUSED", "1")
    monkeypatch.delenv("PEFT_DORA_FUSED_BACKWARD", raising=False)
    config.invalidate_cache()
    device = "cuda" if ON_GPU else "cpu"
    stock, ours = _peft_models(device)
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(3)).to(device)
    stock.train()
    ours.train()
    want = stock(x)
    want.square().sum().backward()
    got = torch.compile(ours, fullgraph=True, backend=compile_setup)(x)
    got.square().sum().backward()
    _close(got.detach(), want.detach(), "train out")
    stock_grads = dict(stock.named_parameters())
    for name, p in ours.named_parameters():
        if p.requires_grad:
            _close(p.grad, stock_grads[name].grad, f"grad {name}")


@pytest.mark.gpu
def test_gpu_inductor_graph_contains_the_kernels(fused):
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    lora = torch.randn(512, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    base = torch.randn(512, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = (torch.rand(4096, device="cuda") + 0.5).requires_grad_()
    compiled = torch.compile(lambda a, b, c: dora_compose(a, b, c, 0.5), fullgraph=True)

    def step():
        out = compiled(lora, base, g)
        out.float().square().sum().backward()
        return out

    _, code = run_and_get_code(step)
    source = "\n".join(code)
    for kernel in ("_compose_fwd_kernel", "_compose_bwd_cols_kernel", "_sum_partials_kernel"):
        assert kernel in source, f"{kernel} is not in the Inductor output"
    torch._dynamo.reset()


# ------------------------------------------------------------------------------- saved activations (memory)


def _saved_for_backward(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of every tensor the compiled training graph keeps for its backward, as Inductor's own
    decompositions and partitioner decide (``compile_fx``); the partitioned graphs then run uncompiled (no
    C++ / Triton build), since only the partition is asked."""
    from functorch.compile import make_boxed_func
    from torch._inductor.compile_fx import compile_fx

    saved: list[tuple[tuple[int, ...], torch.dtype]] = []

    def record(gm, example_inputs, **kwargs):
        if kwargs.get("is_backward"):
            for node in gm.graph.find_nodes(op="placeholder"):
                val = node.meta.get("val")
                if isinstance(val, torch.Tensor) and not node.name.startswith("tangents"):
                    saved.append((tuple(val.shape), val.dtype))
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend=lambda gm, ex: compile_fx(gm, ex, inner_compile=record), fullgraph=True)
        compiled(x).float().square().sum().backward()
    finally:
        torch._dynamo.reset()
    assert saved, "no backward graph was compiled"
    return saved


class _TwoHeads(torch.nn.Module):
    """Two Linear layers of different widths on one input (biased), outputs concatenated: each DoRA module's
    saved tensors are its own (no activation between them for the partitioner to trade)."""

    def __init__(self, d_in: int, widths: dict[str, int]):
        super().__init__()
        self.heads = torch.nn.ModuleDict({name: torch.nn.Linear(d_in, width) for name, width in widths.items()})

    def forward(self, x):
        return torch.cat([head(x) for head in self.heads.values()], dim=-1)


def _activations(saved, tokens: int) -> list[tuple[int, torch.dtype]]:
    """The saved ``[tokens, width]`` activations as sorted (width, dtype); weights ``[d_out, r]`` and vectors do
    not have ``tokens`` rows (the shapes below keep every weight dimension different from ``tokens``)."""
    acts = [(shape[-1], dtype) for shape, dtype in saved if len(shape) >= 2 and math.prod(shape[:-1]) == tokens]
    return sorted(acts, key=str)


@pytest.mark.parametrize("dropout", [0.0, 0.25], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("fp32_adapters", [False, True], ids=["bf16", "fp32-adapters"])
def test_compiled_training_saves_one_activation_per_dora_module(fp32_adapters, dropout):
    """Compiled training (default path: plain traced ops) keeps what LoRA keeps plus one ``[tokens, d_out]``
    activation per DoRA module, the rounded ``inner`` in the composition's output dtype (bf16 for an all-bf16
    model: the base output's dtype; fp32 with fp32 adapters, as the eager Function), not ``base`` and
    ``lora`` both. Inductor's partitioner, on the CPU."""
    widths = {"wide": 24, "narrow": 8}  # d_out of the DoRA modules; 10 tokens, rank 4, d_in 16: no weight has 10 rows
    tokens = 10

    def build(use_dora: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        base = _TwoHeads(16, widths).to(torch.bfloat16)
        cfg = LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=dropout,
            target_modules=list(widths),
            use_dora=use_dora,
            init_lora_weights=False,
        )
        with dorafactors.patched() if use_dora else contextlib.nullcontext():
            model = get_peft_model(base, cfg, autocast_adapter_dtype=fp32_adapters)
        return model.train()

    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    lora = _activations(_saved_for_backward(build(False), x), tokens)
    dora = _activations(_saved_for_backward(build(True), x), tokens)
    inner_dtype = torch.float32 if fp32_adapters else torch.bfloat16
    expected = sorted(lora + [(width, inner_dtype) for width in widths.values()], key=str)
    assert dora == expected, f"DoRA saves {dora}, LoRA {lora}: expected LoRA's plus {widths} in {inner_dtype}"


# ------------------------------------------------------------------------------- compiled training numerics

#: (lora dtype, base dtype, scale dtype): all-bf16, all-fp16, fp32 adapters over a bf16 base, fp32, fp64.
DTYPE_SETUPS = {
    "bf16": (torch.bfloat16, torch.bfloat16, F32),
    "fp16": (torch.float16, torch.float16, F32),
    "fp32-over-bf16": (F32, torch.bfloat16, F32),
    "fp32": (F32, F32, F32),
    "fp64": (torch.float64, torch.float64, torch.float64),
}


@pytest.mark.parametrize("channel_dim", [-1, 1])
@pytest.mark.parametrize("setup", sorted(DTYPE_SETUPS))
def test_compiled_training_gradients_equal_the_eager_function(setup, channel_dim, monkeypatch):
    """The compiled training composition against the eager reference Function (``_ComposeFunction``, which
    saves ``inner`` rounded to the output dtype): the same output bit for bit, ``d_lora`` / ``d_base`` to fp32
    rounding order, and ``d_g`` from the *rounded* ``inner`` as eager computes it (plain ``base + s lora`` in
    fp32 differs from it by half-precision roundings)."""
    monkeypatch.setenv("PEFT_DORA_FUSED", "0")
    config.invalidate_cache()
    lora_dtype, base_dtype, scale_dtype = DTYPE_SETUPS[setup]
    gen = torch.Generator().manual_seed(4)
    shape = (6, 5, 40) if channel_dim == -1 else (3, 24, 4, 5)
    lora = (3.0 * torch.randn(shape, generator=gen)).to(lora_dtype).requires_grad_()
    base = (3.0 * torch.randn(shape, generator=gen)).to(base_dtype).requires_grad_()
    g = (0.5 + torch.rand(shape[channel_dim], generator=gen)).to(scale_dtype).requires_grad_()
    probe = torch.randn(shape, generator=gen, dtype=torch.float64)

    def fn(lo, ba, gg):
        return dora_compose(lo, ba, gg, 0.7, channel_dim=channel_dim)

    def run(f):
        out = f(lora, base, g)
        return (out.detach(), *torch.autograd.grad((out.double() * probe).sum(), (lora, base, g)))

    want = run(fn)
    torch._dynamo.reset()
    try:
        got = run(torch.compile(fn, fullgraph=True, backend="aot_eager"))
    finally:
        torch._dynamo.reset()
    assert got[0].dtype == want[0].dtype and torch.equal(got[0].view(-1), want[0].view(-1)), "forward output"
    assert torch.equal(torch.signbit(got[0]), torch.signbit(want[0])), "forward output signs (zeros)"
    for name, a, b in zip(("d_lora", "d_base", "d_g"), got[1:], want[1:]):
        assert a.dtype == b.dtype, name
        rtol = 1e-12 if a.dtype == torch.float64 else 2e-6 if a.dtype == F32 else TOLERANCES[a.dtype][0] / 8
        assert_close_verbose(a, b, rtol=rtol, atol=rtol * b.abs().max().item(), name=f"{setup} {name}")


def test_compiled_training_composition_keeps_the_plain_output_on_special_values():
    """Signed zeros, infinities, NaN and a sum that overflows the output dtype: the compiled training
    composition's output is :func:`_compose_plain`'s bit for bit (its ``g``-gradient term is an exact ``+0``),
    ``d_lora`` / ``d_base`` are too, and ``d_g`` equals ``sum_rows(d_out * inner)`` wherever that is finite."""
    nan, inf = float("nan"), float("inf")
    base = torch.tensor(
        [[0.0, -0.0, 0.0, 1.0, inf, 40000.0], [-0.0, 0.0, -inf, nan, 2.0, -3.0], [0.0, 5.0, 1.0, -1.0, 3.0, 7.0]]
    )
    lora = torch.tensor(
        [[-0.0, -0.0, 0.0, 2.0, 1.0, 40000.0], [0.0, -0.0, 3.0, 1.0, inf, 4.0], [0.0, -5.0, 2.0, 1.0, -2.0, 0.5]]
    )
    g = torch.tensor([0.5, 1.5, 1.0, 2.0, 0.9, 0.95])
    for dtype in (torch.float16, torch.bfloat16, F32):
        g_inf = g.clone()
        g_inf[3] = inf  # column 3: +inf outputs (not NaN) in the plain composition
        for scale in (g, g_inf):
            outs, grads = [], []
            for fn in (compose._compose_plain, compose._compose_saving_inner):
                lo, ba, gg = (lora.to(dtype).requires_grad_(), base.to(dtype).requires_grad_(), scale.clone())
                gg.requires_grad_()
                out = fn(lo, ba, gg, 1.0, -1, dtype)
                d_out = torch.linspace(-1.0, 1.0, out.numel()).view(out.shape).to(dtype)
                outs.append(out.detach())
                grads.append(torch.autograd.grad(out, (lo, ba, gg), d_out))
            label = f"{dtype} g={scale.tolist()}"
            assert torch.equal(
                outs[0].view(torch.int16 if dtype != F32 else torch.int32),
                outs[1].view(torch.int16 if dtype != F32 else torch.int32),
            ), label
            for name, a, b in zip(("d_lora", "d_base"), grads[0][:2], grads[1][:2]):
                assert torch.equal(torch.nan_to_num(a, nan=123.0), torch.nan_to_num(b, nan=123.0)), f"{label} {name}"
            inner = (base.to(dtype).float() + lora.to(dtype).float()).to(dtype).float()
            want = (d_out.float() * inner).sum(0)
            finite = torch.isfinite(want) & torch.isfinite(scale)
            torch.testing.assert_close(grads[1][2][finite], want[finite], msg=label)
            assert torch.isfinite(grads[1][2]).all(), label


#: (model dtype, fp32 adapters) per dtype setup of a PEFT model.
MODEL_SETUPS = {
    "bf16": (torch.bfloat16, False),
    "fp16": (torch.float16, False),
    "fp32-adapters-over-bf16": (torch.bfloat16, True),
    "fp32": (F32, False),
    "fp64": (torch.float64, False),
}


@pytest.mark.parametrize("setup", sorted(MODEL_SETUPS))
def test_compiled_training_as_close_to_fp64_as_stock(setup, monkeypatch):
    """Patched PEFT models (Linear with and without dropout, Conv2d) trained through ``torch.compile``: output
    and every gradient at least as close to the fp64 truth as stock PEFT's (``StockFidelity``); fp64 equal to
    the truth at fp64 tolerance."""
    monkeypatch.setenv("PEFT_DORA_FUSED", "0")
    config.invalidate_cache()
    traced: list[int] = []

    def counted(*args, _original=compose._compose_saving_inner):
        traced.append(1)
        return _original(*args)

    monkeypatch.setattr(compose, "_compose_saving_inner", counted)
    dtype, fp32_adapters = MODEL_SETUPS[setup]
    cases = [
        LayerCase(kind="linear", d_in=24, d_out=40, rank=4, batch=(2, 12), scaling=1.5, seed=1),
        LayerCase(kind="linear", d_in=24, d_out=40, rank=4, batch=(2, 12), dropout=True, seed=2),
        LayerCase(kind="conv2d", d_in=4, d_out=12, rank=4, batch=(2,), spatial=6, seed=3),
    ]
    fidelity = StockFidelity(f"compiled {setup}")
    for case in cases:
        stock, ours, truth = build_triplet(case, dtype, fp32_adapters=fp32_adapters)
        x = make_input(case, dtype)
        out_s, grads_s = run_forward_backward(stock, x, train=True)
        out_t, grads_t = run_forward_backward(truth, x.to(torch.float64), train=True)
        torch._dynamo.reset()
        try:
            # (not fullgraph: the test dropout draws its fixed mask with a torch.Generator, a graph break)
            ours.forward = torch.compile(ours.forward, backend="aot_eager")
            traced.clear()
            out_o, grads_o = run_forward_backward(ours, x, train=True)
        finally:
            torch._dynamo.reset()
        assert traced, f"{case.kind}: the compiled training graph did not trace the composition saving inner"
        assert grads_o.keys() == grads_s.keys() == grads_t.keys()
        results = {"output": (out_o, out_s, out_t)}
        results.update({name: (grads_o[name], grads_s[name], grads_t[name]) for name in grads_t})
        for name, (o, s, t) in results.items():
            label = f"{case.kind} dropout={case.dropout} {name}"
            if dtype == torch.float64:
                assert_close_verbose(o, t, rtol=1e-10, atol=1e-12 * max(1.0, t.abs().max().item()), name=label)
            else:  # fp32 adapter gradients from half activations are judged at the model's precision
                fidelity.add(label, o, s, t, o.dtype if o.dtype in HALF else dtype)
    fidelity.assert_geomean()


@pytest.mark.gpu
def test_gpu_compiled_training_holds_one_activation_per_dora_module(monkeypatch):
    """Inductor on CUDA: the memory a compiled training forward leaves allocated for its backward is LoRA's
    plus one bf16 ``[tokens, d_out]`` activation per DoRA module (two heads, 4096 tokens), within 1 MiB + 2%."""
    monkeypatch.delenv("PEFT_DORA_FUSED_BACKWARD", raising=False)
    config.invalidate_cache()
    widths = {"wide": 2048, "narrow": 1024}
    tokens, d_in = 4096, 1024

    def build(use_dora: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        base = _TwoHeads(d_in, widths).to("cuda", torch.bfloat16)
        cfg = LoraConfig(r=64, lora_alpha=64, target_modules=list(widths), use_dora=use_dora, init_lora_weights=False)
        with dorafactors.patched() if use_dora else contextlib.nullcontext():
            model = get_peft_model(base, cfg, autocast_adapter_dtype=False)
        return model.train()

    x = torch.randn(2, tokens // 2, d_in, device="cuda", dtype=torch.bfloat16)

    def held_by_forward(model: torch.nn.Module) -> int:
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)
        compiled(x).float().square().sum().backward()  # compile, and allocate the .grad tensors
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out = compiled(x)
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before - out.numel() * out.element_size()
        out.float().square().sum().backward()
        del out
        torch._dynamo.reset()
        return held

    lora, dora = held_by_forward(build(False)), held_by_forward(build(True))
    expected = tokens * sum(widths.values()) * 2
    assert abs((dora - lora) - expected) <= 2**20 + 0.02 * expected, (
        f"DoRA holds {dora - lora} bytes more than LoRA after the forward; one bf16 activation per module is {expected}"
    )
