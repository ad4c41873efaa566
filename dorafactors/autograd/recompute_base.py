"""The base output recomputed from PEFT's dropped-out input (``lora_dropout > 0`` in training:
``base_result=None``), and the DoRA composition on it.

The base output has to be recomputed from the dropped-out input: ``base = x @ W^T`` (no bias), and the input
gradient through it is ``d_x = d_base @ W``. Stock PEFT casts all of ``W`` to the input dtype and
materializes the full ``base``. Here (:class:`BaseRecompute`, :func:`base_input_grad`):

* with PEFT's default dtypes (fp32 adapters, so an fp32 dropped-out input, on a bf16 ``W``) both GEMMs run
  on bf16 tensor cores at fp32 precision: the fp32 operand is split exactly into three bf16 parts
  (``kernels/split_matmul.py``), where ``dispatch/rules.py::split_matmul_ok`` allows (CUDA, sizes above
  launch overhead); otherwise ``W`` is cast to the input dtype per chunk, as stock does as a whole;
* the forward GEMM needs only one of those bf16 GEMMs when the caller knows where the input came from
  (``bf16_origin_scale``: ``layers/linear.py::DoraLinearVariant`` establishes it for PEFT's own dropout
  path). PEFT casts a bf16 activation ``x0`` to fp32 and its ``nn.Dropout`` returns
  ``x = fp32(x0 * c)`` or 0, with ``c = 1 / (1 - p)`` in fp32. Then ``bf16(x / c)`` is ``x0`` (or 0) exactly:
  ``x / c`` is within a few fp32 ulps of the bf16 value ``x0``, and rounding to bf16 lands on it. So
  ``x @ W^T = c * (bf16(x / c) @ W^T)`` up to the fp32 rounding of ``x0 * c`` per element (relative
  ``2^-24``, the size of an fp32 GEMM's own accumulation error): one bf16 GEMM with exact products and an
  fp32 result, scaled by ``c`` in fp32;
* the weight copies (the cast, or the tripled bf16 weight of the split GEMM) are made per chunk of output
  columns, sized so one chunk's temporaries fit ``PEFT_DORA_FWD_CHUNK_MB``.

:func:`compose_recompute_base` composes each column chunk as soon as it exists and saves ``inner`` for the
magnitude gradient; it is the general path (any ``lora_B`` module, a trainable ``W``). Linear layers with a
plain ``lora_B`` take ``lora_compose.dora_linear_compose`` instead, which saves the base output in place of
``inner`` (same size here: the recomputed base output has the input's dtype).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dispatch import config, rules
from ..kernels.operands import promote
from ..kernels.split_matmul import linear_on_parts, matmul_split, mm_exact_products, split_bf16x3, split_counts
from . import fused
from .compose import dora_compose, reference_backward

__all__ = [
    "BaseRecompute",
    "base_input_grad",
    "bf16_from_dropped",
    "compose_recompute_base",
    "forward_chunk_columns",
]

#: Bytes per weight element of the split GEMM's tripled bf16 weight (``kernels/split_matmul.py``).
_SPLIT_WEIGHT_BYTES = 6
#: Column chunks start at multiples of this many columns (256 bytes of fp32): a GEMM writing into a column
#: slice of the whole output needs an aligned start for cuBLAS's fast kernels (an unaligned one falls back
#: to kernels with 4-byte loads, several times slower on an H200).
CHUNK_COLUMN_ALIGN = 64


def forward_chunk_columns(rows: int, d_out: int, d_in: int, act_bytes: int, weight_bytes: int) -> int:
    """Output columns per chunk so that one chunk's temporaries fit ``PEFT_DORA_FWD_CHUNK_MB``: all of
    ``d_out``, or a multiple of ``CHUNK_COLUMN_ALIGN`` where the budget allows one.

    Per column: the cast weight column (``d_in``), the base chunk, and the fp32 compose temporaries of
    the PyTorch path (three fp32 values per element) for every one of ``rows``.
    """
    per_column = d_in * weight_bytes + rows * (act_bytes + 12)
    cols = config.get_dora_fwd_threshold_bytes() // max(1, per_column)
    if cols >= d_out:
        return int(max(1, d_out))
    if cols >= CHUNK_COLUMN_ALIGN:
        cols -= cols % CHUNK_COLUMN_ALIGN
    return int(max(1, cols))


def bf16_from_dropped(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``bf16(x / scale)`` ``[rows, d_in]``: the bf16 activation behind ``x = fp32(x0 * scale)`` (module docstring).

    Exact for every finite ``x0`` whose product with ``scale`` stays finite; a non-finite ``x`` stays
    non-finite of its class. Two passes of PyTorch ops (the fp32 quotient, then the cast).
    """
    return torch.div(x, scale).to(torch.bfloat16)


