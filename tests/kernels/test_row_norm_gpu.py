"""The tensor-core factored norm on a GPU, at the Llama-sized target shapes: accuracy against fp64 truth,
bitwise determinism, peak transient memory, concurrent streams and CUDA graphs (``gpu``-marked: skipped on
the CPU, where ``test_row_norm_kernel.py`` runs the same checks on the interpreter at small shapes).
"""

from __future__ import annotations

import math

import pytest
import torch

from dorafactors.kernels.row_norm import gemm_weight_norm_sq, plan_for, triton_row_sumsq, triton_weight_norm_sq
from dorafactors.norm import engine
from tests._tolerances import assert_close_verbose
from tests.kernels.test_row_norm_kernel import (
    TARGET_SHAPES,
    assert_norm_close,
    counters_are_zero,
    make_exact,
    truth_sq,
)


def _gpu_inputs(d_out, d_in, rank, ad_dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    W = (torch.randn(d_out, d_in, device="cuda", generator=g) * 0.02).bfloat16()
    A = (torch.randn(rank, d_in, device="cuda", generator=g) / math.sqrt(d_in)).to(ad_dtype)
    B = (torch.randn(d_out, rank, device="cuda", generator=g) * 0.01).to(ad_dtype)
    return W, A, B


@pytest.mark.gpu
@pytest.mark.parametrize("d_out,d_in,rank", TARGET_SHAPES[:6])
@pytest.mark.parametrize("ad_dtype", [torch.bfloat16, torch.float32])
def test_gpu_target_shapes_accuracy_determinism(d_out, d_in, rank, ad_dtype):
    W, A, B = _gpu_inputs(d_out, d_in, rank, ad_dtype)
    scaling = 2.0
    truth = truth_sq(W, A, B, scaling)
    sumsq = triton_row_sumsq(W)
    cold = triton_weight_norm_sq(W, A, B, scaling)
    cold_again = triton_weight_norm_sq(W, A, B, scaling)
    warm = triton_weight_norm_sq(W, A, B, scaling, cached_sumsq=sumsq)
    again = triton_weight_norm_sq(W, A, B, scaling, cached_sumsq=sumsq)
    err = assert_norm_close(cold, truth, f"{d_out}x{d_in} r{rank} {ad_dtype}")
    print(f"\n{d_out}x{d_in} r{rank} {ad_dtype}: rel error of the norm {err:.3e}")
    assert torch.equal(cold, cold_again) and torch.equal(warm, again)
    assert_norm_close(warm, truth, f"warm {d_out}x{d_in} r{rank} {ad_dtype}")
    assert_close_verbose(sumsq, W.double().square().sum(1), rtol=1e-6, atol=0, name="row sumsq")
    torch.cuda.synchronize()
    assert counters_are_zero()


@pytest.mark.gpu
@pytest.mark.parametrize("d_out,d_in,rank", TARGET_SHAPES[:6])
@pytest.mark.parametrize("ad_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kernel", [triton_weight_norm_sq, gemm_weight_norm_sq], ids=["one-pass", "gemm"])
def test_gpu_repair_leaves_finite_rows_bitwise(d_out, d_in, rank, ad_dtype, kernel):
    """The in-kernel non-finite repair (``PROBE``) on finite factors: bitwise the norm without it, in every one
    of three runs (a probe computed beside the tiles' dots once made every row wrong and run-dependent)."""
    W, A, B = _gpu_inputs(d_out, d_in, rank, ad_dtype, seed=1)
    sumsq = triton_row_sumsq(W)
    plain = kernel(W, A, B, 2.0, cached_sumsq=sumsq, eps=1e-6)
    for known_finite in (True, False):
        for _ in range(3):
            repaired = kernel(
                W, A, B, 2.0, cached_sumsq=sumsq, eps=1e-6, repair_nonfinite=True, weight_known_finite=known_finite
            )
            assert torch.equal(repaired, plain), (d_out, d_in, rank, ad_dtype, known_finite)
    torch.cuda.synchronize()
    assert counters_are_zero()


@pytest.mark.gpu
@pytest.mark.parametrize("d_out,d_in,rank", TARGET_SHAPES[:6])
def test_gpu_peak_transient_memory(d_out, d_in, rank):
    W, A, B = _gpu_inputs(d_out, d_in, rank, torch.bfloat16)
    sumsq = triton_row_sumsq(W)
    triton_weight_norm_sq(W, A, B, 2.0)  # compile and allocate the counters outside the measurement
    for cached in (None, sumsq):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = triton_weight_norm_sq(W, A, B, 2.0, cached_sumsq=cached)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        bound = 4 * (d_out * rank + rank * rank) + 16 * 2**20
        assert peak <= bound, f"peak transient {peak / 2**20:.1f} MiB > bound {bound / 2**20:.1f} MiB"
        del out


@pytest.mark.gpu
def test_gpu_strided_and_engine():
    W, A, B = _gpu_inputs(4096, 1024, 64, torch.float32)
    truth = truth_sq(W, A, B, -0.5)
    ours = triton_weight_norm_sq(W.T.contiguous().T, A.T.contiguous().T, B.T.contiguous().T, -0.5)
    assert_norm_close(ours, truth, "strided on GPU")
    assert engine.norm_path(W, A, B) == "triton"
    assert_norm_close(engine.weight_norm(W, A, B, -0.5).square(), truth, "engine on GPU", rtol=2e-5)


@pytest.mark.gpu
def test_gpu_two_streams_and_cuda_graph():
    """Per-stream ticket buffers: concurrent launches on two streams; a captured graph replays correctly."""
    W, A, B = _gpu_inputs(2048, 2048, 128, torch.bfloat16)
    W2, A2, B2 = _gpu_inputs(2048, 2048, 128, torch.bfloat16, seed=1)
    ref1 = triton_weight_norm_sq(W, A, B, 1.0)
    ref2 = triton_weight_norm_sq(W2, A2, B2, 1.0)
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    torch.cuda.synchronize()
    outs1, outs2 = [], []
    for _ in range(20):
        with torch.cuda.stream(s1):
            outs1.append(triton_weight_norm_sq(W, A, B, 1.0))
        with torch.cuda.stream(s2):
            outs2.append(triton_weight_norm_sq(W2, A2, B2, 1.0))
    torch.cuda.synchronize()
    assert all(torch.equal(o, ref1) for o in outs1) and all(torch.equal(o, ref2) for o in outs2)

    static = {}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        triton_weight_norm_sq(W, A, B, 1.0)  # warm up (compile, counters) on the capture stream
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static["out"] = triton_weight_norm_sq(W, A, B, 1.0)
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static["out"], ref1)
    assert counters_are_zero()


