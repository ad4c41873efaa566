"""The norm engine against fp64 truth: factored (chunked) and dense paths, conv factors, clamping."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dorafactors.dispatch import config
from dorafactors.norm import conv_factors, dense_row_norm, engine

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _truth(w, a, b, s):
    return (w.double() + s * b.double() @ a.double()).norm(dim=1)


@given(
    d_out=st.integers(1, 40),
    d_in=st.integers(1, 70),
    rank=st.integers(1, 12),
    scaling=st.sampled_from([0.0, -2.5, 0.3, 1.0, 64.0]),
    w_dtype=st.sampled_from(DTYPES),
    lora_dtype=st.sampled_from(DTYPES),
    transpose=st.booleans(),
    seed=st.integers(0, 999),
)
def test_weight_norm_matches_fp64_truth(d_out, d_in, rank, scaling, w_dtype, lora_dtype, transpose, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn((d_in, d_out) if transpose else (d_out, d_in), generator=gen).to(w_dtype)
    w = w.T if transpose else w
    a = torch.randn(rank, d_in, generator=gen).to(lora_dtype)
    b = torch.randn(d_out, rank, generator=gen).to(lora_dtype)
    norm = engine.weight_norm(w, a, b, scaling)
    assert norm.dtype in (torch.float32, torch.float64) and norm.shape == (d_out,)
    truth = _truth(w, a, b, scaling).clamp_min(engine.clamp_eps(w.dtype))
    # CPU: fp64 accumulation of the same (already rounded) inputs; only the final rounding to fp32 (when
    # no input is fp64) and the fp64 sum's cancellation remain.
    rtol = 1e-12 if norm.dtype == torch.float64 else 2**-23
    torch.testing.assert_close(norm.double(), truth, rtol=rtol, atol=1e-300)


@pytest.mark.parametrize("mb", [16, 256])
def test_chunking_does_not_change_the_value_beyond_roundoff(monkeypatch, mb):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(3000, 5000, generator=gen)
    a = torch.randn(8, 5000, generator=gen)
    b = torch.randn(3000, 8, generator=gen)
    monkeypatch.setenv("PEFT_DORA_NORM_CHUNK_MB", str(mb))
    config.invalidate_cache()
    torch.testing.assert_close(engine.weight_norm(w, a, b, 0.5).double(), _truth(w, a, b, 0.5), rtol=2**-23, atol=0)


def test_zero_rows_are_clamped_not_nan():
    w = torch.zeros(4, 6)
    a = torch.randn(2, 6)
    b = torch.zeros(4, 2)
    for dtype, eps in ((torch.float32, 1e-12), (torch.bfloat16, 1e-6)):
        norm = engine.weight_norm(w.to(dtype), a.to(dtype), b.to(dtype), 1.0)
        assert torch.isfinite(norm).all() and (norm == eps).all()
    # exact cancellation W = -s B A
    b = torch.randn(4, 2)
    w = -(2.0 * b @ a)
    norm = engine.weight_norm(w.double(), a.double(), b.double(), 2.0)
    assert torch.isfinite(norm).all() and (norm <= 1e-6).all()


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_factors_reproduce_pefts_conv_delta(groups, dims):
    """PEFT's conv delta is (B.view(-1, r) @ A.view(r, -1)).reshape(W.shape); with groups > 1 that is a
    reinterpretation, which the block-sparse factors must reproduce exactly."""
    gen = torch.Generator().manual_seed(groups * 10 + dims)
    c_in, c_out, r, k = 4 * groups, 3 * groups, 2 * groups, 3
    w = torch.randn((c_out, c_in // groups) + (k,) * dims, generator=gen, dtype=torch.float64)
    a = torch.randn((r, c_in) + (k,) * dims, generator=gen, dtype=torch.float64)
    b = torch.randn((c_out, r // groups) + (1,) * dims, generator=gen, dtype=torch.float64)
    delta = torch.mm(b.view(-1, r), a.view(r, -1)).reshape(w.shape)
    w2, a2, b2 = conv_factors(w, a, b)
    torch.testing.assert_close(b2 @ a2, delta.reshape(c_out, -1), rtol=1e-14, atol=1e-14)
    expected = dense_row_norm(w.reshape(c_out, -1), delta.reshape(c_out, -1), 0.7)
    torch.testing.assert_close(engine.weight_norm(w2, a2, b2, 0.7), expected, rtol=1e-12, atol=0)


def test_conv_factors_reject_foreign_layout():
    with pytest.raises(ValueError, match="PEFT's layout"):
        conv_factors(torch.randn(6, 4, 3, 3), torch.randn(2, 5, 3, 3), torch.randn(6, 2, 1, 1))


def test_shape_mismatch_is_a_clear_error():
    from dorafactors.norm import factored_row_norm_sq

    with pytest.raises(ValueError, match=r"expected A \[r, d_in\] and B \[d_out, r\]"):
        factored_row_norm_sq(torch.randn(5, 7), torch.randn(2, 6), torch.randn(5, 2), 1.0, chunk_columns=4)


@pytest.mark.parametrize("kernels", [False, True], ids=["torch", "kernels"])
@pytest.mark.parametrize(("d_in", "rank"), [(90, 4), (3, 5)], ids=["factored", "dense"])
@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_dense_delta_norm_gives_unchanged_rows_the_forwards_norm(monkeypatch, kernels, d_in, rank, w_dtype):
    """Merge's norm: bitwise :func:`weight_norm` (as the forward calls it, on the cached ``||W||^2``) in rows
    the delta leaves unchanged, :func:`dense_row_norm` elsewhere."""
    if kernels:
        monkeypatch.setenv("PEFT_DORA_FUSED", "1")
    config.invalidate_cache()
    gen = torch.Generator().manual_seed(3)
    d_out = 48
    w = torch.randn(d_out, d_in, generator=gen).to(w_dtype)
    a = torch.randn(rank, d_in, generator=gen)
    b = torch.randn(d_out, rank, generator=gen)
    b[::3] = 0  # every third row of B A is zero
    w[6] = 0  # and one of them has a zero row of W as well (clamped, never 0)
    forward = engine.weight_norm(w, a, b, 0.7, cached_sumsq=engine.weight_sumsq(w))
    delta = b @ a
    merge = engine.dense_delta_norm(w, delta, 0.7, rank=rank)
    unchanged = torch.zeros(d_out, dtype=torch.bool)
    unchanged[::3] = True
    assert torch.equal(merge[unchanged], forward[unchanged])
    assert merge[6] == forward[6] == torch.tensor(engine.clamp_eps(w_dtype), dtype=torch.float32)
    assert torch.equal(merge[~unchanged], dense_row_norm(w, delta, 0.7)[~unchanged])
    assert torch.equal(engine.dense_delta_norm(w, delta, 0.0, rank=rank), engine.weight_norm(w, a, b, 0.0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nonfinite_probe_casts_nothing_when_the_adapters_share_its_dtype(dtype):
    """With ``A`` and ``B`` in the probe's working dtype (bf16 or fp32 adapters) the non-finite row repair
    runs no cast (one launch less per norm computation), and still gives each row the dense class: +inf
    for an infinite ``B_ik`` against a non-zero ``A_k``, NaN for a NaN of ``B``, finite rows untouched."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    gen = torch.Generator().manual_seed(0)
    lora_A = torch.randn(4, 16, generator=gen).to(dtype)
    lora_B = torch.randn(8, 4, generator=gen).to(dtype)
    lora_B[2, 1] = torch.inf
    lora_B[6, 3] = torch.nan
    norm = torch.rand(8, generator=gen) + 0.5
    ops = Ops()
    with ops:
        out = engine._dense_class_of_nonfinite_rows(norm, lora_A, lora_B, 0.5, None)
    assert "_to_copy" not in ops.names and ops.names.count("linalg_vector_norm") == 2
    assert out[2] == torch.inf and out[6].isnan()
    finite = [i for i in range(8) if i not in (2, 6)]
    assert torch.equal(out[finite], norm[finite])
