"""Small helpers shared by the Triton kernel modules: interpreter detection, SM count, launch configs.

Importing this module imports Triton; the kernel modules are only imported once a fused path is taken.
"""

from __future__ import annotations

import functools
import itertools
import threading
from collections.abc import Iterable

import torch
import triton

__all__ = [
    "LaunchConfig",
    "cdiv",
    "current_raw_stream",
    "is_fake",
    "is_interpreted",
    "next_pow2",
    "num_sms",
    "partials_buffer",
    "raw_stream",
    "ticket_buffer",
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


_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def raw_stream(index: int) -> int:
    """The raw ``cudaStream_t`` of CUDA device ``index``'s current stream (what Triton launches on), without
    building a ``torch.cuda.Stream`` object (which costs about as much host time as a small kernel launch)."""
    if _raw_stream is not None:
        return _raw_stream(index)
    return torch.cuda.current_stream(index).cuda_stream


def current_raw_stream(device: torch.device) -> int:
    """:func:`raw_stream` of ``device`` (its current device when it has no index); 0 off CUDA."""
    if device.type != "cuda":
        return 0
    return raw_stream(device.index if device.index is not None else torch.cuda.current_device())


# ticket counters: one zeroed int32 buffer per (device, stream), shared by every kernel that takes integer
# tickets (the norm kernel, the one-pass backward); each launch resets what it used to zero before it ends,
# and launches on one stream never overlap, so the next launch finds zeros without a memset

_ticket_lock = threading.Lock()
_tickets: dict[tuple[torch.device, int], torch.Tensor] = {}
_retired_tickets: list[torch.Tensor] = []  # outgrown buffers a captured CUDA graph may still point at


def ticket_buffer(device: torch.device, needed: int) -> torch.Tensor:
    """A zeroed int32 buffer of at least ``needed`` counters for launches on ``device``'s current stream."""
    stream = current_raw_stream(device)
    key = (device, stream)
    buf = _tickets.get(key)
    if buf is not None and buf.numel() >= needed:
        return buf
    with _ticket_lock:
        buf = _tickets.get(key)
        if buf is None or buf.numel() < needed:
            if buf is not None:
                _retired_tickets.append(buf)
            buf = torch.zeros(max(256, next_pow2(needed)), dtype=torch.int32, device=device)
            _tickets[key] = buf
        return buf


def tickets_all_zero() -> bool:
    """True when every ticket buffer is back to zero (tests: each launch must reset what it used)."""
    return all(int(buf.abs().sum()) == 0 for buf in _tickets.values())


# fp32 partial sums: one scratch buffer per (device, stream) for kernels whose partials are written and read
# back within one launch (the one-pass backward's magnitude gradient: the last program of a column tile sums
# them); launches on one stream never overlap, so reusing it saves an allocation per launch

_partials: dict[tuple[torch.device, int], torch.Tensor] = {}
_retired_partials: list[torch.Tensor] = []  # outgrown buffers a captured CUDA graph may still point at


def partials_buffer(device: torch.device, needed: int) -> torch.Tensor:
    """A flat fp32 scratch buffer of at least ``needed`` elements for launches on ``device``'s current stream."""
    stream = current_raw_stream(device)
    key = (device, stream)
    buf = _partials.get(key)
    if buf is not None and buf.numel() >= needed:
        return buf
    with _ticket_lock:
        buf = _partials.get(key)
        if buf is None or buf.numel() < needed:
            if buf is not None:
                _retired_partials.append(buf)
            buf = torch.empty(max(4096, next_pow2(needed)), dtype=torch.float32, device=device)
            _partials[key] = buf
        return buf
