"""The norm kernel's non-finite row repair (``dense_class=True``, the kernel's ``PROBE`` store) against its
PyTorch reference, :func:`~dorafactors.kernels.row_norm_reference.dense_class_of_nonfinite_rows`.

* finite inputs: the kernel with the repair returns bitwise what it returns without it, which is also what
  the old two-step computation (kernel norm, then the PyTorch repair) returned;
* one NaN / +inf / -inf in W, A or B, the ``0 * inf`` cases (an infinite ``A_k`` where ``B_ik == 0``, an
  infinite ``B_ik`` against a zero row ``A_k``), ``s == 0``: every row has the reference's class (finite,
  NaN, +inf), and the finite rows are bitwise the unrepaired kernel's;
* both kernel modes (the one-pass kernel and the GEMM path's ``FROM_GEMM`` mode), bf16/fp16/fp32 adapters,
  cold and cached ``||W||^2``, ``W`` known finite or not, configurations with several row tiles, rank tiles,
  ``d_in`` splits and gram splits;
* the engine's kernel paths run no PyTorch repair at all.

On the CPU the kernels run on Triton's interpreter (small shapes); ``test_gpu_*`` repeats the checks on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from dorafactors.dispatch import config, rules
from dorafactors.kernels import row_norm
from dorafactors.kernels.row_norm import gemm_weight_norm_sq, triton_row_sumsq, triton_weight_norm_sq
from dorafactors.kernels.row_norm_reference import dense_class_of_nonfinite_rows, factored_row_norm_sq, row_sumsq
from dorafactors.norm import engine
from tests.kernels.test_row_norm_kernel import SMALL_SPLIT, counters_are_zero

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAN, INF = float("nan"), float("inf")
EPS = 1e-6  # the engine's clamp for half-precision W

#: (name, kernel entry, W dtype, adapter dtype): every kernel mode and adapter dtype the engine launches
MODES = [
    ("one-pass-bf16", triton_weight_norm_sq, torch.bfloat16, torch.bfloat16),
    ("one-pass-fp16", triton_weight_norm_sq, torch.float16, torch.float16),
    ("one-pass-fp32-adapters", triton_weight_norm_sq, torch.bfloat16, torch.float32),
    ("one-pass-fp16-w-fp32-adapters", triton_weight_norm_sq, torch.float16, torch.float32),
    ("gemm-bf16", gemm_weight_norm_sq, torch.bfloat16, torch.bfloat16),
    ("gemm-fp16", gemm_weight_norm_sq, torch.float16, torch.float16),
]
MODE_IDS = [m[0] for m in MODES]


def _factors(d_out, d_in, rank, w_dtype, ad_dtype, seed, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g).to(w_dtype)
    A = (torch.randn(rank, d_in, generator=g) / d_in**0.5).to(ad_dtype)
    B = (0.5 * torch.randn(d_out, rank, generator=g)).to(ad_dtype)
    return W.to(device), A.to(device), B.to(device)


def _class(t: torch.Tensor) -> torch.Tensor:
    """0 finite, 1 NaN, 2 +inf, 3 -inf."""
    t = t.detach().double().cpu()
    c = torch.zeros(t.shape, dtype=torch.int8)
    c[torch.isnan(t)] = 1
    c[t == INF] = 2
    c[t == -INF] = 3
    return c


def _reference(W, A, B, scaling, weight_finite):
    """The PyTorch path: the reference norm (fp64 factored sum, clamped as the engine does), then the
    reference repair with ``||W||^2`` unless ``W`` is known finite."""
    sq = factored_row_norm_sq(W, A, B, scaling, chunk_columns=W.shape[1], compute_dtype=torch.float64)
    norm = sq.clamp_min(0).sqrt().float().clamp_min(EPS)
    w_sumsq = None if weight_finite else row_sumsq(W, compute_dtype=torch.float64)
    return dense_class_of_nonfinite_rows(norm, A, B, scaling, w_sumsq)


def _run(fn, W, A, B, scaling, *, cached, weight_finite, cfg, dense_class=True, eps=EPS):
    sumsq = triton_row_sumsq(W) if cached else None
    return fn(
        W,
        A,
        B,
        scaling,
        cached_sumsq=sumsq,
        eps=eps,
        dense_class=dense_class,
        weight_finite=weight_finite,
        kernel_config=cfg,
    )


def _check_against_reference(fn, W, A, B, scaling, *, cached, weight_finite, cfg, label):
    """The repaired kernel norm has the reference's class in every row, and where the reference is finite it
    is bitwise the kernel's own unrepaired norm."""
    got = _run(fn, W, A, B, scaling, cached=cached, weight_finite=weight_finite, cfg=cfg)
    want = _reference(W, A, B, scaling, weight_finite)
    c_got, c_want = _class(got), _class(want)
    assert torch.equal(c_got, c_want), (
        f"{label}: classes (0 fin, 1 NaN, 2 +inf) ours {c_got.tolist()} ref {c_want.tolist()}"
    )
    plain = _run(fn, W, A, B, scaling, cached=cached, weight_finite=weight_finite, cfg=cfg, dense_class=False)
    ok = c_want == 0
    assert torch.equal(got.cpu()[ok], plain.cpu()[ok]), f"{label}: a finite row changed"
    assert counters_are_zero()


