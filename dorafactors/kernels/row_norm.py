"""Host entry points of the tensor-core factored row norm: ``||W + s*B@A||^2_row`` in one kernel launch.

The kernel and its design notes are in ``row_norm_kernel.py``, its launch plans in ``row_norm_plan.py``,
the plain PyTorch reference of the same maths in ``row_norm_reference.py``.
"""

from __future__ import annotations

import torch
import triton

from ._triton_utils import is_interpreted, num_sms, ticket_buffer
from .launch import launch
from .operands import gemm_dtypes_supported, mm_out_dtype_available, norm_operands_problem
from .row_norm_kernel import _row_sumsq_kernel, _weight_norm_sq_kernel
from .row_norm_plan import (
    NormKernelConfig,
    NormLaunchPlan,
    _gemm_plan,
    _one_pass_plan,
    pick_config,
    pick_gemm_config,
    plan_for,
)

__all__ = [
    "NormKernelConfig",
    "NormLaunchPlan",
    "fp32_adapter_gemms",
    "gemm_dtypes_supported",
    "gemm_supported",
    "gemm_weight_norm_sq",
    "matmul_fp32",
    "pick_config",
    "pick_gemm_config",
    "plan_for",
    "triton_row_sumsq",
    "triton_weight_norm_sq",
]


# ---------------------------------------------------------------------------------------------
# host functions


def _check_device(t: torch.Tensor) -> bool:
    """True when launching on ``t``'s device runs the interpreter (CPU tensors)."""
    interpret = is_interpreted(_weight_norm_sq_kernel)
    if t.device.type != "cuda" and not interpret:
        raise ValueError(f"the Triton norm kernels need CUDA tensors (or TRITON_INTERPRET=1); got {t.device}")
    return interpret


def triton_row_sumsq(weight: torch.Tensor) -> torch.Tensor:
    """``||W||^2`` per row in fp32: ``weight`` is ``[d_out, d_in]`` (fp16/bf16/fp32, any strides).

    Returns a new fp32 ``[d_out]`` tensor. One launch, one read of W, no temporaries.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    _check_device(weight)
    d_out, d_in = weight.shape
    if d_out == 0 or d_in == 0:
        return torch.zeros(d_out, dtype=torch.float32, device=weight.device)
    out = torch.empty(d_out, dtype=torch.float32, device=weight.device)
    block_m = 32
    block_k = 128
    if weight.stride(0) == 1 and weight.stride(1) != 1:  # transposed view: rows are the contiguous dim
        block_m, block_k = 128, 32
    launch(
        _row_sumsq_kernel,
        (triton.cdiv(d_out, block_m),),
        weight,
        out,
        d_out,
        d_in,
        weight.stride(0),
        weight.stride(1),
        BM=block_m,
        BK=block_k,
        EVEN_K=d_in % block_k == 0,
        num_warps=4,
    )
    return out


def _norm_from_square_on_host(norm_sq: torch.Tensor, eps: float) -> torch.Tensor:
    """``max(sqrt(max(n^2, 0)), eps)`` of an fp32 ``[d_out]`` vector outside the kernel (the no-product cases),
    with the kernel's correctly rounded sqrt on every device: the sqrt is taken in fp64 and rounded once
    (exact for fp32), since some CPU builds' vectorized fp32 sqrt is off by an ulp. NaN stays NaN."""
    return norm_sq.clamp_min(0).double().sqrt_().float().clamp_min_(eps)


