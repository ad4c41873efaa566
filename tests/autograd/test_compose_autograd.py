"""``dora_compose`` and the ``base_result=None`` path: dispatch, gradients, saved tensors, dtype contract.

Without a GPU the kernels run on the CPU interpreter when a test sets ``PEFT_DORA_FUSED=1`` (conftest sets
``TRITON_INTERPRET=1``); with one, the same tests run on it. ``launch_counts`` proves which path ran.
"""

from __future__ import annotations

import logging

import pytest
import torch

from dorafactors.autograd import recompute_base
from dorafactors.autograd.compose import dora_compose
from dorafactors.autograd.recompute_base import compose_recompute_base
from dorafactors.dispatch import config, rules
from dorafactors.kernels import compose as kc
from tests._tolerances import TOLERANCES, assert_close_verbose, assert_dtype_close, rel_error

F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64
#: The GPU when there is one (compiled kernels), else the CPU (Triton interpreter).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

#: (shape, channel_dim, channels_last)
LAYOUTS = [((2, 5, 33), -1, False), ((2, 6, 5, 7), 1, False), ((2, 6, 5, 7), 1, True), ((3, 4, 9), 1, False)]


def _set_env(monkeypatch, **env) -> None:
    for name, value in env.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    config.invalidate_cache()


@pytest.fixture
def fused(monkeypatch):
    _set_env(monkeypatch, PEFT_DORA_FUSED="1", PEFT_DORA_FUSED_BACKWARD="1")


@pytest.fixture
def reference(monkeypatch):
    _set_env(monkeypatch, PEFT_DORA_FUSED="0")


def _inputs(
    shape, channel_dim, channels_last, dtype=F32, g_dtype=F32, seed=0, requires=(True, True, True), device=DEVICE
):
    gen = torch.Generator().manual_seed(seed)
    lora = torch.randn(shape, generator=gen).to(dtype).to(device)
    base = (3 * torch.randn(shape, generator=gen)).to(dtype).to(device)
    if channels_last:
        lora = lora.contiguous(memory_format=torch.channels_last)
        base = base.contiguous(memory_format=torch.channels_last)
    g = (0.6 + 0.8 * torch.rand(shape[channel_dim], generator=gen)).to(g_dtype).to(device)
    for t, r in zip((lora, base, g), requires):
        t.requires_grad_(r)
    return lora, base, g


def _run(lora, base, g, scaling, channel_dim, seed=1):
    out = dora_compose(lora, base, g, scaling, channel_dim=channel_dim)
    d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype).to(out.device)
    leaves = [t for t in (lora, base, g) if t.requires_grad]
    grads = torch.autograd.grad(out, leaves, d_out) if leaves else ()
    return out.detach(), grads


def _launches() -> dict[str, int]:
    return dict(kc.launch_counts)


def _delta(before: dict[str, int]) -> dict[str, int]:
    now = _launches()
    return {k: v - before.get(k, 0) for k, v in now.items() if v != before.get(k, 0)}


# ------------------------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize(
    "requires", [(True, True, True), (True, False, False), (False, True, True), (True, True, False)]
)
@pytest.mark.parametrize(("shape", "channel_dim", "channels_last"), LAYOUTS[:2])
def test_reference_function_gradcheck_fp64(shape, channel_dim, channels_last, requires, fused):
    """fp64 operands always take the reference Function (even with the kernels on); its gradients are exact."""
    lora, base, g = _inputs(shape, channel_dim, channels_last, F64, F64, requires=requires)
    before = _launches()
    assert torch.autograd.gradcheck(
        lambda lo, ba, gg: dora_compose(lo, ba, gg, -0.7, channel_dim=channel_dim), (lora, base, g)
    )
    assert _delta(before) == {}, "fp64 must not reach the kernels"