def _poison_cases(d_out, d_in, rank):
    """``(label, source, flat index, value, zero_b)`` of single entries (first, middle and last of each
    factor; the last rank of A lies in the last rank tile) and the two ``0 * inf`` cases."""
    sizes = {"W": d_out * d_in, "A": rank * d_in, "B": d_out * rank}
    for source, numel in sizes.items():
        for index in (0, numel // 2, numel - 1):
            for value in (NAN, INF, -INF):
                yield f"{source}[{index}]={value}", source, index, value, None
    # an infinite A_k against rows with B_ik == 0 (NaN there, +inf in the others)
    k = rank - 1
    yield "A_k=inf, B_ik=0 in rows 1 and 3", "A", k * d_in + d_in // 2, INF, ("col", k)
    # an infinite B_ik against a zero row A_k (inf * 0: NaN in that row)
    yield "B_ik=inf, A_k=0", "B", 2 * rank + k, INF, ("arow", k)


def _poisoned(W, A, B, source, index, value, zero):
    W, A, B = W.clone(), A.clone(), B.clone()
    if zero is not None:
        what, k = zero
        if what == "col":
            B[1, k] = 0
            B[3, k] = 0
        else:
            A[k].zero_()
    {"W": W, "A": A, "B": B}[source].view(-1)[index] = value
    return W, A, B


# ---------------------------------------------------------------------------------------------
# finite inputs: the repair changes no bit


#: every mode with the interpreter's configuration; with ``SMALL_SPLIT`` (several row tiles, rank tiles,
#: ``d_in`` splits and gram splits) one mode per kind of gram term (half and fp32 ``A``, fp32 G from a GEMM)
FINITE_CASES = [(*mode, None) for mode in MODES] + [(*MODES[i], SMALL_SPLIT) for i in (0, 2, 4)]


@pytest.mark.parametrize(
    "name,fn,w_dtype,ad_dtype,cfg", FINITE_CASES, ids=[c[0] + ("-split16" if c[4] else "") for c in FINITE_CASES]
)
def test_finite_inputs_are_bitwise_the_unrepaired_kernel(name, fn, w_dtype, ad_dtype, cfg):
    """New (repair in the kernel's store) against old (kernel norm, then the PyTorch repair), random finite
    data: cold and cached ``||W||^2``, ``W`` known finite or not, finished norm and its square."""
    d_out, d_in, rank = (40, 70, 20) if cfg is not None else (37, 50, 6)
    W, A, B = _factors(d_out, d_in, rank, w_dtype, ad_dtype, seed=d_in + rank)
    sumsq = triton_row_sumsq(W)
    variants = [(0.7, False, False, EPS), (-2.5, True, True, EPS), (0.7, True, False, None)]
    for scaling, cached, weight_finite, eps in variants:
        kw = dict(cached=cached, weight_finite=weight_finite, cfg=cfg, eps=eps)
        new = _run(fn, W, A, B, scaling, **kw)
        unrepaired = _run(fn, W, A, B, scaling, dense_class=False, **kw)
        old = dense_class_of_nonfinite_rows(unrepaired, A, B, scaling, None if weight_finite else sumsq)
        label = f"{name} s={scaling} cached={cached} W finite={weight_finite} eps={eps}"
        assert torch.isfinite(old).all(), label
        assert torch.equal(new, old), f"{label}: {int((new != old).sum())} rows differ"
    assert counters_are_zero()


# ---------------------------------------------------------------------------------------------
# non-finite inputs: the reference's class in every row


@pytest.mark.parametrize("name,fn,w_dtype,ad_dtype", MODES, ids=MODE_IDS)
def test_one_nonfinite_entry_gives_the_reference_class(name, fn, w_dtype, ad_dtype):
    """One NaN / +inf / -inf in W, A or B and the ``0 * inf`` cases, ``s = 0.7`` (cached ``||W||^2``; ``W``
    known finite where it is)."""
    d_out, d_in, rank = 6, 20, 3
    W0, A0, B0 = _factors(d_out, d_in, rank, w_dtype, ad_dtype, seed=5)
    for label, source, index, value, zero in _poison_cases(d_out, d_in, rank):
        W, A, B = _poisoned(W0, A0, B0, source, index, value, zero)
        weight_finite = source != "W"
        _check_against_reference(
            fn, W, A, B, 0.7, cached=True, weight_finite=weight_finite, cfg=None, label=f"{name} {label}"
        )


@pytest.mark.parametrize(
    "name,fn,w_dtype,ad_dtype", [MODES[0], MODES[2], MODES[4]], ids=[MODE_IDS[i] for i in (0, 2, 4)]
)
def test_nonfinite_entries_across_tiles_and_splits(name, fn, w_dtype, ad_dtype):
    """Several row tiles, two rank tiles (the infinite A row in the second), ``d_in`` splits and gram splits:
    the probe's partials of every rank tile and the gram programs' ``||A_k||^2`` partials of every split
    reach the right rows; cold ``||W||^2`` (summed in the kernel) with ``W`` not known finite."""
    d_out, d_in, rank = 40, 70, 20
    W0, A0, B0 = _factors(d_out, d_in, rank, w_dtype, ad_dtype, seed=9)
    cases = [
        ("A[18, 40]=inf", "A", 18 * d_in + 40, INF, None),
        ("A[17, 69]=nan", "A", 17 * d_in + 69, NAN, None),
        ("A[19, 3]=-inf, B[1,19]=B[3,19]=0", "A", 19 * d_in + 3, -INF, ("col", 19)),
        ("B[33, 16]=inf", "B", 33 * rank + 16, INF, None),
        ("B[2, 19]=inf, A_19=0", "B", 2 * rank + 19, INF, ("arow", 19)),
        ("W[35, 50]=-inf", "W", 35 * d_in + 50, -INF, None),
        ("W[20, 0]=nan", "W", 20 * d_in, NAN, None),
    ]
    for label, source, index, value, zero in cases:
        W, A, B = _poisoned(W0, A0, B0, source, index, value, zero)
        _check_against_reference(
            fn, W, A, B, -1.5, cached=False, weight_finite=False, cfg=SMALL_SPLIT, label=f"{name} {label}"
        )


@pytest.mark.parametrize(
    "name,fn,w_dtype,ad_dtype", [MODES[1], MODES[2], MODES[5]], ids=[MODE_IDS[i] for i in (1, 2, 5)]
)
def test_zero_scaling_gives_the_reference_class(name, fn, w_dtype, ad_dtype):
    """``s == 0``: ``0 * inf`` is NaN (a row of ``B @ A`` that is not finite makes the dense row NaN); no norm
    kernel runs there, the host side applies the reference."""
    d_out, d_in, rank = 6, 20, 3
    W0, A0, B0 = _factors(d_out, d_in, rank, w_dtype, ad_dtype, seed=6)
    for label, source, index, value, zero in _poison_cases(d_out, d_in, rank):
        if index != 0 and zero is None:
            continue
        W, A, B = _poisoned(W0, A0, B0, source, index, value, zero)
        for cached in (False, True):
            _check_against_reference(
                fn, W, A, B, 0.0, cached=cached, weight_finite=source != "W", cfg=None, label=f"{name} s=0 {label}"
            )


@pytest.mark.parametrize("path", ["triton", "gemm"])
@pytest.mark.parametrize("ad_dtype", [torch.bfloat16, torch.float32])
def test_engine_kernel_paths_repair_in_the_kernel(path, ad_dtype, monkeypatch):
    """``weight_norm`` on the kernel paths returns the reference's classes without running the PyTorch
    repair (it would raise here), with cached ``||W||^2``, ``W`` known finite or not, and uncached."""
    if path == "gemm" and ad_dtype == torch.float32:
        pytest.skip("fp32 adapters always take the one-pass kernel")
    monkeypatch.setenv("PEFT_DORA_FUSED", "1")
    config.invalidate_cache()
    if path == "gemm":
        monkeypatch.setattr(rules, "NORM_GEMM_MIN_DIN_RANK", 0)

    def no_torch_repair(*args, **kwargs):
        raise AssertionError("the PyTorch repair ran on a kernel path")

    monkeypatch.setattr(engine, "dense_class_of_nonfinite_rows", no_torch_repair)
    monkeypatch.setattr(row_norm, "dense_class_of_nonfinite_rows", no_torch_repair)
    d_out, d_in, rank = 6, 20, 3
    W0, A0, B0 = _factors(d_out, d_in, rank, torch.bfloat16, ad_dtype, seed=7)
    cases = [
        ("A[1, 4]=inf, B[1,1]=B[3,1]=0", "A", 1 * d_in + 4, INF, ("col", 1)),
        ("B[4, 0]=-inf", "B", 4 * rank, -INF, None),
        ("W[2, 7]=nan", "W", 2 * d_in + 7, NAN, None),
    ]
    for label, source, index, value, zero in cases:
        W, A, B = _poisoned(W0, A0, B0, source, index, value, zero)
        assert engine.norm_path(W, A, B) == path
        sumsq = engine.weight_sumsq(W)
        finite = engine.weight_rows_finite(sumsq)
        want = _class(_reference(W.cpu(), A.cpu(), B.cpu(), 0.7, weight_finite=finite))
        for kw in (dict(cached_sumsq=sumsq, weight_rows_finite=finite), dict(cached_sumsq=sumsq), {}):
            got = engine.weight_norm(W, A, B, 0.7, **kw)
            assert torch.equal(_class(got), want), f"{path} {label} {sorted(kw)}: {_class(got).tolist()}"


# ---------------------------------------------------------------------------------------------
# GPU: the compiled kernels


@pytest.mark.gpu
@pytest.mark.parametrize("name,fn,w_dtype,ad_dtype", MODES, ids=MODE_IDS)
def test_gpu_repair_matches_the_reference(name, fn, w_dtype, ad_dtype):
    """CUDA, the heuristic configurations: finite inputs bitwise equal to the unrepaired kernel followed by
    the PyTorch repair; every single non-finite entry and ``0 * inf`` case of a shape with several rank
    tiles (r = 160 > 128) has the reference's class (the reference on the CPU, in fp64)."""
    d_out, d_in, rank = 300, 512, 160
    W0, A0, B0 = _factors(d_out, d_in, rank, w_dtype, ad_dtype, seed=11, device="cuda")
    sumsq = triton_row_sumsq(W0)
    for cached in (False, True):
        for weight_finite in (False, True):
            kw = dict(cached=cached, weight_finite=weight_finite, cfg=None)
            new = _run(fn, W0, A0, B0, 0.7, **kw)
            unrepaired = _run(fn, W0, A0, B0, 0.7, dense_class=False, **kw)
            old = dense_class_of_nonfinite_rows(unrepaired, A0, B0, 0.7, None if weight_finite else sumsq)
            assert torch.equal(new, old), f"{name} cached={cached} W finite={weight_finite}"
    for scaling in (0.7, 0.0):
        for label, source, index, value, zero in _poison_cases(d_out, d_in, rank):
            W, A, B = _poisoned(W0, A0, B0, source, index, value, zero)
            got = _run(fn, W, A, B, scaling, cached=True, weight_finite=source != "W", cfg=None)
            want = _reference(W.cpu(), A.cpu(), B.cpu(), scaling, source != "W")
            assert torch.equal(_class(got), _class(want)), f"{name} s={scaling} {label}"
            plain = _run(fn, W, A, B, scaling, cached=True, weight_finite=True, cfg=None, dense_class=False)
            ok = _class(want) == 0
            assert torch.equal(got.cpu()[ok], plain.cpu()[ok]), f"{name} s={scaling} {label}: a finite row changed"
    torch.cuda.synchronize()
    assert counters_are_zero()