def _validate(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    problem = norm_operands_problem(weight, lora_A, lora_B)
    if problem:
        raise ValueError(problem)
    d_out, d_in = weight.shape
    rank = lora_A.shape[0]
    if lora_A.shape[1] != d_in or lora_B.shape != (d_out, rank):
        raise ValueError(
            f"shape mismatch: W {tuple(weight.shape)}, A {tuple(lora_A.shape)}, B {tuple(lora_B.shape)}; "
            "expected A [r, d_in] and B [d_out, r]"
        )


def _as_sumsq(cached_sumsq: torch.Tensor | None, d_out: int, device: torch.device) -> torch.Tensor | None:
    """``cached_sumsq`` checked for shape and made a contiguous fp32 vector on ``device`` (or None)."""
    if cached_sumsq is None:
        return None
    if cached_sumsq.shape != (d_out,):
        raise ValueError(f"cached_sumsq must be [{d_out}], got {tuple(cached_sumsq.shape)}")
    if cached_sumsq.dtype != torch.float32 or cached_sumsq.device != device or cached_sumsq.stride(0) != 1:
        cached_sumsq = cached_sumsq.to(device=device, dtype=torch.float32).contiguous()
    return cached_sumsq


def triton_weight_norm_sq(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    cached_sumsq: torch.Tensor | None = None,
    eps: float | None = None,
    kernel_config: NormKernelConfig | None = None,
    repair_nonfinite: bool = False,
    weight_known_finite: bool = False,
) -> torch.Tensor:
    """Squared row norm of ``W + scaling * B @ A`` in fp32, not clamped (may hold tiny negatives).

    Args:
        weight: ``W`` ``[d_out, d_in]`` fp16/bf16, any strides (``W.T`` views welcome).
        lora_A: ``A`` ``[r, d_in]`` in W's dtype or fp32, any strides.
        lora_B: ``B`` ``[d_out, r]`` in W's dtype or fp32, any strides.
        scaling: ``s`` (0, negative and large values are fine).
        cached_sumsq: fp32 ``[d_out]`` ``||W||^2_row`` from an earlier call; the kernel then spends no work on
            ``||W||^2``. Without it, ``||W||^2`` comes from the same pass over W that computes ``W A^T``.
        eps: if given, return the finished norm ``max(sqrt(max(n^2, 0)), eps)`` (the engine's clamp, fused
            into the same launch, NaN preserved) instead of ``n^2``.
        kernel_config: launch configuration override (tests, tuning); default :func:`pick_config`.
        repair_nonfinite: (needs ``eps``, ``s != 0``, ``r > 0``, ``d_in > 0``) give every row whose
            ``W + s B A`` is not finite the dense row's class, NaN or +inf, in the same launches: the
            engine's ``_dense_class_of_nonfinite_rows`` (``norm/engine.py``), with ``||W||^2`` left out of
            the probe where ``weight_known_finite`` (one more launch: ``||A_k||`` in fp32).

    Returns:
        fp32 ``[d_out]``. Two kernel launches, the gram programs then the main programs (plus a one-time
        counter allocation per device and stream);
        ``s == 0`` or ``r == 0`` needs no product at all.
    """
    interpret = _check_device(weight)
    _validate(weight, lora_A, lora_B)
    d_out, d_in = weight.shape
    rank = lora_A.shape[0]
    device = weight.device
    cached_sumsq = _as_sumsq(cached_sumsq, d_out, device)
    scaling = float(scaling)
    if repair_nonfinite:
        _check_repair(d_out, d_in, rank, scaling, eps)

    if d_out == 0:
        return torch.zeros(0, dtype=torch.float32, device=device)
    if scaling == 0.0 or rank == 0 or d_in == 0:
        res = cached_sumsq.clone() if cached_sumsq is not None else triton_row_sumsq(weight)
        return res if eps is None else _norm_from_square_on_host(res, eps)

    a_is_fp32 = lora_A.dtype == torch.float32
    if kernel_config is None:
        plan = _one_pass_plan(d_out, d_in, rank, a_is_fp32, num_sms(device), interpret)
    else:
        plan = NormLaunchPlan.build(d_out, d_in, rank, kernel_config)
    repair = None
    if repair_nonfinite:  # ||A_k|| from A itself (IEEE fp32 squares), one launch
        repair = (not weight_known_finite, torch.linalg.vector_norm(lora_A, dim=1, dtype=torch.float32))
    return _launch(plan, weight, lora_A, lora_B, None, cached_sumsq, scaling, eps, interpret, repair)


def _check_repair(d_out: int, d_in: int, rank: int, scaling: float, eps: float | None) -> None:
    """The in-kernel non-finite row repair runs in the kernel's final store: it needs a launch and the norm."""
    if eps is None or scaling == 0.0 or 0 in (d_out, d_in, rank):
        raise ValueError(
            "repair_nonfinite needs eps (the finished norm), a non-zero scaling and non-empty factors "
            "(the engine repairs the other cases itself)"
        )


def _launch(
    plan: NormLaunchPlan,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    gemms: tuple[torch.Tensor, torch.Tensor] | None,
    cached_sumsq: torch.Tensor | None,
    scaling: float,
    eps: float | None,
    interpret: bool,
    repair: tuple[bool, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Run ``_weight_norm_sq_kernel`` for validated operands (the gram launch, then the main launch; one
    launch in ``FROM_GEMM`` mode); returns the fp32 ``[d_out]`` result.

    ``gemms`` (``FROM_GEMM`` mode, needs ``cached_sumsq``): the fp32 GEMM results ``(W A^T [d_out, r]
    contiguous, A A^T [r, r] contiguous)``; the launch then has no gram programs.
    ``repair``: the kernel's ``PROBE`` mode, ``(add ||W||^2 to the probe, ||A_k|| fp32 [r])``.
    """
    device = weight.device
    d_out, d_in = weight.shape
    rank = lora_A.shape[0]
    cold = cached_sumsq is None
    from_gemm = gemms is not None
    # everything _launch_constants reads besides the plan (a plan is shared by W dtypes and modes)
    key = (
        weight.dtype,
        lora_A.dtype,
        lora_B.dtype,
        d_in,
        rank,
        from_gemm,
        cold,
        eps is not None,
        interpret,
        repair is not None,
    )
    launch = plan.launch_cache.get(key)
    if launch is None:
        launch = plan.launch_cache[key] = _launch_constants(plan, *key)
    programs, ws_elements, constants, probe_offset = launch
    ws = torch.empty(ws_elements, dtype=torch.float32, device=device)
    out = torch.empty(d_out, dtype=torch.float32, device=device)
    counters = ticket_buffer(device, 2 + plan.gram_tiles + plan.row_tiles)
    u_mat = gemms[0] if from_gemm else out
    gram = gemms[1] if from_gemm else ws
    probe = (out, out, 0)  # (probe partials, ||A_k||, add ||W||^2): unused
    if repair is not None:
        probe = (ws[probe_offset:], repair[1], int(repair[0]))
    gram_programs = 0 if from_gemm else plan.gram_tiles * plan.gram_splits
    # the gram programs first, in a launch of their own, then the main programs: no program ever waits on
    # another of its own launch (see row_norm_kernel's "Synchronization")
    for pid_base, grid in ((0, gram_programs), (gram_programs, programs - gram_programs)):
        if grid:
            _launch_kernel(grid, pid_base, plan, weight, lora_A, lora_B, u_mat, cold, cached_sumsq, out, ws, gram,
                           counters, probe, from_gemm, scaling, eps, d_out, d_in, rank, constants)  # fmt: skip
    return out


def _launch_kernel(
    grid, pid_base, plan, weight, lora_A, lora_B, u_mat, cold, cached_sumsq, out, ws, gram, counters, probe,
    from_gemm, scaling, eps, d_out, d_in, rank, constants,
) -> None:  # fmt: skip
    """One launch of ``_weight_norm_sq_kernel`` over programs ``pid_base .. pid_base + grid - 1``."""
    launch(
        _weight_norm_sq_kernel,
        (grid,),
        weight,
        lora_A,
        lora_B,
        u_mat,
        out if cold else cached_sumsq,
        out,
        ws,
        gram,
        counters,
        *probe,
        d_out,
        d_in,
        rank,
        plan.r_pad,
        weight.stride(0),
        weight.stride(1),
        lora_A.stride(0),
        lora_A.stride(1),
        lora_B.stride(0),
        lora_B.stride(1),
        u_mat.stride(0) if from_gemm else 0,
        1,
        scaling,
        0.0 if eps is None else float(eps),
        plan.row_tiles,
        plan.rank_tiles,
        plan.splits,
        0 if from_gemm else plan.gram_tiles,  # G from a GEMM: no gram programs
        plan.gram_splits,
        plan.k_steps,
        pid_base,
        **constants,
    )


def _launch_constants(
    plan: NormLaunchPlan,
    w_dtype: torch.dtype,
    a_dtype: torch.dtype,
    b_dtype: torch.dtype,
    d_in: int,
    rank: int,
    from_gemm: bool,
    cold: bool,
    sqrt: bool,
    interpret: bool,
    probe: bool,
) -> tuple[int, int, dict[str, int | bool], int]:
    """Grid size, workspace elements, compile-time arguments and the probe partials' offset in the workspace
    of a launch (cached per plan by ``_launch``)."""
    cfg = plan.config
    if a_dtype == w_dtype:
        a_mode = 0
    elif w_dtype == torch.bfloat16:
        a_mode = 1
    else:
        a_mode = 2
    gram_programs = 0 if from_gemm else plan.gram_tiles * plan.gram_splits
    programs = plan.row_tiles * plan.rank_tiles * plan.splits + gram_programs
    constants = dict(
        BM=cfg.block_m,
        BN=cfg.block_n,
        BK=cfg.block_k,
        BKG=plan.gram_chunk,
        BG_STAGES=cfg.bg_stages,
        FROM_GEMM=from_gemm,
        COLD=cold,
        SQRT=sqrt,
        A_MODE=a_mode,
        A_GRAM_MODE=1 if a_dtype == torch.float32 else 0,
        B_MODE={torch.bfloat16: 0, torch.float16: 1}.get(b_dtype, 2),
        EVEN_K=d_in % cfg.block_k == 0,
        EVEN_MN=plan.d_out % cfg.block_m == 0 and rank % cfg.block_n == 0,
        UPCAST=interpret,
        PROBE=probe,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    sections = plan.sections(cold, from_gemm, probe)
    return programs, sum(sections), constants, sum(sections[:4])


def gemm_supported(device: torch.device) -> bool:
    """True when :func:`gemm_weight_norm_sq` can get an fp32 ``W A^T`` from half inputs on ``device``.

    CUDA: ``torch.mm(..., out_dtype=torch.float32)`` (PyTorch >= 2.9, cuBLAS with fp32 output). The CPU
    (Triton's interpreter, tests) multiplies the fp32 upcasts instead: the same exact products.
    """
    return device.type != "cuda" or mm_out_dtype_available()


def matmul_fp32(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x @ y^T`` in fp32 from half ``x`` ``[m, k]`` and ``y`` ``[n, k]`` (``W A^T``, ``A A^T``): contiguous ``[m, n]``.

    On CUDA one cuBLAS GEMM on tensor cores with fp32 accumulation and fp32 output (the operands are never
    upcast in memory); on the CPU (tests only) the product of the fp32 upcasts.
    """
    if x.device.type == "cuda":
        return torch.mm(x, y.t(), out_dtype=torch.float32)
    return torch.mm(x.float(), y.float().t())


def fp32_adapter_gemms(weight: torch.Tensor, lora_A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U = W A^T [d_out, r], G = A A^T [r, r])`` in fp32 for a bf16 ``W`` and an fp32 ``A``, with exact
    products on bf16 tensor cores.

    ``A`` splits exactly into three bf16 parts (``kernels/split_matmul.py``: ``lo + mid + hi == A``), laid out
    as ``3r`` rows (row ``3k + p`` holds part ``p`` of A's row ``k``, a free view of the split's output), so one
    GEMM against W reads W once: ``U3 = W parts^T`` ``[d_out, 3r]`` and ``G9 = parts parts^T`` ``[3r, 3r]``, each
    product of bf16 parts exact in fp32, fp32 accumulation (the one-pass kernel's in-register split does the
    same products). ``U`` sums each row's three part columns and ``G`` the nine part pairs of each entry in
    fp32: two and eight roundings of values already rounded by a sum over ``d_in``.
    """
    from .split_matmul import split_bf16x3

    rank, d_in = lora_A.shape
    parts = split_bf16x3(lora_A).view(3 * rank, d_in)
    u3 = matmul_fp32(weight, parts).view(weight.shape[0], rank, 3)
    g9 = matmul_fp32(parts, parts).view(rank, 3, rank, 3)
    return u3.sum(dim=2), g9.sum(dim=(1, 3))


def gemm_weight_norm_sq(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    cached_sumsq: torch.Tensor | None = None,
    eps: float | None = None,
    kernel_config: NormKernelConfig | None = None,
    repair_nonfinite: bool = False,
    weight_known_finite: bool = False,
) -> torch.Tensor:
    """:func:`triton_weight_norm_sq` with ``W A^T`` from a GEMM: for half ``A`` and ``B`` in ``W``'s dtype, or
    fp32 ``A`` and ``B`` on a bf16 ``W`` (PEFT's default dtypes).

    Two GEMMs (:func:`matmul_fp32`: the fp32 ``U = W A^T`` and ``G = A A^T``; fp32 ``A``:
    :func:`fp32_adapter_gemms`), then one launch of the norm kernel in its ``FROM_GEMM`` mode: each (row,
    rank) tile loads its U tile, adds ``B G''`` on tensor cores (``G''``: the scaled lower block triangle of
    G, split into bf16 parts in registers; an fp32 ``B`` is split there too), and the row sums and the
    assembly follow exactly as in the one-pass kernel (fixed summation orders). Without ``cached_sumsq``,
    ``||W||^2`` comes from :func:`triton_row_sumsq` (a second pass over W).

    Args and returns: as :func:`triton_weight_norm_sq`; see :func:`gemm_dtypes_supported` for the dtypes. With
    ``repair_nonfinite`` one more launch: ``||A_k||`` in fp32 for the kernel's probe.
    Extra memory: ``U`` and ``G`` (``4 * (d_out * r + r^2)`` bytes) besides the kernel's workspace; fp32
    ``A`` adds its bf16 parts and the parts' products (``6 r d_in + 12 d_out r + 36 r^2`` bytes).
    """
    interpret = _check_device(weight)
    _validate(weight, lora_A, lora_B)
    if not gemm_dtypes_supported(weight.dtype, lora_A.dtype, lora_B.dtype):
        raise ValueError(
            f"gemm_weight_norm_sq takes A and B in W's dtype, or fp32 A and B on a bf16 W; got W {weight.dtype}, "
            f"A/B {lora_A.dtype}/{lora_B.dtype} (use triton_weight_norm_sq)"
        )
    if not gemm_supported(weight.device):
        raise RuntimeError("torch.mm(..., out_dtype=torch.float32) needs PyTorch >= 2.9; use triton_weight_norm_sq")
    d_out, d_in = weight.shape
    rank = lora_A.shape[0]
    device = weight.device
    scaling = float(scaling)
    cached_sumsq = _as_sumsq(cached_sumsq, d_out, device)
    if repair_nonfinite:
        _check_repair(d_out, d_in, rank, scaling, eps)
    if d_out == 0:
        return torch.zeros(0, dtype=torch.float32, device=device)
    sumsq = cached_sumsq if cached_sumsq is not None else triton_row_sumsq(weight)
    if scaling == 0.0 or rank == 0 or d_in == 0:
        res = sumsq.clone() if sumsq is cached_sumsq else sumsq
        return res if eps is None else _norm_from_square_on_host(res, eps)
    if kernel_config is None:
        plan = _gemm_plan(d_out, d_in, rank, num_sms(device), interpret)
    else:
        plan = NormLaunchPlan.build(d_out, d_in, rank, kernel_config)
    if lora_A.dtype == torch.float32:
        gemms = fp32_adapter_gemms(weight, lora_A)
    else:
        gemms = (matmul_fp32(weight, lora_A), matmul_fp32(lora_A, lora_A))
    repair = None
    if repair_nonfinite:  # ||A_k|| from A itself (IEEE fp32 squares): G's diagonal may come from split parts
        repair = (not weight_known_finite, torch.linalg.vector_norm(lora_A, dim=1, dtype=torch.float32))
    return _launch(plan, weight, lora_A, lora_B, gemms, sumsq, scaling, eps, interpret, repair)