@pytest.mark.parametrize("scaling", [0.7, 0.0, -2.0])
@pytest.mark.parametrize(("shape", "channel_dim", "channels_last"), LAYOUTS)
def test_fused_function_matches_reference(shape, channel_dim, channels_last, scaling, monkeypatch):
    """The Triton Function gives the reference's outputs and all three gradients (fp32, rel 1e-5)."""
    inputs = _inputs(shape, channel_dim, channels_last)
    _set_env(monkeypatch, PEFT_DORA_FUSED="0")
    ref_out, ref_grads = _run(*inputs, scaling, channel_dim)
    _set_env(monkeypatch, PEFT_DORA_FUSED="1", PEFT_DORA_FUSED_BACKWARD="1")
    before = _launches()
    out, grads = _run(*inputs, scaling, channel_dim)
    launched = _delta(before)
    assert (
        launched.get("compose_fwd", 0) == 1
        and launched.get("compose_bwd", 0) + launched.get("compose_bwd_rows", 0) == 1
    )
    rtol, atol = TOLERANCES[F32]
    assert_close_verbose(out, ref_out, rtol=rtol, atol=atol, name="out")
    for name, got, want in zip(("d_lora", "d_base", "d_g"), grads, ref_grads):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert_close_verbose(got, want, rtol=rtol, atol=atol * max(1.0, want.abs().max().item()), name=name)


@pytest.mark.parametrize(
    ("dtype", "g_dtype", "base_dtype"),
    [(BF16, F32, BF16), (torch.float16, F32, torch.float16), (F32, F32, BF16), (BF16, BF16, BF16)],
)
def test_mixed_dtype_contract(dtype, g_dtype, base_dtype, monkeypatch):
    """AMP / PEFT defaults: result in the activation dtype, ``g - 1`` and ``d_g`` in g's own precision."""
    gen = torch.Generator().manual_seed(3)
    shape = (64, 96)
    lora = torch.randn(shape, generator=gen).to(dtype).to(DEVICE).requires_grad_()
    base = (3 * torch.randn(shape, generator=gen)).to(base_dtype).to(DEVICE).requires_grad_()
    g = (0.6 + 0.8 * torch.rand(96, generator=gen)).to(g_dtype).to(DEVICE).requires_grad_()
    results = {}
    for name, env in (
        ("ref", {"PEFT_DORA_FUSED": "0"}),
        ("fused", {"PEFT_DORA_FUSED": "1", "PEFT_DORA_FUSED_BACKWARD": "1"}),
    ):
        _set_env(monkeypatch, **env)
        before = _launches()
        results[name] = _run(lora, base, g, 0.5, -1)
        assert bool(_delta(before)) == (name == "fused")
    (out, grads), (ref_out, ref_grads) = results["fused"], results["ref"]
    out_dtype = torch.promote_types(dtype, base_dtype)
    assert out.dtype == ref_out.dtype == out_dtype
    assert grads[0].dtype == dtype and grads[1].dtype == base_dtype and grads[2].dtype == g_dtype
    assert_dtype_close(out, ref_out, out_dtype, "out")
    assert_dtype_close(grads[0], ref_grads[0], dtype, "d_lora")
    assert_dtype_close(grads[1], ref_grads[1], base_dtype, "d_base")
    # d_g: both paths sum the same rounded inner * d_out in fp32; an fp32 g gets fp32-level agreement, which a
    # bf16 round trip of g or of d_g (the fork's mixed-dtype issue) could not give.
    assert_dtype_close(grads[2], ref_grads[2], g_dtype, "d_g")
    # and the result is within one rounding of fp64 truth of the stable form
    gg = g.detach().double()
    truth = (gg - 1) * base.detach().double() + gg * (0.5 * lora.detach().double())
    assert rel_error(out, truth) <= 1.01 * rel_error(truth.to(out_dtype), truth) + 1e-7


# ------------------------------------------------------------------------------------------------ saved tensors


def _saved_numels(fn):
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("path", ["fused", "reference"])
@pytest.mark.parametrize(("shape", "channel_dim", "channels_last"), LAYOUTS[:2])
def test_frozen_magnitude_saves_nothing_activation_sized(shape, channel_dim, channels_last, path, monkeypatch):
    env = {"PEFT_DORA_FUSED": "1", "PEFT_DORA_FUSED_BACKWARD": "1"} if path == "fused" else {"PEFT_DORA_FUSED": "0"}
    _set_env(monkeypatch, **env)
    n = torch.Size(shape).numel()
    lora, base, g = _inputs(shape, channel_dim, channels_last, requires=(True, True, False))
    out, saved = _saved_numels(lambda: dora_compose(lora, base, g, 0.7, channel_dim=channel_dim))
    assert all(s < n for s in saved), f"frozen magnitude saved an activation-sized tensor: {saved}"
    out.sum().backward()
    assert g.grad is None and lora.grad is not None
    lora, base, g = _inputs(shape, channel_dim, channels_last, requires=(True, True, True))
    _, saved = _saved_numels(lambda: dora_compose(lora, base, g, 0.7, channel_dim=channel_dim))
    assert sum(s == n for s in saved) == 1, f"a trainable magnitude saves exactly one inner: {saved}"


