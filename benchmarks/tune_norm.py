"""Measure and tune the tensor-core factored norm on one GPU (``python benchmarks/tune_norm.py``).

For each shape (the issue's five, 8192x28672, and ranks 16..512 at 4096^2) it times, with
``triton.testing.do_bench`` (median; the L2 cache is flushed before every run):

* ``ours_warm``: ``triton_weight_norm_sq(..., eps=1e-6)`` (the finished norm, as the engine calls it) with a
  cached ``||W||^2`` (what training pays per optimizer step),
* ``ours_cold``: the same with ``||W||^2`` fused into the pass over W,
* ``gemm``: a plain bf16 ``W @ A.T`` (``torch.matmul``), the floor the issue measures against,
* ``stock``: stock PEFT 0.21's norm (``lora_B(lora_A(eye(d_in))).T``, then ``linalg.norm(W + s*lora_weight)``),
* ``ref``: the PyTorch reference ``factored_row_norm_sq`` (fp32, chunked by ``PEFT_DORA_NORM_CHUNK_MB``),

plus a back-to-back time (50 calls between two events, no flush: shows host overhead when it dominates),
peak transient memory (``max_memory_allocated`` delta, output included), relative error of the norm
against fp64 truth for bf16 and fp32 adapters, kernel launches per call (torch.profiler), and a small
config search. A compact table comes last; ``$OUT/norm_tuning.json`` gets everything when ``$OUT`` is set.
Meant to finish in under 3 minutes on an H100 (``--quick`` for a smaller run).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's dorafactors

import torch
import triton
from triton.testing import do_bench

from dorafactors.dispatch import config as df_config
from dorafactors.kernels import row_norm
from dorafactors.kernels.row_norm import NormKernelConfig, triton_row_sumsq, triton_weight_norm_sq
from dorafactors.kernels.row_norm_reference import factored_row_norm_sq, plan_chunk_columns

ISSUE_SHAPES = [(4096, 4096, 384), (8192, 8192, 384), (14336, 4096, 384), (4096, 14336, 384), (8192, 8192, 768)]
EXTRA_SHAPES = [(8192, 28672, 384)] + [(4096, 4096, r) for r in (16, 64, 128, 256, 512)]
#: Shapes of the config search (bf16, warm).
TUNE_SHAPES = [(4096, 4096, 384), (8192, 8192, 768), (8192, 28672, 384)]
SCALING = 2.0
EPS = 1e-6  # the engine's clamp for half-precision weights


def bench(fn, rep_ms: int) -> float:
    return float(do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms, return_mode="median"))


def back_to_back(fn, calls: int = 50) -> float:
    """ms per call of ``calls`` launches queued back to back (no flush): host-bound shapes show it."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def peak_bytes(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return int(peak)


