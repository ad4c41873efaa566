"""The tensor-core factored norm (``dorafactors/kernels/row_norm.py``) against fp64 truth and the reference.

On CPU the kernels run on Triton's interpreter (conftest sets ``TRITON_INTERPRET=1``), so shapes stay small;
``test_row_norm_gpu.py`` repeats the checks at the Llama-sized target shapes on a GPU and adds timing-free
bounds (memory, determinism), ``test_row_norm_dispatch_order.py`` the independence of program start order.
Two kinds of data:

* **exact**: small integers and dyadic scalings. Every product, partial sum and split part is an fp32 (and
  bf16 for the split parts) number, so the kernel must return the fp64 truth *bitwise*; any indexing,
  masking, split or ticket bug shows with no tolerance to hide in.
* **random**: the precision contract, relative error of the norm <= 1e-5 against the fp64 norm of the same
  (already rounded) inputs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dorafactors.dispatch import config
from dorafactors.kernels import row_norm
from dorafactors.kernels._triton_utils import tickets_all_zero
from dorafactors.kernels.operands import gemm_dtypes_supported
from dorafactors.kernels.row_norm import (
    NormKernelConfig,
    gemm_weight_norm_sq,
    pick_config,
    pick_gemm_config,
    plan_for,
    triton_row_sumsq,
    triton_weight_norm_sq,
)
from dorafactors.kernels.row_norm_reference import factored_row_norm_sq
from dorafactors.norm import engine
from tests._tolerances import TOLERANCES, assert_close_verbose, rel_error

#: The precision contract: relative error of the norm against the fp64 norm of the same inputs.
NORM_RTOL = 1e-5

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

#: Small configurations that force several row/rank tiles, d_in splits and gram splits on tiny shapes.
SMALL_SPLIT = NormKernelConfig(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=2, splits=3, gram_splits=2)
SMALL_WIDE = NormKernelConfig(block_m=32, block_n=32, block_k=32, num_warps=4, num_stages=2, splits=2, gram_splits=3)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_random(d_out, d_in, rank, w_dtype, ad_dtype, *, seed=0, b_scale=0.1, device=DEVICE):
    g = _gen(seed)
    W = torch.randn(d_out, d_in, generator=g).to(w_dtype)
    A = (torch.randn(rank, d_in, generator=g) / math.sqrt(max(d_in, 1))).to(ad_dtype)
    B = (torch.randn(d_out, rank, generator=g) * b_scale).to(ad_dtype)
    return W.to(device), A.to(device), B.to(device)


def make_exact(d_out, d_in, rank, w_dtype, ad_dtype, *, seed=0, device=DEVICE):
    g = _gen(seed)
    W = torch.randint(-4, 5, (d_out, d_in), generator=g).to(w_dtype)
    A = torch.randint(-3, 4, (rank, d_in), generator=g).to(ad_dtype)
    B = torch.randint(-3, 4, (d_out, rank), generator=g).to(ad_dtype)
    return W.to(device), A.to(device), B.to(device)


def truth_sq(W, A, B, scaling) -> torch.Tensor:
    """fp64 ``||W + s B A||^2_row`` of the given (already rounded) inputs, dense."""
    dense = W.double() + scaling * (B.double() @ A.double())
    return dense.square().sum(dim=1)


def term_scale(W, A, B, scaling) -> torch.Tensor:
    """fp64 ``|| |W| + |s| |B| |A| ||^2_row``: the sum of the absolute values of every term the factored
    formula adds (``||W||^2``, ``2s B (W A^T)``, ``s^2 B (A A^T) B^T``, each expanded to its products).

    An fp32-accurate factored result is within a few fp32 ulps (times the summation length) of this per
    row. Where ``W + sBA`` nearly cancels, or ``B_i`` is nearly orthogonal to A's rows, the true norm is far
    smaller than this and its relative error grows: that is the conditioning of the factored maths (the
    PyTorch reference in fp32 shows the same), not an accuracy loss of the kernel.
    """
    dense_abs = W.double().abs() + abs(scaling) * (B.double().abs() @ A.double().abs())
    return dense_abs.square().sum(1)


def norm_of(sq: torch.Tensor) -> torch.Tensor:
    return sq.double().clamp_min(0).sqrt()


def assert_norm_close(ours_sq, truth, name, rtol=NORM_RTOL, scale=None) -> float:
    """The precision contract.

    * vector relative error of the norm, ``||n_ours - n_true|| / ||n_true||`` (``rel_error``) <= ``rtol``;
    * row by row, ``|n_ours^2 - n_true^2| <= rtol * scale`` with ``scale`` from :func:`term_scale` (or the
      true squared norm when not given): the per-row bound of an fp32-accurate factored sum.
    """
    ours, ref = norm_of(ours_sq), norm_of(truth)
    err = rel_error(ours, ref)
    assert err <= rtol, f"{name}: relative error of the norm {err:.3e} > {rtol:.0e}"
    row_scale = truth.double().abs() if scale is None else scale
    row_err = (ours_sq.double() - truth.double()).abs()
    bad = row_err > rtol * row_scale
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} rows off by more than {rtol:.0e} x their scale; worst "
        f"{float((row_err / row_scale.clamp_min(1e-300)).max()):.3e}"
    )
    return err


def counters_are_zero() -> bool:
    return tickets_all_zero()


# ---------------------------------------------------------------------------------------------
# exact data: bitwise against fp64 truth

EXACT_CASES = [
    # d_out, d_in, rank, W dtype, adapter dtype, scaling, config
    (1, 1, 1, torch.bfloat16, torch.bfloat16, 0.5, None),
    (64, 96, 32, torch.bfloat16, torch.bfloat16, 0.5, None),  # no tails: the unmasked main loop
    (64, 64, 16, torch.float16, torch.float32, -1.5, None),  # no tails, fp32 adapters
    (5, 123, 7, torch.bfloat16, torch.bfloat16, -2.0, None),
    (37, 70, 33, torch.float16, torch.float16, 0.25, None),
    (33, 65, 20, torch.bfloat16, torch.float32, 1.5, None),
    (19, 48, 9, torch.float16, torch.float32, -0.75, None),
    (45, 77, 40, torch.bfloat16, torch.bfloat16, 0.5, SMALL_SPLIT),
    (30, 100, 50, torch.float16, torch.float32, -1.0, SMALL_SPLIT),
    (70, 96, 70, torch.bfloat16, torch.float32, 2.0, SMALL_WIDE),
]


@pytest.mark.parametrize("d_out,d_in,rank,w_dtype,ad_dtype,scaling,cfg", EXACT_CASES)
def test_exact_inputs_give_the_fp64_truth_bitwise(d_out, d_in, rank, w_dtype, ad_dtype, scaling, cfg):
    W, A, B = make_exact(d_out, d_in, rank, w_dtype, ad_dtype, seed=d_out + d_in)
    truth = truth_sq(W, A, B, scaling)
    assert truth.abs().max() < 2**24  # every intermediate is an exact fp32 integer (or half-integer)
    sumsq = triton_row_sumsq(W)
    cold = triton_weight_norm_sq(W, A, B, scaling, kernel_config=cfg)
    warm = triton_weight_norm_sq(W, A, B, scaling, cached_sumsq=sumsq, kernel_config=cfg)
    expect = truth.float()
    assert torch.equal(cold, expect), f"cold: max |diff| {(cold.double() - truth).abs().max():.3e}"
    assert torch.equal(warm, expect), f"warm: max |diff| {(warm.double() - truth).abs().max():.3e}"
    assert torch.equal(sumsq, W.double().square().sum(1).float())
    assert counters_are_zero()


# ---------------------------------------------------------------------------------------------
# random data: relative error <= 1e-5 against fp64 truth

RANDOM_CASES = [
    # d_out, d_in, rank, W dtype, adapter dtype, scaling
    (1, 1, 1, torch.bfloat16, torch.bfloat16, 1.5),
    (1, 1, 1, torch.float16, torch.float32, -3.0),
    (7, 1, 3, torch.bfloat16, torch.float32, 250.0),
    (5, 123, 7, torch.bfloat16, torch.bfloat16, -1.7),
    (37, 70, 16, torch.float16, torch.float16, 0.5),
    (64, 257, 33, torch.bfloat16, torch.float32, 2.0),
    (33, 65, 70, torch.float16, torch.float32, -250.0),
    (130, 96, 64, torch.bfloat16, torch.bfloat16, 1000.0),
    (20, 48, 129, torch.bfloat16, torch.float32, -0.3),
    (9, 40, 300, torch.float16, torch.float16, 40.0),
    (6, 24, 1024, torch.bfloat16, torch.bfloat16, 0.05),
    (4, 16, 1024, torch.float16, torch.float32, -8.0),
]


@pytest.mark.parametrize("d_out,d_in,rank,w_dtype,ad_dtype,scaling", RANDOM_CASES)
def test_random_inputs_within_1e5_of_fp64_truth(d_out, d_in, rank, w_dtype, ad_dtype, scaling):
    W, A, B = make_random(d_out, d_in, rank, w_dtype, ad_dtype, seed=rank)
    truth = truth_sq(W, A, B, scaling)
    ours = triton_weight_norm_sq(W, A, B, scaling)
    assert ours.dtype == torch.float32 and ours.shape == (d_out,)
    scale = term_scale(W, A, B, scaling)
    assert_norm_close(ours, truth, f"{d_out}x{d_in} r{rank} {w_dtype}/{ad_dtype} s={scaling}", scale=scale)


@pytest.mark.parametrize("scaling", [0.0, -0.0])
@pytest.mark.parametrize("ad_dtype", [torch.bfloat16, torch.float32])
def test_zero_scaling_is_the_row_sumsq(scaling, ad_dtype):
    W, A, B = make_random(21, 50, 6, torch.bfloat16, ad_dtype)
    cold = triton_weight_norm_sq(W, A, B, scaling)
    assert torch.equal(cold, triton_row_sumsq(W))
    cached = torch.rand(21, device=W.device)
    warm = triton_weight_norm_sq(W, A, B, scaling, cached_sumsq=cached)
    assert torch.equal(warm, cached) and warm.data_ptr() != cached.data_ptr()


@pytest.mark.parametrize("w_dtype,ad_dtype", [(torch.float16, torch.float16), (torch.bfloat16, torch.float32)])
def test_cancellation_prone_rows(w_dtype, ad_dtype):
    """d_in = 1, large s: some rows of W + sBA nearly cancel. The factored sum is then accurate to the size
    of its terms, not of the tiny result (stock PEFT's dense bf16 norm has no cancellation but ~1e-2 error)."""
    W, A, B = make_random(64, 1, 81, w_dtype, ad_dtype, b_scale=1.0, seed=31)
    truth = truth_sq(W, A, B, -8.0)
    ours = triton_weight_norm_sq(W, A, B, -8.0)
    assert_norm_close(ours, truth, "cancellation", scale=term_scale(W, A, B, -8.0))


def test_large_adapter_dominating_the_norm():
    """s^2 ||BA||^2 >> ||W||^2: the gram term alone carries the result (split precision of G'' shows here)."""
    W, A, B = make_random(40, 64, 24, torch.bfloat16, torch.bfloat16, b_scale=1.0, seed=3)
    for scaling in (1e3, -1e4):
        truth = truth_sq(W, A, B, scaling)
        assert_norm_close(triton_weight_norm_sq(W, A, B, scaling), truth, f"s={scaling}")


@pytest.mark.parametrize("cfg", [SMALL_SPLIT, SMALL_WIDE], ids=["split16", "split32"])
@pytest.mark.parametrize("ad_dtype", [torch.bfloat16, torch.float32])
def test_explicit_split_configs(cfg, ad_dtype):
    W, A, B = make_random(50, 150, 45, torch.bfloat16, ad_dtype, seed=11)
    truth = truth_sq(W, A, B, 0.8)
    ours = triton_weight_norm_sq(W, A, B, 0.8, kernel_config=cfg)
    default = triton_weight_norm_sq(W, A, B, 0.8)
    assert_norm_close(ours, truth, f"{cfg}")
    assert_close_verbose(ours, default, rtol=2e-6, atol=0, name="split vs default config")
    assert counters_are_zero()


# ---------------------------------------------------------------------------------------------
# fp32-level precision of each term: fp32 operands are carried to ~24 bits, not ~16


#: fp32-level bound used where one term is isolated (fp32 accumulation alone gives ~1e-7 here).
TERM_RTOL = 1e-6


@pytest.mark.parametrize("w_dtype,ad_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32)])
def test_cross_term_carries_fp32_adapters_to_fp32_precision(w_dtype, ad_dtype):
    """W = I, r = 1, B = 1: row i is e_i + A, so the cross term of row i is A_i itself, row by row."""
    n = 32
    W = torch.eye(n, dtype=w_dtype, device=DEVICE)
    A = torch.randn(1, n, generator=_gen(21), dtype=torch.float64).to(ad_dtype).to(DEVICE)
    B = torch.ones(n, 1, dtype=ad_dtype, device=DEVICE)
    truth = truth_sq(W, A, B, 1.0)
    ours = triton_weight_norm_sq(W, A, B, 1.0)
    assert_close_verbose(ours, truth, rtol=TERM_RTOL, atol=0, name="cross term with fp32 A")


@pytest.mark.parametrize("ad_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gram_term_is_fp32_precise(ad_dtype):
    """W = 0: the result is s^2 ||B_i A||^2 alone, so any truncation of G'' or of B shows row by row."""
    w_dtype = torch.float16 if ad_dtype == torch.float16 else torch.bfloat16
    W = torch.zeros(48, 64, dtype=w_dtype, device=DEVICE)
    A = torch.randn(3, 64, generator=_gen(22)).to(ad_dtype).to(DEVICE)
    B = torch.randn(48, 3, generator=_gen(23)).to(ad_dtype).to(DEVICE)
    for scaling in (3.0, -0.37):
        truth = truth_sq(W, A, B, scaling)
        ours = triton_weight_norm_sq(W, A, B, scaling)
        assert_close_verbose(ours, truth, rtol=TERM_RTOL, atol=0, name=f"gram term, s={scaling}")


# ---------------------------------------------------------------------------------------------
# against the PyTorch reference


@pytest.mark.parametrize(
    "d_out,d_in,rank,w_dtype,ad_dtype",
    [
        (33, 65, 20, torch.bfloat16, torch.bfloat16),
        (48, 130, 70, torch.float16, torch.float32),
        (1, 9, 2, torch.bfloat16, torch.float32),
    ],
)
def test_matches_the_pytorch_reference(d_out, d_in, rank, w_dtype, ad_dtype):
    W, A, B = make_random(d_out, d_in, rank, w_dtype, ad_dtype, seed=5)
    ours = triton_weight_norm_sq(W, A, B, -1.25)
    ref = factored_row_norm_sq(W, A, B, -1.25, chunk_columns=17)
    rtol, atol = TOLERANCES[torch.float32]
    assert_close_verbose(ours, ref, rtol=rtol, atol=atol * float(ref.abs().max()), name="kernel vs reference")


# ---------------------------------------------------------------------------------------------
# layouts


@pytest.mark.parametrize("ad_dtype", [torch.bfloat16, torch.float32])
def test_strided_operands(ad_dtype):
    """W as a transposed view (fan_in_fan_out, embeddings), A and B non-contiguous views."""
    W, A, B = make_random(29, 75, 18, torch.bfloat16, ad_dtype, seed=2)
    W_t = W.T.contiguous().T  # same values, strides (1, d_out)
    A_s = torch.zeros(18, 150, dtype=ad_dtype, device=A.device)
    A_s[:, ::2] = A
    A_s = A_s[:, ::2]  # column stride 2
    B_t = B.T.contiguous().T  # strides (1, d_out)
    assert not W_t.is_contiguous() and not A_s.is_contiguous() and not B_t.is_contiguous()
    truth = truth_sq(W, A, B, 0.7)
    ours = triton_weight_norm_sq(W_t, A_s, B_t, 0.7)
    assert_norm_close(ours, truth, "strided")
    assert_close_verbose(ours, triton_weight_norm_sq(W, A, B, 0.7), rtol=1e-6, atol=0, name="strided vs contiguous")
    sumsq = triton_row_sumsq(W_t)
    assert_close_verbose(sumsq, W.double().square().sum(1), rtol=1e-6, atol=0, name="row sumsq of W.T view")


# ---------------------------------------------------------------------------------------------
# determinism, cached ||W||^2


@pytest.mark.parametrize("ad_dtype", [torch.bfloat16, torch.float32])
def test_bitwise_deterministic_and_cached_sumsq(ad_dtype):
    W, A, B = make_random(45, 90, 40, torch.bfloat16, ad_dtype, seed=9)
    sumsq = triton_row_sumsq(W)
    cold = [triton_weight_norm_sq(W, A, B, 1.3, kernel_config=SMALL_SPLIT) for _ in range(2)]
    warm = [triton_weight_norm_sq(W, A, B, 1.3, cached_sumsq=sumsq, kernel_config=SMALL_SPLIT) for _ in range(2)]
    assert torch.equal(cold[0], cold[1]) and torch.equal(warm[0], warm[1])
    # the one-pass ||W||^2 and the standalone one differ only in summation order
    assert_close_verbose(warm[0], cold[0], rtol=1e-6, atol=0, name="warm(row_sumsq) vs cold")


def test_one_plan_shared_by_two_weight_dtypes_launches_each_in_its_own_mode():
    """A plan is shared by every W dtype of a shape; the launch constants must still follow W's dtype.

    fp32 adapters take A_MODE 1 (bf16 parts) against a bf16 W and A_MODE 2 (fp16 parts) against an fp16 W. On
    a GPU a mixed-up mode fails to compile (an fp16 x bf16 dot); the interpreter upcasts every dot operand to
    fp32 and would hide it, so this checks the cached constants themselves, and both results against fp64.
    """
    shape = (24, 40, 6)
    plan = row_norm.plan_for(*shape, a_is_fp32=True, device=DEVICE)
    plan.launch_cache.clear()
    modes = {}
    for w_dtype in (torch.bfloat16, torch.float16):
        W, A, B = make_random(*shape, w_dtype, torch.float32, seed=21)
        out = triton_weight_norm_sq(W, A, B, 0.7)
        assert rel_error(out.double(), truth_sq(W, A, B, 0.7)) < NORM_RTOL
        modes[w_dtype] = {launch[2]["A_MODE"] for launch in plan.launch_cache.values()}
    # after the bf16 launch only mode 1 was built; the fp16 launch must have built mode 2 beside it
    assert modes == {torch.bfloat16: {1}, torch.float16: {1, 2}}, modes


def test_cached_sumsq_is_used_not_recomputed():
    """A deliberately wrong cache shows up in the result: the warm kernel never looks at ||W||^2."""
    W, A, B = make_random(12, 40, 5, torch.float16, torch.float16, seed=4)
    true_w = triton_row_sumsq(W)
    fake = true_w + 100.0
    cold = triton_weight_norm_sq(W, A, B, 0.5)
    warm = triton_weight_norm_sq(W, A, B, 0.5, cached_sumsq=fake)
    assert_close_verbose(warm - cold, torch.full_like(cold, 100.0), rtol=1e-5, atol=1e-4, name="offset")


@pytest.mark.parametrize("eps", [1e-6, 1e-12])
@pytest.mark.parametrize("scaling", [0.9, 0.0])
def test_fused_finish_matches_the_engine_clamp_bitwise(eps, scaling):
    """``eps=`` makes the kernel return max(sqrt(max(n^2, 0)), eps) with a correctly rounded sqrt: bitwise the
    engine's clamp/sqrt/clamp on n^2 wherever torch's sqrt is correctly rounded (CUDA; this CPU build's
    vectorized fp32 sqrt is not always, so the expectation takes the sqrt in fp64 and rounds once)."""
    W, A, B = make_random(40, 30, 6, torch.bfloat16, torch.float32, seed=13)
    W[5] = 0.0  # a zero row: n^2 = 0 exactly (a positive scaling of a zero B row keeps it 0)
    B[5] = 0.0
    B[7, 2] = float("nan")
    sq = triton_weight_norm_sq(W, A, B, scaling)
    finished = triton_weight_norm_sq(W, A, B, scaling, eps=eps)
    expect = sq.double().clamp_min(0).sqrt().float().clamp_min(eps)
    if sq.is_cuda:
        torch.testing.assert_close(
            expect, sq.clone().clamp_min_(0).sqrt_().clamp_min_(eps), rtol=0, atol=0, equal_nan=True
        )
    assert torch.equal(finished.isnan(), expect.isnan())
    ok = ~expect.isnan()
    assert torch.equal(finished[ok], expect[ok])
    assert finished[5] == torch.tensor(eps, dtype=torch.float32)
    if scaling != 0.0:
        assert finished[7].isnan()


# ---------------------------------------------------------------------------------------------
# edge cases and validation


def test_empty_and_degenerate_shapes():
    W, A, B = make_random(0, 10, 3, torch.bfloat16, torch.bfloat16)
    assert triton_weight_norm_sq(W, A, B, 1.0).shape == (0,)
    W, A, B = make_random(6, 10, 0, torch.bfloat16, torch.float32)
    assert torch.equal(triton_weight_norm_sq(W, A, B, 1.0), triton_row_sumsq(W))
    W, A, B = make_random(6, 0, 3, torch.bfloat16, torch.bfloat16)
    assert torch.equal(triton_weight_norm_sq(W, A, B, 1.0), torch.zeros(6, device=W.device))


def test_validation_errors():
    W, A, B = make_random(6, 10, 3, torch.bfloat16, torch.bfloat16)
    with pytest.raises(ValueError, match="shape mismatch"):
        triton_weight_norm_sq(W, A[:, :9], B, 1.0)
    with pytest.raises(ValueError, match="fp16/bf16 W"):
        triton_weight_norm_sq(W.float(), A.float(), B.float(), 1.0)
    with pytest.raises(ValueError, match="lora_A dtype"):
        triton_weight_norm_sq(W, A.half(), B, 1.0)
    with pytest.raises(ValueError, match="cached_sumsq"):
        triton_weight_norm_sq(W, A, B, 1.0, cached_sumsq=torch.zeros(5, device=W.device))
    with pytest.raises(ValueError, match="power of two"):
        NormKernelConfig(block_m=48).validate()


def test_non_finite_inputs_propagate():
    W, A, B = make_random(8, 20, 4, torch.bfloat16, torch.bfloat16)
    W[3, 7] = float("inf")
    B[5, 1] = float("nan")
    out = triton_weight_norm_sq(W, A, B, 0.5)
    assert not torch.isfinite(out[3]) and torch.isnan(out[5])
    assert torch.isfinite(out[[0, 1, 2, 4, 6, 7]]).all()
    assert counters_are_zero()


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 1), (7, 300), (130, 33)])
def test_row_sumsq(w_dtype, shape):
    g = _gen(1)
    W = torch.randn(*shape, generator=g).to(w_dtype).to(DEVICE)
    truth = W.double().square().sum(1)
    assert_close_verbose(triton_row_sumsq(W), truth, rtol=1e-6, atol=0, name="row sumsq")
    assert_close_verbose(triton_row_sumsq(W.T.contiguous().T), truth, rtol=1e-6, atol=0, name="row sumsq (W.T)")
    assert triton_row_sumsq(W[:, :0]).eq(0).all()


