"""Launch configurations of the compose kernels (``compose_kernel.py``): autotuning, forced tiles, launches.

Launch configurations are autotuned on first use per (columns, power-of-two row bucket, dtypes, flags)
from a small default list, or from a full grid when ``DORA_AUTOTUNE_COMPREHENSIVE=1``. After the first call
the chosen config is looked up in a dict and the kernel is launched directly (no per-call autotuner
bookkeeping; ``launch.py`` then skips Triton's per-call binding too). The in-place kernel restores its destination between autotuning trials. Under Triton's CPU
interpreter a fixed config is used (no autotuning).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator

import torch
import triton

from ..dispatch import config
from ._triton_utils import LaunchConfig, is_fake, next_pow2, tile_grid, to_triton_configs
from .compose_kernel import (
    INTERPRETER,
    _compose_bwd_cols_kernel,
    _compose_bwd_lora_b_kernel,
    _compose_bwd_rows_kernel,
    _compose_fwd_kernel,
)
from .launch import launch

#: Real (non-fake) kernel launches per kernel name, for tests and benchmarks.
launch_counts: Counter[str] = Counter()


#: Forward tiles ``(BLOCK_R, BLOCK_C, num_warps, num_stages)``: 4-16K elements per program for the
#: bandwidth-bound shapes, and one-row tiles for decode-sized calls.
FORWARD_CONFIGS: tuple[LaunchConfig, ...] = (
    (1, 1024, 4, 1),
    (1, 4096, 8, 1),
    (4, 1024, 4, 1),
    (8, 1024, 8, 1),
    (16, 512, 8, 1),
    (4, 2048, 8, 1),
    (32, 256, 4, 1),
)

#: Backward tiles (one loop iteration of a program).
BACKWARD_CONFIGS: tuple[LaunchConfig, ...] = (
    (1, 1024, 4, 1),
    (8, 256, 4, 1),
    (16, 256, 4, 1),
    (8, 512, 4, 1),
    (16, 512, 8, 1),
    (4, 1024, 4, 1),
    (8, 1024, 8, 1),
    (32, 128, 4, 1),
)

_ROWS = (1, 2, 4, 8, 16, 32, 64)
_COLS = (64, 128, 256, 512, 1024, 2048, 4096)
_WARPS = (2, 4, 8, 16)


def forward_configs(comprehensive: bool) -> list[LaunchConfig]:
    """The forward's autotune list (``DORA_AUTOTUNE_COMPREHENSIVE`` picks the full grid, 88 tiles)."""
    if not comprehensive:
        return list(FORWARD_CONFIGS)
    return tile_grid(
        _ROWS, _COLS, _WARPS, min_elems=256, max_elems=16384, min_elems_per_thread=8, max_elems_per_thread=64
    )


def backward_configs(comprehensive: bool) -> list[LaunchConfig]:
    """The backward's autotune list; the full grid (140) also tries ``num_stages=2`` (the kernel loops)."""
    if not comprehensive:
        return list(BACKWARD_CONFIGS)
    out: list[LaunchConfig] = []
    for stages in (1, 2):
        out += tile_grid(
            _ROWS,
            _COLS,
            _WARPS,
            min_elems=256,
            max_elems=16384,
            min_elems_per_thread=8,
            max_elems_per_thread=32,
            stages=stages,
        )
    return out


