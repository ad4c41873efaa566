"""The compose kernels (``dorafactors/kernels/compose.py``) against fp64 truth and the PyTorch reference.

Without a GPU they run on Triton's interpreter (conftest sets ``TRITON_INTERPRET=1``); with one, the same
tests run the compiled kernels on it, and the ``gpu`` tests add real sizes. Every launch writes into NaN-poisoned memory (``poison`` fixture), so an
element a kernel forgot to write fails the bitwise checks.
"""

from __future__ import annotations

import pytest
import torch

from dorafactors.dispatch import config
from dorafactors.kernels import compose as kc
from dorafactors.kernels import compose_launch as kl
from dorafactors.kernels._triton_utils import tickets_all_zero
from dorafactors.kernels.compose_reference import compose_backward_reference, compose_forward_reference
from tests._tolerances import assert_dtype_close
from tests.kernels._compose_data import (
    DEVICE,
    EXACT_SCALING,
    assert_exact,
    assert_one_rounding,
    exact_scale,
    exact_tensor,
    random_scale,
    random_tensor,
    truth_backward,
    truth_forward,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16

LAST_DIM_SHAPES = [(1, 1), (1, 5), (5, 123), (123, 257), (257, 5), (3, 7, 33), (2, 1, 3, 17)]
#: (shape, channel_dim, channels_last)
CHANNEL_CASES = [
    ((2, 6, 5, 7), 1, False),
    ((2, 6, 5, 7), 1, True),
    ((3, 5, 11), 1, False),
    ((2, 4, 3, 3, 3), 1, False),
    ((2, 6, 1, 1), 1, False),
    ((4, 9), 0, False),
    ((1, 3, 130), 1, False),
]
NEEDS = [(True, True, True), (True, False, False), (False, True, False), (False, False, True), (True, True, False)]


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(abs(hash(key)) % (2**31))


@pytest.fixture
def poison(monkeypatch):
    """``torch.empty`` / ``torch.empty_like`` return NaN-filled floating tensors for the test's duration."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def nan_fill(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan_fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan_fill(real_empty_like(*a, **k)))


def _layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if not channels_last:
        return t
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}[t.dim()]
    return t.contiguous(memory_format=fmt)


# ------------------------------------------------------------------------------------------------ forward


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LAST_DIM_SHAPES)
def test_forward_exact_last_dim(shape, dtype, poison):
    gen = _gen("fwd", shape, dtype)
    lora, base = exact_tensor(shape, dtype, gen), exact_tensor(shape, dtype, gen)
    g = exact_scale(shape[-1], F32, gen)
    out, inner = kc.compose_forward(lora, base, g, EXACT_SCALING, save_inner=True)
    t_out, t_inner, _ = truth_forward(lora, base, g, EXACT_SCALING)
    assert out.dtype == dtype and inner.dtype == dtype
    assert_exact(out, t_out, "out")
    assert_exact(inner, t_inner, "inner")
    out_only, none = kc.compose_forward(lora, base, g, EXACT_SCALING)
    assert none is None
    assert_exact(out_only, t_out, "out (no inner)")


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize(("shape", "channel_dim", "channels_last"), CHANNEL_CASES)
def test_forward_exact_channel_layouts(shape, channel_dim, channels_last, dtype, poison):
    gen = _gen("fwd-ch", shape, channel_dim, channels_last, dtype)
    lora = _layout(exact_tensor(shape, dtype, gen), channels_last)
    base = _layout(exact_tensor(shape, dtype, gen), channels_last)
    g = exact_scale(shape[channel_dim], F32, gen)
    out, inner = kc.compose_forward(lora, base, g, EXACT_SCALING, channel_dim=channel_dim, save_inner=True)
    t_out, t_inner, _ = truth_forward(lora, base, g, EXACT_SCALING, channel_dim)
    assert_exact(out, t_out, "out")
    assert_exact(inner, t_inner, "inner")
    if channels_last:
        fmt = {4: torch.channels_last, 5: torch.channels_last_3d}[len(shape)]
        assert out.is_contiguous(memory_format=fmt), "channels-last activations keep their memory format"


def test_forward_more_than_65535_rows(poison):
    gen = _gen("rows")
    shape = (70_001, 3)
    lora, base = exact_tensor(shape, BF16, gen), exact_tensor(shape, BF16, gen)
    g = exact_scale(3, F32, gen)
    out, inner = kc.compose_forward(lora, base, g, EXACT_SCALING, save_inner=True)
    t_out, t_inner, _ = truth_forward(lora, base, g, EXACT_SCALING)
    assert_exact(out, t_out, "out")
    assert_exact(inner, t_inner, "inner")


@pytest.mark.parametrize("cfg", [*kl.FORWARD_CONFIGS, (4, 32, 1, 1), (64, 4, 1, 1)])
def test_forward_every_tile(cfg, poison):
    """Every default tile (and two odd ones) covers odd shapes exactly: edges, masks, several programs."""
    gen = _gen("tile", cfg)
    shape = (37, 300)
    lora, base = exact_tensor(shape, BF16, gen), exact_tensor(shape, F32, gen)
    g = exact_scale(300, F32, gen)
    with kc.forced_config(fwd=cfg):
        out, inner = kc.compose_forward(lora, base, g, EXACT_SCALING, save_inner=True)
        lora3 = exact_tensor((2, 6, 37), BF16, gen)
        base3 = exact_tensor((2, 6, 37), BF16, gen)
        g6 = exact_scale(6, F32, gen)
        out3, _ = kc.compose_forward(lora3, base3, g6, EXACT_SCALING, channel_dim=1)
    t_out, t_inner, _ = truth_forward(lora, base, g, EXACT_SCALING)
    assert_exact(out, t_out, "out")
    assert_exact(inner, t_inner, "inner")
    assert_exact(out3, truth_forward(lora3, base3, g6, EXACT_SCALING, 1)[0], "out (channel dim 1)")


@pytest.mark.parametrize("scaling", [2.0 / 3.0, 0.0, -1.7])
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_precision(dtype, scaling):
    """fp32 arithmetic and one rounding at the store, against fp64 truth; and the reference agrees."""
    gen = _gen("prec", dtype, scaling)
    shape = (33, 257)
    lora = random_tensor(shape, dtype, gen)
    base = random_tensor(shape, dtype, gen, scale=4.0)
    g = random_scale(257, F32, gen)
    out, inner = kc.compose_forward(lora, base, g, scaling, save_inner=True)
    t_out, t_inner, mag = truth_forward(lora, base, g, scaling)
    assert_one_rounding(out, t_out, mag, 8, "out")
    assert_one_rounding(inner, t_inner, base.double().abs() + (lora.double() * scaling).abs(), 4, "inner")
    ref_out, ref_inner = compose_forward_reference(lora, base, g, scaling, save_inner=True)
    assert_dtype_close(out, ref_out, dtype, "out vs reference")
    assert_dtype_close(inner, ref_inner, dtype, "inner vs reference")


MIXED = [
    # lora, base, g, out_dtype (None = promote(lora, base))
    (BF16, BF16, F32, None),  # AMP: fp32 magnitude, bf16 activations
    (F32, BF16, F32, None),  # PEFT default: fp32 adapter, bf16 base layer
    (BF16, F32, F32, None),
    (F16, F16, F32, None),
    (BF16, BF16, BF16, None),  # all-bf16 adapters
    (BF16, BF16, F32, F32),
    (F32, F32, F32, BF16),
]


@pytest.mark.parametrize(("lora_dtype", "base_dtype", "g_dtype", "out_dtype"), MIXED)
def test_forward_mixed_dtypes(lora_dtype, base_dtype, g_dtype, out_dtype, poison):
    gen = _gen("mixed", lora_dtype, base_dtype, g_dtype, out_dtype)
    shape = (9, 77)
    expected_dtype = out_dtype or torch.promote_types(lora_dtype, base_dtype)
    lora, base = exact_tensor(shape, lora_dtype, gen), exact_tensor(shape, base_dtype, gen)
    g = exact_scale(77, g_dtype, gen)
    out, inner = kc.compose_forward(lora, base, g, EXACT_SCALING, out_dtype=out_dtype, save_inner=True)
    assert out.dtype == expected_dtype and inner.dtype == expected_dtype
    t_out, t_inner, _ = truth_forward(lora, base, g, EXACT_SCALING)
    assert_exact(out, t_out, "out")
    assert_exact(inner, t_inner, "inner")
    # Precision: g is used in its own (fp32) precision, never rounded to the activation dtype.
    lora_r, base_r = random_tensor(shape, lora_dtype, gen), random_tensor(shape, base_dtype, gen, 4.0)
    g_r = random_scale(77, g_dtype, gen)
    out_r, _ = kc.compose_forward(lora_r, base_r, g_r, 0.3, out_dtype=out_dtype)
    t_r, _, mag_r = truth_forward(lora_r, base_r, g_r, 0.3)
    assert_one_rounding(out_r, t_r, mag_r, 8, "out (random)")


def test_forward_non_contiguous_inputs(poison):
    gen = _gen("noncontig")
    R, C = 19, 45
    lora_t = exact_tensor((C, R), BF16, gen).t()  # column stride != 1: copied
    base_b = exact_tensor((1, C), BF16, gen).expand(R, C)  # row stride 0: read in place
    g_every_other = exact_scale(2 * C, F32, gen)[::2]  # non-contiguous g
    out, inner = kc.compose_forward(lora_t, base_b, g_every_other, EXACT_SCALING, save_inner=True)
    t_out, t_inner, _ = truth_forward(lora_t, base_b, g_every_other, EXACT_SCALING)
    assert_exact(out, t_out, "out")
    assert_exact(inner, t_inner, "inner")
    big = exact_tensor((R, 3 * C), F32, gen)
    strided = big[:, ::3]  # column stride 3: copied
    out2, _ = kc.compose_forward(strided, base_b, g_every_other, EXACT_SCALING)
    assert_exact(out2, truth_forward(strided, base_b, g_every_other, EXACT_SCALING)[0], "out (strided)")


def test_row_strided_views_are_not_copied(monkeypatch, poison):
    """Column slices of larger tensors reach the kernel as row-strided views of the same memory."""
    gen = _gen("slices")
    big_lora = exact_tensor((2, 5, 40), BF16, gen)
    big_base = exact_tensor((2, 5, 40), BF16, gen)
    lora, base = big_lora[..., 4:31], big_base[..., 9:36]
    g = exact_scale(27, F32, gen)
    seen = {}
    real = kc._fwd_cols

    def spy(lora2, base2, *args):
        seen["lora"] = (lora2.data_ptr(), lora2.stride())
        seen["base"] = (base2.data_ptr(), base2.stride())
        return real(lora2, base2, *args)

    monkeypatch.setattr(kc, "_fwd_cols", spy)
    out, _ = kc.compose_forward(lora, base, g, EXACT_SCALING)
    assert seen["lora"] == (lora.data_ptr(), (40, 1))
    assert seen["base"] == (base.data_ptr(), (40, 1))
    assert_exact(out, truth_forward(lora, base, g, EXACT_SCALING)[0], "out")


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_forward_into_column_slices(dtype):
    """The chunked base recompute writes column chunks of one output: exactly its slice, nothing else."""
    gen = _gen("into", dtype)
    B, T, D = 2, 7, 300
    lora_full = exact_tensor((B, T, D), dtype, gen)
    g = exact_scale(D, F32, gen)
    out = torch.full((B, T, D), float("nan"), dtype=dtype, device=DEVICE)
    inner = torch.full((B, T, D), float("nan"), dtype=dtype, device=DEVICE)
    bases = []
    for c0, c1 in ((0, 100), (100, 257), (257, 300)):
        base_chunk = exact_tensor((B, T, c1 - c0), dtype, gen)
        bases.append(base_chunk)
        kc.compose_forward_into(
            out[..., c0:c1], inner[..., c0:c1], lora_full[..., c0:c1], base_chunk, g[c0:c1], EXACT_SCALING
        )
        assert torch.isnan(out[..., c1:]).all() and torch.isnan(inner[..., c1:]).all(), "wrote past its slice"
    base_full = torch.cat(bases, dim=-1)
    t_out, t_inner, _ = truth_forward(lora_full, base_full, g, EXACT_SCALING)
    assert_exact(out, t_out, "out")
    assert_exact(inner, t_inner, "inner")


def test_forward_into_non_viewable_out_is_written_back():
    gen = _gen("into-copy")
    lora, base = exact_tensor((6, 10), F32, gen), exact_tensor((6, 10), F32, gen)
    g = exact_scale(10, F32, gen)
    out = torch.full((10, 6), float("nan"), device=DEVICE).t()  # column stride 6: the kernel writes a temporary
    kc.compose_forward_into(out, None, lora, base, g, EXACT_SCALING)
    assert_exact(out, truth_forward(lora, base, g, EXACT_SCALING)[0], "out")


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_inplace(dtype):
    gen = _gen("inplace", dtype)
    big = exact_tensor((11, 50), dtype, gen)
    before = big.clone()
    lora = big[:, 5:38]  # in place on a row-strided view
    base = exact_tensor((11, 33), dtype, gen)
    g = exact_scale(33, F32, gen)
    expected = truth_forward(before[:, 5:38], base, g, EXACT_SCALING)[0]
    result = kc.compose_forward_(lora, base, g, EXACT_SCALING)
    assert result is lora
    assert_exact(lora, expected, "lora after in-place compose")
    assert torch.equal(big[:, :5], before[:, :5]) and torch.equal(big[:, 38:], before[:, 38:])


def test_forward_empty_and_validation():
    lora = torch.empty(0, 5)
    out, inner = kc.compose_forward(lora, lora, torch.ones(5), 1.0, save_inner=True)
    assert out.shape == (0, 5) and inner.shape == (0, 5)
    with pytest.raises(ValueError, match="same shape"):
        kc.compose_forward(torch.ones(2, 3), torch.ones(3, 2), torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="vector of 3"):
        kc.compose_forward(torch.ones(2, 3), torch.ones(2, 3), torch.ones(4), 1.0)
    with pytest.raises(TypeError, match="fp16/bf16/fp32"):
        kc.compose_forward(torch.ones(2, 3, dtype=torch.float64), torch.ones(2, 3), torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="in-place"):
        kc.compose_forward_(torch.ones(3, 2).t(), torch.ones(2, 3), torch.ones(3), 1.0)


# ------------------------------------------------------------------------------------------------ backward


@pytest.mark.parametrize("need", NEEDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 5), (123, 257), (300, 70), (3, 7, 33)])
def test_backward_exact_last_dim(shape, dtype, need, poison):
    need_lora, need_base, need_g = need
    gen = _gen("bwd", shape, dtype, need)
    d_out, inner = exact_tensor(shape, dtype, gen), exact_tensor(shape, dtype, gen)
    g = exact_scale(shape[-1], F32, gen)
    d_lora, d_base, d_g = kc.compose_backward(
        d_out,
        g,
        inner if need_g else None,
        EXACT_SCALING,
        lora_dtype=dtype,
        base_dtype=dtype,
        need_lora=need_lora,
        need_base=need_base,
        need_g=need_g,
    )
    t_lora, t_base, t_g, _ = truth_backward(d_out, g, inner, EXACT_SCALING)
    assert (d_lora is not None) == need_lora and (d_base is not None) == need_base and (d_g is not None) == need_g
    if need_lora:
        assert_exact(d_lora, t_lora, "d_lora")
    if need_base:
        assert_exact(d_base, t_base, "d_base")
    if need_g:
        assert d_g.dtype == F32
        assert_exact(d_g, t_g, "d_g")


def test_backward_uses_several_row_groups():
    """The shapes above really exercise the two-stage reduction (several groups of rows)."""
    groups, per_group = kc._row_groups(300, 70, torch.device("cpu"), kc._ROW_GRANULE)
    assert groups > 1 and per_group % kc._ROW_GRANULE == 0 and (groups - 1) * per_group < 300 <= groups * per_group


@pytest.mark.parametrize(("R", "K", "sms"), [(1, 8192, 132), (8192, 8192, 132), (4096, 14336, 132), (70_001, 3, 4)])
def test_row_groups_partition(R, K, sms, monkeypatch):
    monkeypatch.setattr(kc, "num_sms", lambda device: sms)
    groups, per_group = kc._row_groups(R, K, torch.device("cpu"), kc._ROW_GRANULE)
    assert 1 <= groups <= kc._MAX_GROUPS
    assert per_group % kc._ROW_GRANULE == 0
    assert (groups - 1) * per_group < R <= groups * per_group, "every group non-empty, every row covered"


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize(("shape", "channel_dim", "channels_last"), CHANNEL_CASES)
def test_backward_exact_channel_layouts(shape, channel_dim, channels_last, dtype, poison):
    gen = _gen("bwd-ch", shape, channel_dim, channels_last, dtype)
    d_out = _layout(exact_tensor(shape, dtype, gen), channels_last)
    inner = _layout(exact_tensor(shape, dtype, gen), channels_last)
    g = exact_scale(shape[channel_dim], F32, gen)
    d_lora, d_base, d_g = kc.compose_backward(
        d_out, g, inner, EXACT_SCALING, channel_dim=channel_dim, lora_dtype=dtype, base_dtype=F32
    )
    t_lora, t_base, t_g, _ = truth_backward(d_out, g, inner, EXACT_SCALING, channel_dim)
    assert d_base.dtype == F32
    assert_exact(d_lora, t_lora, "d_lora")
    assert_exact(d_base, t_base, "d_base")
    assert_exact(d_g, t_g, "d_g")


def test_backward_inner_in_other_layout_than_d_out(poison):
    """A channels-last ``d_out`` with an NCHW ``inner`` (or the reverse) still pairs the right elements."""
    gen = _gen("bwd-mixed-layout")
    shape = (2, 6, 5, 7)
    d_cl = _layout(exact_tensor(shape, F32, gen), True)
    inner = exact_tensor(shape, F32, gen)
    g = exact_scale(6, F32, gen)
    for d_out, x in ((d_cl, inner), (d_cl.contiguous(), _layout(inner, True))):
        _, _, d_g = kc.compose_backward(
            d_out, g, x, EXACT_SCALING, channel_dim=1, lora_dtype=F32, base_dtype=F32, need_lora=False, need_base=False
        )
        assert_exact(d_g, truth_backward(d_out, g, x, EXACT_SCALING, 1)[2], "d_g")


def test_backward_more_than_65535_rows(poison):
    gen = _gen("bwd-rows")
    shape = (70_001, 3)
    d_out, inner = exact_tensor(shape, BF16, gen), exact_tensor(shape, BF16, gen)
    g = exact_scale(3, F32, gen)
    d_lora, d_base, d_g = kc.compose_backward(d_out, g, inner, EXACT_SCALING, lora_dtype=BF16, base_dtype=BF16)
    t_lora, t_base, t_g, _ = truth_backward(d_out, g, inner, EXACT_SCALING)
    assert_exact(d_lora, t_lora, "d_lora")
    assert_exact(d_base, t_base, "d_base")
    assert_exact(d_g, t_g, "d_g")


@pytest.mark.parametrize("cfg", [*kl.BACKWARD_CONFIGS, (4, 32, 1, 1)])
def test_backward_every_tile(cfg, poison):
    gen = _gen("bwd-tile", cfg)
    shape = (100, 150)
    d_out, inner = exact_tensor(shape, BF16, gen), exact_tensor(shape, BF16, gen)
    g = exact_scale(150, F32, gen)
    d3, x3, g6 = exact_tensor((2, 6, 37), F32, gen), exact_tensor((2, 6, 37), F32, gen), exact_scale(6, F32, gen)
    with kc.forced_config(bwd=cfg):
        d_lora, d_base, d_g = kc.compose_backward(d_out, g, inner, EXACT_SCALING, lora_dtype=BF16, base_dtype=F32)
        _, _, d_g3 = kc.compose_backward(d3, g6, x3, EXACT_SCALING, channel_dim=1, lora_dtype=F32, base_dtype=F32)
    t_lora, t_base, t_g, _ = truth_backward(d_out, g, inner, EXACT_SCALING)
    assert_exact(d_lora, t_lora, "d_lora")
    assert_exact(d_base, t_base, "d_base")
    assert_exact(d_g, t_g, "d_g")
    assert_exact(d_g3, truth_backward(d3, g6, x3, EXACT_SCALING, 1)[2], "d_g (channel dim 1)")


@pytest.mark.parametrize("scaling", [2.0 / 3.0, 0.0, -1.7])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_precision(dtype, scaling):
    gen = _gen("bwd-prec", dtype, scaling)
    R, C = 257, 123
    d_out = random_tensor((R, C), dtype, gen)
    inner = random_tensor((R, C), dtype, gen, scale=3.0)
    g = random_scale(C, F32, gen)
    d_lora, d_base, d_g = kc.compose_backward(d_out, g, inner, scaling, lora_dtype=dtype, base_dtype=dtype)
    t_lora, t_base, t_g, t_mag = truth_backward(d_out, g, inner, scaling)
    assert_one_rounding(d_lora, t_lora, t_lora.abs(), 4, "d_lora")
    assert_one_rounding(d_base, t_base, t_base.abs(), 2, "d_base")
    # fp32 accumulation of R products: each partial sum rounds at most once per step of its chain.
    assert_one_rounding(d_g, t_g, t_mag, 2 * (R // 16 + 64), "d_g")
    ref = compose_backward_reference(d_out, g, inner, scaling, lora_dtype=dtype, base_dtype=dtype)
    assert_dtype_close(d_lora, ref[0], dtype, "d_lora vs reference")
    assert_dtype_close(d_base, ref[1], dtype, "d_base vs reference")
    assert_dtype_close(d_g, ref[2], F32, "d_g vs reference")


@pytest.mark.parametrize("rows", [1, 300])
@pytest.mark.parametrize("g_dtype", [BF16, F16])
def test_backward_low_precision_g(g_dtype, rows, poison):
    """A half-precision magnitude: d_g accumulated exactly in fp32, rounded once to g's dtype."""
    gen = _gen("bwd-g", g_dtype, rows)
    d_out, inner = exact_tensor((rows, 70), BF16, gen), exact_tensor((rows, 70), BF16, gen, lo=-50, hi=50)
    g = exact_scale(70, g_dtype, gen)
    _, _, d_g = kc.compose_backward(d_out, g, inner, EXACT_SCALING, lora_dtype=BF16, base_dtype=BF16)
    assert d_g.dtype == g_dtype
    assert_exact(d_g, truth_backward(d_out, g, inner, EXACT_SCALING)[2], "d_g")


def test_backward_d_g_is_deterministic():
    gen = _gen("determinism")
    d_out, inner = random_tensor((1000, 130), BF16, gen), random_tensor((1000, 130), BF16, gen)
    g = random_scale(130, F32, gen)
    runs = [kc.compose_backward(d_out, g, inner, 0.7, lora_dtype=BF16, base_dtype=BF16)[2] for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])