# ---------------------------------------------------------------------------------------------
# through the engine


@pytest.mark.parametrize("gemm_from", [0, None], ids=["gemm-path", "size-rule"])
@pytest.mark.parametrize("ad_dtype", [torch.bfloat16, torch.float32])
def test_engine_takes_the_kernel_and_matches_the_torch_path(monkeypatch, ad_dtype, gemm_from):
    from dorafactors.dispatch import rules

    if gemm_from is not None:
        monkeypatch.setattr(rules, "NORM_GEMM_MIN_DIN_RANK", gemm_from)
        monkeypatch.setattr(rules, "NORM_GEMM_FP32_MIN_MACS", gemm_from)
    W, A, B = make_random(40, 72, 12, torch.bfloat16, ad_dtype, seed=8)
    monkeypatch.setenv("PEFT_DORA_FUSED", "0")
    config.invalidate_cache()
    assert engine.norm_path(W, A, B) == "torch"
    torch_norm = engine.weight_norm(W, A, B, 1.7)
    torch_sumsq = engine.weight_sumsq(W)

    monkeypatch.setenv("PEFT_DORA_FUSED", "1")
    config.invalidate_cache()
    if DEVICE == "cpu":
        assert config.triton_interpreter_active()
    gemm = gemm_from is not None  # 40 * 72 * 12 is far below the size rules
    assert engine.norm_path(W, A, B) == ("gemm" if gemm else "triton")
    fused_norm = engine.weight_norm(W, A, B, 1.7)
    fused_sumsq = engine.weight_sumsq(W)
    assert_close_verbose(fused_norm, torch_norm, rtol=1e-5, atol=0, name="engine norm: triton vs torch")
    assert_close_verbose(fused_sumsq, torch_sumsq, rtol=1e-6, atol=0, name="engine sumsq: triton vs torch")
    warm = engine.weight_norm(W, A, B, 1.7, cached_sumsq=fused_sumsq)
    assert_close_verbose(warm, fused_norm, rtol=1e-6, atol=0, name="engine warm vs cold")
    assert_norm_close(fused_norm.square(), truth_sq(W, A, B, 1.7), "engine vs fp64", rtol=2e-5)


