"""Plain PyTorch reference of the factored row norm (``row_norm.py``): ``||W + s*B@A||_row`` without ``B@A``.

    ||W + s*B A||^2_row = ||W||^2_row + 2s * rowsum(B * (W A^T)) + s^2 * rowsum((B (A A^T)) * B)

This is the reference implementation (CPU, and any device where the Triton kernel does not apply). It
walks ``d_in`` in column chunks sized by :func:`plan_chunk_columns`, which counts every temporary the loop
allocates, so the working set stays inside the budget (``PEFT_DORA_NORM_CHUNK_MB``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .operands import compute_dtype_for

__all__ = ["ChunkPlan", "factored_row_norm_sq", "plan_chunk_columns", "row_sumsq"]


@dataclass(frozen=True)
class ChunkPlan:
    """How the reference norm walks ``d_in``: columns per chunk and the bytes it expects to hold."""

    chunk_columns: int
    fixed_bytes: int
    per_column_bytes: int

    @property
    def working_set_bytes(self) -> int:
        return self.fixed_bytes + self.chunk_columns * self.per_column_bytes


def plan_chunk_columns(
    d_out: int,
    d_in: int,
    rank: int,
    *,
    weight_dtype: torch.dtype,
    lora_dtype: torch.dtype,
    budget_bytes: int,
    need_sumsq: bool,
    compute_dtype: torch.dtype | None = None,
) -> ChunkPlan:
    """Choose the d_in chunk width of :func:`factored_row_norm_sq` so its working set fits ``budget_bytes``.

    Counted (compute dtype ``c``, 4 or 8 bytes): ``U [d_out, r]``, ``G [r, r]``, the ``sumsq`` vector, and at
    the end ``B`` in ``c`` (if cast) plus ``B @ G`` ``[d_out, r]``. Per chunk column: the cast copy of the W
    chunk (or, for a W already in ``c``, the square temporary), the cast copy of the A chunk.

    The chunk never spans all of ``d_in`` when it would copy W: no temporary of ``d_out * d_in`` elements.
    If the budget is below the fixed cost, the chunk is one column (the fixed cost cannot be chunked).
    """
    cdt = compute_dtype or compute_dtype_for(weight_dtype, lora_dtype)
    c = torch.finfo(cdt).bits // 8
    fixed = c * (d_out * rank + rank * rank + d_out)
    fixed += c * d_out * rank * (2 if lora_dtype != cdt else 1)  # B cast + B@G at assembly
    w_copies = weight_dtype != cdt
    per_col = 0
    if w_copies or need_sumsq:
        per_col += c * d_out  # W chunk cast copy, or the square temporary of an uncast chunk
    if lora_dtype != cdt:
        per_col += c * rank  # A chunk cast copy
    if per_col == 0:
        cols = d_in
    else:
        cols = max(1, (budget_bytes - fixed) // per_col) if budget_bytes > fixed else 1
        cols = min(cols, d_in)
        if d_in > 1 and (w_copies or need_sumsq):
            cols = min(cols, (d_in + 1) // 2)  # never a full-size copy of W
    return ChunkPlan(chunk_columns=int(cols), fixed_bytes=int(fixed), per_column_bytes=int(per_col))


@torch.no_grad()
def row_sumsq(
    weight: torch.Tensor, *, chunk_columns: int | None = None, compute_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``sum_j W_ij^2`` per row of ``weight`` ``[d_out, d_in]``, accumulated in ``compute_dtype``."""
    cdt = compute_dtype or compute_dtype_for(weight.dtype)
    d_out, d_in = weight.shape
    step = d_in if not chunk_columns else max(1, int(chunk_columns))
    out = torch.zeros(d_out, dtype=cdt, device=weight.device)
    for c0 in range(0, d_in, step):
        chunk = weight[:, c0 : c0 + step].to(cdt)
        if chunk.dtype == weight.dtype:
            chunk = chunk.square()  # uncast view: one temporary
        else:
            chunk.square_()  # our own cast copy: square in place
        out += chunk.sum(dim=1)
    return out


@torch.no_grad()
def factored_row_norm_sq(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    *,
    chunk_columns: int,
    weight_sumsq: torch.Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
    out_sumsq: torch.Tensor | None = None,
) -> torch.Tensor:
    """Squared row norm of ``W + s * B @ A`` (not clamped), accumulated in ``compute_dtype``.

    Args:
        weight: ``W`` ``[d_out, d_in]``, any float dtype, may be a strided view (fan_in_fan_out, embeddings).
        lora_A: ``A`` ``[r, d_in]``.
        lora_B: ``B`` ``[d_out, r]``.
        scaling: ``s``.
        chunk_columns: d_in columns per step (see :func:`plan_chunk_columns`).
        weight_sumsq: cached ``||W||^2_row`` in the compute dtype; computed here when None.
        compute_dtype: accumulation dtype; default fp32 (fp64 if any input is fp64).
        out_sumsq: optional ``[d_out]`` buffer that receives ``||W||^2_row`` (computed here or given).

    Returns:
        ``[d_out]`` squared norm in the compute dtype; may hold tiny negatives from rounding.

    Conditioning: the three terms cancel when a row of ``B @ A`` is small next to ``|B_i| |A|`` (the Gram
    form ``B_i G B_i^T``) or when ``W_i ~ -s (B A)_i``; the relative error is about the unit roundoff of
    ``compute_dtype`` times the cancellation ratio. ``engine.weight_norm`` therefore accumulates in fp64 on
    the CPU and uses the exact dense form when ``d_in <= r``.
    """
    cdt = compute_dtype or compute_dtype_for(weight.dtype, lora_A.dtype, lora_B.dtype)
    d_out, d_in = weight.shape
    rank = lora_A.shape[0]
    if lora_A.shape != (rank, d_in) or lora_B.shape != (d_out, rank):
        raise ValueError(
            f"shape mismatch: W {tuple(weight.shape)}, A {tuple(lora_A.shape)}, B {tuple(lora_B.shape)}; "
            "expected A [r, d_in] and B [d_out, r]"
        )
    device = weight.device
    need_sumsq = weight_sumsq is None
    if scaling == 0.0:
        if need_sumsq:
            weight_sumsq = row_sumsq(weight, chunk_columns=chunk_columns, compute_dtype=cdt)
        if out_sumsq is not None:
            out_sumsq.copy_(weight_sumsq)
        return weight_sumsq.to(cdt).clone()
    sumsq = torch.zeros(d_out, dtype=cdt, device=device) if need_sumsq else weight_sumsq.to(cdt)

    U = torch.zeros(d_out, rank, dtype=cdt, device=device)
    gram = torch.zeros(rank, rank, dtype=cdt, device=device)
    step = max(1, int(chunk_columns))
    for c0 in range(0, d_in, step):
        w_chunk = weight[:, c0 : c0 + step].to(cdt)
        a_chunk = lora_A[:, c0 : c0 + step].to(device=device, dtype=cdt)
        U.addmm_(w_chunk, a_chunk.T)
        gram.addmm_(a_chunk, a_chunk.T)
        if need_sumsq:
            if w_chunk.dtype == weight.dtype:
                sumsq += w_chunk.square().sum(dim=1)
            else:
                sumsq += w_chunk.square_().sum(dim=1)
        del w_chunk, a_chunk

    if out_sumsq is not None:
        out_sumsq.copy_(sumsq)
    b = lora_B.to(device=device, dtype=cdt)
    cross = U.mul_(b).sum(dim=1)
    del U
    ba = torch.mm(b, gram).mul_(b).sum(dim=1)
    return sumsq + (2.0 * scaling) * cross + (scaling * scaling) * ba
