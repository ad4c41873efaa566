"""DoRA right after ``get_peft_model`` is exactly the base model, half-precision magnitudes included.

PEFT stores the magnitude as the row norm rounded to the magnitude's dtype, ``m = round(||W + s B A||)``.
dorafactors divides it by the norm rounded the same way (``norm.scale.magnitude_scale``), computes the
initial norm along the forward's own arithmetic (``||W||^2`` from ``engine.weight_sumsq``), and gives PEFT's
merge the forward's norm in the rows the delta leaves unchanged (``engine.dense_delta_norm``). So
``g == 1`` bitwise whenever ``m == round(norm)``, on every path: PyTorch compose, kernels (interpreter on the
CPU), decode fold, recompute-base (``lora_dropout > 0`` in training), Embedding's ``(g, ...)``, and merge.

This is the one place where DoRA is tested at its identity init on purpose: the identity is the property.
Stock PEFT is held to the same assertions in the same process (unpatched), so a failure of the premise
(stock not being the identity) shows up as such.
"""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Embedding as LoraEmbedding
from peft.tuners.lora import LoraLayer
from peft.utils.other import transpose

import dorafactors
from dorafactors.dispatch import config, rules
from dorafactors.kernels import compose as kc
from dorafactors.layers import conv as conv_layers
from dorafactors.layers import linear as linear_layers
from tests._models import Holder, LayerCase, make_input, make_layer

HALF = (torch.bfloat16, torch.float16)
#: The property tests run on the GPU where there is one (kernels on by default, or forced), else on the CPU.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KINDS = ("linear", "gpt2_conv1d", "embedding", "conv1d", "conv2d", "conv3d")
#: Rows wide enough that the norm kernel's one-pass ||W||^2 and its ||W||^2-only kernel sum in different
#: orders and differ in the last fp32 bits of some rows (the interpreter follows the kernels' order).
WIDE_ROWS = (
    LayerCase(kind="linear", d_in=200, d_out=64, rank=4, batch=(2, 3), seed=1),
    LayerCase(kind="embedding", d_in=200, d_out=24, rank=4, batch=(2, 5), seed=2),
)
#: Rows no wider than the rank (3 x 1 conv taps, rank 3): the engine's dense form, which merge must match.
NARROW_ROWS = LayerCase(kind="conv1d", d_in=1, d_out=3, rank=3, kernel=3, bias=False, batch=(2,), seed=200)
#: ``default``: for no-grad Linear calls the decode fold; otherwise the PyTorch compose on a CPU (kernels are
#: off there unless forced), the kernels on a GPU. ``kernels``: compose and norm kernels forced on
#: (``PEFT_DORA_FUSED=1``, the interpreter on a CPU), no fold.
MODES = ("default", "kernels")


@st.composite
def identity_cases(draw, kinds: tuple[str, ...] = KINDS) -> LayerCase:
    """Small odd shapes of every layer kind (fan_in_fan_out via transformers' Conv1D, grouped convs)."""
    kind = draw(st.sampled_from(kinds))
    common = dict(
        rank=draw(st.sampled_from([1, 3, 4])),
        scaling=draw(st.sampled_from([0.5, 1.0, 2.0, -1.5])),
        dropout=draw(st.booleans()) and kind != "embedding",
        seed=draw(st.integers(0, 10_000)),
    )
    if kind in ("linear", "gpt2_conv1d"):
        return LayerCase(
            kind=kind,
            d_in=draw(st.sampled_from([5, 33, 70])),
            d_out=draw(st.sampled_from([3, 17, 40])),
            bias=draw(st.booleans()) if kind == "linear" else True,
            batch=draw(st.sampled_from([(3,), (2, 5)])),
            **common,
        )
    if kind == "embedding":
        return LayerCase(
            kind=kind,
            d_in=draw(st.sampled_from([11, 40])),
            d_out=draw(st.sampled_from([5, 9])),
            batch=(2, 6),
            **common,
        )
    groups = draw(st.sampled_from([1, 2]))
    return LayerCase(
        kind=kind,
        d_in=groups * draw(st.sampled_from([1, 3])),
        d_out=groups * draw(st.sampled_from([3, 5])),
        bias=draw(st.booleans()),
        kernel=draw(st.sampled_from([1, 3])),
        padding=1,
        groups=groups,
        batch=(2,),
        spatial=5 if kind != "conv3d" else 4,
        **{**common, "rank": common["rank"] * groups},
    )


# ---------------------------------------------------------------------------------------------------
# building and probing


def _set_mode(monkeypatch, mode: str) -> None:
    if mode == "kernels":
        monkeypatch.setenv("PEFT_DORA_FUSED", "1")
        monkeypatch.setenv("PEFT_DORA_FUSED_BACKWARD", "1")
    config.invalidate_cache()