def launches(fn) -> int:
    fn()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def make_inputs(d_out, d_in, rank, ad_dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    W = (torch.randn(d_out, d_in, device="cuda", generator=g) * 0.02).bfloat16()
    A = (torch.randn(rank, d_in, device="cuda", generator=g) / math.sqrt(d_in)).to(ad_dtype)
    B = (torch.randn(d_out, rank, device="cuda", generator=g) * 0.01).to(ad_dtype)
    return W, A, B


@torch.no_grad()
def truth_norm(W, A, B, scaling, rows=1024) -> torch.Tensor:
    """fp64 row norm of ``W + s B A`` of the given inputs, in row blocks (bounded memory)."""
    A64 = A.double()
    out = torch.empty(W.shape[0], dtype=torch.float64, device=W.device)
    for r0 in range(0, W.shape[0], rows):
        blk = W[r0 : r0 + rows].double() + scaling * (B[r0 : r0 + rows].double() @ A64)
        out[r0 : r0 + rows] = blk.square().sum(1).sqrt()
    return out


def rel_err(ours: torch.Tensor, truth: torch.Tensor) -> float:
    ours = ours.double()
    if not torch.isfinite(ours).all():
        return float("inf")
    return float((ours - truth).norm() / truth.norm())


def stock_fns(W, A, B, scaling):
    """Stock PEFT 0.21's DoRA norm, called through its own DoraLinearLayer methods."""
    from peft.tuners.lora.dora import DoraLinearLayer

    layer = DoraLinearLayer(fan_in_fan_out=False)
    lin_A = torch.nn.Linear(A.shape[1], A.shape[0], bias=False, device="cuda", dtype=A.dtype)
    lin_B = torch.nn.Linear(B.shape[1], B.shape[0], bias=False, device="cuda", dtype=B.dtype)
    lin_A.weight.data.copy_(A)
    lin_B.weight.data.copy_(B)

    @torch.no_grad()
    def stock():
        lora_weight = layer.get_lora_weight(lora_A=lin_A, lora_B=lin_B)
        return layer.get_weight_norm(W, lora_weight.detach(), scaling)

    return stock


def ref_fn(W, A, B, scaling):
    plan = plan_chunk_columns(
        W.shape[0],
        W.shape[1],
        A.shape[0],
        weight_dtype=W.dtype,
        lora_dtype=torch.promote_types(A.dtype, B.dtype),
        budget_bytes=df_config.get_dora_norm_threshold_bytes(),
        need_sumsq=False,
    )
    sumsq = triton_row_sumsq(W)
    return lambda: factored_row_norm_sq(W, A, B, scaling, chunk_columns=plan.chunk_columns, weight_sumsq=sumsq)


def measure_shape(d_out, d_in, rank, ad_dtype, rep_ms, *, with_baselines: bool) -> dict:
    W, A, B = make_inputs(d_out, d_in, rank, ad_dtype)
    sumsq = triton_row_sumsq(W)
    # eps=: the finished norm, exactly what dorafactors.norm.engine.weight_norm launches
    warm = lambda: triton_weight_norm_sq(W, A, B, SCALING, cached_sumsq=sumsq, eps=EPS)  # noqa: E731
    cold = lambda: triton_weight_norm_sq(W, A, B, SCALING, eps=EPS)  # noqa: E731
    truth = truth_norm(W, A, B, SCALING)
    plan = row_norm.plan_for(d_out, d_in, rank, a_is_fp32=ad_dtype == torch.float32)
    row = {
        "d_out": d_out,
        "d_in": d_in,
        "rank": rank,
        "adapters": str(ad_dtype).replace("torch.", ""),
        "config": dataclasses.asdict(plan.config),
        "programs": plan.programs,
        "err_ours": rel_err(warm(), truth),
        "err_ours_cold": rel_err(cold(), truth),
        "ms_ours_warm": bench(warm, rep_ms),
        "ms_ours_cold": bench(cold, rep_ms),
        "ms_row_sumsq": bench(lambda: triton_row_sumsq(W), rep_ms),
        "b2b_ours_warm": back_to_back(warm),
        "peak_ours_warm": peak_bytes(warm),
        "peak_ours_cold": peak_bytes(cold),
        "launches_ours_warm": launches(warm),
        "launches_ours_cold": launches(cold),
    }
    sq = torch.empty(d_out, dtype=torch.float32, device=W.device)
    c = triton_weight_norm_sq(W, A, B, SCALING, out_sumsq=sq)
    row["cold_warm_bitwise"] = bool(torch.equal(c, triton_weight_norm_sq(W, A, B, SCALING, cached_sumsq=sq)))
    row["deterministic"] = bool(torch.equal(warm(), warm()))
    if with_baselines:
        A16 = A.bfloat16()
        row["ms_gemm"] = bench(lambda: torch.matmul(W, A16.T), rep_ms)
        stock = stock_fns(W, A, B, SCALING)
        row["err_stock"] = rel_err(stock(), truth)
        row["ms_stock"] = bench(stock, rep_ms)
        row["b2b_stock"] = back_to_back(stock, 10)
        row["peak_stock"] = peak_bytes(stock)
        row["launches_stock"] = launches(stock)
        ref = ref_fn(W, A, B, SCALING)
        row["err_ref"] = rel_err(ref().clamp_min(0).sqrt(), truth)
        row["ms_ref"] = bench(ref, rep_ms)
        row["peak_ref"] = peak_bytes(ref)
        row["ratio_warm_gemm"] = row["ms_ours_warm"] / row["ms_gemm"]
        row["ratio_cold_gemm"] = row["ms_ours_cold"] / row["ms_gemm"]
        row["ratio_warm_stock"] = row["ms_ours_warm"] / row["ms_stock"]
        row["ratio_cold_stock"] = row["ms_ours_cold"] / row["ms_stock"]
    row["mem_bound"] = 4 * (d_out * rank + rank * rank) + 16 * 2**20
    return row


def kernel_table(fn, calls: int = 3) -> list[tuple[str, float, int]]:
    """(kernel name, device us per call, launches per call) of ``fn``, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    acc: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            acc.setdefault(e.name[:70], []).append(e.device_time)
    return sorted(((k, sum(v) / calls, len(v) // calls) for k, v in acc.items()), key=lambda t: -t[1])


def probe_gemm_path(shapes, rep_ms: int) -> list[dict]:
    """The GEMM path of the engine (``gemm_weight_norm_sq``) piece by piece, per shape (see :func:`_probe_one`)."""
    out = []
    for shape in shapes:
        out.append(_probe_one(*shape, rep_ms))
        torch.cuda.empty_cache()
    return out


def _probe_one(d_out: int, d_in: int, rank: int, rep_ms: int) -> dict:
    """The fp32-output GEMM alone, the finish kernel alone (U given), the whole path, the one-pass kernel and
    the bf16 GEMM floor: do_bench (L2 flushed), back-to-back and host time per call; the kernels of one call."""
    W, A, B = make_inputs(d_out, d_in, rank, torch.bfloat16)
    sumsq = triton_row_sumsq(W)
    U = (row_norm.matmul_fp32(W, A), row_norm.matmul_fp32(A, A))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cfg = row_norm.pick_gemm_config(d_out, d_in, rank, sms, False)
    plan = row_norm.NormLaunchPlan.build(d_out, d_in, rank, cfg)
    fns = {
        "floor_bf16": lambda: W @ A.T,
        "u_fp32": lambda: row_norm.matmul_fp32(W, A),
        "gram_fp32": lambda: row_norm.matmul_fp32(A, A),
        "finish": lambda: row_norm._launch(plan, W, A, B, U, sumsq, None, SCALING, EPS, False),
        "gemm_path": lambda: row_norm.gemm_weight_norm_sq(W, A, B, SCALING, cached_sumsq=sumsq, eps=EPS),
        "one_pass": lambda: triton_weight_norm_sq(W, A, B, SCALING, cached_sumsq=sumsq, eps=EPS),
    }
    row = {"shape": [d_out, d_in, rank], "config": dataclasses.asdict(cfg), "programs": plan.programs}
    for name, fn in fns.items():
        fn()
        torch.cuda.synchronize()
        row[f"ms_{name}"] = bench(fn, rep_ms)
        row[f"b2b_{name}"] = back_to_back(fn)
        t = time.perf_counter()
        for _ in range(20):
            fn()
        row[f"host_us_{name}"] = (time.perf_counter() - t) / 20 * 1e6
        torch.cuda.synchronize()
    row["kernels_gemm_path"] = kernel_table(fns["gemm_path"])
    timings = ", ".join(
        f"{k} {row['ms_' + k] * 1e3:.1f}/{row['b2b_' + k] * 1e3:.1f}/{row['host_us_' + k]:.0f}" for k in fns
    )
    print(f"gemm probe {d_out}x{d_in} r{rank} {cfg}: {timings} (us: do_bench / back-to-back / host)", flush=True)
    for name, us, n in row["kernels_gemm_path"]:
        print(f"    {us:8.1f} us  x{n}  {name}")
    return row


def _graph_ms(fn) -> float:
    """Device time per call from a CUDA-graph replay (no host launch cost in it)."""
    from triton.testing import do_bench_cudagraph

    return float(do_bench_cudagraph(fn, rep=20, return_mode="median"))


def sweep_grid(shape: tuple[int, int, int]) -> list[tuple[str, NormKernelConfig]]:
    """One-pass configs around the heuristic's (runtime split counts share one compiled kernel), and
    finish-kernel (``U_GIVEN``) configs around ``pick_gemm_config``'s."""
    d_out, d_in, rank = shape
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    base = row_norm.pick_config(d_out, d_in, rank, False, sms, False)
    out = [("one_pass", base)]
    for stages in (3, 4):
        for splits in (1, 2, 3, 4, 6):
            for gram_splits in sorted({1, 4, 8, 16, base.gram_splits}):
                cfg = dataclasses.replace(base, num_stages=stages, splits=splits, gram_splits=gram_splits)
                if cfg != base:
                    out.append(("one_pass", cfg))
    fbase = row_norm.pick_gemm_config(d_out, d_in, rank, sms, False)
    out.append(("finish", fbase))
    for warps in (4, 8):
        for splits in (1, 2, 3, 4, 6):
            for stages in (2, 3):
                cfg = dataclasses.replace(fbase, num_warps=warps, splits=splits, num_stages=stages)
                if cfg != fbase:
                    out.append(("finish", cfg))
    return out


def sweep_configs(shapes, deadline: float) -> list[dict]:
    """Every :func:`sweep_grid` config: device time (graph replay), do_bench time, agreement with the default."""
    rows = []
    for shape in shapes:
        d_out, d_in, rank = shape
        W, A, B = make_inputs(d_out, d_in, rank, torch.bfloat16)
        sumsq = triton_row_sumsq(W)
        U = (row_norm.matmul_fp32(W, A), row_norm.matmul_fp32(A, A))
        ref = triton_weight_norm_sq(W, A, B, SCALING, cached_sumsq=sumsq, eps=EPS).double()
        floor_graph = _graph_ms(lambda W=W, A=A: W @ A.T)
        u_graph = _graph_ms(lambda W=W, A=A: (row_norm.matmul_fp32(W, A), row_norm.matmul_fp32(A, A)))
        print(f"sweep {shape}: bf16 GEMM floor {floor_graph * 1e3:.1f} us (graph), U+G GEMMs {u_graph * 1e3:.1f} us")
        for kind, cfg in sweep_grid(shape):
            if time.monotonic() > deadline:
                break
            plan = row_norm.NormLaunchPlan.build(d_out, d_in, rank, cfg)
            if kind == "one_pass":
                fn = functools.partial(
                    triton_weight_norm_sq, W, A, B, SCALING, cached_sumsq=sumsq, eps=EPS, kernel_config=cfg
                )
            else:
                fn = functools.partial(row_norm._launch, plan, W, A, B, U, sumsq, None, SCALING, EPS, False)
            try:
                diff = float((fn().double() - ref).abs().max() / ref.abs().max())
                row = {"shape": list(shape), "kind": kind, "config": dataclasses.asdict(cfg)}
                row.update(graph_ms=_graph_ms(fn), ms=bench(fn, 20), max_rel_diff=diff, floor_graph_ms=floor_graph)
                row["gemm_graph_ms"] = u_graph
            except Exception as exc:  # a config the compiler rejects
                row = {"shape": list(shape), "kind": kind, "config": dataclasses.asdict(cfg), "error": str(exc)[:200]}
            rows.append(row)
            c = cfg
            desc = f"{kind:8s} w{c.num_warps} st{c.num_stages} S{c.splits} SG{c.gram_splits}"
            val = (
                f"graph {row['graph_ms'] * 1e3:7.1f} us, do_bench {row['ms'] * 1e3:7.1f} us, diff {row['max_rel_diff']:.1e}"
                if "graph_ms" in row
                else row["error"]
            )
            print(f"  {desc}: {val}", flush=True)
        for kind in ("one_pass", "finish"):
            timed = [r for r in rows if r["shape"] == list(shape) and r["kind"] == kind and "graph_ms" in r]
            if timed:
                best = min(timed, key=lambda r: r["graph_ms"])
                extra = u_graph if kind == "finish" else 0.0
                print(
                    f"sweep {shape} best {kind}: {best['config']} graph {best['graph_ms'] * 1e3:.1f} us "
                    f"(default {timed[0]['graph_ms'] * 1e3:.1f}); path/floor {(best['graph_ms'] + extra) / floor_graph:.2f}x",
                    flush=True,
                )
        del W, A, B, U
        torch.cuda.empty_cache()
    return rows


def gemm_sweep(shapes, deadline: float) -> list[dict]:
    """The whole GEMM path (``gemm_weight_norm_sq``, warm) per variant: the default (G from a second GEMM),
    other ``splits``, the earlier 8-warp 64 x 2 finish, G from gram programs, and the one-pass kernel;
    device time (graph replay), do_bench time, host time per call, and the max difference to the default
    (bitwise expected between variants of the same maths up to summation order)."""
    rows = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for shape in shapes:
        d_out, d_in, rank = shape
        W, A, B = make_inputs(d_out, d_in, rank, torch.bfloat16)
        sumsq = triton_row_sumsq(W)
        truth = truth_norm(W, A, B, SCALING)
        floor_graph = _graph_ms(lambda W=W, A=A: W @ A.T)
        floor_bench = bench(lambda W=W, A=A: W @ A.T, 30)
        u_graph = _graph_ms(lambda W=W, A=A: row_norm.matmul_fp32(W, A))
        base = row_norm.pick_gemm_config(d_out, d_in, rank, sms, False)
        variants: list[tuple[str, dict]] = [("default", {})]
        gram_cfg = row_norm.pick_gemm_config(d_out, d_in, rank, sms, False, True)
        variants.append(("gram_programs", {"gram_from_gemm": False, "kernel_config": gram_cfg}))
        for sp in sorted({1, 2, 3} - {base.splits}):
            variants.append((f"S{sp}", {"kernel_config": dataclasses.replace(base, splits=sp)}))
        variants.append(
            ("w8_bg64x2", {"kernel_config": dataclasses.replace(base, num_warps=8, bg_chunk=64, bg_stages=2)})
        )
        print(
            f"gemm-sweep {shape}: floor {floor_graph * 1e3:.1f} us graph / {floor_bench * 1e3:.1f} us do_bench, "
            f"U GEMM {u_graph * 1e3:.1f} us graph; default {base}",
            flush=True,
        )
        ref = None
        for name, kw in [*variants, ("one_pass", None)]:
            if time.monotonic() > deadline:
                break
            if kw is None:
                fn = functools.partial(triton_weight_norm_sq, W, A, B, SCALING, cached_sumsq=sumsq, eps=EPS)
            else:
                fn = functools.partial(
                    row_norm.gemm_weight_norm_sq, W, A, B, SCALING, cached_sumsq=sumsq, eps=EPS, **kw
                )
            row = {"shape": list(shape), "variant": name, "floor_graph_ms": floor_graph, "floor_ms": floor_bench}
            try:
                out = fn()
                torch.cuda.synchronize()
                if ref is None:
                    ref = out.clone()
                row["max_rel_diff_vs_default"] = float((out.double() - ref.double()).abs().max() / ref.abs().max())
                row["rel_err_vs_fp64"] = rel_err(out, truth)
                row["graph_ms"] = _graph_ms(fn)
                row["ms"] = bench(fn, 30)
                t = time.perf_counter()
                for _ in range(20):
                    fn()
                row["host_us"] = (time.perf_counter() - t) / 20 * 1e6
                torch.cuda.synchronize()
                print(
                    f"  {name:10s}: graph {row['graph_ms'] * 1e3:7.1f} us ({row['graph_ms'] / floor_graph:.2f}x floor), "
                    f"do_bench {row['ms'] * 1e3:7.1f} us ({row['ms'] / floor_bench:.2f}x), host {row['host_us']:5.0f} us, "
                    f"err {row['rel_err_vs_fp64']:.1e}, diff {row['max_rel_diff_vs_default']:.1e}",
                    flush=True,
                )
            except Exception as exc:  # a config the compiler rejects
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                print(f"  {name:10s}: {row['error']}", flush=True)
            rows.append(row)
        del W, A, B
        torch.cuda.empty_cache()
    return rows


def _cublas_finish_parts(W, A, B, sumsq):
    """The norm from cuBLAS GEMMs and PyTorch ops only, as separately timeable pieces (a candidate design):
    ``U = W A^T`` and ``G = A A^T`` (fp32 out), ``(s/2) G`` split into bf16 hi + mid + lo, ``U += B @ part``
    three times (fp32 accumulate in place), then ``sqrt(||W||^2 + 2s rowsum(B * U))``."""
    half = SCALING * 0.5

    def split(G):
        gs = G * half
        hi = gs.bfloat16()
        r1 = gs - hi.float()
        mid = r1.bfloat16()
        lo = (r1 - mid.float()).bfloat16()
        return hi, mid, lo

    def addmms(U, parts):
        for part in parts:
            torch.addmm(U, B, part, out_dtype=torch.float32, out=U)
        return U

    def assemble(U):
        return (sumsq + (2.0 * SCALING) * (U * B.float()).sum(1)).clamp_min_(0).sqrt_().clamp_min_(EPS)

    def whole():
        return assemble(addmms(row_norm.matmul_fp32(W, A), split(row_norm.matmul_fp32(A, A))))

    return split, addmms, assemble, whole


def _finish_inputs(d_out: int, d_in: int, rank: int):
    """bf16 ``W, A, B``, ``||W||^2``, the fp64 truth, the fp32 ``U = W A^T`` and ``G = A A^T``, and the row
    head (shape, bf16 GEMM floor from graph replay) shared by the finish probe and sweep."""
    W, A, B = make_inputs(d_out, d_in, rank, torch.bfloat16)
    sumsq = triton_row_sumsq(W)
    truth = truth_norm(W, A, B, SCALING)
    U0, G0 = row_norm.matmul_fp32(W, A), row_norm.matmul_fp32(A, A)
    head = {"shape": [d_out, d_in, rank], "floor_graph_ms": _graph_ms(lambda: W @ A.T)}
    return W, A, B, sumsq, truth, U0, G0, head


def finish_probe(shapes, deadline: float) -> list[dict]:
    """Where the GEMM path's time goes after ``U = W A^T``, per shape (device time from graph replay):
    the cuBLAS-only candidate piece by piece, and the finish launch (U given) alone for ``B G''`` loop
    variants (``bg_chunk`` x ``bg_stages``, warps), G from gram programs and from a GEMM; the one-pass
    kernel with the same loop variants. Every row carries its error against fp64 truth."""
    rows = []
    for shape in shapes:
        if time.monotonic() > deadline:
            break
        rows += _finish_probe_one(*shape, deadline)
        torch.cuda.empty_cache()
    return rows


_LOOP_VARIANTS = [(64, 2), (32, 3), (32, 4), (64, 3), (128, 1), (16, 4)]


def _finish_probe_one(d_out: int, d_in: int, rank: int, deadline: float) -> list[dict]:
    rows = []
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    W, A, B, sumsq, truth, U0, G0, head = _finish_inputs(d_out, d_in, rank)
    floor = head["floor_graph_ms"]
    split, addmms, assemble, whole = _cublas_finish_parts(W, A, B, sumsq)
    parts = split(G0)
    pieces = {
        "u_gemm": lambda: row_norm.matmul_fp32(W, A),
        "g_gemm": lambda: row_norm.matmul_fp32(A, A),
        "split_torch": lambda: split(G0),
        "addmm_x3": lambda: addmms(U0.clone(), parts),
        "clone_u": lambda: U0.clone(),
        "assemble_torch": lambda: assemble(U0),
        "cublas_chain": whole,
    }
    line = []
    for name, fn in pieces.items():
        row = dict(head, variant=name)
        try:
            row["graph_ms"] = _graph_ms(fn)
            if name == "cublas_chain":
                row["rel_err_vs_fp64"] = rel_err(fn(), truth)
            line.append(f"{name} {row['graph_ms'] * 1e3:.1f}")
        except Exception as exc:  # e.g. no addmm(out_dtype=) in this PyTorch
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            line.append(f"{name} ERROR {row['error'][:80]}")
        rows.append(row)
    print(
        f"finish-probe {(d_out, d_in, rank)}: floor {floor * 1e3:.1f} us; "
        + ", ".join(line)
        + f" (us, graph); chain err {rows[-1].get('rel_err_vs_fp64')}",
        flush=True,
    )
    base = row_norm.pick_gemm_config(d_out, d_in, rank, sms, False)
    one = row_norm.pick_config(d_out, d_in, rank, False, sms, False)
    rep = dataclasses.replace
    trials = [("finish", f"bg{c}x{st}", rep(base, bg_chunk=c, bg_stages=st), None) for c, st in _LOOP_VARIANTS]
    trials.append(("finish", "bg64x2_w4", rep(base, num_warps=4), None))
    trials += [("finish_g", f"bg{c}x{st}", rep(base, bg_chunk=c, bg_stages=st), G0) for c, st in _LOOP_VARIANTS[:4]]
    trials += [("one_pass", f"bg{c}x{st}", rep(one, bg_chunk=c, bg_stages=st), None) for c, st in _LOOP_VARIANTS[:4]]
    for kind, name, cfg, g in trials:
        if time.monotonic() > deadline:
            break
        row = dict(head, variant=f"{kind}:{name}", config=dataclasses.asdict(cfg))
        plan = row_norm.NormLaunchPlan.build(d_out, d_in, rank, cfg)
        if kind == "one_pass":
            fn = functools.partial(
                triton_weight_norm_sq, W, A, B, SCALING, cached_sumsq=sumsq, eps=EPS, kernel_config=cfg
            )
        else:
            fn = functools.partial(row_norm._launch, plan, W, A, B, (U0, g), sumsq, None, SCALING, EPS, False)
        try:
            row["rel_err_vs_fp64"] = rel_err(fn(), truth)
            row["graph_ms"] = _graph_ms(fn)
            msg = f"graph {row['graph_ms'] * 1e3:7.1f} us, err {row['rel_err_vs_fp64']:.1e}"
        except Exception as exc:  # a config the compiler rejects (shared memory)
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            msg = row["error"][:120]
        rows.append(row)
        print(f"  {kind:8s} {name:10s}: {msg}", flush=True)
    return rows


#: (block_m, num_warps, bg_chunk, bg_stages, splits) of the finish sweep
_FINISH_GRID = [
    (128, 8, 64, 2, 1),
    (128, 8, 16, 4, 1),
    (128, 8, 32, 3, 1),
    (128, 4, 32, 3, 1),
    (64, 4, 32, 3, 1),
    (64, 4, 32, 4, 1),
    (64, 4, 64, 2, 1),
    (64, 8, 32, 3, 1),
    (64, 4, 16, 4, 1),
    (64, 4, 32, 3, 2),
    (128, 8, 16, 4, 2),
    (128, 4, 32, 3, 2),
]


def finish_sweep(shapes, deadline: float) -> list[dict]:
    """The G-given finish (``G = A A^T`` from a GEMM, no gram programs compiled in) over row tiles, warps and
    ``B G''`` loops (:data:`_FINISH_GRID`): the launch alone and the whole path (``gram_from_gemm=True``)
    as device time (graph replay), against the default whole path; errors against fp64 truth."""
    rows = []
    for shape in shapes:
        if time.monotonic() > deadline:
            break
        rows += _finish_sweep_one(*shape, deadline)
        torch.cuda.empty_cache()
    return rows


def _finish_sweep_one(d_out: int, d_in: int, rank: int, deadline: float) -> list[dict]:
    W, A, B, sumsq, truth, U0, G0, head = _finish_inputs(d_out, d_in, rank)
    floor = head["floor_graph_ms"]

    def whole(**kw):
        return functools.partial(row_norm.gemm_weight_norm_sq, W, A, B, SCALING, cached_sumsq=sumsq, eps=EPS, **kw)

    default = _graph_ms(whole())
    rows = [dict(head, variant="default_path", graph_ms=default, rel_err_vs_fp64=rel_err(whole()(), truth))]
    print(f"finish-sweep {(d_out, d_in, rank)}: floor {floor * 1e3:.1f} us, default path {default * 1e3:.1f} us "
          f"({default / floor:.2f}x)", flush=True)  # fmt: skip
    base = row_norm.pick_gemm_config(
        d_out, d_in, rank, torch.cuda.get_device_properties(0).multi_processor_count, False
    )
    for bm, warps, chunk, stages, splits in _FINISH_GRID:
        if time.monotonic() > deadline:
            break
        cfg = dataclasses.replace(base, block_m=bm, num_warps=warps, bg_chunk=chunk, bg_stages=stages, splits=splits)
        name = f"BM{bm} w{warps} bg{chunk}x{stages} S{splits}"
        row = dict(head, variant=name, config=dataclasses.asdict(cfg))
        plan = row_norm.NormLaunchPlan.build(d_out, d_in, rank, cfg)
        launch = functools.partial(row_norm._launch, plan, W, A, B, (U0, G0), sumsq, None, SCALING, EPS, False)
        path = whole(kernel_config=cfg, gram_from_gemm=True)
        try:
            row["rel_err_vs_fp64"] = rel_err(path(), truth)
            row["finish_graph_ms"] = _graph_ms(launch)
            row["graph_ms"] = _graph_ms(path)
            msg = (
                f"finish {row['finish_graph_ms'] * 1e3:6.1f} us, path {row['graph_ms'] * 1e3:6.1f} us "
                f"({row['graph_ms'] / floor:.2f}x floor), err {row['rel_err_vs_fp64']:.1e}"
            )
        except Exception as exc:  # a config the compiler rejects
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            msg = row["error"][:120]
        rows.append(row)
        print(f"  {name:24s}: {msg}", flush=True)
    return rows


def ncu_target(d_out: int, d_in: int, rank: int, mode: str) -> None:
    """Run one norm launch a few times (for ``ncu -k regex:weight_norm_sq --launch-skip 2 --launch-count 1``):
    ``mode`` is ``finish`` (U given, gram programs) or ``one_pass``."""
    W, A, B = make_inputs(d_out, d_in, rank, torch.bfloat16)
    sumsq = triton_row_sumsq(W)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cfg = row_norm.pick_gemm_config(d_out, d_in, rank, sms, False, True)  # the config gram programs need
    plan = row_norm.NormLaunchPlan.build(d_out, d_in, rank, cfg)
    U = row_norm.matmul_fp32(W, A)
    for _ in range(4):
        if mode == "finish":
            row_norm._launch(plan, W, A, B, (U, None), sumsq, None, SCALING, EPS, False)
        else:
            triton_weight_norm_sq(W, A, B, SCALING, cached_sumsq=sumsq, eps=EPS)
    torch.cuda.synchronize()


def candidate_configs(base: NormKernelConfig) -> list[NormKernelConfig]:
    rep = dataclasses.replace
    cands = [
        base,
        rep(base, splits=max(1, base.splits // 2)),
        rep(base, splits=base.splits * 2),
        rep(base, gram_splits=base.gram_splits * 2),
        rep(base, num_stages=max(2, base.num_stages - 1)),
        rep(base, block_k=32, num_stages=5),
    ]
    out = []
    for c in cands:
        if c not in out:
            out.append(c)
    return out


def tune_shape(d_out, d_in, rank, rep_ms, deadline) -> dict:
    W, A, B = make_inputs(d_out, d_in, rank, torch.bfloat16)
    sumsq = triton_row_sumsq(W)
    ref = triton_weight_norm_sq(W, A, B, SCALING, cached_sumsq=sumsq).double()
    base = row_norm.plan_for(d_out, d_in, rank, a_is_fp32=False).config
    trials = []
    for cfg in candidate_configs(base):
        if time.monotonic() > deadline:
            trials.append({"config": dataclasses.asdict(cfg), "skipped": "time budget"})
            continue
        try:
            fn = lambda cfg=cfg: triton_weight_norm_sq(W, A, B, SCALING, cached_sumsq=sumsq, kernel_config=cfg)  # noqa: E731
            diff = float((fn().double() - ref).abs().max() / ref.abs().max())
            trials.append({"config": dataclasses.asdict(cfg), "ms": bench(fn, rep_ms), "max_rel_diff": diff})
        except Exception as exc:  # a config the compiler rejects (e.g. out of shared memory)
            trials.append({"config": dataclasses.asdict(cfg), "error": f"{type(exc).__name__}: {exc}"[:200]})
    timed = [t for t in trials if "ms" in t]
    best = min(timed, key=lambda t: t["ms"]) if timed else None
    return {"shape": [d_out, d_in, rank], "default": dataclasses.asdict(base), "trials": trials, "best": best}


def _ratio(row: dict, key: str) -> str:
    return f"{row[key]:6.2f}" if key in row else "     -"


def fmt_ms(x):
    return f"{x * 1000:7.1f}" if isinstance(x, float) else "      -"


def print_table(rows, device_name):
    print(f"\n== factored norm on {device_name}: times in us (do_bench median, L2 flushed), s={SCALING} ==")
    hdr = (
        f"{'d_out x d_in, r':>20} {'adapt':>5} {'warm':>7} {'cold':>7} {'gemm':>7} {'stock':>7} {'ref':>7}"
        f" {'w/gemm':>6} {'c/gemm':>6} {'w/stock':>7} {'b2b':>7} {'peakMiB':>7} {'boundMiB':>8}"
        f" {'err ours':>8} {'err stock':>9} {'L':>2}"
    )
    print(hdr)
    for r in rows:
        shape = f"{r['d_out']}x{r['d_in']}, {r['rank']}"
        ratio = functools.partial(_ratio, r)
        print(
            f"{shape:>20} {r['adapters'][:5]:>5} {fmt_ms(r['ms_ours_warm'])} {fmt_ms(r['ms_ours_cold'])}"
            f" {fmt_ms(r.get('ms_gemm'))} {fmt_ms(r.get('ms_stock'))} {fmt_ms(r.get('ms_ref'))}"
            f" {ratio('ratio_warm_gemm')} {ratio('ratio_cold_gemm')} {ratio('ratio_warm_stock'):>7}"
            f" {fmt_ms(r['b2b_ours_warm'])} {r['peak_ours_cold'] / 2**20:7.1f} {r['mem_bound'] / 2**20:8.1f}"
            f" {r['err_ours']:8.1e} {r.get('err_stock', float('nan')):9.1e} {r['launches_ours_warm']:>2}"
        )
    print("warm: cached ||W||^2; cold: ||W||^2 fused; b2b: us/call back to back without flush; L: launches (warm)")


def _save_json(name: str, meta: dict, rows: list) -> None:
    """``$OUT/name`` gets ``{"meta": ..., "rows": ...}`` when ``$OUT`` is set (the device tool's folder)."""
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / name).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="issue shapes only, bf16 only, short reps")
    parser.add_argument("--rep-ms", type=int, default=60)
    parser.add_argument("--budget-s", type=float, default=170.0, help="skip remaining config trials after this")
    parser.add_argument("--gemm-probe", action="store_true", help="only the GEMM path, piece by piece")
    parser.add_argument("--sweep", action="store_true", help="only a launch-config sweep (device time per config)")
    parser.add_argument("--gemm-sweep", action="store_true", help="only the GEMM path's variants, whole path timed")
    parser.add_argument("--finish-probe", action="store_true", help="the GEMM path's finish: pieces and loop variants")
    parser.add_argument("--finish-sweep", action="store_true", help="the G-given finish over tiles and loops")
    parser.add_argument("--ncu-target", nargs=4, metavar=("D_OUT", "D_IN", "R", "MODE"), help="launches for ncu")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tune_norm.py needs a CUDA GPU")
    t0 = time.monotonic()
    deadline = t0 + args.budget_s
    rep = 30 if args.quick else args.rep_ms
    props = torch.cuda.get_device_properties(0)
    meta = {
        "gpu": props.name,
        "sms": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "scaling": SCALING,
    }
    print(json.dumps(meta))
    if args.sweep:
        rows = sweep_configs(ISSUE_SHAPES, deadline)
        _save_json("norm_sweep.json", meta, rows)
        return
    if args.ncu_target:
        d_out, d_in, rank, mode = args.ncu_target
        ncu_target(int(d_out), int(d_in), int(rank), mode)
        return
    if args.finish_sweep:
        rows = finish_sweep([(8192, 8192, 384), (14336, 4096, 384), (4096, 14336, 384), (8192, 8192, 768),
                             (4096, 4096, 384), (8192, 28672, 384)], deadline)  # fmt: skip
        _save_json("norm_finish_sweep.json", meta, rows)
        return
    if args.finish_probe:
        rows = finish_probe([*ISSUE_SHAPES, (8192, 28672, 384)], deadline)
        _save_json("norm_finish_probe.json", meta, rows)
        return
    if args.gemm_sweep:
        rows = gemm_sweep([*ISSUE_SHAPES, (8192, 28672, 384)], deadline)
        _save_json("norm_gemm_sweep.json", meta, rows)
        return
    if args.gemm_probe:
        shapes = [*ISSUE_SHAPES, (8192, 28672, 384), (4096, 4096, 16), (4096, 4096, 128)]
        probe = probe_gemm_path(shapes, 30)
        _save_json("norm_gemm_probe.json", meta, probe)
        return
    rows = []
    shapes = ISSUE_SHAPES if args.quick else ISSUE_SHAPES + EXTRA_SHAPES
    for shape in shapes:
        dtypes = [torch.bfloat16] if args.quick or shape not in ISSUE_SHAPES else [torch.bfloat16, torch.float32]
        for ad in dtypes:
            t = time.monotonic()
            row = measure_shape(*shape, ad, rep, with_baselines=True)
            rows.append(row)
            torch.cuda.empty_cache()
            print(
                f"{shape} {row['adapters']}: warm {row['ms_ours_warm'] * 1e3:.1f} us, cold {row['ms_ours_cold'] * 1e3:.1f} us, "
                f"gemm {row['ms_gemm'] * 1e3:.1f} us, stock {row['ms_stock'] * 1e3:.1f} us, ref {row['ms_ref'] * 1e3:.1f} us; "
                f"err {row['err_ours']:.1e} (stock {row['err_stock']:.1e}, ref {row['err_ref']:.1e}); "
                f"bitwise cold==warm {row['cold_warm_bitwise']}; {time.monotonic() - t:.1f}s",
                flush=True,
            )
    tuning = []
    if not args.quick:
        for shape in TUNE_SHAPES:
            res = tune_shape(*shape, rep, deadline)
            tuning.append(res)
            for tr in res["trials"]:
                c = tr["config"]
                desc = f"BM{c['block_m']} BN{c['block_n']} BK{c['block_k']} w{c['num_warps']} st{c['num_stages']} S{c['splits']} SG{c['gram_splits']}"
                val = (
                    f"{tr['ms'] * 1e3:7.1f} us (max rel diff {tr['max_rel_diff']:.1e})"
                    if "ms" in tr
                    else tr.get("error", tr.get("skipped"))
                )
                print(f"tune {shape}: {desc:>40}: {val}", flush=True)
            if res["best"]:
                c = res["best"]["config"]
                print(
                    f"tune {shape}: best {c} at {res['best']['ms'] * 1e3:.1f} us (default {res['trials'][0].get('ms', float('nan')) * 1e3:.1f} us)"
                )
    # host cost per call at a shape where the GPU work is negligible
    W, A, B = make_inputs(1024, 1024, 16, torch.bfloat16)
    sumsq = triton_row_sumsq(W)
    fn = lambda: triton_weight_norm_sq(W, A, B, SCALING, cached_sumsq=sumsq)  # noqa: E731
    fn()
    torch.cuda.synchronize()
    n = 300
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host_us = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    meta["host_us_per_call_1024x1024_r16"] = host_us
    print(f"host time per call (1024x1024, r16, warm): {host_us:.1f} us")
    meta["elapsed_s"] = time.monotonic() - t0
    print_table(rows, props.name)
    print(f"elapsed {meta['elapsed_s']:.0f}s")
    out_dir = os.environ.get("OUT")
    if out_dir:
        path = Path(out_dir) / "norm_tuning.json"
        path.write_text(json.dumps({"meta": meta, "rows": rows, "tuning": tuning}, indent=1))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
