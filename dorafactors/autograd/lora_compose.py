"""Training composition of a Linear DoRA layer with ``lora_B`` inside one autograd node.

    lora = h @ B^T            h = A x (lora_A's output, [..., r]), B = lora_B.weight ([d_out, r])
    out  = (g - 1) * base + g * (s * lora)

The magnitude gradient is ``d_g = sum_t d_out * (base + s * lora)``. :func:`compose.dora_compose` saves
``inner = base + s * lora`` for it: one ``[tokens, d_out]`` activation in the *output* dtype, i.e. fp32 with
PEFT's default dtypes (fp32 adapters on a bf16 base), twice the bf16 base output. This node saves the base
output in its own dtype and takes the LoRA part from

    sum_t d_out[t, j] * lora[t, j]  =  sum_k B[j, k] * M[j, k],        M = d_out^T h     ([d_out, r])

``M`` is, up to a row scaling, the gradient of ``B`` itself: ``d_B = (g * s)[:, None] * M``. With ``lora_B``
inside the node one GEMM gives both, so the LoRA part of ``d_g`` costs no GEMM at all: the backward kernel's
pass over ``d_out`` (``d_base``, ``sum_t d_out * base``) also turns ``M`` into ``d_B``, ``(g * s) B`` and ``d_g``,
in the program that finishes each column tile (one launch, as the plain composition's backward). The
alternatives cost a ``2 * tokens * d_out * r``-FLOP GEMM each: recomputing ``lora`` (plus a ``[tokens, d_out]``
temporary and a pass over it) or computing ``M`` beside ``lora_B``'s own ``d_B`` GEMM (on CUDA cores with fp32
adapters: about a sixth of the adapters' FLOPs).
The input gradient through ``B`` is ``d_h = d_out @ ((g * s)[:, None] * B)``: ``d_lora`` is never
materialized, and the forward composes in place into its own ``lora`` temporary.

Saved: ``h`` (when ``B`` or ``g`` needs a gradient: the tensor ``lora_B``'s linear would save, so no extra
memory), ``B``, ``g``, and the base output when ``g`` needs a gradient. With a trainable magnitude that is
one ``[tokens, d_out]`` activation in the base output's dtype per layer (the floor), with a frozen one none.

``base=None`` (PEFT's dropout path): the base output is recomputed from the dropped-out input ``x``
(``recompute_base.BaseRecompute``: the bf16x3 split GEMM for an fp32 ``x`` on a bf16 ``W``, or one bf16 GEMM
where ``x`` is known to be PEFT's dropout of a bf16 activation), saved in
``x``'s dtype when ``g`` needs a gradient, and ``d_x = d_base @ W`` (``recompute_base.base_input_grad``).

``add_base=True`` (given ``base``; ``layers/linear.py``'s training variant without dropout): the node returns
PEFT's whole variant output ``base + out`` instead of ``out``, composed in the same kernel pass, and
``d_base = d_out + (g - 1) * d_out``: PEFT's ``result + extra`` in the forward and autograd's sum of the two
gradients reaching ``result`` in the backward cost no launch and no ``[tokens, d_out]`` pass of their own.

``divisor`` given (``layers/linear.py`` with a trainable magnitude): ``scale`` is the magnitude ``m`` and the
node takes ``g = m / divisor`` itself, in its kernels where they run (the forward kernel divides each column's
magnitude, the backward kernel writes ``d_g / divisor`` in ``m``'s dtype), else with PyTorch ops inside the
node: no division launch, no division node and no cast to the parameter's dtype per training call, with the
values of autograd's division (``div_rn``: IEEE fp32 division, one rounding to ``m``'s dtype).

Second-order gradients (``create_graph=True``): the backward is then :func:`lora_compose_backward_reference`,
plain autograd ops on the saved inputs (the recomputed base output is rebuilt from ``x`` differentiably), so
double backward is exact. Precision: one rounding per result, fp32 (fp64) arithmetic, products of the GEMMs
exact-in-fp32 where half operands meet (``M`` with fp32 output).

Used by ``layers/linear.py`` for a plain, hook-free, bias-free ``nn.Linear`` ``lora_B`` in eager training
without autocast; every other case keeps ``lora_B`` as a module and :func:`compose.dora_compose`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dispatch import rules
from ..kernels.compose_reference import compose_forward_reference, lora_b_grads_reference
from ..kernels.operands import HALF_DTYPES, KERNEL_DTYPES, compute_dtype_for, mm_out_dtype_available, promote
from . import fused
from .recompute_base import BaseRecompute, base_input_grad

__all__ = ["dora_linear_compose", "lora_compose_backward_reference"]


def _mm_fp32(a: torch.Tensor, b: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
    """``a @ b`` accumulated and returned in ``cdt`` (fp32/fp64); half operands stay half on CUDA (fp32-output
    GEMM, exact products), elsewhere and while a graph is being created they are upcast (same products)."""
    half = a.dtype == b.dtype and a.dtype in HALF_DTYPES and cdt == torch.float32
    if half and a.device.type == "cuda" and not torch.is_grad_enabled() and mm_out_dtype_available():
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.to(cdt), b.to(cdt))


def lora_compose_backward_reference(
    d_out: torch.Tensor,
    h: torch.Tensor | None,
    weight_b: torch.Tensor | None,
    base: torch.Tensor | None,
    scale: torch.Tensor,
    scaling: float,
    *,
    need_h: bool,
    need_b: bool,
    need_base: bool,
    need_g: bool,
    base_dtype: torch.dtype,
    h_dtype: torch.dtype,
    add_base: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(d_h, d_B, d_base, d_g)`` of the node, in plain autograd ops (differentiable in every argument).

    ``d_base = (g - 1) d_out`` (``add_base``: ``d_out + (g - 1) d_out``); ``M = d_out^T h``; ``d_B = (g s) M``;
    ``d_g = sum_t d_out * base + s * rowsum(B * M)``; ``d_h = d_out @ ((g s) B)`` (a GEMM in ``promote(d_out, B)``).
    """
    n = scale.shape[0]
    cdt = compute_dtype_for(d_out.dtype, scale.dtype)
    d2 = d_out.reshape(-1, n)
    g = scale.to(cdt)
    d_base = None
    if need_base:
        d_base = d2.to(cdt) * (g - 1.0)
        if add_base:
            d_base = d2.to(cdt) + d_base
        d_base = d_base.to(base_dtype).view(d_out.shape)
    h2 = h.reshape(-1, h.shape[-1]) if h is not None else None
    m = _mm_fp32(d2.t(), h2, cdt) if (need_b or need_g) else None  # type: ignore[arg-type]
    d_g_base = (base.reshape(-1, n).to(cdt) * d2.to(cdt)).sum(0) if need_g else None  # type: ignore[union-attr]
    gemm_dtype = promote(d_out.dtype, weight_b.dtype)  # type: ignore[union-attr]
    d_b, scaled_b, d_g = lora_b_grads_reference(
        m,
        weight_b,
        scale,
        d_g_base,
        scaling,
        d_out=d2 if need_b else None,
        h=h2,
        need_b=need_b,
        scaled_b_dtype=gemm_dtype if need_h else None,
        need_g=need_g,
    )
    d_h = None
    if need_h:
        d_h = (d2.to(gemm_dtype) @ scaled_b).to(h_dtype).view(*d_out.shape[:-1], -1)
    return d_h, d_b, d_base, d_g