@pytest.mark.gpu
@pytest.mark.parametrize("ad_dtype", [torch.bfloat16, torch.float32])
def test_gpu_exact_inputs_bitwise_at_size(ad_dtype):
    """Exact data at a size where the default plan splits d_in and the gram tiles: races would show."""
    W, A, B = make_exact(4096, 2048, 384, torch.bfloat16, ad_dtype, seed=7, device="cuda")
    plan = plan_for(4096, 2048, 384, a_is_fp32=ad_dtype == torch.float32)
    assert plan.splits > 1 or plan.gram_splits > 1, plan
    truth = truth_sq(W, A, B, 0.5)
    assert truth.abs().max() < 2**24
    for _ in range(10):
        assert torch.equal(triton_weight_norm_sq(W, A, B, 0.5), truth.float())
    torch.cuda.synchronize()
    assert counters_are_zero()


def _gemm_twice_with_peak(W, A, B, sumsq):
    """``gemm_weight_norm_sq`` (s = 2) twice: the first call compiles and allocates outside the measurement;
    returns both results and the second call's peak transient memory in bytes."""
    first = gemm_weight_norm_sq(W, A, B, 2.0, cached_sumsq=sumsq)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    again = gemm_weight_norm_sq(W, A, B, 2.0, cached_sumsq=sumsq)
    torch.cuda.synchronize()
    return first, again, torch.cuda.max_memory_allocated() - base


