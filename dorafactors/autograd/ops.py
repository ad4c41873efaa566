"""``torch.library`` Triton ops for the DoRA composition: what ``torch.compile`` sees.

Three ops in the ``dorafactors`` namespace, each a :func:`torch.library.triton_op` whose body launches the
kernels of :mod:`dorafactors.kernels.compose` through :func:`torch.library.wrap_triton`, so a compiled
graph (Inductor) runs the Triton kernels themselves, with no graph break:

* ``dorafactors::compose(lora, base, g, scaling, channel_dim, out_dtype) -> out`` (frozen magnitude or
  inference: saves only ``g`` for the backward),
* ``dorafactors::compose_and_inner(...) -> (out, inner)`` (trainable magnitude: saves ``g`` and ``inner``),
* ``dorafactors::compose_backward(d_out, g, inner, ...) -> [d_lora?, d_base?, d_g?]`` (the one-pass backward;
  only the requested gradients, in that order).

The first two have their autograd registered (``register_autograd``). The backward op is not itself
differentiable; when a graph is being created (``create_graph=True``, eager) their backward uses the
PyTorch reference formulas instead, which are differentiable (exact second-order gradients). A compiled backward cannot be
differentiated again at all: PyTorch raises for it.

Eager code does not go through these ops (their dispatcher round trip costs host time at decode sizes);
``autograd/compose.py`` calls the same host functions from a plain ``torch.autograd.Function`` and uses
these ops only while ``torch.compile`` traces.

Under ``TRITON_INTERPRET=1`` (CPU) the kernels cannot be recorded into a graph; compile with
``torch._functorch.config.patch(decompose_custom_triton_ops=False)`` so the ops stay opaque and run their
interpreted kernels when the compiled graph executes (``aot_eager``); the ops raise otherwise.
"""

from __future__ import annotations

import torch
from torch.library import triton_op

from ..kernels import compose as kc
from .compose import reference_backward

__all__ = ["compose", "compose_and_inner", "compose_backward"]


@triton_op("dorafactors::compose", mutates_args=())
def compose(
    lora: torch.Tensor,
    base: torch.Tensor,
    g: torch.Tensor,
    scaling: float,
    channel_dim: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``(g - 1) * base + g * (scaling * lora)``; see :func:`dorafactors.kernels.compose.compose_forward`."""
    out, _ = kc.compose_forward(lora, base, g, scaling, channel_dim=channel_dim, out_dtype=out_dtype, wrap=True)
    return out


@triton_op("dorafactors::compose_and_inner", mutates_args=())
def compose_and_inner(
    lora: torch.Tensor,
    base: torch.Tensor,
    g: torch.Tensor,
    scaling: float,
    channel_dim: int,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, inner = base + scaling * lora)``, both in ``out_dtype``."""
    out, inner = kc.compose_forward(
        lora, base, g, scaling, channel_dim=channel_dim, out_dtype=out_dtype, save_inner=True, wrap=True
    )
    return out, inner  # type: ignore[return-value]


@triton_op("dorafactors::compose_backward", mutates_args=())
def compose_backward(
    d_out: torch.Tensor,
    g: torch.Tensor,
    inner: torch.Tensor | None,
    scaling: float,
    channel_dim: int,
    lora_dtype: torch.dtype,
    base_dtype: torch.dtype,
    need_lora: bool,
    need_base: bool,
    need_g: bool,
) -> list[torch.Tensor]:
    """The requested ones of ``[d_lora, d_base, d_g]``, in that order."""
    grads = kc.compose_backward(
        d_out,
        g,
        inner,
        scaling,
        channel_dim=channel_dim,
        lora_dtype=lora_dtype,
        base_dtype=base_dtype,
        need_lora=need_lora,
        need_base=need_base,
        need_g=need_g,
        wrap=True,
    )
    return [t for t in grads if t is not None]


def _save_common(ctx, inputs) -> None:
    lora, base, _g, scaling, channel_dim, _ = inputs
    ctx.scaling = scaling
    ctx.channel_dim = channel_dim
    ctx.lora_dtype = lora.dtype
    ctx.base_dtype = base.dtype


def _setup_compose(ctx, inputs, output) -> None:
    _save_common(ctx, inputs)
    ctx.save_for_backward(inputs[2])  # g only: nothing activation-sized for a frozen magnitude


def _setup_compose_and_inner(ctx, inputs, output) -> None:
    _save_common(ctx, inputs)
    # inner stays a differentiable output: a double backward reaches lora and base through it (d_inner)
    ctx.save_for_backward(inputs[2], output[1])
    ctx.set_materialize_grads(False)


def _backward(ctx, d_out, g, inner, d_inner=None):
    need_lora, need_base, need_g = ctx.needs_input_grad[:3]
    need_g = bool(need_g and inner is not None)
    if (d_out is None and d_inner is None) or not (need_lora or need_base or need_g):
        return None, None, None, None, None, None
    if d_inner is not None or torch.is_grad_enabled():
        # A graph is being created (create_graph=True) or a double backward arrives through inner: plain
        # autograd ops, differentiable in d_out, g and inner (exact second-order gradients).
        if d_out is None:
            g = inner = None
        d_lora, d_base, d_g = reference_backward(
            d_out,
            g,
            inner,
            d_inner,
            ctx.scaling,
            channel_dim=ctx.channel_dim,
            lora_dtype=ctx.lora_dtype,
            base_dtype=ctx.base_dtype,
            need_lora=need_lora,
            need_base=need_base,
            need_g=need_g,
        )
        return d_lora, d_base, d_g, None, None, None
    grads = iter(
        torch.ops.dorafactors.compose_backward(
            d_out,
            g,
            inner if need_g else None,
            ctx.scaling,
            ctx.channel_dim,
            ctx.lora_dtype,
            ctx.base_dtype,
            need_lora,
            need_base,
            need_g,
        )
    )
    d_lora = next(grads) if need_lora else None
    d_base = next(grads) if need_base else None
    d_g = next(grads) if need_g else None
    return d_lora, d_base, d_g, None, None, None


def _backward_compose(ctx, d_out):
    (g,) = ctx.saved_tensors
    if ctx.needs_input_grad[2]:
        raise RuntimeError("dorafactors::compose saved no `inner`; use compose_and_inner when g requires grad")
    return _backward(ctx, d_out, g, None)


def _backward_compose_and_inner(ctx, d_out, d_inner):
    if d_out is None:  # only through inner: nothing saved is needed
        return _backward(ctx, None, None, None, d_inner)
    g, inner = ctx.saved_tensors
    return _backward(ctx, d_out, g, inner, d_inner)


compose.register_autograd(_backward_compose, setup_context=_setup_compose)
compose_and_inner.register_autograd(_backward_compose_and_inner, setup_context=_setup_compose_and_inner)