def _backward_fast(ctx, d_out, h, weight_b, base, scale, divisor, need_h, need_b, need_base, need_g):
    """The node's backward with no graph to create: the ``M`` GEMM, one kernel launch for ``d_base``, ``d_B``,
    ``(g s) B`` and ``d_g`` (``fused.compose_backward_lora_b``: the Triton kernel wherever the kernels may run,
    as the forward decided in ``ctx.kernel``, else the references), the ``d_h`` GEMM. Tensors keep their rank
    where the kernel takes them as they are (no view per call). With ``divisor``, ``scale`` is the magnitude
    and the last result its gradient (in its dtype)."""
    n = scale.shape[0]
    # with a divisor, the magnitude as it is (the kernel divides and returns its gradient); else an fp32 g, so
    # that d_g rounds once, at the end
    fp32_or_wider = scale.dtype in (torch.float32, torch.float64)
    g = scale if divisor is not None or fp32_or_wider else scale.float()
    d2 = d_out if d_out.dim() == 2 else d_out.reshape(-1, n)
    h2 = None
    m = None
    if need_b or need_g:
        h2 = h if h.dim() == 2 else h.reshape(-1, h.shape[-1])
        m = _mm_fp32(d2.t(), h2, compute_dtype_for(d_out.dtype, scale.dtype))
    gemm_dtype = promote(d_out.dtype, weight_b.dtype)
    d_base, d_b, scaled_b, d_g = fused.compose_backward_lora_b(
        d_out,
        g,
        base if need_g else None,
        m,
        weight_b,
        h2,
        ctx.scaling,
        base_dtype=ctx.base_dtype,
        need_base=need_base,
        need_b=need_b,
        scaled_b_dtype=gemm_dtype if need_h else None,
        need_g=need_g,
        kernel=ctx.kernel,
        add_base=ctx.add_base,
        divisor=divisor,
    )
    if need_g and d_g.dtype != scale.dtype:
        d_g = d_g.to(scale.dtype)
    d_h = None
    if need_h:
        d_h = torch.mm(d2 if d2.dtype == gemm_dtype else d2.to(gemm_dtype), scaled_b)
        if d_h.dtype != ctx.h_dtype:
            d_h = d_h.to(ctx.h_dtype)
        if d_out.dim() != 2:
            d_h = d_h.view(*d_out.shape[:-1], d_h.shape[-1])
    return d_h, d_b, d_base, d_g