# ------------------------------------------------------------------------------------------------ dispatch


def _which(lora, base, g, grad: bool, channel_dim=-1) -> str:
    before = _launches()
    with torch.set_grad_enabled(grad):
        out = dora_compose(lora, base, g, 0.5, channel_dim=channel_dim)
    if grad:
        out.sum().backward()
    launched = _delta(before)
    return "kernel" if launched else "reference"


SMALL = (8, 64)
LARGE = (1024, rules.FUSED_BACKWARD_MIN_COLS)  # rows * cols = 2**20 = FUSED_BACKWARD_MIN_ELEMENTS


@pytest.mark.parametrize(
    ("device", "fused_env", "backward_env", "shape", "inference", "training"),
    [
        ("cpu", None, None, SMALL, "reference", "reference"),  # CPU without PEFT_DORA_FUSED=1: never kernels
        (DEVICE, "1", None, SMALL, "kernel", "reference"),  # training below the size threshold
        (DEVICE, "1", None, LARGE, "kernel", "kernel"),  # at the threshold
        (DEVICE, "1", "1", SMALL, "kernel", "kernel"),  # force: skip the heuristic
        (DEVICE, "1", "0", LARGE, "kernel", "reference"),  # training compose off
        (DEVICE, "0", "1", LARGE, "reference", "reference"),  # master switch wins
    ],
)
def test_dispatch_table(device, fused_env, backward_env, shape, inference, training, monkeypatch):
    _set_env(monkeypatch, PEFT_DORA_FUSED=fused_env, PEFT_DORA_FUSED_BACKWARD=backward_env)
    lora, base, g = _inputs(shape, -1, False, device=device)
    assert _which(lora.detach(), base.detach(), g.detach(), grad=False) == inference
    assert _which(lora, base, g, grad=True) == training


def test_dispatch_conv_layout_skips_the_size_heuristic(monkeypatch):
    _set_env(monkeypatch, PEFT_DORA_FUSED="1")
    lora, base, g = _inputs((2, 6, 5, 7), 1, False)
    assert _which(lora, base, g, grad=True, channel_dim=1) == "kernel"


@pytest.mark.parametrize(("lora_dtype", "base_dtype", "g_dtype"), [(F64, F64, F64), (F32, F32, F64), (F32, F64, F32)])
def test_dispatch_fp64_goes_to_reference(lora_dtype, base_dtype, g_dtype, fused):
    lora = torch.randn(4, 8, dtype=lora_dtype)
    base = torch.randn(4, 8, dtype=base_dtype)
    g = torch.rand(8, dtype=g_dtype) + 0.5
    assert _which(lora, base, g, grad=False) == "reference"


def test_rejections_are_logged_once_with_a_reason(caplog, monkeypatch):
    rules._logged.clear()
    _set_env(monkeypatch, PEFT_DORA_FUSED="0")
    lora, base, g = _inputs(SMALL, -1, False)
    with caplog.at_level(logging.DEBUG, logger="dorafactors.dispatch"):
        for _ in range(3):
            dora_compose(lora.detach(), base.detach(), g.detach(), 0.5)
    records = [r for r in caplog.records if r.name == "dorafactors.dispatch"]
    assert len(records) == 1 and "PEFT_DORA_FUSED=0" in records[0].getMessage()
    assert rules.fused_compose_ok(lora, base, g) == (False, "PEFT_DORA_FUSED=0")


def test_fused_without_triton_is_a_configuration_error(monkeypatch):
    _set_env(monkeypatch, PEFT_DORA_FUSED="1")
    monkeypatch.setattr(rules, "_triton_found", False)
    with pytest.raises(RuntimeError, match="triton is not installed"):
        rules.kernels_enabled(torch.device("cpu"))


def test_inplace_writes_into_lora_only_without_grad(fused):
    lora, base, g = _inputs((6, 40), -1, False, requires=(False, False, False))
    expected = dora_compose(lora.clone(), base, g, 0.5)
    out = dora_compose(lora, base, g, 0.5, inplace=True)
    assert out.data_ptr() == lora.data_ptr()
    assert torch.equal(out, expected)
    lora2, base2, g2 = _inputs((6, 40), -1, False)
    out2 = dora_compose(lora2, base2, g2, 0.5, inplace=True)
    assert out2.data_ptr() != lora2.data_ptr(), "with autograd recording, inplace is ignored"


