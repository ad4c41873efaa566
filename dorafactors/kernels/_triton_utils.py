"""Small helpers shared by the Triton kernel modules: interpreter detection, SM count, launch configs.

Importing this module imports Triton; the kernel modules are only imported once a fused path is taken.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable

import torch
import triton

__all__ = [
    "LaunchConfig",
    "cdiv",
    "is_fake",
    "is_interpreted",
    "next_pow2",
    "num_sms",
    "to_triton_configs",
]

#: ``(BLOCK_R, BLOCK_C, num_warps, num_stages)``: a tile of ``BLOCK_R`` rows by ``BLOCK_C`` columns.
LaunchConfig = tuple[int, int, int, int]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two ``>= n`` (1 for ``n <= 1``)."""
    return 1 << max(0, n - 1).bit_length()


def is_interpreted(kernel: object) -> bool:
    """True when ``kernel`` (a ``@triton.jit`` object) runs on Triton's CPU interpreter (``TRITON_INTERPRET=1``).

    The interpreter flag is read by Triton when the decorator runs, so the kernel object itself is the
    ground truth, whatever the environment says now.
    """
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - every supported Triton has it
        return False
    return isinstance(kernel, InterpretedFunction)


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


#: SM count assumed for CPU tensors (the interpreter): small, so the tests see several row groups.
INTERPRETER_SMS = 4


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (cached per device)."""
    if device.type != "cuda":
        return INTERPRETER_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_sms(index)


def is_fake(t: torch.Tensor) -> bool:
    """True for FakeTensors (also behind functionalization): tensors with no data to launch a kernel on."""
    from torch._subclasses.fake_tensor import is_fake as _is_fake

    return _is_fake(t)


def to_triton_configs(configs: Iterable[LaunchConfig]) -> list[triton.Config]:
    return [triton.Config({"BLOCK_R": br, "BLOCK_C": bc}, num_warps=w, num_stages=s) for br, bc, w, s in configs]


def tile_grid(
    block_rows: Iterable[int],
    block_cols: Iterable[int],
    warps: Iterable[int],
    *,
    min_elems: int,
    max_elems: int,
    min_elems_per_thread: int,
    max_elems_per_thread: int,
    stages: int = 1,
) -> list[LaunchConfig]:
    """Every ``(BLOCK_R, BLOCK_C, num_warps)`` tile in the given ranges that gives each thread a sane amount of work."""
    out: list[LaunchConfig] = []
    for br, bc, w in itertools.product(block_rows, block_cols, warps):
        elems = br * bc
        per_thread = elems // (32 * w)
        if min_elems <= elems <= max_elems and min_elems_per_thread <= per_thread <= max_elems_per_thread:
            out.append((br, bc, w, stages))
    for br, bc, _, _ in out:
        if br & (br - 1) or bc & (bc - 1):
            raise ValueError(f"tile {br}x{bc}: Triton block sizes must be powers of two")
    return out
