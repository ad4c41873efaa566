"""The norm kernel does not depend on the order in which the hardware starts its programs.

CUDA does not promise to start the blocks of a grid in program-id order (MPS, concurrent streams, partial
residency). The one-pass kernel's main programs need the gram programs' ``G''``, so the gram programs run in
a launch of their own before the main programs' launch (``row_norm_kernel.py``, "Synchronization"): no
program waits on another of its launch. On the CPU the interpreter is made to run each launch's programs
reversed or shuffled (a single launch of both kinds spins forever there); on a GPU another stream keeps the
SMs busy while the norm runs.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time

import pytest
import torch
import triton
import triton.language as tl

from dorafactors.kernels.row_norm import gemm_weight_norm_sq, plan_for, triton_row_sumsq, triton_weight_norm_sq
from tests.kernels.test_row_norm_kernel import SMALL_SPLIT, SMALL_WIDE, counters_are_zero, make_exact, truth_sq

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def interpreter_runs_programs(order: str):
    """Make Triton's interpreter run the programs of a 1-D grid ``"reversed"`` or ``"shuffled"``.

    The interpreter runs program ids 0, 1, 2, ... one after the other; this maps the ``i``-th program it
    runs to another program id, so ``tl.program_id(0)`` no longer follows the start order.
    """
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    run_in_order = builder.set_grid_idx
    perms: dict[int, list[int]] = {}

    def permuted(n: int) -> list[int]:
        if n not in perms:
            ids = list(range(n))
            if order == "reversed":
                ids.reverse()
            else:
                random.Random(n).shuffle(ids)
            perms[n] = ids
        return perms[n]

    def set_grid_idx(x, y, z):
        run_in_order(permuted(builder.grid_dim[0])[x], y, z)

    builder.set_grid_idx = set_grid_idx
    try:
        yield
    finally:
        del builder.set_grid_idx  # back to the class's method


def _call_with_timeout(fn, seconds: float):
    """``fn()`` in a daemon thread; fails the test if it has not returned after ``seconds`` (a kernel whose
    programs wait on programs that never run spins forever on the single-threaded interpreter)."""
    result: dict[str, object] = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as exc:  # re-raised in the test thread
            result["error"] = exc

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        pytest.fail(f"the norm kernel did not finish within {seconds:.0f} s: a program waits on one that never runs")
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["value"]


@pytest.mark.skipif(DEVICE != "cpu", reason="reorders the programs of Triton's CPU interpreter")
@pytest.mark.parametrize("order", ["reversed", "shuffled"])
@pytest.mark.parametrize(
    "ad_dtype,cfg", [(torch.bfloat16, SMALL_SPLIT), (torch.float32, SMALL_WIDE)], ids=["bf16-split16", "fp32-split32"]
)
def test_programs_started_in_any_order_give_the_in_order_bits(order, ad_dtype, cfg):
    """Exact data with several gram tiles, gram splits, row tiles and d_in splits: every program must run its
    role exactly once (a lost or doubled one shows as a wrong or garbage row), no main program may wait on
    a gram program that has not started, and every counter is back at zero afterwards."""
    W, A, B = make_exact(45, 100, 70, torch.bfloat16, ad_dtype, seed=17)
    truth = truth_sq(W, A, B, 0.5).float()
    sumsq = triton_row_sumsq(W)
    in_order = {
        "cold": triton_weight_norm_sq(W, A, B, 0.5, kernel_config=cfg),
        "warm": triton_weight_norm_sq(W, A, B, 0.5, cached_sumsq=sumsq, kernel_config=cfg),
    }
    assert torch.equal(in_order["cold"], truth) and torch.equal(in_order["warm"], truth)

    def run():
        with interpreter_runs_programs(order):
            return {
                "cold": triton_weight_norm_sq(W, A, B, 0.5, kernel_config=cfg),
                "warm": triton_weight_norm_sq(W, A, B, 0.5, cached_sumsq=sumsq, kernel_config=cfg),
                "gemm": gemm_weight_norm_sq(W, A, B, 0.5, cached_sumsq=sumsq, kernel_config=cfg)
                if ad_dtype == W.dtype
                else None,
            }

    got = _call_with_timeout(run, 300)
    assert torch.equal(got["cold"], truth), f"cold: {int((got['cold'] != truth).sum())} rows differ"
    assert torch.equal(got["warm"], truth), f"warm: {int((got['warm'] != truth).sum())} rows differ"
    if got["gemm"] is not None:
        assert torch.equal(got["gemm"], truth)
    assert counters_are_zero()


def test_interpreter_reordering_really_reorders():
    """The harness above is only a test if the interpreter does run the programs in another order."""

    @triton.jit
    def record_start_order(out_ptr, cnt_ptr):
        slot = tl.atomic_add(cnt_ptr, 1)
        tl.store(out_ptr + slot, tl.program_id(0))

    if DEVICE != "cpu":
        pytest.skip("the interpreter only")
    out = torch.full((9,), -1, dtype=torch.int32)
    cnt = torch.zeros(1, dtype=torch.int32)
    with interpreter_runs_programs("reversed"):
        record_start_order[(9,)](out, cnt)
    assert out.tolist() == list(range(8, -1, -1))


# ---------------------------------------------------------------------------------------------
# GPU: the norm while another stream occupies the SMs


@triton.jit
def _occupy_sm(x_ptr, iters, BLOCK: tl.constexpr):
    """One 1024-thread block per program spinning on a dependent chain of FMAs for ``iters`` steps."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.load(x_ptr + offs)
    for _ in range(iters):
        acc = acc * 0.999 + 0.001
    tl.store(x_ptr + offs, acc)


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["one_pass", "gemm"])
def test_gpu_norm_finishes_while_another_stream_keeps_the_sms_busy(path):
    """A side stream keeps every SM full of spinning 1024-thread blocks that retire at different times, so the
    norm's programs become resident a few at a time and in no particular order. Each launch must finish
    (no deadlock: polled with a deadline) and return the fp64 truth of exact data bitwise."""
    W, A, B = make_exact(4096, 2048, 384, torch.bfloat16, torch.bfloat16, seed=7, device="cuda")
    plan = plan_for(4096, 2048, 384, a_is_fp32=False)
    assert plan.gram_tiles * plan.gram_splits > 1, plan  # several gram programs for the main ones to wait on
    truth = truth_sq(W, A, B, 0.5).float()
    sumsq = triton_row_sumsq(W)
    if path == "gemm":
        norm = lambda: gemm_weight_norm_sq(W, A, B, 0.5, cached_sumsq=sumsq)  # noqa: E731
    else:
        norm = lambda: triton_weight_norm_sq(W, A, B, 0.5)  # noqa: E731
    assert torch.equal(norm(), truth)
    sms = torch.cuda.get_device_properties(W.device).multi_processor_count
    blocks = 4 * sms  # two waves of two resident blocks per SM (2048 threads)
    busy = torch.zeros(blocks * 1024, device="cuda")
    side, main = torch.cuda.Stream(), torch.cuda.Stream()
    torch.cuda.synchronize()
    outs = []
    for i in range(12):
        with torch.cuda.stream(side):
            _occupy_sm[(blocks,)](busy, 200_000 * (1 + i % 4), BLOCK=1024, num_warps=32)
        with torch.cuda.stream(main):
            outs.append(norm())
    done = torch.cuda.Event()
    with torch.cuda.stream(main):
        done.record()
    deadline = time.monotonic() + 120
    while not done.query():
        if time.monotonic() > deadline:
            pytest.fail("the norm did not finish within 120 s beside a busy stream: deadlock")
        time.sleep(0.01)
    torch.cuda.synchronize()
    bad = [i for i, o in enumerate(outs) if not torch.equal(o, truth)]
    assert not bad, f"launches {bad} differ from the fp64 truth"
    assert counters_are_zero()