def _compose_whole(lora, base, g, scaling, out_dtype, kernel: bool, add_base: bool = False, divisor=None):
    """``(g - 1) base + g s lora`` of same-shaped operands (``add_base``: plus ``base``); in place into ``lora``
    on the kernel path. ``divisor``: ``g`` is the magnitude, divided by ``divisor`` first (inside the kernel
    where it can)."""
    if kernel and out_dtype == lora.dtype:
        return fused.compose_inplace(lora, base, g, scaling, add_base, divisor)
    if divisor is not None:
        g = g / divisor
    if kernel and not add_base:
        return fused.compose(lora, base, g, scaling, channel_dim=-1, out_dtype=out_dtype)
    out, _ = compose_forward_reference(lora, base, g, scaling, out_dtype=out_dtype, add_base=add_base)
    return out


class _LoraComposeFunction(torch.autograd.Function):
    """``(g - 1) * base + g * s * (h @ B^T)`` (``add_base``: plus ``base``); ``base`` given, or recomputed as
    ``x @ W^T`` (``W`` constant). ``g`` is ``scale``, or ``scale / divisor`` (``scale`` the magnitude) where
    ``divisor`` is given."""

    @staticmethod
    def forward(ctx, h, weight_b, base, x, weight, scale, scaling, out_dtype, origin_scale, add_base, divisor):  # type: ignore[override]
        need_h, need_b, _, need_x, _, need_g = ctx.needs_input_grad[:6]
        n = weight_b.shape[0]
        lora = F.linear(h, weight_b)
        g = scale if scale.is_contiguous() else scale.contiguous()
        recompute = base is None
        # the forward kernel by the training compose's rule (its size threshold: below it PyTorch's few eager ops
        # cost less host time than a launch); the backward kernel wherever the kernels may run, since it
        # replaces more than a dozen eager ops (d_base, d_g, d_B, (g s) B) with one launch
        proxy = lora if recompute else base
        kernel = fused.available_for(lora, proxy, g, -1, training=True, out_dtype=out_dtype)
        backward_kernel = kernel or fused.available_for(lora, proxy, g, -1, training=False, out_dtype=out_dtype)
        backward_kernel = backward_kernel and rules.fused_backward_enabled()[0]
        if not recompute:
            out = _compose_whole(lora, base, g, scaling, out_dtype, kernel, add_base, divisor)
            saved_base = base if need_g else None
        else:
            if divisor is not None:
                g = g / divisor
            rows = lora.numel() // n if n else 0
            lora2 = lora.view(rows, n)
            recomputer = BaseRecompute(x.reshape(rows, x.shape[-1]), weight, origin_scale)
            if need_g or recomputer.chunk >= n:
                base2 = recomputer.full()
                out2 = _compose_whole(lora2, base2, g, scaling, out_dtype, kernel)
                saved_base = base2.view(lora.shape) if need_g else None
            else:  # no base output to save: compose chunk by chunk, each chunk's temporaries bounded
                out2 = lora2
                if out_dtype != lora2.dtype:
                    out2 = torch.empty((rows, n), dtype=out_dtype, device=lora.device)
                for c0 in range(0, n, recomputer.chunk):
                    c1 = min(n, c0 + recomputer.chunk)
                    fused.compose_into(
                        out2[:, c0:c1], None, lora2[:, c0:c1], recomputer.columns(c0, c1), g[c0:c1], scaling
                    )
                saved_base = None
            out = out2.view(lora.shape)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(
            h if (need_b or need_g) else None,
            weight_b if (need_h or need_b or need_g) else None,  # d_B takes its dtype (a parameter: no memory)
            saved_base,
            x if (recompute and need_g and need_x) else None,  # rebuilds base differentiably (create_graph)
            weight if (recompute and need_x) else None,
            scale,
            divisor,
        )
        ctx.scaling = scaling
        ctx.recompute = recompute
        ctx.add_base = add_base and not recompute
        ctx.base_dtype = x.dtype if recompute else base.dtype
        ctx.h_dtype = h.dtype
        ctx.kernel = backward_kernel and (not recompute or x.dtype in KERNEL_DTYPES)
        return out

    @staticmethod
    def backward(ctx, d_out):  # type: ignore[override]
        need_h, need_b, need_base, need_x, _, need_g = ctx.needs_input_grad[:6]
        if d_out is None:
            return None, None, None, None, None, None, None, None, None, None, None
        h, weight_b, base, x, weight, scale, divisor = ctx.saved_tensors
        need_base_grad = need_x if ctx.recompute else need_base
        if torch.is_grad_enabled():
            # a graph is being created (create_graph=True): plain autograd ops on the saved inputs
            if ctx.recompute and need_g and x is not None:
                base = F.linear(x, weight.to(x.dtype))
            g = scale if divisor is None else scale / divisor
            d_h, d_b, d_base, d_g = lora_compose_backward_reference(
                d_out,
                h,
                weight_b,
                base,
                g,
                ctx.scaling,
                need_h=need_h,
                need_b=need_b,
                need_base=need_base_grad,
                need_g=need_g,
                base_dtype=ctx.base_dtype,
                h_dtype=ctx.h_dtype,
                add_base=ctx.add_base,
            )
            if divisor is not None and d_g is not None:
                d_g = d_g / divisor  # the magnitude's gradient (autograd casts it to the magnitude's dtype)
        else:
            d_h, d_b, d_base, d_g = _backward_fast(
                ctx, d_out, h, weight_b, base, scale, divisor, need_h, need_b, need_base_grad, need_g
            )
        d_x = None
        if ctx.recompute:
            d_x = base_input_grad(d_base, weight, ctx.base_dtype) if need_x else None
            d_base = None
        return d_h, d_b, d_base, d_x, None, d_g, None, None, None, None, None


