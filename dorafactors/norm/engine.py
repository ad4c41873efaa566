"""The norm engine: one entry point that returns the detached, clamped fp32 row norm of ``W + s*B@A``.

It picks the Triton kernel where ``dispatch`` allows it and the PyTorch reference (``kernels/row_norm_reference.py``)
otherwise, and reshapes conv and grouped-conv factors into the 2-D form both understand.

Non-finite values: the norm of a row is NaN exactly where the dense IEEE evaluation of
``||W + s * (B @ A)||_row`` is NaN, +inf where it is +inf. The factored sum cannot give that by itself: it
meets ``inf - inf`` and ``0 * inf`` in ``W A^T``, ``A A^T`` and the assembly that the dense form does not
(an infinity of ``W`` turned the row's norm into NaN, hence ``g = m / norm`` NaN, and the NaN spread into
every ``lora_A``/``lora_B``/input gradient where stock PEFT's ``+inf`` norm gives ``g = 0`` and keeps it
local). :func:`weight_norm` therefore replaces the rows that are not finite with the class of the dense
row, computed from small row sums (on the kernel paths in the norm kernel's own launches, its ``PROBE``
mode; :func:`_dense_class_of_nonfinite_rows` is the PyTorch form): ``||W||^2`` (cached with the layer's sum
of squares, and skipped while ``W`` is known to be finite) and ``sum_k |B_ik| * ||A_k||`` (``0 * inf``: NaN, as in ``B @ A``); both are
non-negative, so their sum is NaN if any source is, else +inf if any is. Exact whenever the non-finite
entries do not meet in one element of ``W + s B A`` (a single one always); where two infinities of
opposite sign meet there, or an infinite ``B_ik`` meets an exact zero of ``A_k``, the dense row is NaN and
this gives +inf. Cost per norm computation (a cache miss: each training step, not each decode call): on the
kernel paths one more launch (``||A_k||`` in fp32) and a few fp32 vectors in the kernel's workspace; on the
PyTorch path five small launches (six with half-precision adapters) on ``[r,
d_in]``, ``[d_out, r]`` and ``[d_out]`` tensors and a ``[d_out, r]`` temporary in ``B``'s dtype (fp32 for fp16
``B``). No synchronization; nothing on the dense path, which is the dense form itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..dispatch import config, rules
from ..kernels.operands import HALF_DTYPES, compute_dtype_for
from ..kernels.row_norm_reference import factored_row_norm_sq, plan_chunk_columns, row_sumsq
from .cache import NormCache, write_epoch
from .dense import dense_factor_row_norm_sq, dense_row_norm

__all__ = [
    "cached_weight_sumsq",
    "clamp_eps",
    "conv_factors",
    "dense_delta_norm",
    "norm_path",
    "weight_norm",
    "weight_norm_fresh_sumsq",
    "weight_norm_with_cached_sumsq",
    "weight_rows_finite",
    "weight_sumsq",
]


def clamp_eps(weight_dtype: torch.dtype) -> float:
    """Smallest norm the engine returns: 1e-6 for half-precision weights, 1e-12 otherwise."""
    return 1e-6 if weight_dtype in HALF_DTYPES else 1e-12


def norm_path(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> str:
    """Which implementation :func:`weight_norm` uses: ``"dense"`` (``d_in <= r``), ``"gemm"`` (fp32-output
    GEMMs for ``W A^T`` and ``A A^T`` + the Triton kernel's ``FROM_GEMM`` mode; half adapters, or fp32 adapters
    on a bf16 W, at the sizes of ``rules.norm_gemm_ok``), ``"triton"`` (the one-pass Triton kernel: the
    smaller shapes, fp32 adapters on an fp16 W) or ``"torch"`` (the PyTorch reference)."""
    if weight.shape[1] <= lora_A.shape[0]:
        return "dense"
    ok, _ = rules.fused_norm_ok(weight, lora_A, lora_B)
    if not ok:
        return "torch"
    return "gemm" if rules.norm_gemm_ok(weight, lora_A, lora_B)[0] else "triton"


def reference_compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Accumulation dtype of the PyTorch paths: fp64 on the CPU (cheap there, and it makes the factored
    sum's cancellation harmless), else fp32 (fp64 when an operand is fp64)."""
    if tensors[0].device.type == "cpu":
        return torch.float64
    return compute_dtype_for(*(t.dtype for t in tensors))


