"""Launch plans of the norm kernel (``row_norm_kernel.py``): configuration heuristics and workspace layout.

Every function here is a pure function of shapes, dtypes and the SM count (no timing), so a launch is
deterministic. The host entry points are in ``row_norm.py``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import triton

from ._triton_utils import num_sms as device_sms

__all__ = [
    "GEMM_PATH_LOOP",
    "GRAM_SHARE",
    "SPLIT_MIN_STEPS",
    "NormKernelConfig",
    "NormLaunchPlan",
    "gemm_path_config",
    "one_pass_config",
    "pick_config",
    "pick_gemm_config",
    "plan_for",
]


# ---------------------------------------------------------------------------------------------
# launch configuration


@dataclass(frozen=True)
class NormKernelConfig:
    """Launch configuration of the norm kernel (fixed per shape, dtypes and device: no timing involved).

    ``block_m`` rows of ``d_out`` x ``block_n`` ranks per program, ``block_k`` columns of ``d_in`` per step,
    ``splits`` ranges of ``d_in`` per (row, rank) tile, ``gram_splits`` ranges of ``d_in`` per gram tile;
    ``bg_chunk`` ranks per step of the ``B G''`` loop (capped at ``block_n``), ``bg_stages`` its pipeline depth.
    """

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3
    splits: int = 1
    gram_splits: int = 1
    bg_chunk: int = 64
    bg_stages: int = 2

    def validate(self) -> None:
        if self.bg_stages < 1:
            raise ValueError(f"bg_stages={self.bg_stages} must be >= 1")
        for name in ("block_m", "block_n", "block_k", "bg_chunk"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"{name}={v} must be a power of two >= 16")
        if self.splits < 1 or self.gram_splits < 1:
            raise ValueError(f"splits={self.splits} and gram_splits={self.gram_splits} must be >= 1")


#: Shared memory the heuristic plans the main loop's pipeline into (sm_90 allows 227 KiB per block).
_SMEM_BUDGET = 200 * 1024
#: Largest fp32 gram-partial buffer the heuristic allows itself (bytes).
_GRAM_PARTIAL_BUDGET = 8 << 20
_MAX_SPLITS = 16

# The measured choices of the heuristics below (``python -m benchmarks tune --only norm`` re-measures them on
# a GPU and prints the values it would set):

#: Once 128-wide rank tiles fill half the SMs, a ``d_in`` split of the one-pass kernel keeps at least this
#: many k-steps: shorter splits cost more in partial sums and gram waits than they win in wave filling. With
#: fewer tiles a split keeps at least 8 k-steps (there are too few programs to stream W otherwise).
SPLIT_MIN_STEPS = 64
#: A gram program of 128-wide rank tiles gets at most ``1 / GRAM_SHARE`` of a main program's k-steps and
#: tensor-core work, so ``G''`` is final before the main programs need it (narrower rank tiles: a half).
GRAM_SHARE = 4
#: ``(num_warps, bg_chunk, bg_stages)`` of the GEMM path's ``B G''`` loop: with no gram programs compiled
#: in, 4 warps and a 3-deep, 32-wide pipeline leave room for two programs per SM.
GEMM_PATH_LOOP = (4, 32, 3)


def _pow2_at_least(x: int, lo: int) -> int:
    return max(lo, 1 << max(0, (x - 1).bit_length()))


def _interpreter_config(d_out: int, rank: int) -> NormKernelConfig:
    """The CPU interpreter: few, small programs."""
    block_n = min(128, _pow2_at_least(rank, 16))
    return NormKernelConfig(32 if d_out > 16 else 16, min(block_n, 64), 32, 4, 1, 1, 1)


@functools.lru_cache(maxsize=1024)
def pick_config(
    d_out: int,
    d_in: int,
    rank: int,
    a_is_fp32: bool,
    num_sms: int,
    interpret: bool,
) -> NormKernelConfig:
    """The one-pass kernel's launch configuration for a shape: a pure function of its arguments (hence
    deterministic); :func:`one_pass_config` on a GPU."""
    if interpret:
        return _interpreter_config(d_out, rank)
    return one_pass_config(d_out, d_in, rank, a_is_fp32, num_sms)


def one_pass_config(
    d_out: int,
    d_in: int,
    rank: int,
    a_is_fp32: bool,
    num_sms: int,
    *,
    split_min_steps: int = SPLIT_MIN_STEPS,
    gram_share: int = GRAM_SHARE,
) -> NormKernelConfig:
    """The one-pass kernel's GPU configuration (``split_min_steps`` / ``gram_share``: see the module constants).

    Rank tile: the smallest power of two >= r up to 128 (so r <= 128 is one tile and W is read once).
    Row tile 128, 8 warps for 128-wide rank tiles (and fp32 adapters), as many pipeline stages as fit in
    ~200 KiB of shared memory (at most 4). ``splits`` cuts ``d_in`` so the main programs fill the SMs in
    nearly whole waves; ``gram_splits`` keeps each gram program a fraction of a main program so the gram
    tiles are final before the first main program needs them.
    """
    block_n = min(128, _pow2_at_least(rank, 16))
    # 128-row tiles everywhere (64-row tiles spill at 4 warps and need too much shared memory for fp32 A,
    # checked on sm_90 cubins): small d_out is filled by splitting d_in instead
    block_m = 128
    block_k = 64
    num_warps = 8 if block_n >= 128 or (a_is_fp32 and block_n >= 32) else 4
    a_bytes = 4 if a_is_fp32 else 2
    stage_bytes = block_m * block_k * 2 + block_k * block_n * a_bytes
    split_bytes = 3 * block_k * block_n * 2 if a_is_fp32 else 0  # the bf16 parts of the A tile
    num_stages = max(2, min(4, (_SMEM_BUDGET - split_bytes) // stage_bytes))
    n_m = triton.cdiv(d_out, block_m)
    nr = triton.cdiv(rank, block_n)
    k_steps = triton.cdiv(d_in, block_k)
    tiles = n_m * nr
    best, best_score = 1, -1.0
    min_steps = split_min_steps if block_n >= 128 and tiles * 2 >= num_sms else 8
    for splits in range(1, _MAX_SPLITS + 1):
        if splits > 1 and k_steps // splits < min_steps:
            break
        programs = tiles * splits
        waves = triton.cdiv(programs, num_sms)
        score = programs / (waves * num_sms) - 0.02 * (splits - 1)
        if score > best_score + 1e-9:
            best, best_score = splits, score
    splits = best
    # gram programs (BN x BN tiles) must finish well before the main programs need G'': at most a share of a
    # main program's k-steps and of its tensor-core work (fp32 A: 6 dots per gram step, 3 per main step)
    dots_gram = 6 if a_is_fp32 else 1
    dots_main = 3 if a_is_fp32 else 1
    main_steps = max(1, k_steps // splits)
    share = gram_share if block_n >= 128 else 2
    gram_steps_max = max(
        1, min(main_steps // share, (main_steps * block_m * dots_main) // (share * block_n * dots_gram))
    )
    gram_splits = max(1, min(k_steps, triton.cdiv(k_steps, gram_steps_max)))
    nt = nr * (nr + 1) // 2
    cap = max(1, _GRAM_PARTIAL_BUDGET // (nt * block_n * block_n * 4))
    gram_splits = max(1, min(gram_splits, cap, _MAX_SPLITS * 2))
    return NormKernelConfig(block_m, block_n, block_k, num_warps, num_stages, splits, gram_splits)


@functools.lru_cache(maxsize=1024)
def pick_gemm_config(d_out: int, d_in: int, rank: int, num_sms: int, interpret: bool) -> NormKernelConfig:
    """Launch configuration of the kernel's ``FROM_GEMM`` mode (:func:`gemm_weight_norm_sq`): pure function;
    :func:`gemm_path_config` on a GPU."""
    if interpret:
        return _interpreter_config(d_out, rank)
    return gemm_path_config(d_out, d_in, rank, num_sms)


def gemm_path_config(
    d_out: int, d_in: int, rank: int, num_sms: int, *, loop: tuple[int, int, int] = GEMM_PATH_LOOP
) -> NormKernelConfig:
    """The GEMM path's GPU configuration; ``loop`` is ``(num_warps, bg_chunk, bg_stages)`` of ``B G''``.

    The main programs have no loop over ``d_in`` (U came from a GEMM), only the ``B G''`` chunks of each
    (row, rank) tile: ``splits`` cuts them into up to 4 programs until the programs fill the SMs.
    """
    block_n = min(128, _pow2_at_least(rank, 16))
    block_m, block_k = 128, 64
    n_m = triton.cdiv(d_out, block_m)
    nr = triton.cdiv(rank, block_n)
    num_warps, bg_chunk, bg_stages = loop
    chunks = max(1, block_n // min(block_n, bg_chunk))  # B G'' chunks of the last (shortest) rank tile
    splits = 1
    while n_m * nr * splits < num_sms and splits < 4 and splits < chunks * nr:
        splits += 1
    return NormKernelConfig(block_m, block_n, block_k, num_warps, 3, splits, 1, bg_chunk, bg_stages)


@dataclass(frozen=True)
class NormLaunchPlan:
    """Everything a launch derives from (shape, config): grid layout and workspace sizes."""

    config: NormKernelConfig
    d_out: int
    row_tiles: int
    rank_tiles: int
    r_pad: int
    k_steps: int
    splits: int
    gram_splits: int
    gram_tiles: int
    gram_chunk: int
    #: launch constants per (d_in, rank, mode, dtypes), filled by ``_launch`` (not part of the plan's identity)
    launch_cache: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def build(cls, d_out: int, d_in: int, rank: int, cfg: NormKernelConfig) -> NormLaunchPlan:
        cfg.validate()
        rank_tiles = triton.cdiv(rank, cfg.block_n)
        k_steps = triton.cdiv(d_in, cfg.block_k)
        return cls(
            config=cfg,
            d_out=d_out,
            row_tiles=triton.cdiv(d_out, cfg.block_m),
            rank_tiles=rank_tiles,
            r_pad=rank_tiles * cfg.block_n,
            k_steps=k_steps,
            splits=max(1, min(cfg.splits, k_steps)),
            gram_splits=max(1, min(cfg.gram_splits, k_steps)),
            gram_tiles=rank_tiles * (rank_tiles + 1) // 2,
            gram_chunk=min(cfg.block_n, cfg.bg_chunk),
        )

    @property
    def programs(self) -> int:
        return self.gram_tiles * self.gram_splits + self.row_tiles * self.rank_tiles * self.splits

    def sections(self, cold: bool, from_gemm: bool = False, probe: bool = False) -> tuple[int, ...]:
        """fp32 elements of the workspace's sections, in order (the kernel derives the first four offsets, the
        host passes the probe's): cross partials, ``||W||^2`` partials (cold only), gram partials and the bf16
        ``G''`` parts (both absent in ``FROM_GEMM`` mode, whose G comes from a GEMM); with ``probe`` (the
        non-finite row repair) the probe partials ``[NR, d_out]``. Each starts 128-byte aligned."""
        bn = self.config.block_n
        n_part = self.rank_tiles * self.splits * self.d_out
        n_wpart = self.splits * self.d_out if cold else 0
        n_gpart = 0 if from_gemm else self.gram_splits * self.gram_tiles * bn * bn
        n_g = 0 if from_gemm else (3 * self.r_pad * self.r_pad + 1) // 2  # three bf16 matrices (hi, mid, lo)
        sizes = [n_part, n_wpart, n_gpart, n_g]
        if probe:
            sizes.append(self.rank_tiles * self.d_out)
        return tuple(-(-n // 32) * 32 for n in sizes)

    def workspace_elements(self, cold: bool, from_gemm: bool = False, probe: bool = False) -> int:
        """fp32 elements of the one workspace a launch allocates (besides the ``[d_out]`` result), at most."""
        return sum(self.sections(cold, from_gemm, probe))

    def workspace_bytes(self, cold: bool, from_gemm: bool = False, probe: bool = False) -> int:
        """Bytes a launch allocates, at most: the workspace plus the fp32 ``[d_out]`` result (no ``d_in`` term)."""
        return 4 * (self.workspace_elements(cold, from_gemm, probe) + self.d_out)


@functools.lru_cache(maxsize=1024)
def _one_pass_plan(d_out: int, d_in: int, rank: int, a_is_fp32: bool, num_sms: int, interpret: bool) -> NormLaunchPlan:
    return NormLaunchPlan.build(d_out, d_in, rank, pick_config(d_out, d_in, rank, a_is_fp32, num_sms, interpret))


@functools.lru_cache(maxsize=1024)
def _gemm_plan(d_out: int, d_in: int, rank: int, num_sms: int, interpret: bool) -> NormLaunchPlan:
    return NormLaunchPlan.build(d_out, d_in, rank, pick_gemm_config(d_out, d_in, rank, num_sms, interpret))


def plan_for(
    d_out: int,
    d_in: int,
    rank: int,
    *,
    a_is_fp32: bool,
    device: torch.device | str = "cuda",
    num_sms: int | None = None,
) -> NormLaunchPlan:
    """The plan :func:`triton_weight_norm_sq` uses for a shape (for tests, benchmarks and memory accounting)."""
    device = torch.device(device)
    sms = num_sms if num_sms is not None else device_sms(device)
    interpret = device.type != "cuda"
    return _one_pass_plan(d_out, d_in, rank, a_is_fp32, sms, interpret)