# ------------------------------------------------------------------------------------------------ base_result=None


def _recompute_case(seed, dtype=F32, requires_scale=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 24, generator=gen).to(dtype).to(DEVICE).requires_grad_()
    weight = (torch.randn(70, 24, generator=gen) / 5).to(dtype).to(DEVICE)
    lora = torch.randn(3, 5, 70, generator=gen).to(dtype).to(DEVICE).requires_grad_()
    scale = (0.6 + 0.8 * torch.rand(70, generator=gen)).to(DEVICE).requires_grad_(requires_scale)
    return x, weight, lora, scale


@pytest.mark.parametrize("requires_scale", [True, False])
def test_recompute_base_path_uses_kernels_and_matches_reference(requires_scale, monkeypatch):
    """``lora_dropout > 0`` in training: fused compose into column chunks, fused one-pass backward."""
    monkeypatch.setattr(recompute_base, "forward_chunk_columns", lambda *a: 16)  # 70 columns -> 5 chunks
    results = {}
    for name, env in (
        ("ref", {"PEFT_DORA_FUSED": "0"}),
        ("fused", {"PEFT_DORA_FUSED": "1", "PEFT_DORA_FUSED_BACKWARD": "1"}),
    ):
        _set_env(monkeypatch, **env)
        x, weight, lora, scale = _recompute_case(7, requires_scale=requires_scale)
        before = _launches()
        out = compose_recompute_base(x, weight, lora, scale, 0.7)
        d_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(8)).to(out.device)
        leaves = [t for t in (x, lora, scale) if t.requires_grad]
        results[name] = (out.detach(), torch.autograd.grad(out, leaves, d_out), _delta(before))
    (out, grads, launched), (ref_out, ref_grads, ref_launched) = results["fused"], results["ref"]
    assert ref_launched == {}
    assert launched.get("compose_fwd") == 5 and launched.get("compose_bwd") == 1
    rtol, atol = TOLERANCES[F32]
    assert_close_verbose(out, ref_out, rtol=rtol, atol=atol, name="out")
    for got, want in zip(grads, ref_grads):
        assert_close_verbose(got, want, rtol=rtol, atol=atol * max(1.0, want.abs().max().item()), name="grad")


@pytest.mark.parametrize("budget_mb", [16, 256, 4096])
def test_base_recompute_chunks_start_at_aligned_columns(budget_mb, monkeypatch):
    """A chunked base recompute writes each chunk's GEMM into a column slice of the whole output: every chunk
    must start at a multiple of ``CHUNK_COLUMN_ALIGN`` columns (cuBLAS's fast kernels need the aligned start;
    PEFT's default dtypes at 4096 tokens x 14336 columns gave 2978-column chunks) and still fit the budget."""
    monkeypatch.setenv("PEFT_DORA_FWD_CHUNK_MB", str(budget_mb))
    config.invalidate_cache()
    align = recompute_base.CHUNK_COLUMN_ALIGN
    for rows, d_out, d_in, act, weight in ((4096, 14336, 4096, 4, 6), (4096, 4096, 14336, 4, 6), (512, 1000, 64, 2, 2)):
        cols = recompute_base.forward_chunk_columns(rows, d_out, d_in, act, weight)
        per_column = d_in * weight + rows * (act + 12)
        assert 1 <= cols <= d_out
        assert cols * per_column <= max(per_column, budget_mb * 2**20), (rows, d_out, cols)
        if cols < d_out:
            assert cols % align == 0 or cols < align, (rows, d_out, cols)
            assert cols > budget_mb * 2**20 // per_column - align  # rounded down by less than one step
    config.invalidate_cache()


def test_recompute_base_respects_fused_backward_off(monkeypatch):
    monkeypatch.setattr(recompute_base, "forward_chunk_columns", lambda *a: 16)
    _set_env(monkeypatch, PEFT_DORA_FUSED="1", PEFT_DORA_FUSED_BACKWARD="0")
    x, weight, lora, scale = _recompute_case(9)
    before = _launches()
    compose_recompute_base(x, weight, lora, scale, 0.7).sum().backward()
    assert _delta(before) == {}, "a trainable magnitude in training with PEFT_DORA_FUSED_BACKWARD=0: reference"
    with torch.no_grad():
        compose_recompute_base(x, weight, lora, scale.detach(), 0.7)
    assert _delta(before).get("compose_fwd") == 5, "without a magnitude gradient the chunked path uses the kernel"