def _base(case: LayerCase, dtype: torch.dtype, device) -> Holder:
    torch.manual_seed(case.seed)
    return Holder(make_layer(case)).to(dtype).to(device)


def _peft(base: Holder, case: LayerCase, *, patched: bool, init: bool = True, fp32_adapters: bool = False):
    """PEFT DoRA on a copy of ``base``: adapters in the base dtype (or fp32), PEFT's init unless ``init=False``."""
    cfg = LoraConfig(
        r=case.rank,
        lora_alpha=case.rank,
        target_modules=["target"],
        use_dora=True,
        init_lora_weights=init,
        lora_dropout=0.2 if case.dropout else 0.0,
    )
    with dorafactors.patched() if patched else contextlib.nullcontext():
        model = get_peft_model(copy.deepcopy(base), cfg, autocast_adapter_dtype=fp32_adapters)
    layer = _lora_layer(model)
    assert type(layer.lora_magnitude_vector["default"]).__module__.startswith("dorafactors.") == patched
    layer.scaling["default"] = case.scaling  # any real s, negative included
    return model


def _lora_layer(model) -> LoraLayer:
    return next(m for m in model.modules() if isinstance(m, LoraLayer))


def _reinit_magnitude(model) -> None:
    """Set the magnitude to ``||W + s B A||`` of the current weights through the DoRA layer's own init path
    (``update_layer``, what PEFT calls in ``get_peft_model``), in ``promote(W, A)``: fp32 with fp32 adapters."""
    layer = _lora_layer(model)
    dora = layer.lora_magnitude_vector["default"]
    if isinstance(layer, LoraEmbedding):
        lora_A, lora_B = layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]
    else:
        lora_A, lora_B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    dora.update_layer(base_layer=layer.get_base_layer(), lora_A=lora_A, lora_B=lora_B, scaling=layer.scaling["default"])


@contextlib.contextmanager
def _recorded_scales(monkeypatch, model):
    """Every ``g`` the patched layer hands to a composition, by path: ``compose`` (Linear and Conv, and the
    training node with ``lora_B`` inside), the ``recompute_base`` composition (either form), the decode
    ``fold``, and Embedding's returned ``g``."""
    scales: dict[str, list[torch.Tensor]] = {}

    def spy(patcher, module, name, position, path):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            scales.setdefault(path, []).append(args[position].detach().clone())
            return original(*args, **kwargs)

        patcher.setattr(module, name, wrapper)

    def embedding_hook(_module, _args, out):
        if isinstance(out, tuple):
            scales.setdefault("embedding", []).append(out[0].detach().clone())

    with monkeypatch.context() as patcher:
        spy(patcher, linear_layers, "dora_compose", 2, "compose")  # (lora, base, scale, scaling)
        spy(patcher, linear_layers, "compose_recompute_base", 3, "recompute_base")  # (x, weight, lora, scale, s)
        spy(patcher, linear_layers, "fold_scale_into_lora_B", 1, "fold")  # (lora_B, scale, scaling, bias)
        spy(patcher, conv_layers, "dora_compose", 2, "compose")
        node = linear_layers.dora_linear_compose  # training with lora_B inside the node: (h, B, scale, s, ...)

        def node_spy(*args, **kwargs):
            path = "compose" if kwargs.get("base") is not None else "recompute_base"
            g = args[2].detach()
            if kwargs.get("divisor") is not None:  # the node divides the magnitude itself, bitwise as here
                g = g / kwargs["divisor"]
            scales.setdefault(path, []).append(g.clone())
            return node(*args, **kwargs)

        patcher.setattr(linear_layers, "dora_linear_compose", node_spy)
        hook = _lora_layer(model).lora_magnitude_vector["default"].register_forward_hook(embedding_hook)
        try:
            yield scales
        finally:
            hook.remove()


def _expected_paths(case: LayerCase, mode: str) -> set[str]:
    """The compositions :func:`_outputs` must go through for this layer (fold: small no-grad Linear calls
    in the default mode)."""
    if case.kind == "embedding":
        return {"embedding"}
    paths = {"compose"}
    if case.kind in ("linear", "gpt2_conv1d"):
        rows = math.prod(case.batch)
        if mode == "default" and rows <= rules.INFERENCE_FOLD_MAX_ROWS:
            paths.add("fold")
        if case.dropout:
            paths.add("recompute_base")
    return paths


def _outputs(model, x: torch.Tensor, *, dropout: bool) -> dict[str, torch.Tensor]:
    """The model's output on every path a forward can take: eval without grad (fold / in-place kernel), eval
    with a gradient to record, train (the recompute-base path when the layer has dropout)."""
    outs = {}
    model.eval()
    with torch.no_grad():
        outs["eval, no grad"] = model(x)
    x_grad = x.clone().requires_grad_(x.is_floating_point())
    outs["eval, grad"] = model(x_grad).detach()
    model.train()
    outs["train" + (", dropout" if dropout else "")] = model(x_grad).detach()
    model.eval()
    return outs