def _interpreter_config(R: int, K: int) -> LaunchConfig:
    """Tiles for the CPU interpreter: few, large programs (it costs milliseconds per program and loop step).

    Tests that need many small tiles force them with :func:`forced_config`.
    """
    bc = min(next_pow2(K), 1024)
    br = max(1, min(next_pow2(R), 65536 // bc, 4096))
    return (br, bc, 4, 1)


#: ``forced_config`` overrides, by kernel family ("fwd" / "bwd"); for tests and the tuning script.
_FORCED: dict[str, LaunchConfig] = {}


@contextlib.contextmanager
def forced_config(*, fwd: LaunchConfig | None = None, bwd: LaunchConfig | None = None) -> Iterator[None]:
    """Launch every forward / backward kernel with this tile instead of the autotuned (or interpreter) one."""
    saved = dict(_FORCED)
    if fwd is not None:
        _FORCED["fwd"] = tuple(fwd)  # type: ignore[assignment]
    if bwd is not None:
        _FORCED["bwd"] = tuple(bwd)  # type: ignore[assignment]
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(saved)


#: Warm-up and measurement time (ms) per config while autotuning: about 30 ms per config, so a new tuning
#: key costs ~0.25 s per kernel variant instead of ~1 s with Triton's defaults (25 / 100 ms).
AUTOTUNE_WARMUP_MS = 5
AUTOTUNE_REP_MS = 25


def _autotune_bench(fn, quantiles=None):
    from triton.testing import do_bench

    return do_bench(fn, warmup=AUTOTUNE_WARMUP_MS, rep=AUTOTUNE_REP_MS, quantiles=quantiles)


class _Tuned:
    """A ``@triton.jit`` kernel, its lazily built autotuners and the config each tuning key settled on."""

    __slots__ = ("chosen", "family", "fn", "key", "name", "restore", "tuners")

    def __init__(self, fn, name: str, family: str, key: list[str], restore: tuple[str, ...] = ()) -> None:
        self.fn = fn
        self.name = name
        self.family = family
        self.key = key
        self.restore = list(restore)
        self.tuners: dict[bool, object] = {}
        #: comprehensive flag -> tuning key -> chosen config
        self.chosen: dict[bool, dict[tuple, LaunchConfig]] = {False: {}, True: {}}

    def tuner(self, comprehensive: bool):
        tuner = self.tuners.get(comprehensive)
        if tuner is None:
            configs = forward_configs(comprehensive) if self.family == "fwd" else backward_configs(comprehensive)
            tuner = triton.autotune(
                configs=to_triton_configs(configs),
                key=self.key,
                restore_value=self.restore or None,
                do_bench=_autotune_bench,
            )(self.fn)
            self.tuners[comprehensive] = tuner
        return tuner

    def reset(self) -> None:
        """Forget the tuned configs (a later call tunes again)."""
        self.tuners.clear()
        self.chosen = {False: {}, True: {}}


_FWD_KEY = ["K", "R_BUCKET", "G_ON_ROWS", "WRITE_INNER", "ADD_BASE", "DIVIDE"]
_FWD = _Tuned(_compose_fwd_kernel, "compose_fwd", "fwd", _FWD_KEY)
_FWD_INPLACE = _Tuned(_compose_fwd_kernel, "compose_fwd_inplace", "fwd", _FWD_KEY, ("out_ptr",))
_BWD_COLS = _Tuned(
    _compose_bwd_cols_kernel, "compose_bwd", "bwd", ["K", "R_BUCKET", "NEED_LORA", "NEED_BASE", "NEED_G"]
)
_BWD_ROWS = _Tuned(
    _compose_bwd_rows_kernel, "compose_bwd_rows", "bwd", ["K", "R_BUCKET", "NEED_LORA", "NEED_BASE", "NEED_G"]
)
_BWD_LORA_B = _Tuned(
    _compose_bwd_lora_b_kernel,
    "compose_bwd_lora_b",
    "bwd",
    ["K", "RANK", "R_BUCKET", "NEED_BASE", "NEED_G", "NEED_DB", "NEED_BS", "ADD_BASE", "DIVIDE"],
)


def reset_tuning() -> None:
    """Forget every autotuned config (the next call of each kernel tunes again)."""
    for tuned in (_FWD, _FWD_INPLACE, _BWD_COLS, _BWD_ROWS, _BWD_LORA_B):
        tuned.reset()


def _row_bucket(R) -> int:
    """Autotune bucket of a row count: the next power of 8 (1, 8, 64, 512, 4096, 32768 and above).

    Coarse on purpose: every new bucket costs one autotuning round per kernel variant, and decode batch
    sizes vary. Under torch.compile with dynamic shapes ``R`` is symbolic: Inductor tunes user kernels itself.
    """
    if not isinstance(R, int):
        return 0
    bucket = 1
    while bucket < R and bucket < 32768:
        bucket <<= 3
    return bucket


def _skip_launch(t: torch.Tensor) -> bool:
    """Inside a ``torch.library`` op under the interpreter, fake tensors (tracing) get no launch.

    With a real GPU ``wrap_triton`` records the launch instead; the interpreter's kernels cannot be
    recorded, so the op must stay opaque to AOTAutograd there (see ``autograd/ops.py``).
    """
    if not INTERPRETER:
        return False
    from torch._subclasses.functional_tensor import FunctionalTensor

    if isinstance(t, FunctionalTensor):
        raise RuntimeError(
            "dorafactors: under TRITON_INTERPRET=1 the Triton ops cannot be decomposed into a compiled graph; "
            "compile with torch._functorch.config.patch(decompose_custom_triton_ops=False)"
        )
    return is_fake(t)


def _launch(
    tuned: _Tuned,
    grid_of: Callable[[int, int], tuple[int, int]],
    args: tuple,
    key: tuple,
    R: int,
    K: int,
    wrap: bool,
) -> None:
    """Launch ``tuned`` on ``args`` (every kernel argument up to, not including, ``BLOCK_R``).

    The config is the forced one (tests), the interpreter's, the one cached for ``key``, or, on the first
    call of a key, the autotuner's choice. ``wrap``: inside a ``torch.library`` op (``wrap_triton``).
    """
    if wrap:
        _launch_wrapped(tuned, grid_of, args, R, K)
        return
    index = args[0].get_device()
    if index >= 0 and index != torch.cuda.current_device():
        # Triton launches on the current device: tensors on another GPU (a model spread over several GPUs)
        # need that device made current for the launch.
        with torch.cuda.device(index):
            _launch_here(tuned, grid_of, args, key, R, K)
        return
    _launch_here(tuned, grid_of, args, key, R, K)


def _launch_here(tuned: _Tuned, grid_of, args: tuple, key: tuple, R: int, K: int) -> None:
    forced = _FORCED.get(tuned.family) if _FORCED else None
    if forced is not None or INTERPRETER:
        br, bc, warps, stages = forced or _interpreter_config(R, K)
        launch(tuned.fn, grid_of(br, bc), *args, br, bc, num_warps=warps, num_stages=stages)
        launch_counts[tuned.name] += 1
        return
    comprehensive = config.autotune_comprehensive()
    chosen = tuned.chosen[comprehensive]
    cfg = chosen.get(key)
    if cfg is not None:
        br, bc, warps, stages = cfg
        launch(tuned.fn, grid_of(br, bc), *args, br, bc, num_warps=warps, num_stages=stages)
    else:
        tuner = tuned.tuner(comprehensive)
        tuner[lambda meta: grid_of(meta["BLOCK_R"], meta["BLOCK_C"])](*args)
        best = tuner.best_config
        chosen[key] = (best.kwargs["BLOCK_R"], best.kwargs["BLOCK_C"], best.num_warps, best.num_stages)
    launch_counts[tuned.name] += 1


def _launch_wrapped(tuned: _Tuned, grid_of, args: tuple, R, K) -> None:
    """The launch inside a ``torch.library`` Triton op: recorded by ``wrap_triton`` while tracing."""
    from torch.library import wrap_triton

    if _skip_launch(args[0]):
        return
    forced = _FORCED.get(tuned.family) if _FORCED else None
    if forced is not None or INTERPRETER:
        br, bc, warps, stages = forced or _interpreter_config(R, K)
        wrap_triton(tuned.fn)[grid_of(br, bc)](*args, br, bc, num_warps=warps, num_stages=stages)
    else:
        tuner = tuned.tuner(config.autotune_comprehensive())
        wrap_triton(tuner)[lambda meta: grid_of(meta["BLOCK_R"], meta["BLOCK_C"])](*args)
    launch_counts[tuned.name] += 1