@pytest.mark.parametrize("cfg", [(64, 4096, 4, 1), (8, 16, 1, 1), (8, 512, 4, 1)])
def test_backward_sums_the_partials_in_the_same_launch(cfg, poison):
    """Eager: the last program of each column tile sums the row groups' partials (one launch, no
    ``sum_partials``), whether the groups fit in one block of its sum (BLOCK_C 16) or take one step each
    (BLOCK_C 4096), and leaves the shared ticket counters at zero for the next launch."""
    gen = _gen("bwd-fused-sum", cfg)
    R, C = 768, 40
    d_out, inner = exact_tensor((R, C), BF16, gen), exact_tensor((R, C), BF16, gen)
    g = exact_scale(C, F32, gen)
    groups, _ = kc._row_groups(R, C, torch.device("cpu"), kc._ROW_GRANULE)
    assert groups >= 8
    before = dict(kc.launch_counts)
    with kc.forced_config(bwd=cfg):
        runs = [kc.compose_backward(d_out, g, inner, EXACT_SCALING, lora_dtype=BF16, base_dtype=BF16) for _ in range(2)]
    assert kc.launch_counts["compose_bwd"] - before.get("compose_bwd", 0) == 2
    assert kc.launch_counts["sum_partials"] == before.get("sum_partials", 0)
    assert tickets_all_zero()
    assert_exact(runs[0][2], truth_backward(d_out, g, inner, EXACT_SCALING)[2], "d_g")
    assert torch.equal(runs[0][2], runs[1][2])