def _peft_merges(case: LayerCase) -> bool:
    """PEFT itself cannot merge grouped convs (it raises) nor 1x1x1 Conv3d (its 1x1 shortcut squeezes 4-D)."""
    return case.groups == 1 and not (case.kind == "conv3d" and case.kernel == 1)


def _merge_factor(model) -> torch.Tensor:
    """``m / get_weight_norm(W, delta)``: the factor PEFT's DoRA merge multiplies ``W + delta`` by."""
    layer = _lora_layer(model)
    dora = layer.lora_magnitude_vector["default"]
    delta = layer.get_delta_weight("default")
    weight = layer.get_base_layer().weight
    if isinstance(layer, LoraEmbedding):
        delta = delta.T
    elif weight.dim() == 2:
        delta = transpose(delta, layer.fan_in_fan_out)
    with torch.no_grad():
        return dora.weight / dora.get_weight_norm(weight, delta, scaling=1)


def _assert_identity(model, base, x, case, who: str) -> None:
    want = base(x)
    for path, out in _outputs(model, x, dropout=case.dropout).items():
        assert out.dtype == want.dtype, f"{who}, {path}: dtype {out.dtype} != {want.dtype}"
        diff = (out.double() - want.double()).abs().max().item()
        assert torch.equal(out, want), f"{who} {case.kind}, {path}: max |DoRA - base| = {diff:.3e}"
    if not _peft_merges(case):
        return
    merged = model.merge_and_unload().state_dict()
    for name, tensor in base.state_dict().items():
        assert torch.equal(merged[name], tensor), f"{who} {case.kind}: merge_and_unload changed {name}"


def _assert_all_one(
    scales: dict[str, list[torch.Tensor]], what: str, paths: frozenset[str] | set[str] = frozenset()
) -> None:
    """Every recorded ``g`` is 1 bitwise, and each of ``paths`` recorded one (the path was taken)."""
    missing = set(paths) - set(scales)
    assert not missing, f"{what}: no g recorded on {sorted(missing)} (taken: {sorted(scales)})"
    assert scales, f"{what}: no g was recorded"
    for path, values in scales.items():
        for g in values:
            bad = int((g != 1).sum())
            worst = (g.double() - 1).abs().max().item()
            assert bad == 0, f"{what}, {path}: {bad}/{g.numel()} entries of g != 1, worst |g - 1| = {worst:.3e}"


# ---------------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", (*HALF, torch.float32), ids=str)
@settings(max_examples=8, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=identity_cases())
def test_untrained_dora_is_exactly_the_base_model(case: LayerCase, dtype, mode, monkeypatch) -> None:
    """Base and magnitude in one dtype (half, and fp32 too): eval/train outputs and merged weights are
    bitwise the base's, as stock PEFT's are; g == 1 bitwise on every path ours takes, merge's factor
    included."""
    _set_mode(monkeypatch, mode)
    base = _base(case, dtype, DEVICE)
    x = make_input(case, dtype).to(DEVICE)
    stock = _peft(base, case, patched=False)
    _assert_identity(stock, base, x, case, "stock PEFT")

    ours = _peft(base, case, patched=True)
    assert _lora_layer(ours).lora_magnitude_vector["default"].weight.dtype == dtype
    if _peft_merges(case):
        _assert_all_one({"merge": [_merge_factor(ours)]}, f"{case.kind} merge factor")
    launches = sum(kc.launch_counts.values())
    with _recorded_scales(monkeypatch, ours) as scales:
        _assert_identity(ours, base, x, case, "dorafactors")
    _assert_all_one(scales, f"{case.kind} {mode}", _expected_paths(case, mode))
    if mode == "kernels" and case.kind != "embedding":
        assert sum(kc.launch_counts.values()) > launches, "the compose kernels did not run"