class BaseRecompute:
    """``x @ W^T`` of one forward, column chunk by column chunk, in ``x``'s dtype.

    Args:
        x2: the dropped-out input as ``[rows, d_in]``.
        weight: ``W`` ``[d_out, d_in]`` (any float dtype; a constant).
        bf16_origin_scale: ``c`` when ``x2`` is known to be ``fp32(x0 * c)`` (or 0) for a bf16 ``x0`` (module
            docstring); None when nothing is known about it.

    Where the split GEMM may run (fp32 ``x2``, bf16 ``W``, ``rules.split_matmul_ok``): with
    ``bf16_origin_scale``, ``x0 = bf16(x2 / c)`` is made once (``2 * rows * d_in`` bytes) and every chunk is
    one exact-product bf16 GEMM scaled by ``c``; without it ``x2``'s three bf16 parts are made once
    (``6 * rows * d_in`` bytes) and every chunk is one GEMM over them. Otherwise each chunk casts its rows of
    ``W`` to ``x2``'s dtype (no copy when the dtypes agree).
    """

    def __init__(self, x2: torch.Tensor, weight: torch.Tensor, bf16_origin_scale: float | None = None) -> None:
        rows, d_in = x2.shape
        d_out = weight.shape[0]
        self.x2 = x2
        self.weight = weight
        self.split = x2.dtype != weight.dtype and rules.split_matmul_ok(x2, weight, rows * d_in * d_out)[0]
        self.origin_scale = bf16_origin_scale if self.split else None
        self.recovered = bf16_from_dropped(x2, bf16_origin_scale) if self.origin_scale is not None else None
        self.parts = split_bf16x3(x2) if self.split and self.recovered is None else None
        if self.recovered is not None:
            self.weight_bytes = weight.element_size()  # W is used as it is: no copy
        else:
            self.weight_bytes = _SPLIT_WEIGHT_BYTES if self.split else x2.element_size()
        self.chunk = forward_chunk_columns(rows, d_out, d_in, x2.element_size(), self.weight_bytes)

    def columns(self, c0: int, c1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """``(x @ W^T)[:, c0:c1]`` ``[rows, c1 - c0]`` in ``x``'s dtype: a new tensor, or written into ``out``
        (a row-strided view, e.g. a column slice of the whole output)."""
        rows_of_w = self.weight[c0:c1]
        if self.recovered is not None:
            split_counts["recovered"] += 1
            return mm_exact_products(self.recovered, rows_of_w.t(), out).mul_(self.origin_scale)
        if self.parts is not None:
            return linear_on_parts(self.parts, rows_of_w, out)
        cast = rows_of_w.to(self.x2.dtype)
        if out is None:
            return F.linear(self.x2, cast)
        return torch.mm(self.x2, cast.t(), out=out)

    def full(self) -> torch.Tensor:
        """The whole ``[rows, d_out]`` base output, each column chunk's GEMM writing straight into it."""
        d_out = self.weight.shape[0]
        # F.linear (or the recovered input's GEMM) on W itself: no temporary but the output
        no_copy = self.weight.dtype == self.x2.dtype or self.recovered is not None
        if no_copy or self.chunk >= d_out:
            return self.columns(0, d_out)
        base = torch.empty((self.x2.shape[0], d_out), dtype=self.x2.dtype, device=self.x2.device)
        for c0 in range(0, d_out, self.chunk):
            c1 = min(d_out, c0 + self.chunk)
            self.columns(c0, c1, out=base[:, c0:c1])
        return base


class _RecomputeBaseCompose(torch.autograd.Function):
    """Chunked ``(g - 1) * (x @ W^T) + g * (s * lora)``; ``W`` is a constant (its gradient takes plain autograd).

    Like ``compose._ComposeFunction``: ``inner`` is a second output (dropped by the caller) so that a double
    backward reaches ``x`` and ``lora`` through it, and while a graph is being created the backward is plain
    autograd ops (exact second-order gradients).
    """

    @staticmethod
    def forward(ctx, x, weight, lora, scale, scaling, out_dtype, grad_enabled, origin_scale):  # type: ignore[override]
        d_out, d_in = weight.shape
        recompute = BaseRecompute(x.reshape(-1, d_in), weight, origin_scale)
        chunk = recompute.chunk
        # needs_input_grad stays True under no_grad: inner is only worth writing when autograd records.
        save_inner = grad_enabled and ctx.needs_input_grad[3]
        out = torch.empty(lora.shape, dtype=out_dtype, device=lora.device)
        inner = torch.empty(lora.shape, dtype=out_dtype, device=lora.device) if save_inner else None
        for c0 in range(0, d_out, chunk):
            c1 = min(d_out, c0 + chunk)
            base_chunk = recompute.columns(c0, c1).view(*lora.shape[:-1], c1 - c0)
            fused.compose_into(
                out[..., c0:c1],
                inner[..., c0:c1] if save_inner else None,
                lora[..., c0:c1],
                base_chunk,
                scale[c0:c1],
                scaling,
            )
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight, scale, inner)
        ctx.scaling = scaling
        ctx.chunk = chunk
        ctx.lora_dtype = lora.dtype
        return out, inner

    @staticmethod
    def backward(ctx, d_out, d_inner):  # type: ignore[override]
        need_x, _, need_lora, need_scale = ctx.needs_input_grad[:4]
        if d_out is None and d_inner is None:
            return None, None, None, None, None, None, None, None
        x, weight, scale, inner = ctx.saved_tensors
        if d_inner is None and not torch.is_grad_enabled():
            d_lora, d_base, d_scale = fused.compose_backward(
                d_out,
                scale,
                inner,
                ctx.scaling,
                lora_dtype=ctx.lora_dtype,
                base_dtype=x.dtype,
                need_lora=need_lora,
                need_base=need_x,
                need_scale=need_scale,
            )
        else:  # plain ops; with only d_inner (double backward): inner = x @ W^T + s * lora
            d_lora, d_base, d_scale = reference_backward(
                d_out,
                scale,
                inner,
                d_inner,
                ctx.scaling,
                channel_dim=-1,
                lora_dtype=ctx.lora_dtype,
                base_dtype=x.dtype,
                need_lora=need_lora,
                need_base=need_x,
                need_g=need_scale,
            )
        d_x = base_input_grad(d_base, weight, x.dtype) if need_x else None
        return d_x, None, d_lora, d_scale, None, None, None, None