def test_backward_empty_and_validation():
    d_lora, d_base, d_g = kc.compose_backward(
        torch.empty(0, 4), torch.ones(4), torch.empty(0, 4), 1.0, lora_dtype=F32, base_dtype=F32
    )
    assert d_lora.shape == (0, 4) and d_base.shape == (0, 4) and torch.equal(d_g, torch.zeros(4))
    with pytest.raises(RuntimeError, match="inner"):
        kc.compose_backward(torch.ones(2, 3), torch.ones(3), None, 1.0, lora_dtype=F32, base_dtype=F32)
    with pytest.raises(ValueError, match="vector of 3"):
        kc.compose_backward(torch.ones(2, 3), torch.ones(2), torch.ones(2, 3), 1.0, lora_dtype=F32, base_dtype=F32)


# ------------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("comprehensive", [False, True])
def test_config_lists(comprehensive):
    fwd, bwd = kl.forward_configs(comprehensive), kl.backward_configs(comprehensive)
    for configs in (fwd, bwd):
        assert len(set(configs)) == len(configs) > 0
        for br, bc, warps, stages in configs:
            assert br & (br - 1) == 0 and bc & (bc - 1) == 0, "block sizes are powers of two"
            assert br <= kc._ROW_GRANULE, "row groups of the backward are a multiple of every BLOCK_R"
            assert warps in (1, 2, 4, 8, 16) and stages >= 1
    if comprehensive:
        assert len(fwd) > 3 * len(kl.FORWARD_CONFIGS) and len(bwd) > 3 * len(kl.BACKWARD_CONFIGS)
    else:
        assert fwd == list(kl.FORWARD_CONFIGS) and bwd == list(kl.BACKWARD_CONFIGS)


