"""What the kernels accept, importable without Triton: their dtypes, the norm kernel's operand check, the
accumulation dtype of the PyTorch references, and whether ``torch.mm`` can return fp32 from half inputs.

``dispatch/rules.py`` asks these questions before it picks a kernel; the kernels' host entry points ask them
again to raise a clear error when called directly. One definition serves both.
"""

from __future__ import annotations

import torch

__all__ = [
    "HALF_DTYPES",
    "KERNEL_DTYPES",
    "compute_dtype_for",
    "gemm_dtypes_supported",
    "mm_out_dtype_available",
    "norm_operands_problem",
    "promote",
]

#: The half-precision dtypes: the norm kernel's weight dtypes (tensor-core operands).
HALF_DTYPES = (torch.float16, torch.bfloat16)
#: Every dtype a Triton kernel loads or stores (compose activations and scales, norm adapters).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: ``torch.promote_types`` of every pair of floating dtypes, filled once at import and never written again:
#: a table that changed at run time would be a Dynamo guard that fails once after the first compiled call.
_PROMOTED: dict[tuple[torch.dtype, torch.dtype], torch.dtype] = {
    (a, b): torch.promote_types(a, b) for a in _FLOAT_DTYPES for b in _FLOAT_DTYPES
}


def promote(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """``torch.promote_types(a, b)``, looked up in a fixed table for floating dtypes (the hot paths ask it per
    call, and each ``torch.promote_types`` is a dispatcher call)."""
    out = _PROMOTED.get((a, b))
    return torch.promote_types(a, b) if out is None else out


def compute_dtype_for(*dtypes: torch.dtype) -> torch.dtype:
    """fp64 if any input is fp64, else fp32: the precision every norm and composition is accumulated in."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def norm_operands_problem(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> str:
    """Why the tensor-core norm kernel cannot take ``W``, ``A``, ``B`` (``""`` when it can).

    It takes 2-D operands, an fp16/bf16 ``W``, and adapters in ``W``'s dtype or fp32 on ``W``'s device.
    Shapes are not checked here (the host entry points check them).
    """
    if weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
        return "weight, lora_A and lora_B must be 2-D"
    if weight.dtype not in HALF_DTYPES:
        return f"weight dtype {weight.dtype}: the tensor-core norm takes fp16/bf16 W"
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if t.dtype not in (weight.dtype, torch.float32):
            return f"{name} dtype {t.dtype}: must be W's dtype ({weight.dtype}) or fp32"
        if t.device != weight.device:
            return f"{name} is on {t.device}, W on {weight.device}"
    return ""


_mm_out_dtype: bool | None = None


def mm_out_dtype_available() -> bool:
    """``torch.mm(a, b, out_dtype=torch.float32)`` exists (PyTorch >= 2.9; CUDA kernels only)."""
    global _mm_out_dtype
    if _mm_out_dtype is None:
        _mm_out_dtype = hasattr(torch.ops.aten.mm, "dtype")
    return _mm_out_dtype


def gemm_dtypes_supported(w_dtype: torch.dtype, a_dtype: torch.dtype, b_dtype: torch.dtype) -> bool:
    """The dtypes ``kernels/row_norm.py::gemm_weight_norm_sq`` takes: half ``A`` and ``B`` in ``W``'s dtype, or
    fp32 ``A`` and ``B`` on a bf16 ``W`` (A's exact bf16 parts then multiply W; an fp16 W would need fp16 parts,
    whose exponent range loses A's low bits)."""
    if w_dtype in (torch.bfloat16, torch.float16) and a_dtype == w_dtype and b_dtype == w_dtype:
        return True
    return w_dtype == torch.bfloat16 and a_dtype == torch.float32 and b_dtype == torch.float32