def base_input_grad(d_base: torch.Tensor, weight: torch.Tensor, x_dtype: torch.dtype) -> torch.Tensor:
    """``d_x = d_base @ W`` ``[..., d_in]`` in ``x_dtype`` (``d_base``'s), differentiable in ``d_base`` (``W`` is a
    constant).

    An fp32 ``d_base`` with a bf16 ``W`` takes the split GEMM where ``rules.split_matmul_ok`` allows (not
    while a graph is being created: the fp32-output GEMM has no derivative); otherwise a ``W`` in another
    dtype is cast in column chunks of ``d_x`` (bounded temporaries). Either way each element of ``d_x``
    comes out of one GEMM: one rounding.
    """
    if weight.dtype == x_dtype:
        return d_base @ weight
    d_out, d_in = weight.shape
    rows = d_base.numel() // max(1, d_out)
    differentiable = torch.is_grad_enabled()
    if not differentiable and rules.split_matmul_ok(d_base, weight, rows * d_in * d_out)[0]:
        budget = config.get_dora_fwd_threshold_bytes()
        d_x = matmul_split(d_base.reshape(rows, d_out), weight, budget_bytes=budget)
        return d_x.view(*d_base.shape[:-1], d_in)
    step = forward_chunk_columns(rows, d_in, d_out, torch.finfo(x_dtype).bits // 8, torch.finfo(x_dtype).bits // 8)
    if differentiable:  # building a graph: out-of-place chunks
        return torch.cat([d_base @ weight[:, j0 : j0 + step].to(x_dtype) for j0 in range(0, d_in, step)], dim=-1)
    d_x = torch.empty((*d_base.shape[:-1], d_in), dtype=x_dtype, device=d_base.device)
    for j0 in range(0, d_in, step):
        j1 = min(d_in, j0 + step)
        d_x[..., j0:j1] = d_base @ weight[:, j0:j1].to(x_dtype)
    return d_x


def compose_recompute_base(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora: torch.Tensor,
    scale: torch.Tensor,
    scaling: float,
    *,
    out_dtype: torch.dtype | None = None,
    bf16_origin_scale: float | None = None,
) -> torch.Tensor:
    """``(g - 1) * (x @ W^T) + g * (s * lora)`` with the base recomputed chunk by chunk.

    Args:
        x: dropped-out input ``[..., d_in]`` (the dtype PEFT cast it to: the adapter dtype).
        weight: base weight as ``F.linear`` takes it, ``[d_out, d_in]`` (any dtype; cast per chunk).
        lora: ``B(A(x))`` ``[..., d_out]``.
        scale: ``g`` ``[d_out]``.
        scaling: ``s``.
        out_dtype: default ``promote(lora.dtype, x.dtype)``.
        bf16_origin_scale: ``c`` where ``x`` is known to be ``fp32(x0 * c)`` of a bf16 ``x0`` (``BaseRecompute``).
    """
    out_dtype = out_dtype or promote(lora.dtype, x.dtype)
    scaling = float(scaling)
    if (
        (weight.requires_grad and torch.is_grad_enabled())
        or rules.plain_autograd_required()
        or torch.compiler.is_compiling()
    ):
        # A trainable base weight needs its own gradient, torch.func transforms and torch.jit tracing need
        # plain ops, and under torch.compile AOTAutograd plans the activations itself (a custom Function
        # traced by Dynamo lost its gradients on torch 2.11 CUDA): keep everything in plain autograd.
        base = F.linear(x, weight.to(x.dtype))
        return dora_compose(lora, base, scale, scaling, out_dtype=out_dtype)
    grad_enabled = torch.is_grad_enabled()
    return _RecomputeBaseCompose.apply(
        x, weight.detach(), lora, scale, scaling, out_dtype, grad_enabled, bf16_origin_scale
    )[0]