@pytest.mark.parametrize(
    "d_out,d_in,rank,gemm",
    [
        (4096, 4096, 384, False),
        (8192, 8192, 384, True),
        (14336, 4096, 384, True),
        (4096, 14336, 384, True),
        (8192, 8192, 768, True),
        (8192, 28672, 384, True),
        (4096, 4096, 16, False),
        (8192, 28672, 16, False),
    ],
)
def test_norm_path_rules_at_the_measured_shapes(d_out, d_in, rank, gemm):
    """The GEMM-path rule gives the measured winners (``python -m benchmarks tune --only norm`` re-measures them)."""
    from dorafactors.dispatch import rules

    W = torch.empty(d_out, d_in, dtype=torch.bfloat16, device="meta")
    A = torch.empty(rank, d_in, dtype=torch.bfloat16, device="meta")
    B = torch.empty(d_out, rank, dtype=torch.bfloat16, device="meta")
    assert rules.norm_gemm_ok(W, A, B)[0] == gemm
    fp32_gemm = d_out * d_in * rank >= rules.NORM_GEMM_FP32_MIN_MACS
    assert rules.fp32_adapter_gemm_bytes(d_out, d_in, rank) <= config.get_dora_norm_threshold_bytes()
    assert rules.norm_gemm_ok(W, A.float(), B.float())[0] == fp32_gemm, "fp32 adapters on a bf16 W"
    assert not rules.norm_gemm_ok(W.half(), A.float(), B.float())[0], "fp16 W with fp32 adapters: one-pass"
    assert not rules.norm_gemm_ok(W, A.float(), B)[0], "mixed adapter dtypes: one-pass"


