"""DoRA composition when PEFT passes ``base_result=None`` (``lora_dropout > 0`` in training).

The base output has to be recomputed from the dropped-out input: ``base = x @ W^T`` (no bias). Stock PEFT
casts all of ``W`` to the input dtype and materializes the full ``base``. Here both are produced per chunk
of output columns, sized so one chunk's temporaries fit ``PEFT_DORA_FWD_CHUNK_MB``, and each chunk is
composed immediately. The backward recomputes nothing: it uses the saved ``inner`` for the magnitude
gradient and walks the same column chunks of ``W`` for the input gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dispatch import config, rules
from ..kernels.compose_reference import compose_backward_reference
from ..kernels.operands import compute_dtype_for
from . import fused
from .compose import dora_compose

__all__ = ["compose_recompute_base", "forward_chunk_columns"]


def forward_chunk_columns(rows: int, d_out: int, d_in: int, act_bytes: int, weight_bytes: int) -> int:
    """Output columns per chunk so that one chunk's temporaries fit ``PEFT_DORA_FWD_CHUNK_MB``.

    Per column: the cast weight column (``d_in``), the base chunk, and the fp32 compose temporaries of
    the PyTorch path (three fp32 values per element) for every one of ``rows``.
    """
    per_column = d_in * weight_bytes + rows * (act_bytes + 12)
    cols = config.get_dora_fwd_threshold_bytes() // max(1, per_column)
    return int(max(1, min(d_out, cols)))


class _RecomputeBaseCompose(torch.autograd.Function):
    """Chunked ``(g - 1) * (x @ W^T) + g * (s * lora)``; ``W`` is a constant (its gradient takes plain autograd).

    Like ``compose._ComposeFunction``: ``inner`` is a second output (dropped by the caller) so that a double
    backward reaches ``x`` and ``lora`` through it, and while a graph is being created the backward is plain
    autograd ops (exact second-order gradients).
    """

    @staticmethod
    def forward(ctx, x, weight, lora, scale, scaling, out_dtype, grad_enabled):  # type: ignore[override]
        rows = lora.numel() // lora.shape[-1]
        d_out, d_in = weight.shape
        chunk = forward_chunk_columns(rows, d_out, d_in, x.element_size(), x.element_size())
        # needs_input_grad stays True under no_grad: inner is only worth writing when autograd records.
        save_inner = grad_enabled and ctx.needs_input_grad[3]
        out = torch.empty(lora.shape, dtype=out_dtype, device=lora.device)
        inner = torch.empty(lora.shape, dtype=out_dtype, device=lora.device) if save_inner else None
        for c0 in range(0, d_out, chunk):
            c1 = min(d_out, c0 + chunk)
            base_chunk = F.linear(x, weight[c0:c1].to(x.dtype))
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
            return None, None, None, None, None, None, None
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
        elif d_out is None:  # only through inner (double backward): inner = x @ W^T + s * lora
            extra = d_inner.to(compute_dtype_for(d_inner.dtype))
            d_lora = (extra * ctx.scaling).to(ctx.lora_dtype) if need_lora else None
            d_base = extra.to(x.dtype) if need_x else None
            d_scale = None
        else:
            d_lora, d_base, d_scale = compose_backward_reference(
                d_out,
                scale,
                inner,
                ctx.scaling,
                lora_dtype=ctx.lora_dtype,
                base_dtype=x.dtype,
                need_lora=need_lora,
                need_base=need_x,
                need_scale=need_scale,
                d_inner=d_inner,
            )
        d_x = _input_grad(d_base, weight, x) if need_x else None
        return d_x, None, d_lora, d_scale, None, None, None


def _input_grad(d_base: torch.Tensor, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``d_x = d_base @ W`` in ``x``'s dtype, differentiable in ``d_base`` (``W`` is a constant).

    A ``W`` in another dtype is cast in column chunks of ``d_x`` (bounded temporaries), so each element of
    ``d_x`` still comes out of one GEMM: one rounding.
    """
    if weight.dtype == x.dtype:
        return d_base @ weight
    d_in = weight.shape[1]
    step = forward_chunk_columns(
        d_base.numel() // d_base.shape[-1], d_in, weight.shape[0], x.element_size(), x.element_size()
    )
    if torch.is_grad_enabled():  # building a graph: out-of-place chunks
        return torch.cat([d_base @ weight[:, j0 : j0 + step].to(x.dtype) for j0 in range(0, d_in, step)], dim=-1)
    d_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    for j0 in range(0, d_in, step):
        j1 = min(d_in, j0 + step)
        d_x[..., j0:j1] = d_base @ weight[:, j0:j1].to(x.dtype)
    return d_x


def compose_recompute_base(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora: torch.Tensor,
    scale: torch.Tensor,
    scaling: float,
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``(g - 1) * (x @ W^T) + g * (s * lora)`` with the base recomputed chunk by chunk.

    Args:
        x: dropped-out input ``[..., d_in]`` (the dtype PEFT cast it to: the adapter dtype).
        weight: base weight as ``F.linear`` takes it, ``[d_out, d_in]`` (any dtype; cast per chunk).
        lora: ``B(A(x))`` ``[..., d_out]``.
        scale: ``g`` ``[d_out]``.
        scaling: ``s``.
        out_dtype: default ``promote(lora.dtype, x.dtype)``.
    """
    out_dtype = out_dtype or torch.promote_types(lora.dtype, x.dtype)
    scaling = float(scaling)
    if (weight.requires_grad and torch.is_grad_enabled()) or rules.plain_autograd_required():
        # A trainable base weight needs its own gradient, and torch.func transforms and torch.jit tracing
        # need plain ops: keep everything in plain autograd.
        base = F.linear(x, weight.to(x.dtype))
        return dora_compose(lora, base, scale, scaling, out_dtype=out_dtype)
    grad_enabled = torch.is_grad_enabled()
    return _RecomputeBaseCompose.apply(x, weight.detach(), lora, scale, scaling, out_dtype, grad_enabled)[0]