def test_tuners_follow_the_comprehensive_switch():
    small = kl._FWD.tuner(False)
    full = kl._FWD.tuner(True)
    assert len(small.configs) == len(kl.FORWARD_CONFIGS) and len(full.configs) == len(kl.forward_configs(True))
    assert kl._FWD_INPLACE.tuner(False).restore_value == ["out_ptr"], "in-place trials restore the destination"
    kl._FWD.reset()
    assert not kl._FWD.tuners


# ------------------------------------------------------------------------------------------------ GPU


def _cuda_exact(shape, dtype, seed, lo=-3, hi=3):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randint(lo, hi + 1, shape, generator=gen, device="cuda").to(dtype)


GPU_SHAPES = [(1, 4096), (1, 28672), (2048, 4096), (8192, 8192), (4096, 14336), (70_001, 64), (3, 4097)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_forward_backward_exact(shape, dtype):
    lora, base = _cuda_exact(shape, dtype, 1), _cuda_exact(shape, dtype, 2)
    g = exact_scale(shape[-1], F32, torch.Generator().manual_seed(3)).cuda()
    out, inner = kc.compose_forward(lora, base, g, EXACT_SCALING, save_inner=True)
    t_out, t_inner, _ = truth_forward(lora, base, g, EXACT_SCALING)
    assert_exact(out, t_out, "out")
    assert_exact(inner, t_inner, "inner")
    d_out = _cuda_exact(shape, dtype, 4)
    d_lora, d_base, d_g = kc.compose_backward(d_out, g, inner, EXACT_SCALING, lora_dtype=dtype, base_dtype=dtype)
    t_lora, t_base, t_g, _ = truth_backward(d_out, g, inner, EXACT_SCALING)
    assert_exact(d_lora, t_lora, "d_lora")
    assert_exact(d_base, t_base, "d_base")
    assert_exact(d_g, t_g, "d_g")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_precision_and_determinism(dtype):
    gen = torch.Generator().manual_seed(5)
    shape = (4096, 8192)
    lora = random_tensor(shape, dtype, gen).cuda()
    base = random_tensor(shape, dtype, gen, 4.0).cuda()
    g = random_scale(8192, F32, gen).cuda()
    out, inner = kc.compose_forward(lora, base, g, 0.37, save_inner=True)
    t_out, _, mag = truth_forward(lora, base, g, 0.37)
    assert_one_rounding(out, t_out, mag, 8, "out")
    d_out = random_tensor(shape, dtype, gen).cuda()
    runs = [kc.compose_backward(d_out, g, inner, 0.37, lora_dtype=dtype, base_dtype=dtype) for _ in range(5)]
    assert all(torch.equal(runs[0][2], r[2]) for r in runs[1:]), "d_g is bitwise repeatable"
    t_lora, t_base, t_g, t_mag = truth_backward(d_out, g, inner, 0.37)
    assert_one_rounding(runs[0][0], t_lora, t_lora.abs(), 4, "d_lora")
    assert_one_rounding(runs[0][1], t_base, t_base.abs(), 2, "d_base")
    assert_one_rounding(runs[0][2], t_g, t_mag, 2 * (4096 // 16 + 64), "d_g")


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", kl.FORWARD_CONFIGS)
def test_gpu_every_forward_tile(cfg):
    lora, base = _cuda_exact((1000, 4100), BF16, 6), _cuda_exact((1000, 4100), BF16, 7)
    g = exact_scale(4100, F32, torch.Generator().manual_seed(8)).cuda()
    with kc.forced_config(fwd=cfg):
        out, inner = kc.compose_forward(lora, base, g, EXACT_SCALING, save_inner=True)
    t_out, t_inner, _ = truth_forward(lora, base, g, EXACT_SCALING)
    assert_exact(out, t_out, "out")
    assert_exact(inner, t_inner, "inner")


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", kl.BACKWARD_CONFIGS)
def test_gpu_every_backward_tile(cfg):
    d_out, inner = _cuda_exact((1000, 4100), BF16, 9), _cuda_exact((1000, 4100), BF16, 10)
    g = exact_scale(4100, F32, torch.Generator().manual_seed(11)).cuda()
    with kc.forced_config(bwd=cfg):
        d_lora, d_base, d_g = kc.compose_backward(d_out, g, inner, EXACT_SCALING, lora_dtype=BF16, base_dtype=BF16)
    t_lora, t_base, t_g, _ = truth_backward(d_out, g, inner, EXACT_SCALING)
    assert_exact(d_lora, t_lora, "d_lora")
    assert_exact(d_base, t_base, "d_base")
    assert_exact(d_g, t_g, "d_g")


@pytest.mark.gpu
def test_gpu_autotune_then_cached_config_and_inplace_restore():
    kl.reset_tuning()
    lora, base = _cuda_exact((512, 4096), BF16, 12), _cuda_exact((512, 4096), BF16, 13)
    g = exact_scale(4096, F32, torch.Generator().manual_seed(14)).cuda()
    expected = truth_forward(lora, base, g, EXACT_SCALING)[0]
    first, _ = kc.compose_forward(lora, base, g, EXACT_SCALING)  # autotunes
    assert len(kl._FWD.chosen[config.autotune_comprehensive()]) == 1  # one key tuned, in the current mode
    second, _ = kc.compose_forward(lora, base, g, EXACT_SCALING)  # direct launch with the cached config
    assert_exact(first, expected, "out (tuning call)")
    assert_exact(second, expected, "out (cached config)")
    # In place, first call of its key: every autotune trial must start from the original lora.
    kc.compose_forward_(lora, base, g, EXACT_SCALING)
    assert_exact(lora, expected, "in-place result after autotuning")


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("shape", "channel_dim", "channels_last"), [((16, 256, 56, 56), 1, False), ((16, 256, 56, 56), 1, True)]
)
def test_gpu_channel_layouts(shape, channel_dim, channels_last):
    lora = _layout(_cuda_exact(shape, BF16, 15), channels_last)
    base = _layout(_cuda_exact(shape, BF16, 16), channels_last)
    g = exact_scale(shape[channel_dim], F32, torch.Generator().manual_seed(17)).cuda()
    out, inner = kc.compose_forward(lora, base, g, EXACT_SCALING, channel_dim=channel_dim, save_inner=True)
    assert_exact(out, truth_forward(lora, base, g, EXACT_SCALING, channel_dim)[0], "out")
    d_out = _layout(_cuda_exact(shape, BF16, 18), channels_last)
    grads = kc.compose_backward(
        d_out, g, inner, EXACT_SCALING, channel_dim=channel_dim, lora_dtype=BF16, base_dtype=BF16
    )
    truth = truth_backward(d_out, g, inner, EXACT_SCALING, channel_dim)
    for name, got, want in zip(("d_lora", "d_base", "d_g"), grads, truth[:3]):
        assert_exact(got, want, name)


@pytest.mark.gpu
def test_gpu_more_than_2_pow_31_elements():
    """64-bit offsets: a bf16 activation of 2**31 + 2**20 elements (about 4.3 GB per tensor)."""
    C = 4096
    R = (2**31 + 2**20) // C
    need = 7 * R * C * 2 + (8 << 30)  # lora, base, out, inner, d_out, d_lora, d_base + fp64 truth chunks
    free, _ = torch.cuda.mem_get_info()
    if free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB free GPU memory, {free / 2**30:.1f} GiB available")
    lora, base = _cuda_exact((R, C), BF16, 19), _cuda_exact((R, C), BF16, 20)
    g = exact_scale(C, F32, torch.Generator().manual_seed(21)).cuda()
    out, inner = kc.compose_forward(lora, base, g, EXACT_SCALING, save_inner=True)
    rows = torch.cat([torch.arange(0, 64), torch.randint(0, R, (256,)), torch.arange(R - 64, R)]).cuda()
    t_out, t_inner, _ = truth_forward(lora[rows], base[rows], g, EXACT_SCALING)
    assert_exact(out[rows], t_out, "out (sampled rows incl. the last ones)")
    assert_exact(inner[rows], t_inner, "inner (sampled rows)")
    del base
    d_out = _cuda_exact((R, C), BF16, 22)
    d_lora, d_base, d_g = kc.compose_backward(d_out, g, inner, EXACT_SCALING, lora_dtype=BF16, base_dtype=BF16)
    t_lora, t_base, _, _ = truth_backward(d_out[rows], g, inner[rows], EXACT_SCALING)
    assert_exact(d_lora[rows], t_lora, "d_lora (sampled rows)")
    assert_exact(d_base[rows], t_base, "d_base (sampled rows)")
    t_g = torch.zeros(C, dtype=torch.float64, device="cuda")
    for r0 in range(0, R, 65536):
        t_g += (inner[r0 : r0 + 65536].double() * d_out[r0 : r0 + 65536].double()).sum(0)
    assert_exact(d_g, t_g, "d_g over all rows")


@pytest.mark.gpu
def test_gpu_tensors_on_another_device_than_the_current_one():
    """A model spread over GPUs: the kernels launch on the tensors' device, not on the current one."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    shape = (300, 4100)
    with torch.cuda.device(1):
        lora, base = _cuda_exact(shape, BF16, 23), _cuda_exact(shape, BF16, 24)
        d_out = _cuda_exact(shape, BF16, 25)
    g = exact_scale(4100, F32, torch.Generator().manual_seed(26)).to("cuda:1")
    assert torch.cuda.current_device() == 0
    out, inner = kc.compose_forward(lora, base, g, EXACT_SCALING, save_inner=True)
    assert_exact(out, truth_forward(lora, base, g, EXACT_SCALING)[0], "out")
    grads = kc.compose_backward(d_out, g, inner, EXACT_SCALING, lora_dtype=BF16, base_dtype=BF16)
    for name, got, want in zip(("d_lora", "d_base", "d_g"), grads, truth_backward(d_out, g, inner, EXACT_SCALING)):
        assert_exact(got, want, name)
