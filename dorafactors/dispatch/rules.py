"""Small predicates that choose between the Triton kernels and the PyTorch references.

Each returns ``(ok, reason)``; a rejection is logged once per distinct reason at DEBUG level on the
``dorafactors.dispatch`` logger. Rules, in order:

1. ``PEFT_DORA_FUSED=0`` is the master switch: every Triton path off (compose, backward, norm).
2. Triton must be importable (``PEFT_DORA_FUSED=1`` without Triton is a configuration error).
3. Tensors on CUDA run kernels by default. CPU tensors run them only under ``TRITON_INTERPRET=1`` *and*
   ``PEFT_DORA_FUSED=1`` (the test suite's way of exercising the real kernels without a GPU).
4. Per-op dtype and layout checks (below). ``PEFT_DORA_FUSED_BACKWARD`` additionally gates the training
   compose: ``0`` off, ``1`` on for every shape, unset = on above the shape threshold.
"""

from __future__ import annotations

import functools
import logging

import torch

from . import config

__all__ = [
    "FUSED_BACKWARD_MIN_COLS",
    "FUSED_BACKWARD_MIN_ELEMENTS",
    "fused_backward_ok",
    "fused_compose_ok",
    "fused_norm_ok",
    "kernels_enabled",
    "triton_importable",
]

logger = logging.getLogger("dorafactors.dispatch")

#: Auto mode of ``PEFT_DORA_FUSED_BACKWARD``: last-dim layouts use the fused training compose when the
#: activation has at least this many columns and elements (below, one fused launch is not cheaper than
#: PyTorch's elementwise ops; measured in ``benchmarks/results``).
FUSED_BACKWARD_MIN_COLS = 1024
FUSED_BACKWARD_MIN_ELEMENTS = 1 << 20

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_HALF = (torch.float16, torch.bfloat16)
_logged: set[tuple[str, str]] = set()


def _reject(op: str, reason: str) -> tuple[bool, str]:
    if (op, reason) not in _logged:
        _logged.add((op, reason))
        logger.debug("dorafactors: %s uses the PyTorch path: %s", op, reason)
    return False, reason


@functools.cache
def triton_importable() -> bool:
    """True when ``import triton`` works (probed once)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernels_enabled(device: torch.device) -> tuple[bool, str]:
    """Rules 1-3: may a Triton kernel run on ``device`` at all?"""
    mode = config.fused_mode()
    if mode is False:
        return False, "PEFT_DORA_FUSED=0"
    if not triton_importable():
        if mode:
            raise RuntimeError(
                "PEFT_DORA_FUSED=1 asks for the Triton kernels but triton is not installed: "
                "`pip install dorafactors[triton]`, or unset PEFT_DORA_FUSED."
            )
        return False, "triton is not installed"
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and config.triton_interpreter_active() and mode:
        return True, ""
    return False, f"tensors on {device.type} (kernels need CUDA, or TRITON_INTERPRET=1 with PEFT_DORA_FUSED=1)"


def _under_compile() -> bool:
    return torch.compiler.is_compiling()


def fused_compose_ok(lora: torch.Tensor, base: torch.Tensor, scale: torch.Tensor) -> tuple[bool, str]:
    """May the compose kernel take ``lora`` / ``base`` (activations) and ``scale`` (``g``)?"""
    ok, reason = kernels_enabled(lora.device)
    if not ok:
        return _reject("compose", reason)
    if base.device != lora.device or scale.device != lora.device:
        return _reject("compose", "operands on different devices")
    if lora.dtype not in _KERNEL_DTYPES or base.dtype not in _KERNEL_DTYPES:
        return _reject("compose", f"activation dtype {lora.dtype}/{base.dtype} (kernels take fp16/bf16/fp32)")
    if scale.dtype not in _KERNEL_DTYPES:
        return _reject("compose", f"scale dtype {scale.dtype}")
    if lora.shape != base.shape:
        return _reject("compose", "lora and base shapes differ (broadcast base)")
    if lora.numel() == 0:
        return _reject("compose", "empty tensor")
    return True, ""


def fused_backward_ok(rows: int, cols: int, last_dim_layout: bool) -> tuple[bool, str]:
    """Rule 4 for the training compose (forward that saves for backward + one-pass backward)."""
    mode = config.fused_backward_mode()
    if mode is False:
        return _reject("training compose", "PEFT_DORA_FUSED_BACKWARD=0")
    if mode is True or not last_dim_layout:
        return True, ""
    if cols < FUSED_BACKWARD_MIN_COLS or rows * cols < FUSED_BACKWARD_MIN_ELEMENTS:
        return _reject("training compose", "activation below the fused-backward size threshold")
    return True, ""


def fused_norm_ok(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> tuple[bool, str]:
    """May the Triton norm kernel compute ``||W + s B A||`` for these operands?"""
    ok, reason = kernels_enabled(weight.device)
    if not ok:
        return _reject("norm", reason)
    if weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
        return _reject("norm", "operands are not 2-D")
    if weight.dtype not in _HALF:
        return _reject("norm", f"weight dtype {weight.dtype} (the tensor-core kernel takes fp16/bf16 W)")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if t.dtype not in (weight.dtype, torch.float32):
            return _reject("norm", f"{name} dtype {t.dtype} with W {weight.dtype}")
        if t.device != weight.device:
            return _reject("norm", f"{name} on {t.device}, W on {weight.device}")
    if _is_dtensor(weight) or _is_dtensor(lora_A) or _is_dtensor(lora_B):
        return _reject("norm", "DTensor operands")
    if _under_compile():
        # the kernel's host side (per-stream ticket buffers, cached launch plans) is not traceable
        return _reject("norm", "under torch.compile")
    return True, ""


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"