@pytest.mark.parametrize("fp32_adapters", [False, True], ids=["half-magnitude", "fp32-magnitude"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@settings(max_examples=6, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=identity_cases())
@example(case=WIDE_ROWS[0])
@example(case=WIDE_ROWS[1])
@example(case=NARROW_ROWS)
def test_g_is_one_when_the_magnitude_is_the_norm(case: LayerCase, dtype, mode, fp32_adapters, monkeypatch) -> None:
    """``init_lora_weights=False`` (B != 0) and the magnitude re-initialized to the norm of the current
    weights: every path's g is 1 bitwise; with B = 0 merge's factor is 1 bitwise too. fp32 adapters (fp32
    magnitude) included: the forward's norm is bitwise the one the magnitude was initialized from."""
    _set_mode(monkeypatch, mode)
    base = _base(case, dtype, DEVICE)
    x = make_input(case, dtype).to(DEVICE)
    ours = _peft(base, case, patched=True, init=False, fp32_adapters=fp32_adapters)
    _reinit_magnitude(ours)
    magnitude = _lora_layer(ours).lora_magnitude_vector["default"].weight
    assert magnitude.dtype == (torch.float32 if fp32_adapters else dtype)
    with _recorded_scales(monkeypatch, ours) as scales:
        _outputs(ours, x, dropout=case.dropout)
    _assert_all_one(scales, f"{case.kind} {mode}, B != 0", _expected_paths(case, mode))

    with torch.no_grad():
        for name, param in ours.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.zero_()
    _reinit_magnitude(ours)
    if _peft_merges(case):
        _assert_all_one({"merge": [_merge_factor(ours)]}, f"{case.kind} merge factor, B = 0")
    with _recorded_scales(monkeypatch, ours) as scales:
        _assert_identity(ours, base, x, case, "dorafactors")
    _assert_all_one(scales, f"{case.kind} {mode}, B = 0", _expected_paths(case, mode))


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("kind", ["linear", "conv2d", "embedding"])
def test_merging_an_untrained_adapter_keeps_a_zero_row_zero(kind, dtype) -> None:
    """A zero row of W: the magnitude is the clamped norm, and merge divides it by that same clamped norm, so
    the merged row stays zero and the forward stays the base's (stock PEFT divides 0 by 0 there: NaN)."""
    case = LayerCase(kind=kind, d_in=6, d_out=4, rank=2, batch=(2, 5) if kind == "embedding" else (2,))
    base = _base(case, dtype, DEVICE)
    with torch.no_grad():
        weight = base.target.weight
        (weight[:, 1] if kind == "embedding" else weight[1]).zero_()
    x = make_input(case, dtype).to(DEVICE)
    _assert_identity(_peft(base, case, patched=True), base, x, case, "dorafactors")


GPU_CASES = [
    LayerCase(kind="linear", d_in=4096, d_out=11008, rank=16, bias=False, batch=(4, 100)),
    LayerCase(kind="linear", d_in=1000, d_out=3001, rank=8, dropout=True, batch=(3, 7), scaling=2.0),
    LayerCase(kind="linear", d_in=768, d_out=3072, rank=32, batch=(1, 1)),  # decode: the fold
    LayerCase(kind="gpt2_conv1d", d_in=1600, d_out=4800, rank=8, batch=(2, 33)),
    LayerCase(kind="embedding", d_in=32000, d_out=1024, rank=8, batch=(2, 17)),
    LayerCase(kind="conv2d", d_in=64, d_out=256, rank=8, groups=2, batch=(2,), spatial=9),
    LayerCase(kind="conv1d", d_in=96, d_out=384, rank=4, kernel=3, batch=(2,), spatial=31, dropout=True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("fp32_adapters", [False, True], ids=["half-magnitude", "fp32-magnitude"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c.kind}-{c.d_in}x{c.d_out}")
def test_untrained_dora_is_exactly_the_base_model_gpu(case, dtype, fp32_adapters, monkeypatch) -> None:
    """On CUDA with the kernels on by default, at sizes with ~10^4 rows, where norms summed in different
    orders would round differently in some rows: outputs and merged weights are bitwise the base's, g == 1
    bitwise on every path. fp32 magnitudes are re-initialized after PEFT's upcast (which otherwise stores a
    half-rounded norm in fp32, and stock PEFT is then not the identity either)."""
    config.invalidate_cache()
    base = _base(case, dtype, "cuda")
    x = make_input(case, dtype).cuda()
    stock = _peft(base, case, patched=False, fp32_adapters=fp32_adapters)
    ours = _peft(base, case, patched=True, fp32_adapters=fp32_adapters)
    if fp32_adapters:
        _reinit_magnitude(stock)
        _reinit_magnitude(ours)
    if not (fp32_adapters and case.dropout and case.kind.startswith("conv")):
        # (stock's conv recompute-base path feeds the fp32 input to the half conv weight and raises)
        _assert_identity(stock, base, x, case, "stock PEFT")
    if _peft_merges(case):
        _assert_all_one({"merge": [_merge_factor(ours)]}, f"{case.kind} merge factor")
    launches = sum(kc.launch_counts.values())
    with _recorded_scales(monkeypatch, ours) as scales:
        _assert_identity(ours, base, x, case, "dorafactors")
    _assert_all_one(scales, f"{case.kind} cuda", _expected_paths(case, "default"))
    rows = math.prod(case.batch)
    if case.kind.startswith("conv") or rules.fused_backward_ok(rows, case.d_out, True)[0]:
        # Linear training forwards (dropout's recompute too) launch the kernel above the fused-backward size
        # rule; small no-grad calls take the fold: no kernel there
        assert sum(kc.launch_counts.values()) > launches, "the compose kernels did not run"
