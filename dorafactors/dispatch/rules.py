"""Small predicates that choose between the Triton kernels and the PyTorch references.

Each returns ``(ok, reason)``; a rejection is logged once per distinct reason at DEBUG level on the
``dorafactors.dispatch`` logger. Rules, in order:

1. ``PEFT_DORA_FUSED=0`` is the master switch: every Triton path off (compose, backward, norm).
2. Triton must be importable (``PEFT_DORA_FUSED=1`` without Triton is a configuration error).
3. Tensors on CUDA run kernels by default. CPU tensors run them only under ``TRITON_INTERPRET=1`` *and*
   ``PEFT_DORA_FUSED=1`` (the test suite's way of exercising the real kernels without a GPU).
4. Per-op dtype and layout checks (below). ``PEFT_DORA_FUSED_BACKWARD`` additionally gates the training
   compose: ``0`` off, ``1`` on for every shape, unset = on above the shape threshold (last-dim layouts
   only; conv layouts always take it).

No kernel runs while ``torch.jit`` traces (a trace cannot record a Triton launch, and the launch code
reads sizes that tracing turns into tensors) or inside a ``torch.func`` transform (its wrapped tensors have
no storage for a kernel, and custom autograd Functions need functorch rules): :func:`plain_autograd_required`.

Under ``torch.compile`` the compose decision is :func:`compiled_compose_ok` (device and dtypes only, no
size threshold; in training the traced composition unless ``PEFT_DORA_FUSED_BACKWARD=1``), evaluated once
at trace time; :func:`kernels_enabled` is likewise baked in at trace time,
so the dispatch adds no graph breaks (the config cache's lock and the logger are never traced). The norm
is the opaque op ``dorafactors::cached_weight_norm`` (:func:`compiled_norm_op_ok`), whose body runs these
rules eagerly, at run time, like an eager call (:func:`fused_norm_ok` rejects only while tracing).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
import torch.autograd.forward_ad as _forward_ad

from ..kernels.operands import KERNEL_DTYPES, gemm_dtypes_supported, mm_out_dtype_available, norm_operands_problem
from . import config

__all__ = [
    "FUSED_BACKWARD_MIN_COLS",
    "FUSED_BACKWARD_MIN_ELEMENTS",
    "INFERENCE_FOLD_MAX_ROWS",
    "NORM_GEMM_FP32_MIN_MACS",
    "NORM_GEMM_MIN_DIN_RANK",
    "NORM_GEMM_MIN_MACS",
    "SPLIT_MATMUL_MIN_MACS",
    "compiled_compose_ok",
    "compiled_norm_op_ok",
    "constant_while_compiling",
    "forced_split_matmul",
    "forward_tangents_possible",
    "fp32_adapter_gemm_bytes",
    "fused_backward_enabled",
    "fused_backward_ok",
    "fused_compose_backward_ok",
    "fused_compose_ok",
    "fused_norm_ok",
    "inference_fold_ok",
    "inside_func_transform",
    "kernels_enabled",
    "magnitude_division_outside_node",
    "node_divides_magnitude",
    "norm_gemm_ok",
    "plain_autograd_required",
    "split_matmul_ok",
    "triton_importable",
]

logger = logging.getLogger("dorafactors.dispatch")

#: Auto mode of ``PEFT_DORA_FUSED_BACKWARD``: last-dim layouts use the fused training compose when the
#: activation has at least this many columns and elements. Below them the two kernel launches (forward that
#: saves ``inner``, one-pass backward) cost more host time than the fusion saves over PyTorch's eager
#: composition. ``python -m benchmarks tune --only compose`` times both over rows x columns and prints the
#: thresholds that fit the measurements best.
FUSED_BACKWARD_MIN_COLS = 1024
FUSED_BACKWARD_MIN_ELEMENTS = 1 << 20

#: No-grad Linear calls of at most this many rows (tokens) use the folded PyTorch composition
#: (``autograd/folded.py``): decode-sized calls are bound by host time, and the fold needs no kernel launch
#: of its own. Larger calls keep the compose kernel. ``python -m benchmarks tune --only fold`` times both
#: per token count and prints the crossover.
INFERENCE_FOLD_MAX_ROWS = 256

#: The GEMM norm path (cuBLAS GEMMs for ``W A^T`` and ``A A^T`` + the kernel's ``FROM_GEMM`` mode) is taken
#: from this ``d_in * r`` on, or from ``NORM_GEMM_MIN_MACS`` multiply-adds ``d_out * d_in * r`` on. cuBLAS
#: streams W faster than the one-pass kernel's main loop, which pays off on large products; below both
#: thresholds the one-pass kernel's single launch costs less than the GEMM path saves. On an H200 the
#: one-pass kernel wins at (d_in, r) = (4096, 16..768) up to 4096x4096, the GEMM path from 8192x8192 r384 and
#: 14336x4096 r384 on (``tests/kernels/test_row_norm_kernel.py::test_norm_path_rules_at_the_measured_shapes``
#: pins these winners). ``python -m benchmarks tune --only norm`` times both paths per shape (device time)
#: and prints the thresholds that fit the measurements best.
NORM_GEMM_MIN_DIN_RANK = 4 * 1024 * 1024
NORM_GEMM_MIN_MACS = 2**34
#: fp32 adapters on a bf16 W (PEFT's default dtypes) take the GEMM path from this many multiply-adds
#: ``d_out * d_in * r`` on: there ``U = W A^T`` is one cuBLAS GEMM over A's three exact bf16 parts
#: (``kernels/row_norm.py::fp32_adapter_gemms``), the same products the one-pass kernel's in-register split
#: makes, at cuBLAS's rate; below it the one-pass kernel's two launches cost less than the split, the two
#: GEMMs and their sums. ``python -m benchmarks tune --only norm`` times both paths per shape.
NORM_GEMM_FP32_MIN_MACS = 2**32

#: An fp32 input times a bf16 weight (PEFT's dropout path with its default dtypes) takes the bf16x3 split GEMM
#: (``kernels/split_matmul.py``) from this many multiply-adds on. Below it both forms are bound by launch
#: overhead and the plain fp32 GEMM is one launch (the split) and one weight copy fewer; at 2^26 MACs an fp32
#: GEMM takes ~3 us on an H100/H200's CUDA cores.
SPLIT_MATMUL_MIN_MACS = 2**26

_logged: set[tuple[str, str]] = set()


def _reject(op: str, reason: str) -> tuple[bool, str]:
    if (op, reason) not in _logged and not torch.compiler.is_compiling():
        _logged.add((op, reason))
        logger.debug("dorafactors: %s uses the PyTorch path: %s", op, reason)
    return False, reason


_triton_found: bool | None = None


def triton_importable() -> bool:
    """True when ``import triton`` works (probed once; a plain global, so torch.compile traces it cheaply)."""
    global _triton_found
    if _triton_found is None:
        try:
            import triton  # noqa: F401
        except ImportError:
            _triton_found = False
        else:
            _triton_found = True
    return _triton_found


def constant_while_compiling(fn):
    """Mark ``fn`` as ``torch._dynamo.assume_constant_result`` does, without importing Dynamo here.

    Dynamo then calls ``fn`` eagerly at trace time and bakes its result into the graph (no tracing of the
    config cache's lock, no graph break). Only for functions of plain Python arguments whose result is
    fixed for the life of a compiled graph.
    """
    fn._dynamo_marked_constant = True
    return fn


_functorch_interpreter = torch._C._functorch.peek_interpreter_stack  # not None inside a torch.func transform
_jit_tracing = torch._C._is_tracing  # what torch.jit.is_tracing() asks, without its Python frame


def plain_autograd_required() -> bool:
    """True inside a ``torch.func`` transform (``grad``, ``vmap``, ``jvp``, ...), inside a forward-mode AD
    dual level (``torch.autograd.forward_ad``) or while ``torch.jit`` traces: the composition must then be
    plain differentiable PyTorch ops (our custom autograd Functions have no forward-mode rule, a kernel
    carries no tangent and a trace records no kernel)."""
    return _functorch_interpreter() is not None or _forward_ad._current_level >= 0 or _jit_tracing()


def inside_func_transform() -> bool:
    """True inside a ``torch.func`` transform: tensors may be batched (``vmap``: no in-place write of an
    unbatched tensor from a batched one) or carry tangents (``jvp``, ``jacfwd``)."""
    return _functorch_interpreter() is not None


def forward_tangents_possible() -> bool:
    """True where a tensor may carry a forward-mode tangent that ``torch.no_grad`` does not stop: inside a
    ``torch.func`` transform or a ``torch.autograd.forward_ad.dual_level``. Detached values (the norm) must
    then be computed from detached inputs."""
    return _functorch_interpreter() is not None or _forward_ad._current_level >= 0


def kernels_enabled(device: torch.device) -> tuple[bool, str]:
    """Rules 1-3: may a Triton kernel run on ``device`` at all?"""
    return _kernels_enabled_on(device.type)


def _kernels_enabled_on(device_type: str) -> tuple[bool, str]:
    if torch.compiler.is_compiling():
        return _kernels_enabled_traced(device_type)
    return _kernels_enabled_eager(device_type)


@constant_while_compiling
def _kernels_enabled_traced(device_type: str) -> tuple[bool, str]:
    return _kernels_enabled_eager(device_type)


def _kernels_enabled_eager(device_type: str) -> tuple[bool, str]:
    mode = config.fused_mode()
    if mode is False:
        return False, "PEFT_DORA_FUSED=0"
    if plain_autograd_required():
        return False, "inside a torch.func transform, a forward-mode AD dual level or torch.jit tracing"
    if not triton_importable():
        if mode:
            raise RuntimeError(
                "PEFT_DORA_FUSED=1 asks for the Triton kernels but triton is not installed: "
                "`pip install dorafactors[triton]`, or unset PEFT_DORA_FUSED."
            )
        return False, "triton is not installed"
    if device_type == "cuda":
        return True, ""
    if device_type == "cpu" and config.triton_interpreter_active() and mode:
        return True, ""
    return False, f"tensors on {device_type} (kernels need CUDA, or TRITON_INTERPRET=1 with PEFT_DORA_FUSED=1)"


def _under_compile() -> bool:
    return torch.compiler.is_compiling()


def _dtype_reason(lora_dtype, base_dtype, scale_dtype, out_dtype) -> str:
    if lora_dtype not in KERNEL_DTYPES or base_dtype not in KERNEL_DTYPES:
        return f"activation dtype {lora_dtype}/{base_dtype} (kernels take fp16/bf16/fp32)"
    if scale_dtype not in KERNEL_DTYPES:
        return f"scale dtype {scale_dtype}"
    if out_dtype is not None and out_dtype not in KERNEL_DTYPES:
        return f"output dtype {out_dtype}"
    return ""


def fused_compose_ok(
    lora: torch.Tensor, base: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype | None = None
) -> tuple[bool, str]:
    """May the compose kernel take ``lora`` / ``base`` (activations) and ``scale`` (``g``), writing ``out_dtype``?"""
    ok, reason = _kernels_enabled_on(lora.device.type)
    if not ok:
        return _reject("compose", reason)
    index = lora.get_device()
    if base.get_device() != index or scale.get_device() != index:
        return _reject("compose", "operands on different devices")
    reason = _dtype_reason(lora.dtype, base.dtype, scale.dtype, out_dtype)
    if reason:
        return _reject("compose", reason)
    if lora.shape != base.shape:
        return _reject("compose", "lora and base shapes differ (broadcast base)")
    if lora.numel() == 0:
        return _reject("compose", "empty tensor")
    return True, ""


def fused_backward_enabled() -> tuple[bool, str]:
    """``PEFT_DORA_FUSED_BACKWARD`` is not ``0`` (the size heuristic aside)."""
    if config.fused_backward_mode() is False:
        return _reject("training compose", "PEFT_DORA_FUSED_BACKWARD=0")
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


def fused_compose_backward_ok(
    d_out: torch.Tensor,
    inner: torch.Tensor | None,
    scale: torch.Tensor,
    lora_dtype: torch.dtype,
    base_dtype: torch.dtype,
) -> tuple[bool, str]:
    """May the one-pass backward kernel run on ``d_out`` ``[..., C]`` (and ``inner``), ``g`` along the last dim?"""
    device = d_out.device
    ok, reason = _kernels_enabled_on(device.type)
    if not ok:
        return _reject("compose backward", reason)
    if scale.device != device or (inner is not None and inner.device != device):
        return _reject("compose backward", "operands on different devices")
    reason = _dtype_reason(d_out.dtype, d_out.dtype if inner is None else inner.dtype, scale.dtype, None)
    reason = reason or _dtype_reason(lora_dtype, base_dtype, scale.dtype, None)
    if reason:
        return _reject("compose backward", reason)
    if d_out.numel() == 0:
        return _reject("compose backward", "empty tensor")
    cols = d_out.shape[-1]
    return fused_backward_ok(d_out.numel() // cols, cols, True)


def compiled_compose_ok(
    device_type: str,
    lora_dtype: torch.dtype,
    base_dtype: torch.dtype,
    scale_dtype: torch.dtype,
    out_dtype: torch.dtype,
    training: bool,
) -> tuple[bool, str]:
    """The compose decision while ``torch.compile`` traces: device and dtypes only.

    In training the kernels run only when ``PEFT_DORA_FUSED_BACKWARD=1`` forces them: by default the
    composition is traced as plain differentiable ops, which Inductor fuses with their neighbours, forward and
    backward, at the activation memory of stock PEFT; the kernels save one activation less per layer.
    """
    ok, reason = _kernels_enabled_on(device_type)
    if not ok:
        return _reject("compiled compose", reason)
    reason = _dtype_reason(lora_dtype, base_dtype, scale_dtype, out_dtype)
    if reason:
        return _reject("compiled compose", reason)
    if training and config.fused_backward_mode() is not True:
        return _reject(
            "compiled compose",
            "training under torch.compile: the traced composition (Inductor fuses it); "
            "PEFT_DORA_FUSED_BACKWARD=1 runs the kernels (less activation memory)",
        )
    return True, ""


def fused_norm_ok(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> tuple[bool, str]:
    """May the Triton norm kernel compute ``||W + s B A||`` for these operands?"""
    ok, reason = kernels_enabled(weight.device)
    if not ok:
        return _reject("norm", reason)
    reason = norm_operands_problem(weight, lora_A, lora_B)
    if reason:
        return _reject("norm", reason)
    if _is_dtensor(weight) or _is_dtensor(lora_A) or _is_dtensor(lora_B):
        return _reject("norm", "DTensor operands")
    if _under_compile():
        # the kernel's host side (per-stream ticket buffers, cached launch plans) is not traceable
        return _reject("norm", "under torch.compile")
    return True, ""


@constant_while_compiling
def compiled_norm_op_ok() -> tuple[bool, str]:
    """While ``torch.compile`` traces: may the layer's norm be the opaque op ``dorafactors::cached_weight_norm``
    (``autograd/norm_op.py``: the norm kernels and the norm cache, run by the compiled graph)?

    Yes except inside a ``torch.func`` transform, which has no rule for the op, and under ``torch.export``,
    whose programs must run without dorafactors' Python (AOTInductor, other runtimes): there the PyTorch
    reference is traced instead, recomputed in every call. Kernels, the cache switch and sharding are
    decided by the op at run time, as in eager mode.
    """
    if _functorch_interpreter() is not None:
        return _reject("compiled norm", "inside a torch.func transform")
    if torch.compiler.is_exporting():
        return _reject("compiled norm", "torch.export (the op's body is Python)")
    return True, ""


def inference_fold_ok(rows: int, settings: config.CacheSettings | None = None) -> tuple[bool, str]:
    """May a no-grad Linear call of ``rows`` tokens use the folded composition (``autograd/folded.py``)?

    Not when ``PEFT_DORA_FUSED=1`` forces the kernels (tests exercise them that way), not with the norm cache
    off (the fold is a cache of ``g * s * B``), and not above :data:`INFERENCE_FOLD_MAX_ROWS`. The caller
    checks the rest (no gradient, not compiling, nothing sharded, a plain ``lora_B``). ``settings``: the
    caller's read of ``config.cache_settings()``, if it has one.
    """
    if rows > INFERENCE_FOLD_MAX_ROWS:
        return False, "more rows than INFERENCE_FOLD_MAX_ROWS"
    if settings is None:
        settings = config.cache_settings()
    if settings.fused is True:
        return False, "PEFT_DORA_FUSED=1"
    if settings.norm_cache == "off":
        return False, "PEFT_DORA_NORM_CACHE=0"
    return True, ""


def norm_gemm_ok(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> tuple[bool, str]:
    """Among the Triton norm paths: the GEMM path (``gemm_weight_norm_sq``) rather than the
    one-pass kernel? For half ``A`` and ``B`` in W's dtype, ``d_in * r >= NORM_GEMM_MIN_DIN_RANK`` or
    ``d_out * d_in * r >= NORM_GEMM_MIN_MACS``; for fp32 ``A`` and ``B`` on a bf16 W,
    ``d_out * d_in * r >= NORM_GEMM_FP32_MIN_MACS`` and the split's temporaries
    (:func:`fp32_adapter_gemm_bytes`) within ``PEFT_DORA_NORM_CHUNK_MB`` (the one-pass kernel has no
    ``d_in``-sized temporaries); where an fp32-output GEMM is available (CUDA:
    ``mm_out_dtype_available``; the CPU interpreter multiplies fp32 upcasts). Other dtype mixes keep the
    one-pass kernel."""
    if not gemm_dtypes_supported(weight.dtype, lora_A.dtype, lora_B.dtype):
        return _reject("norm GEMM", f"adapters {lora_A.dtype}/{lora_B.dtype} with W {weight.dtype}")
    din_rank = weight.shape[1] * lora_A.shape[0]
    if lora_A.dtype == torch.float32:
        if weight.shape[0] * din_rank < NORM_GEMM_FP32_MIN_MACS:
            return _reject("norm GEMM", "fp32 adapters below NORM_GEMM_FP32_MIN_MACS (one-pass is cheaper)")
        if (
            fp32_adapter_gemm_bytes(weight.shape[0], weight.shape[1], lora_A.shape[0])
            > config.get_dora_norm_threshold_bytes()
        ):
            return _reject(
                "norm GEMM", "fp32 adapters: A's bf16 parts and their products exceed PEFT_DORA_NORM_CHUNK_MB"
            )
    elif din_rank < NORM_GEMM_MIN_DIN_RANK and weight.shape[0] * din_rank < NORM_GEMM_MIN_MACS:
        return _reject("norm GEMM", "below NORM_GEMM_MIN_DIN_RANK and NORM_GEMM_MIN_MACS (one-pass is cheaper)")
    if weight.device.type == "cuda" and not mm_out_dtype_available():
        return _reject("norm GEMM", "torch.mm has no out_dtype (PyTorch < 2.9)")
    return True, ""


def fp32_adapter_gemm_bytes(d_out: int, d_in: int, rank: int) -> int:
    """Temporaries of the GEMM norm path with fp32 adapters (``kernels/row_norm.py::fp32_adapter_gemms``): A's
    bf16 parts ``[3r, d_in]``, the fp32 products ``[d_out, 3r]`` and ``[3r, 3r]``, and the summed ``U``, ``G``."""
    return 6 * rank * d_in + 4 * (3 * d_out * rank + 9 * rank * rank) + 4 * (d_out * rank + rank * rank)


_node_division_off: list[bool] = [False]


def node_divides_magnitude() -> bool:
    """May the Linear training node take ``g = m / divisor`` of a trainable magnitude itself
    (``autograd/lora_compose.py``)? Yes, unless inside :func:`magnitude_division_outside_node`."""
    return not _node_division_off[0]


@contextlib.contextmanager
def magnitude_division_outside_node() -> Iterator[None]:
    """Tests and benchmarks: divide the magnitude with autograd before the training node, as before the node
    took the division (the values are bitwise the same; the host time is not)."""
    saved = _node_division_off[0]
    _node_division_off[0] = True
    try:
        yield
    finally:
        _node_division_off[0] = saved


_split_matmul_forced: list[bool | None] = [None]


@contextlib.contextmanager
def forced_split_matmul(enabled: bool | None) -> Iterator[None]:
    """Tests and benchmarks: take (True) or avoid (False) the split GEMM wherever its dtypes allow, on any
    device and size (the CPU then multiplies the exact bf16 parts as fp32 upcasts); None restores the rule."""
    saved = _split_matmul_forced[0]
    _split_matmul_forced[0] = enabled
    try:
        yield
    finally:
        _split_matmul_forced[0] = saved


def split_matmul_ok(x: torch.Tensor, weight: torch.Tensor, macs: int) -> tuple[bool, str]:
    """May ``x @ weight^T`` (or ``d @ weight``) of an fp32 ``x`` and a bf16 ``weight`` run as the bf16x3 split
    GEMM (exact products on tensor cores, fp32 accumulation) instead of an fp32 GEMM on the weight's upcast?

    Only fp32 activations with bf16 weights (fp16 parts of fp32 values overflow: fp16 weights keep the fp32
    GEMM), on CUDA with ``torch.mm(..., out_dtype=float32)`` and the Triton split kernel, from
    :data:`SPLIT_MATMUL_MIN_MACS` on. On the CPU the fp32 GEMM is the native rate: it is never split there
    unless :func:`forced_split_matmul` says so.
    """
    if x.dtype != torch.float32 or weight.dtype != torch.bfloat16:
        return False, "not an fp32 input with a bf16 weight"
    forced = _split_matmul_forced[0]
    if forced is not None:
        return (True, "") if forced else _reject("split matmul", "forced off")
    if x.device.type != "cuda":
        return _reject("split matmul", f"tensors on {x.device.type} (fp32 GEMMs are the native rate there)")
    ok, reason = kernels_enabled(x.device)
    if not ok:
        return _reject("split matmul", reason)
    if not mm_out_dtype_available():
        return _reject("split matmul", "torch.mm has no out_dtype (PyTorch < 2.9)")
    if macs < SPLIT_MATMUL_MIN_MACS:
        return _reject("split matmul", "below SPLIT_MATMUL_MIN_MACS (launch-bound either way)")
    return True, ""


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"