def dora_linear_compose(
    h: torch.Tensor,
    weight_b: torch.Tensor,
    scale: torch.Tensor,
    scaling: float,
    *,
    base: torch.Tensor | None = None,
    x: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    bf16_origin_scale: float | None = None,
    add_base: bool = False,
    divisor: torch.Tensor | None = None,
) -> torch.Tensor:
    """DoRA's extra output ``(g - 1) * base + g * s * (h @ B^T)`` for training, ``lora_B`` folded into the node.

    Args:
        h: ``lora_A``'s output ``[..., r]``.
        weight_b: ``lora_B.weight`` ``[d_out, r]`` (``h``'s dtype).
        scale: ``g = m / ||W + s B A||`` ``[d_out]``; with ``divisor``, the magnitude ``m`` itself.
        scaling: ``s``.
        base: the base output without bias ``[..., d_out]``; or None with ``x`` and ``weight``:
        x: PEFT's dropped-out input ``[..., d_in]`` and ``weight``: ``W`` ``[d_out, d_in]`` (a constant; a
            trainable ``W`` needs plain autograd: use :func:`compose.dora_compose`).
        out_dtype: default ``promote(h, B, base or x)``, stock PEFT's.
        bf16_origin_scale: ``c`` where ``x`` is known to be ``fp32(x0 * c)`` of a bf16 ``x0`` (PEFT's dropout of
            its fp32 cast): the forward recompute then takes one bf16 GEMM (``recompute_base.BaseRecompute``).
        add_base: return ``base + extra`` (PEFT's variant output where ``base`` is its ``result``); needs ``base``.
        divisor: the detached ``[d_out]`` divisor of the magnitude (``norm.scale.scale_divisor``): the node then
            computes ``g = m / divisor`` and ``m``'s gradient itself, inside its kernels where they run (no
            division launch and no division node of autograd's), with the values of ``m / divisor`` recorded
            by autograd, bitwise.

    Returns:
        ``[..., d_out]`` in ``out_dtype``.
    """
    if base is None and (x is None or weight is None):
        raise ValueError("dora_linear_compose needs the base output, or x and the base weight to recompute it")
    if add_base and base is None:
        raise ValueError("dora_linear_compose(add_base=True) needs the base output")
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("dora_linear_compose takes a constant base weight; a trainable one needs dora_compose")
    activation = base if base is not None else x
    out_dtype = out_dtype or promote(promote(h.dtype, weight_b.dtype), activation.dtype)  # type: ignore[union-attr]
    if divisor is not None and (
        divisor.requires_grad or divisor.shape != scale.shape or scale.dim() != 1 or divisor.device != scale.device
    ):
        raise ValueError(
            "dora_linear_compose's divisor is a detached [d_out] tensor, shaped like the magnitude and on its device"
        )
    return _LoraComposeFunction.apply(
        h, weight_b, base, x, weight, scale, float(scaling), out_dtype, bf16_origin_scale, add_base, divisor
    )