@pytest.mark.gpu
@pytest.mark.parametrize("d_out,d_in,rank", TARGET_SHAPES[:6])
def test_gpu_gemm_path_accuracy_memory_determinism(d_out, d_in, rank):
    """The engine's path for bf16 adapters at the target shapes: 1e-5 of fp64 truth, repeatable bitwise,
    peak transient memory within the bound (the fp32 U and G included)."""
    W, A, B = _gpu_inputs(d_out, d_in, rank, torch.bfloat16)
    from dorafactors.dispatch import rules

    gemm = d_in * rank >= rules.NORM_GEMM_MIN_DIN_RANK or d_out * d_in * rank >= rules.NORM_GEMM_MIN_MACS
    expected = "gemm" if gemm else "triton"
    assert engine.norm_path(W, A, B) == expected
    sumsq = triton_row_sumsq(W)
    first, again, peak = _gemm_twice_with_peak(W, A, B, sumsq)
    bound = 4 * (d_out * rank + rank * rank) + 16 * 2**20
    assert peak <= bound, f"peak transient {peak / 2**20:.1f} MiB > bound {bound / 2**20:.1f} MiB"
    assert torch.equal(first, again)
    err = assert_norm_close(again, truth_sq(W, A, B, 2.0), f"gemm {d_out}x{d_in} r{rank}")
    print(f"\ngemm {d_out}x{d_in} r{rank}: rel error of the norm {err:.3e}, peak {peak / 2**20:.2f} MiB")
    cold = gemm_weight_norm_sq(W, A, B, 2.0)
    assert torch.equal(cold, again)
    assert counters_are_zero()


@pytest.mark.gpu
@pytest.mark.parametrize("d_out,d_in,rank", [(1024, 4096, 384), *TARGET_SHAPES[:6]])
def test_gpu_fp32_adapter_gemm_path_accuracy_memory_determinism(d_out, d_in, rank):
    """fp32 adapters on a bf16 W (PEFT's default dtypes) through the GEMM path (U and G from A's exact bf16
    parts): as close to fp64 truth as the one-pass kernel's in-register split (1e-5, and within 2e-6 of it),
    repeatable bitwise, peak transient memory within the bound with the parts and their products."""
    from dorafactors.dispatch import rules

    W, A, B = _gpu_inputs(d_out, d_in, rank, torch.float32)
    expected = "gemm" if d_out * d_in * rank >= rules.NORM_GEMM_FP32_MIN_MACS else "triton"
    assert engine.norm_path(W, A, B) == expected
    sumsq = triton_row_sumsq(W)
    first, again, peak = _gemm_twice_with_peak(W, A, B, sumsq)
    # U, G, the bf16 parts of A, U3 [d_out, 3r] and G9 [3r, 3r] (fp32), plus the kernel's workspace
    bound = 4 * (4 * d_out * rank + 10 * rank * rank) + 6 * rank * d_in + 16 * 2**20
    assert peak <= bound, f"peak transient {peak / 2**20:.1f} MiB > bound {bound / 2**20:.1f} MiB"
    assert torch.equal(first, again)
    truth = truth_sq(W, A, B, 2.0)
    err = assert_norm_close(again, truth, f"fp32-adapter gemm {d_out}x{d_in} r{rank}")
    one_pass = triton_weight_norm_sq(W, A, B, 2.0, cached_sumsq=sumsq)
    err_one_pass = assert_norm_close(one_pass, truth, f"fp32-adapter one-pass {d_out}x{d_in} r{rank}")
    assert_norm_close(again, one_pass.double(), "gemm vs one-pass", rtol=2e-6)
    print(f"\nfp32-adapter gemm {d_out}x{d_in} r{rank}: rel error {err:.3e} (one-pass {err_one_pass:.3e}), "
          f"peak {peak / 2**20:.2f} MiB")  # fmt: skip
    assert torch.equal(gemm_weight_norm_sq(W, A, B, 2.0), again)
    assert counters_are_zero()


@pytest.mark.gpu
def test_gpu_gemm_exact_inputs_bitwise_and_cuda_graph():
    """Exact data: the GPU GEMM path returns the fp64 truth bitwise, also replayed from a CUDA graph."""
    W, A, B = make_exact(4096, 2048, 384, torch.bfloat16, torch.bfloat16, seed=7, device="cuda")
    truth = truth_sq(W, A, B, 0.5).float()
    sumsq = triton_row_sumsq(W)
    exact = gemm_weight_norm_sq(W, A, B, 0.5, cached_sumsq=sumsq)
    assert torch.equal(exact, truth)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        gemm_weight_norm_sq(W, A, B, 0.5, cached_sumsq=sumsq)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gemm_weight_norm_sq(W, A, B, 0.5, cached_sumsq=sumsq)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, truth)
    assert counters_are_zero()