def test_fp32_adapter_gemm_path_keeps_within_the_norm_budget(monkeypatch):
    """The fp32-adapter GEMM path splits A into bf16 parts ``[3r, d_in]``, a ``d_in``-sized temporary the
    one-pass kernel does not have: a layer whose split exceeds ``PEFT_DORA_NORM_CHUNK_MB`` (a 128k-token
    vocabulary's embedding at r=384: 6 * 384 * 128256 bytes) keeps the one-pass kernel, and a larger budget
    lets it take the GEMM path."""
    from dorafactors.dispatch import rules

    W = torch.empty(4096, 128256, dtype=torch.bfloat16, device="meta")
    A = torch.empty(384, 128256, dtype=torch.float32, device="meta")
    B = torch.empty(4096, 384, dtype=torch.float32, device="meta")
    need = rules.fp32_adapter_gemm_bytes(4096, 128256, 384)
    assert need > 256 * 2**20
    monkeypatch.setenv("PEFT_DORA_NORM_CHUNK_MB", "256")
    config.invalidate_cache()
    ok, reason = rules.norm_gemm_ok(W, A, B)
    assert not ok and "PEFT_DORA_NORM_CHUNK_MB" in reason
    monkeypatch.setenv("PEFT_DORA_NORM_CHUNK_MB", str(need // 2**20 + 1))
    config.invalidate_cache()
    assert rules.norm_gemm_ok(W, A, B)[0]
    config.invalidate_cache()


def test_engine_uses_the_torch_path_under_compile(monkeypatch):
    from dorafactors.dispatch import rules

    W, A, B = make_random(8, 16, 2, torch.bfloat16, torch.bfloat16)
    monkeypatch.setenv("PEFT_DORA_FUSED", "1")
    config.invalidate_cache()
    assert engine.norm_path(W, A, B) == "triton"
    monkeypatch.setattr(rules, "NORM_GEMM_MIN_DIN_RANK", 0)
    assert engine.norm_path(W, A, B) == "gemm"
    monkeypatch.setattr(rules, "_under_compile", lambda: True)
    assert engine.norm_path(W, A, B) == "torch"


# ---------------------------------------------------------------------------------------------
# launch plan: working-set bound and wave filling, checked for the target shapes without a GPU

TARGET_SHAPES = [
    (4096, 4096, 384),
    (8192, 8192, 384),
    (14336, 4096, 384),
    (4096, 14336, 384),
    (8192, 8192, 768),
    (8192, 28672, 384),
    *[(4096, 4096, r) for r in (16, 64, 128, 256, 512, 1024)],
]


@pytest.mark.parametrize("d_out,d_in,rank", TARGET_SHAPES)
@pytest.mark.parametrize("a_is_fp32", [False, True])
def test_plan_working_set_and_grid(d_out, d_in, rank, a_is_fp32):
    plan = plan_for(d_out, d_in, rank, a_is_fp32=a_is_fp32, device="cuda", num_sms=132)
    bound = 4 * (d_out * rank + rank * rank) + 16 * 2**20  # fp32 U and G + 16 MiB: no d_in working set
    for cold in (False, True):
        assert plan.workspace_bytes(cold) <= bound, (plan, plan.workspace_bytes(cold), bound)
    cfg = plan.config
    assert plan.k_steps // plan.splits >= 8 or plan.splits == 1
    main_programs = plan.row_tiles * plan.rank_tiles * plan.splits
    waves = math.ceil(main_programs / 132)
    assert main_programs / (waves * 132) >= 0.7, (cfg, main_programs)
    assert plan.gram_tiles * plan.gram_splits <= 2 * 132
    assert pick_config(d_out, d_in, rank, a_is_fp32, 132, False) == cfg  # pure function of its arguments


# ---------------------------------------------------------------------------------------------
# the GEMM path: fp32 W A^T from a GEMM (cuBLAS on GPUs), the rest in the kernel's FROM_GEMM mode

# half adapters in W's dtype, and fp32 adapters on a bf16 W (U and G from A's exact bf16 parts)
GEMM_EXACT = [c for c in EXACT_CASES if gemm_dtypes_supported(c[3], c[4], c[4])]
GEMM_RANDOM = [c for c in RANDOM_CASES if gemm_dtypes_supported(c[3], c[4], c[4])]


@pytest.mark.parametrize("d_out,d_in,rank,w_dtype,ad_dtype,scaling,cfg", GEMM_EXACT)
def test_gemm_exact_inputs_give_the_fp64_truth_bitwise(d_out, d_in, rank, w_dtype, ad_dtype, scaling, cfg):
    W, A, B = make_exact(d_out, d_in, rank, w_dtype, ad_dtype, seed=d_out + d_in)
    truth = truth_sq(W, A, B, scaling)
    expect = truth.float()
    cold = gemm_weight_norm_sq(W, A, B, scaling, kernel_config=cfg)
    warm = gemm_weight_norm_sq(W, A, B, scaling, cached_sumsq=triton_row_sumsq(W), kernel_config=cfg)
    assert torch.equal(cold, expect), f"cold: max |diff| {(cold.double() - truth).abs().max():.3e}"
    assert torch.equal(warm, expect)
    assert counters_are_zero()


@pytest.mark.parametrize("cfg", [SMALL_SPLIT, SMALL_WIDE], ids=["split16", "split32"])
def test_gemm_split_configs_add_U_once(cfg):
    """``splits > 1`` cuts the B G'' chunks over several programs per tile; only one of them adds U."""
    W, A, B = make_exact(45, 77, 40, torch.bfloat16, torch.bfloat16, seed=4)
    assert cfg.splits > 1
    assert torch.equal(gemm_weight_norm_sq(W, A, B, 0.5, kernel_config=cfg), truth_sq(W, A, B, 0.5).float())


@pytest.mark.parametrize("d_out,d_in,rank,w_dtype,ad_dtype,scaling", GEMM_RANDOM)
def test_gemm_random_inputs_within_1e5_of_fp64_truth(d_out, d_in, rank, w_dtype, ad_dtype, scaling):
    W, A, B = make_random(d_out, d_in, rank, w_dtype, ad_dtype, seed=rank)
    truth = truth_sq(W, A, B, scaling)
    ours = gemm_weight_norm_sq(W, A, B, scaling)
    assert ours.dtype == torch.float32 and ours.shape == (d_out,)
    name = f"gemm {d_out}x{d_in} r{rank} {w_dtype} s={scaling}"
    assert_norm_close(ours, truth, name, scale=term_scale(W, A, B, scaling))
    one_pass = triton_weight_norm_sq(W, A, B, scaling)
    assert_norm_close(ours, one_pass.double(), "gemm vs one-pass", rtol=2e-6, scale=term_scale(W, A, B, scaling))


@pytest.mark.parametrize("ad_dtype", [torch.bfloat16, torch.float16])
def test_gemm_gram_and_large_adapter_terms_are_fp32_precise(ad_dtype):
    W = torch.zeros(48, 64, dtype=ad_dtype, device=DEVICE)
    A = torch.randn(3, 64, generator=_gen(22)).to(ad_dtype).to(DEVICE)
    B = torch.randn(48, 3, generator=_gen(23)).to(ad_dtype).to(DEVICE)
    for scaling in (3.0, -0.37):
        truth = truth_sq(W, A, B, scaling)
        got = gemm_weight_norm_sq(W, A, B, scaling)
        assert_close_verbose(got, truth, rtol=TERM_RTOL, atol=0, name=f"gram term, s={scaling}")
    W, A, B = make_random(40, 64, 24, ad_dtype, ad_dtype, b_scale=1.0, seed=3)
    for scaling in (1e3, -1e4):
        assert_norm_close(gemm_weight_norm_sq(W, A, B, scaling), truth_sq(W, A, B, scaling), f"s={scaling}")
    W, A, B = make_random(64, 1, 81, ad_dtype, ad_dtype, b_scale=1.0, seed=31)
    got = gemm_weight_norm_sq(W, A, B, -8.0)
    assert_norm_close(got, truth_sq(W, A, B, -8.0), "cancellation", scale=term_scale(W, A, B, -8.0))


def test_gemm_strided_zero_scaling_eps_and_validation():
    W, A, B = make_random(29, 75, 18, torch.bfloat16, torch.bfloat16, seed=2)
    W_t, B_t = W.T.contiguous().T, B.T.contiguous().T
    A_s = torch.zeros(18, 150, dtype=A.dtype, device=A.device)
    A_s[:, ::2] = A
    A_s = A_s[:, ::2]
    ours = gemm_weight_norm_sq(W_t, A_s, B_t, 0.7)
    assert_norm_close(ours, truth_sq(W, A, B, 0.7), "strided")
    contiguous = gemm_weight_norm_sq(W, A, B, 0.7)  # the GEMM may sum in another order for other strides
    assert_close_verbose(ours, contiguous, rtol=1e-6, atol=0, name="strided vs contiguous")
    sumsq = triton_row_sumsq(W)
    assert torch.equal(gemm_weight_norm_sq(W, A, B, 0.0), sumsq)
    cached = gemm_weight_norm_sq(W, A, B, 0.0, cached_sumsq=sumsq)
    assert torch.equal(cached, sumsq) and cached.data_ptr() != sumsq.data_ptr()
    finished = gemm_weight_norm_sq(W, A, B, 0.7, eps=1e-6)
    assert torch.equal(finished, ours.double().clamp_min(0).sqrt().float().clamp_min(1e-6))
    with pytest.raises(ValueError, match="W's dtype"):
        gemm_weight_norm_sq(W, A.float(), B, 1.0)
    with pytest.raises(ValueError, match="W's dtype"):
        gemm_weight_norm_sq(W.half(), A.float(), B.float(), 1.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        gemm_weight_norm_sq(W, A[:, :9], B, 1.0)
    assert gemm_weight_norm_sq(W[:0], A, B[:0], 1.0).shape == (0,)


@pytest.mark.parametrize("d_out,d_in,rank", TARGET_SHAPES)
def test_gemm_plan_working_set_and_grid(d_out, d_in, rank):
    """The FROM_GEMM plan at the target shapes: U and G plus the workspace within the memory bound."""
    bound = 4 * (d_out * rank + rank * rank) + 16 * 2**20
    cfg = pick_gemm_config(d_out, d_in, rank, 132, False)
    plan = row_norm.NormLaunchPlan.build(d_out, d_in, rank, cfg)
    assert plan.workspace_bytes(False, from_gemm=True) + 4 * (d_out * rank + rank * rank) <= bound
    assert 1 <= plan.splits <= 4


# ---------------------------------------------------------------------------------------------
# the compiled kernel (sm_90 cubin built on the CPU with Triton's own ptxas)


@pytest.mark.slow
def test_heuristic_configs_compile_for_sm90_without_spills():
    names = [
        "bf16_warm",
        "bf16_cold",
        "bf16_w_fp32_adapters",
        "bf16_transposed_w",
        "bf16_r16_cold",
        "fp32_adapters_r64_cold",
        "bf16_from_gemm",
        "fp16_from_gemm",
        "bf16_warm_probe",
        "bf16_cold_probe",
        "bf16_w_fp32_adapters_probe",
        "bf16_from_gemm_probe",
    ]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("_row_norm_aot.py")), *names],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    expected_dots = {
        "bf16_warm": 5,
        "bf16_cold": 5,
        "bf16_w_fp32_adapters": 15,
        "bf16_transposed_w": 5,
        "bf16_r16_cold": 5,
        "fp32_adapters_r64_cold": 15,
        "bf16_from_gemm": 3,
        "fp16_from_gemm": 5,
    }
    expected_dots.update({f"{name}_probe": expected_dots[name] for name in list(expected_dots)})
    for name in names:
        r = report[name]
        assert r["stack"] == 0, f"{name}: register spills ({r})"
        if "from_gemm" not in name:  # with U and G from GEMMs no d_in loop is left to pipeline
            assert r["async_copies"] >= 8, f"{name}: loads not pipelined ({r})"
        assert r["wgmma"] >= expected_dots[name], f"{name}: no tensor-core dots ({r})"
        assert r["shared"] <= 227 * 1024, f"{name}: more shared memory than sm_90 gives a block ({r})"