@torch.no_grad()
def weight_sumsq(weight: torch.Tensor) -> torch.Tensor:
    """``||W||^2`` per row (fp32 from the kernel, else the reference dtype); ``weight`` is ``[d_out, d_in]``."""
    if rules.fused_norm_ok(weight, weight[:1], weight[:, :1])[0]:
        from ..kernels.row_norm import triton_row_sumsq

        return triton_row_sumsq(weight)
    cdt = reference_compute_dtype(weight)
    plan = plan_chunk_columns(
        weight.shape[0],
        weight.shape[1],
        0,
        weight_dtype=weight.dtype,
        lora_dtype=weight.dtype,
        budget_bytes=config.get_dora_norm_threshold_bytes(),
        need_sumsq=True,
        compute_dtype=cdt,
    )
    return row_sumsq(weight, chunk_columns=plan.chunk_columns, compute_dtype=cdt)


def weight_rows_finite(sumsq: torch.Tensor) -> bool:
    """True when every ``||W||^2`` row sum is finite (one host synchronization; cache it with the sums)."""
    return bool(torch.isfinite(sumsq).all())


@torch.no_grad()
def weight_norm(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    cached_sumsq: torch.Tensor | None = None,
    weight_rows_finite: bool | None = None,
) -> torch.Tensor:
    """Row norm of ``W + scaling * B @ A``: detached, ``sqrt(max(n^2, 0))`` clamped to :func:`clamp_eps`.

    Args:
        weight: ``W`` ``[d_out, d_in]`` in bf16/fp16/fp32/fp64 (any strides).
        lora_A: ``A`` ``[r, d_in]``; lora_B: ``B`` ``[d_out, r]`` (any float dtypes, e.g. fp32 adapters on a
            bf16 base).
        scaling: the LoRA scaling ``s`` (any real, 0 and negative included).
        cached_sumsq: ``||W||^2_row`` from an earlier call on the same W, or None.
        weight_rows_finite: :func:`weight_rows_finite` of ``cached_sumsq`` when the caller knows it; None: not
            known (the non-finite row check then runs on the device, without a synchronization).

    A row that is not finite is NaN or +inf as the dense evaluation of ``W + s * (B @ A)`` (module docstring).

    Returns:
        ``[d_out]`` in fp32 (fp64 when an input is fp64; never half; the CPU accumulates in fp64 but
        returns fp32 for non-fp64 inputs). Never materializes a ``[d_out, d_in]`` tensor: the
        factored paths never form ``B @ A``; the dense path (only for ``d_in <= r``) forms it in row blocks.
    """
    scaling = float(scaling)
    if rules.forward_tangents_possible():
        # a detached value, as stock PEFT's norm: torch.no_grad stops no forward-mode tangent, detach() does
        weight, lora_A, lora_B = weight.detach(), lora_A.detach(), lora_B.detach()
        cached_sumsq = None if cached_sumsq is None else cached_sumsq.detach()
        if rules.inside_func_transform():
            return _functional_norm(weight, lora_A, lora_B, scaling)
    path = norm_path(weight, lora_A, lora_B)
    if path == "dense":  # B @ A formed in row blocks: the dense IEEE evaluation itself
        return _norm(weight, lora_A, lora_B, scaling, path, cached_sumsq, None)
    check_w_rows = weight_rows_finite is not True
    if path in ("gemm", "triton") and scaling != 0.0 and lora_A.shape[0] > 0 and weight.shape[0] > 0:
        # the repair in the kernel's own launches (its ||W||^2 included: no pass of its own for the check)
        return _norm(weight, lora_A, lora_B, scaling, path, cached_sumsq, None, repair_w_rows=check_w_rows)
    out_sumsq = None
    if check_w_rows and cached_sumsq is None:
        # the row check needs ||W||^2: the reference writes it out of its own pass over W; the kernels have
        # no such output, so it is computed in a pass of its own and handed over as cached
        if path in ("gemm", "triton"):
            cached_sumsq = weight_sumsq(weight)
        else:
            cdt = reference_compute_dtype(weight, lora_A, lora_B)
            out_sumsq = torch.empty(weight.shape[0], dtype=cdt, device=weight.device)
    norm = _norm(weight, lora_A, lora_B, scaling, path, cached_sumsq, out_sumsq)
    w_sumsq = (cached_sumsq if out_sumsq is None else out_sumsq) if check_w_rows else None
    return _dense_class_of_nonfinite_rows(norm, lora_A, lora_B, scaling, w_sumsq)


