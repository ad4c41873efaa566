"""CUDA-graph replay of a Linear layer's norm recomputation: one graph launch for the engine's Python and kernels.

In training the norm is recomputed after every optimizer step, always from the same tensors: the optimizer
writes ``lora_A`` and ``lora_B`` in place, and ``W`` and its cached row sums of squares do not move. Eagerly
each recomputation costs the host the engine's dispatch and three to five kernel launches, a large part of a
DoRA layer's extra host time per training call where the layer is host-bound (small layers, fast GPUs). A
:class:`NormReplay` (one per layer and adapter) turns the repeats into replays of a CUDA graph:

* the first recomputation with a *layout* runs eagerly and stamps it; the layout is which tensors the
  computation reads (:meth:`StampSet.same_layout`: the objects, their storage, address, shape, strides
  and dtype, whatever their values) and the plain values that select its kernels (scaling, whether ``W`` is
  known finite, the dispatch settings, the device and the current stream);
* the second recomputation with the same layout runs eagerly too, then captures the same computation on a
  side stream of the current stream's own (a warm-up run there first, so no scratch buffer is first
  allocated inside the capture);
* from then on a recomputation with that layout is one graph replay on the current stream and a copy of its
  output (the cache and autograd get a tensor no later replay writes). A different layout drops the graph.

The graph reads the tensors' memory at replay time, so it computes from their current values, exactly as the
eager path would (the same kernels with the same arguments: bitwise the same norm). Only the kernel paths are
captured (``norm_path`` ``"gemm"`` or ``"triton"``: no host synchronization, no data-dependent host branch);
the PyTorch paths, the CPU, a ``torch.compile`` trace, another capture in progress, ``torch.func`` and
``torch.jit`` keep the eager computation. A layer whose layout keeps changing (a new tensor every step) stops
capturing after ``MAX_CAPTURES`` graphs. A capture that fails anyway keeps the eager value and turns
capturing off in the whole process (:func:`capture_failure` says why): PyTorch's caching allocator keeps
the state of a failed capture, so no later capture is attempted; a small capture that completes then takes
the CUDA generators out of the capture state the failed one left them in.

Graph memory: the graphs replayed on one stream of a device share one memory pool (their temporaries are
dead once a replay ends, and replays on one stream never overlap), so the pool holds one computation's
temporaries plus every graph's output (``[d_out]``, or ``[2, d_out]`` with the magnitude's divisor row). A
keeper graph holds each pool for the process: a pool whose graphs were all freed cannot be captured into again
(an internal assertion of the allocator).
:func:`replay_disabled` turns replays off inside a block (tests and benchmarks compare the two paths).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import torch

from .cache import StampSet, caching_allowed

__all__ = ["MAX_CAPTURES", "NormReplay", "capture_failure", "replay_disabled"]

#: Graphs one :class:`NormReplay` captures at most (each after two eager runs with one layout).
MAX_CAPTURES = 4

_enabled = True
_failure = ""  # why a capture failed: no capture is attempted after one
#: ``(device, replay stream) -> capture stream``: each replay stream's graphs bake in the scratch buffers
#: (per-stream ticket counters and partials) of a capture stream of their own, so graphs replayed on two
#: streams at once never share them, as eager launches on two streams do not
_side_streams: dict[tuple[int, int], torch.cuda.Stream] = {}
#: ``(device, replay stream) -> (pool handle, keeper graph, keeper's tensor)``
_pools: dict[tuple[int, int], tuple[Any, torch.cuda.CUDAGraph, torch.Tensor]] = {}


@contextlib.contextmanager
def replay_disabled() -> Iterator[None]:
    """Every norm computes eagerly inside the block (graphs already captured are kept, not replayed)."""
    global _enabled
    saved = _enabled
    _enabled = False
    try:
        yield
    finally:
        _enabled = saved


def capture_failure() -> str:
    """Why a norm capture failed in this process (capturing is then off), or "" when none did."""
    return _failure


def _side_stream(device: int, replay_stream: int) -> torch.cuda.Stream:
    side = _side_streams.get((device, replay_stream))
    if side is None:
        side = _side_streams[(device, replay_stream)] = torch.cuda.Stream(device)
    return side


def _pool(device: int, stream: int) -> Any:
    """The memory pool of the graphs replayed on ``stream`` of ``device`` (call on the capture stream); made
    with a keeper graph of one small fill, which stays alive with the pool."""
    entry = _pools.get((device, stream))
    if entry is None:
        handle = torch.cuda.graph_pool_handle()
        entry = _pools[(device, stream)] = (handle, *_capture_fill(device, handle))
    return entry[0]


def _capture_fill(device: int, pool: Any = None) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """A graph of one small fill on the current (capture) stream, into ``pool`` (None: a pool of its own)."""
    graph = torch.cuda.CUDAGraph()
    graph.capture_begin(pool=pool, capture_error_mode="thread_local")
    try:
        filled = torch.zeros(1, device=torch.device("cuda", device))
    finally:
        graph.capture_end()
    return graph, filled


def _end_failed_capture(side: torch.cuda.Stream, device: int) -> None:
    """A capture that raised leaves the CUDA generators in their capture state (every later random op then
    raises "Offset increment outside graph capture"); a capture of one small fill that completes, in a pool
    of its own, takes them out of it."""
    try:
        with torch.cuda.stream(side):
            _capture_fill(device)
    except RuntimeError:  # pragma: no cover - nothing more to undo
        pass


def _replay_stream(device: torch.device) -> int | None:
    """The raw current stream of a CUDA ``device`` a graph may be replayed on; None off CUDA and while the
    current stream is being captured (the computation then joins that capture)."""
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return None
    return torch._C._cuda_getCurrentRawStream(device.index)


class _Layout(NamedTuple):
    """What one :class:`NormReplay` last saw, replaced as a whole (a layer shared between threads, as
    ``nn.DataParallel`` replicas share their ``__dict__``, never pairs one layout's stamps with another's
    graph)."""

    stamps: StampSet
    values: tuple
    graph: torch.cuda.CUDAGraph | None = None
    out: torch.Tensor | None = None


class NormReplay:
    """One layer's (one adapter's) norm computation, replayed from a CUDA graph while its layout is unchanged.

    ``captures`` and ``replays`` count graphs captured and replays run (tests, benchmarks).
    """

    __slots__ = ("_layout", "captures", "replays")

    def __init__(self) -> None:
        self._layout: _Layout | None = None
        self.captures = 0
        self.replays = 0

    def run(
        self,
        compute: Callable[[], torch.Tensor],
        tensors: tuple[torch.Tensor, ...],
        values: tuple,
        capturable: Callable[[], bool],
    ) -> torch.Tensor:
        """``compute()``, or a replay of its graph.

        Args:
            compute: the norm computation; reads exactly ``tensors`` (and no other tensor) and returns a new
                tensor (a Linear layer's: the ``[d_out]`` norm, or ``[2, d_out]``: the norm and its divisor).
            tensors: every tensor ``compute`` reads, CUDA tensors of one device (the first one's).
            values: every plain value ``compute`` depends on besides the tensors (hashable, comparable).
            capturable: called before a capture: True when ``compute`` launches only capturable work (no host
                synchronization, no branch on tensor values).
        """
        device = tensors[0].device
        if not _enabled or _failure or not caching_allowed():
            return compute()
        stream = _replay_stream(device)
        if stream is None:
            return compute()
        index = device.index
        values = (*values, index, stream)
        layout = self._layout
        same = layout is not None and values == layout.values and layout.stamps.same_layout(tensors)
        if not same:  # a new layout: stamp it (the old one's graph goes with it)
            self._layout = _Layout(StampSet(tensors), values)
            return compute()
        if layout.graph is not None:  # type: ignore[union-attr]
            layout.graph.replay()  # type: ignore[union-attr]
            self.replays += 1
            return layout.out.clone()  # type: ignore[union-attr]
        out = compute()  # the second run with this layout: capture it for the next ones
        if self.captures < MAX_CAPTURES and capturable():
            captured = self._capture(compute, index, stream)
            if captured is not None:
                self._layout = layout._replace(graph=captured[0], out=captured[1])  # type: ignore[union-attr]
        return out

    def _capture(
        self, compute: Callable[[], torch.Tensor], index: int, stream: int
    ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor] | None:
        """``(graph, its output)`` of ``compute``, captured on the side stream of the replay ``stream``; None
        when the capture failed."""
        global _failure
        self.captures += 1
        with torch.cuda.device(index):
            current = torch.cuda.current_stream()
            side = _side_stream(index, stream)
            side.wait_stream(current)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.stream(side):
                    compute()  # warm-up: the side stream's scratch buffers are allocated outside the capture
                    pool = _pool(index, stream)
                    graph.capture_begin(pool=pool, capture_error_mode="thread_local")
                    try:
                        out = compute()
                    finally:
                        graph.capture_end()
            except RuntimeError as error:  # not capturable after all: eager, and no capture any more
                _failure = f"{type(error).__name__}: {error}"
                _end_failed_capture(side, index)
                return None
            finally:
                current.wait_stream(side)
        return graph, out

    def clear(self) -> None:
        """Forget the layout and drop the graph (its memory returns to the pool)."""
        self._layout = None