def _functional_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """:func:`weight_norm` inside a ``torch.func`` transform: the dense ``||W + s * (B @ A)||_row`` in
    out-of-place ops, which every transform supports (``vmap`` cannot write a batched value into an
    unbatched buffer, as the chunked reference does, and runs no kernel). Accumulated in
    :func:`reference_compute_dtype`; a non-finite row is the dense row's class by construction. Forms
    ``[d_out, d_in]`` temporaries in that dtype, as stock PEFT forms ``B @ A`` on every forward."""
    cdt = reference_compute_dtype(weight, lora_A, lora_B)
    device = weight.device
    delta = lora_B.to(device=device, dtype=cdt) @ lora_A.to(device=device, dtype=cdt)
    norm = torch.linalg.vector_norm(weight.to(cdt) + scaling * delta, dim=1)
    return norm.to(compute_dtype_for(weight.dtype, lora_A.dtype, lora_B.dtype)).clamp_min(clamp_eps(weight.dtype))


def weight_norm_fresh_sumsq(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """:func:`weight_norm` with ``||W||^2`` computed as :func:`cached_weight_sumsq` computes it, kept nowhere:
    bitwise the norm the cached path serves, for callers that must not cache (one host synchronization)."""
    sumsq = weight_sumsq(weight)
    return weight_norm(
        weight, lora_A, lora_B, scaling, cached_sumsq=sumsq, weight_rows_finite=weight_rows_finite(sumsq)
    )


def weight_norm_with_cached_sumsq(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    base_tensors: tuple[torch.Tensor, ...],
    base_trainable: bool,
    sumsq_cache: NormCache,
    check: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """:func:`weight_norm` with ``||W||^2`` per row, and whether every row is finite, kept in ``sumsq_cache``
    (one slot; filled on a miss, with one host synchronization per version of ``W``).

    ``weight``/``lora_A``/``lora_B`` are the 2-D factors; ``base_tensors`` the tensors ``W`` is a pure function
    of (the entry's stamps); ``base_trainable``: one of them requires a gradient, so the entry is also keyed
    by the optimizer step. ``check(what, cached, fresh)`` is called under ``PEFT_DORA_NORM_CACHE=verify``
    with the cached and a recomputed sum of squares.
    """
    sumsq, rows_finite = cached_weight_sumsq(
        weight, base_tensors=base_tensors, base_trainable=base_trainable, sumsq_cache=sumsq_cache, check=check
    )
    return weight_norm(weight, lora_A, lora_B, scaling, cached_sumsq=sumsq, weight_rows_finite=rows_finite)


def cached_weight_sumsq(
    weight: torch.Tensor,
    *,
    base_tensors: tuple[torch.Tensor, ...],
    base_trainable: bool,
    sumsq_cache: NormCache,
    check: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, bool]:
    """``(||W||^2 per row, every row finite)`` from ``sumsq_cache`` (:func:`weight_norm_with_cached_sumsq`'s
    arguments), computed and stored on a miss: the same tensor object while ``W`` is unchanged."""
    settings = config.cache_settings()
    signature = (settings.norm_chunk_mb, settings.fused, write_epoch() if base_trainable else -1)
    cached = sumsq_cache.get(None, signature, base_tensors)
    if cached is None:
        sumsq = weight_sumsq(weight)
        cached = (sumsq, weight_rows_finite(sumsq))
        sumsq_cache.put(None, signature, base_tensors, cached)
    elif check is not None and settings.norm_cache == "verify":
        check("base weight sum of squares", cached[0], weight_sumsq(weight))
    return cached


def _dense_class_of_nonfinite_rows(
    norm: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    w_sumsq: torch.Tensor | None,
) -> torch.Tensor:
    """``norm`` with every row whose ``W + s * (B @ A)`` is not finite set to the dense row's class.

    ``probe_i = sum_k |B_ik| * ||A_k||`` is finite exactly when row ``i`` of ``B @ A`` is, and NaN where that
    row has a NaN from a NaN factor or ``0 * inf`` (module docstring for the exceptions); ``s = 0`` makes
    ``s * inf`` a NaN as in ``W + 0 * (B @ A)``; ``||W||^2_row`` (when ``W`` is not known to be finite) adds
    the base weight's own class. All terms are >= 0 or NaN: no ``inf - inf`` in the probe.
    """
    # products in B's dtype (a [d_out, r] temporary), except fp16, whose range a finite |B_ik| * ||A_k|| can
    # exceed (a false +inf would zero g); bf16 has fp32's range
    device = norm.device
    work = norm.dtype if lora_B.dtype == torch.float16 else lora_B.dtype
    if lora_B.dtype != work or lora_B.device != device:
        lora_B = lora_B.to(device=device, dtype=work)
    if lora_A.device != device:
        lora_A = lora_A.to(device)
    if lora_A.dtype == work:
        # one launch: a bf16 A's norm accumulates in fp32 and is rounded once to bf16, as the fp32 norm cast
        # to bf16 would be (only the class of each probe matters: finite, +inf or NaN)
        a_rows = torch.linalg.vector_norm(lora_A, dim=1)  # [r]
    else:
        a_rows = torch.linalg.vector_norm(lora_A, dim=1, dtype=norm.dtype).to(work)
    # elementwise, not a GEMV: BLAS may skip a zero a_k, and IEEE 0 * inf must give its NaN here
    probe = torch.linalg.vector_norm(lora_B * a_rows, ord=1, dim=1, dtype=norm.dtype)  # [d_out]
    if scaling == 0.0:
        probe = probe * 0.0
    if w_sumsq is not None:
        if w_sumsq.dtype != norm.dtype or w_sumsq.device != device:
            w_sumsq = w_sumsq.to(device=device, dtype=norm.dtype)
        probe = probe + w_sumsq
    # every term is >= 0, +inf or NaN (a sum of squares, an L1 norm), never -inf: "probe < inf" is
    # isfinite(probe) in one comparison (torch.isfinite is four elementwise ops)
    return torch.where(probe < torch.inf, norm, probe)


def _norm(weight, lora_A, lora_B, scaling, path, cached_sumsq, out_sumsq, repair_w_rows=None) -> torch.Tensor:
    """The body of :func:`weight_norm` on ``path``: the clamped norm, with no non-finite row repair, except on
    the kernel paths with ``repair_w_rows`` given (the kernel's repair; True: ``W`` is not known finite)."""
    if path in ("gemm", "triton"):
        from ..kernels.row_norm import gemm_weight_norm_sq, triton_weight_norm_sq

        # the kernel applies the clamp, IEEE sqrt and eps clamp in its final store
        kernel = gemm_weight_norm_sq if path == "gemm" else triton_weight_norm_sq
        return kernel(
            weight,
            lora_A,
            lora_B,
            scaling,
            cached_sumsq=cached_sumsq,
            eps=clamp_eps(weight.dtype),
            repair_nonfinite=repair_w_rows is not None,
            weight_known_finite=repair_w_rows is False,
        )
    if path == "dense":
        cdt = reference_compute_dtype(weight, lora_A, lora_B)
        elem = torch.finfo(cdt).bits // 8
        d_in, rank = weight.shape[1], lora_A.shape[0]
        fixed = elem * (rank * d_in + weight.shape[0])  # A cast copy, the result vector
        per_row = elem * (2 * d_in + rank)  # block, W rows cast, B rows cast
        rows = max(1, (config.get_dora_norm_threshold_bytes() - fixed) // per_row)
        norm_sq = dense_factor_row_norm_sq(weight, lora_A, lora_B, scaling, max_rows=rows, compute_dtype=cdt)
    else:
        cdt = reference_compute_dtype(weight, lora_A, lora_B)
        plan = plan_chunk_columns(
            weight.shape[0],
            weight.shape[1],
            lora_A.shape[0],
            weight_dtype=weight.dtype,
            lora_dtype=torch.promote_types(lora_A.dtype, lora_B.dtype),
            budget_bytes=config.get_dora_norm_threshold_bytes(),
            need_sumsq=cached_sumsq is None,
            compute_dtype=cdt,
        )
        norm_sq = factored_row_norm_sq(
            weight,
            lora_A,
            lora_B,
            scaling,
            chunk_columns=plan.chunk_columns,
            weight_sumsq=cached_sumsq,
            compute_dtype=cdt,
            out_sumsq=out_sumsq,
        )
    norm = norm_sq.clamp_min_(0).sqrt_().to(compute_dtype_for(weight.dtype, lora_A.dtype, lora_B.dtype))
    return norm.clamp_min_(clamp_eps(weight.dtype))


@torch.no_grad()
def dense_delta_norm(
    weight: torch.Tensor, delta: torch.Tensor, scaling: float, *, rank: int = 1, max_rows: int | None = None
) -> torch.Tensor:
    """Row norm of ``W + scaling * D`` for a dense delta ``D`` (PEFT's merge builds it), consistent with
    :func:`weight_norm` where ``scaling * D`` is zero.

    Rows with a non-zero delta: :func:`dense_row_norm` (not clamped). Rows where ``scaling * D`` is exactly
    zero (every row of an adapter whose ``lora_B`` is still zero): :func:`weight_norm` of ``W`` alone on
    :func:`weight_sumsq`, so bitwise the norm the forward computes there (a zero row of ``B`` makes its
    cross and Gram terms exact zeros) and the one the initial magnitude was rounded from. Merging an
    untrained adapter then divides the magnitude by exactly its own norm and leaves ``W`` unchanged.

    Args:
        weight: ``[d_out, d_in]`` (any float dtype; may be a strided view, as the forward passes it).
        delta: ``[d_out, d_in]``, any float dtype / device.
        scaling: Python float.
        rank: the rank of the factors the forward hands :func:`weight_norm` (its path depends on it:
            the dense form where ``d_in <= rank``); the unchanged rows go through the same path.
        max_rows: rows per step of the dense norm (bounds its fp32 temporaries).

    Returns:
        ``[d_out]`` in fp32 (fp64 when an input is fp64).
    """
    scaling = float(scaling)
    d_out, d_in = weight.shape
    if scaling == 0.0:
        untouched = torch.ones(d_out, dtype=torch.bool, device=weight.device)
    else:
        untouched = torch.linalg.vector_norm(delta, ord=float("inf"), dim=1).eq(0).to(weight.device)
    if not bool(untouched.any()):
        return dense_row_norm(weight, delta, scaling, max_rows=max_rows)
    rank = max(1, int(rank))
    no_adapter = (weight.new_zeros(rank, d_in), weight.new_zeros(d_out, rank))
    own = weight_norm(weight, *no_adapter, 0.0, cached_sumsq=weight_sumsq(weight))
    own = own.to(compute_dtype_for(weight.dtype, delta.dtype))
    if bool(untouched.all()):  # an untrained adapter: no dense norm needed
        return own
    return torch.where(untouched, own, dense_row_norm(weight, delta, scaling, max_rows=max_rows))


def conv_factors(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """2-D factors ``(W2, A2, B2)`` of a conv layer with ``||W2 + s*B2@A2||_row`` equal to PEFT's conv norm.

    PEFT builds the conv delta as ``(B.view(-1, r) @ A.view(r, -1)).reshape(W.shape)``. With ``groups=1``
    that is ``B2 = B.view(out, r)``, ``A2 = A.view(r, -1)``. With ``groups=g`` (B is ``[out, r/g, ...]``, A is
    ``[r, in*k]``) the reshape makes delta row ``i`` equal to ``B'[i // g] @ A'[:, block i % g]``, where
    ``B' = B.view(out/g, r)`` and ``A'`` is cut into ``g`` column blocks of width ``D = W.numel() / out``.
    That is a factored product of rank ``g*r``: ``A2`` stacks the blocks (``[g*r, D]``) and ``B2`` places
    ``B'[i // g]`` in block ``i % g`` of row ``i`` (``[out, g*r]``, block-sparse).

    Args:
        weight: conv weight ``[out, in/groups, *k]``.
        lora_A: ``[r, in, *k]`` (PEFT's lora_A conv weight); lora_B: ``[out, r/groups, 1, ...]``.
    """
    out = weight.shape[0]
    width = weight.numel() // out
    rank = lora_A.shape[0]
    w2 = weight.reshape(out, width)
    a_flat = lora_A.reshape(rank, -1)
    b_rows = lora_B.reshape(-1, rank)
    groups = a_flat.shape[1] // width
    if groups * width != a_flat.shape[1] or b_rows.shape[0] * groups != out:
        raise ValueError(
            f"conv factors do not match PEFT's layout: weight {tuple(weight.shape)}, "
            f"lora_A {tuple(lora_A.shape)}, lora_B {tuple(lora_B.shape)}"
        )
    if groups == 1:
        return w2, a_flat, b_rows
    a2 = a_flat.reshape(rank, groups, width).permute(1, 0, 2).reshape(groups * rank, width)
    rows = torch.arange(out, device=b_rows.device)
    block = (rows % groups).unsqueeze(1) * rank + torch.arange(rank, device=b_rows.device)
    # out of place: under vmap a batched lora_B cannot be scattered into an unbatched buffer
    b2 = b_rows.new_zeros(out, groups * rank).scatter(1, block, b_rows[rows // groups])
    return w2, a2, b2
