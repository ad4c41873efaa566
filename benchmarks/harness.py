"""Settings, timing, memory, run metadata, the results file and the runner.

Timing: on CUDA every number comes from ``triton.testing.do_bench`` (CUDA events around each call, the L2
cache flushed before each timed call, ``return_mode="all"``), after a warm-up call; the row keeps the
median, p20, p80 and the number of timed calls. On CPU (``--quick``) a ``perf_counter`` loop stands in:
those numbers only show that the harness runs.

Memory: "peak extra" as in ``anchors.md``: ``max_memory_allocated - memory_allocated(before)`` around one
call, after ``reset_peak_memory_stats``.

Robustness: every case runs inside ``try``; a failing provider (OOM, missing kernel, ...) becomes an
``error`` row and the run goes on. The results file is rewritten atomically after every case, so a crash
or a kill leaves every finished row on disk. ``--time-budget`` skips (and records) the cases whose
estimate no longer fits.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import hashlib
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import SCHEMA
from .common import SUITE_ORDER, device_label, load_results, write_results

__all__ = [
    "SUITE_ORDER",
    "Case",
    "ResultsFile",
    "Settings",
    "bench",
    "bench_in_turn",
    "collect_metadata",
    "device_label",
    "device_us",
    "free_memory",
    "host_us",
    "load_results",
    "loop_us",
    "peak_extra_mib",
    "provider_rows",
    "run_cases",
]

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Calls a measurement costs besides the timed ones: our warm-up and estimate calls, do_bench's own first
#: call, its 5 estimate calls and >= 1 warm-up call, and one call for peak memory.
OVERHEAD_CALLS = 9
#: Below this many ms per call a case is a microbenchmark: it gets at least ``MICRO_REPS`` timed calls.
MICRO_MS = 1.0
MICRO_REPS = 50
#: Per-provider cost outside the timed calls (gc + empty_cache, inputs, peak-memory call), added to priors.
PROVIDER_OVERHEAD_S = 0.5


@dataclass
class Settings:
    """What a run measures and how."""

    quick: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    reps: int = 20
    heavy_reps: int = 8
    compile: bool = True
    compile_backend: str = "inductor"
    compile_mode: str | None = None
    seed: int = 0
    #: Interleaved rounds of the host-bound cases (``provider_rows(rounds=)``: the eager layer and decode
    #: cases); 1 in the --quick smoke run.
    rounds: int = 1

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def compiled_case_name(self, name: str) -> str:
        """The name of a compiled case: ``name``, with ``/mode=<mode>`` under a non-default ``--compile-mode``
        (a CUDA-graph row is another measurement than the default mode's, and must not replace it in reports)."""
        return name if self.compile_mode is None else f"{name}/mode={self.compile_mode}"

    @classmethod
    def make(
        cls,
        *,
        quick: bool,
        reps: int | None = None,
        heavy_reps: int | None = None,
        compile: bool = True,
        compile_mode: str | None = None,
        device: str | None = None,
        seed: int = 0,
        rounds: int | None = None,
    ) -> Settings:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if reps is None:
            reps = 3 if quick else 20
        if heavy_reps is None:
            heavy_reps = min(reps, 3 if quick else 8)
        # CPU smoke runs: Dynamo's graphs run eagerly (tests/layers/test_compiled_norm.py covers AOTAutograd)
        backend = "inductor" if dev.type == "cuda" else "eager"
        return cls(
            quick=quick,
            device=dev,
            reps=max(1, reps),
            heavy_reps=max(1, heavy_reps),
            compile=compile,
            compile_backend=backend,
            compile_mode=compile_mode if backend == "inductor" and compile_mode != "default" else None,
            seed=seed,
            rounds=max(1, rounds if rounds is not None else (1 if quick else 3)),
        )


@dataclass
class Case:
    """One benchmark case: every provider measured back to back on the same inputs.

    ``run(settings)`` returns one row fragment per provider (see :func:`provider_rows`). ``est_s`` is the
    estimated wall time of the whole case at default (GPU) sizes on an H100, used by ``--time-budget`` and
    ``plan``; it is a prior, not a measurement.
    """

    suite: str
    name: str
    params: dict[str, Any]
    providers: tuple[str, ...]
    run: Callable[[Settings], list[dict[str, Any]]]
    est_s: float = 0.0
    optional: bool = False
    priority: int = 0
    skip_quick: str = ""

    @property
    def key(self) -> str:
        """``suite:name``, with ``#compile`` for the optional compiled twin of a case."""
        return f"{self.suite}:{self.name}" + ("#compile" if self.optional else "")

    def estimate(self, measured: dict[str, float] | None = None) -> float:
        """Measured wall time of an earlier run if given, else the prior plus per-provider overhead."""
        if measured and self.key in measured:
            return measured[self.key]
        return self.est_s + PROVIDER_OVERHEAD_S * len(self.providers)


# --------------------------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device | None = None) -> None:
    """On CUDA ``gc.collect()`` + ``empty_cache()`` (run between providers and cases); on CPU a young-gen collect.

    A full collection over transformers' and PEFT's object graph costs ~0.1-0.3 s: worth it on a GPU (freed
    memory, clean peak-memory baselines), not in the CPU smoke run.
    """
    if (device is None or device.type == "cuda") and torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
    else:
        gc.collect(0)


_FLUSH_MS: float | None = None


def _flush_ms() -> float:
    """Time do_bench spends flushing L2 before each call (it is inside its estimate, outside the events)."""
    global _FLUSH_MS
    if _FLUSH_MS is None:
        try:
            from triton import runtime

            cache = runtime.driver.active.get_empty_cache_for_benchmark()
            runtime.driver.active.clear_cache(cache)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(10):
                runtime.driver.active.clear_cache(cache)
            torch.cuda.synchronize()
            _FLUSH_MS = (time.perf_counter() - t0) * 100.0
            del cache
        except Exception:  # an older/newer triton without these hooks: assume a 256 MB memset
            _FLUSH_MS = 0.25
    return _FLUSH_MS


def _summary(times: Sequence[float], timer: str) -> dict[str, Any]:
    ordered = sorted(times)
    n = len(ordered)

    def q(p: float) -> float:
        if n == 1:
            return ordered[0]
        pos = p * (n - 1)
        lo = int(pos)
        hi = min(lo + 1, n - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return {
        "ms": statistics.median(ordered),
        "ms_p20": q(0.2),
        "ms_p80": q(0.8),
        "ms_min": ordered[0],
        "reps": n,
        "timer": timer,
    }


def _drop_grads(tensors: Sequence[torch.Tensor] | None) -> None:
    """``.grad = None`` for each of ``tensors`` (a timing's ``grad_to_none``), as
    ``optimizer.zero_grad(set_to_none=True)`` does between the calls of a training loop."""
    for t in tensors or ():
        t.grad = None


def bench(
    fn: Callable[[], Any],
    settings: Settings,
    *,
    reps: int | None = None,
    grad_to_none: Sequence[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Median time of ``fn`` in ms (+ p20/p80, timed-call count): ``do_bench`` on CUDA, a loop on CPU.

    ``fn`` runs once to warm up (compilation, autotuning, allocator). On CUDA it runs once more to estimate
    its time, from which the do_bench repetition time is derived so that at least ``reps`` calls are timed
    (at least ``MICRO_REPS`` below ``MICRO_MS``). ``grad_to_none`` tensors get ``.grad = None`` before
    every timed call (as ``optimizer.zero_grad(set_to_none=True)`` would).
    """
    reps = reps or settings.reps
    device = settings.device
    fn()
    sync(device)
    if not settings.cuda:
        times = []
        for _ in range(reps):
            _drop_grads(grad_to_none)
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return _summary(times, "perf_counter (CPU)")
    t0 = time.perf_counter()
    fn()
    sync(device)
    est_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
    if est_ms < MICRO_MS:
        reps = max(reps, MICRO_REPS)
    from triton.testing import do_bench

    per_call = est_ms + _flush_ms()
    rep_ms = per_call * (reps + 0.5) * 1.25  # do_bench re-estimates (with accumulating grads): keep >= reps
    try:
        times = do_bench(fn, warmup=1e-3, rep=rep_ms, grad_to_none=list(grad_to_none or ()), return_mode="all")
        return _summary([float(t) for t in times], "triton.testing.do_bench (L2 flushed)")
    except AssertionError:  # an older triton without return_mode="all"
        p50, p20, p80 = do_bench(
            fn, warmup=1e-3, rep=rep_ms, grad_to_none=list(grad_to_none or ()), quantiles=[0.5, 0.2, 0.8]
        )
        return {
            "ms": p50,
            "ms_p20": p20,
            "ms_p80": p80,
            "ms_min": None,
            "reps": int(rep_ms / per_call),
            "timer": "triton.testing.do_bench (L2 flushed)",
        }


#: What :func:`bench_in_turn` records as a row's ``timer`` on CUDA.
IN_TURN_TIMER = "in turn with the case's other providers (CUDA events, L2 flushed, device idle before each call)"


def bench_in_turn(
    fns: dict[str, Callable[[], Any]],
    settings: Settings,
    *,
    reps: int,
    warm_per_turn: int = 0,
    per_turn: int = 1,
    warm_up: bool = True,
    host_ms: dict[str, list[float]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Times of several functions measured in turn: turns that call each function ``warm_per_turn`` times
    untimed, then ``per_turn`` times timed (the order of the functions reversed every other turn), until each
    has ``reps`` timed calls; per function the :func:`bench` summary of its timed calls.

    For host-bound calls whose providers must be compared on a host whose speed drifts, or jumps between two
    speeds for seconds at a time, within one case: neighbouring calls of different providers see the same
    host, where separate measurements (even in interleaved rounds of ``bench``) may not. ``warm_per_turn``:
    the first call after another function's pays for the switch (compiled models that share code share
    Dynamo's cache entries, and a hit moves its entry to the front: the first call after a switch evaluates
    the other models' guards first; CPU caches are cold), which one model called over and over never does.
    On CUDA each timed call starts from an idle device (synchronized), after the L2 flush ``do_bench`` makes,
    between CUDA events, so that a long call of one provider never leaves the next one's launches queued
    ahead of the device; on CPU a ``perf_counter`` around each call. Every function runs once first to warm up
    (``warm_up=False``: the caller warmed them). ``host_ms``: where given, each timed call's host time (until
    it returned, ms) is appended to ``host_ms[name]``.
    """
    device = settings.device
    names = list(fns)
    if warm_up:
        for name in names:
            fns[name]()
    sync(device)
    cache = None
    if settings.cuda:
        from triton import runtime

        cache = runtime.driver.active.get_empty_cache_for_benchmark()
    times: dict[str, list[float]] = {name: [] for name in names}
    events: dict[str, list[tuple[Any, Any]]] = {name: [] for name in names}
    per_turn = max(1, per_turn)
    for turn in range(-(-reps // per_turn)):
        timed = min(per_turn, reps - turn * per_turn)
        for name in names if turn % 2 == 0 else names[::-1]:
            fn = fns[name]
            for _ in range(warm_per_turn):
                fn()
            for _ in range(timed):
                if cache is None:
                    t0 = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - t0) * 1e3)
                    if host_ms is not None:
                        host_ms.setdefault(name, []).append(times[name][-1])
                    continue
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                sync(device)
                runtime.driver.active.clear_cache(cache)
                start.record()
                t0 = time.perf_counter()
                fn()
                if host_ms is not None:
                    host_ms.setdefault(name, []).append((time.perf_counter() - t0) * 1e3)
                end.record()
                events[name].append((start, end))
    sync(device)
    if cache is None:
        timer = "perf_counter (CPU), " + IN_TURN_TIMER.split(" (")[0]
    else:
        del cache
        timer = IN_TURN_TIMER
        for name in names:
            times[name] = [start.elapsed_time(end) for start, end in events[name]]
    if warm_per_turn:
        timer += f"; {warm_per_turn} untimed call(s) after each switch, {per_turn} timed"
    return {name: _summary(times[name], timer) for name in names}


def ratios_in_turn(
    fns: dict[str, Callable[[], Any]], settings: Settings, *, turns: int, per_turn: int, baseline: str = "lora"
) -> dict[str, dict[str, float]]:
    """Per function (warm already), :func:`bench_in_turn` with one untimed and ``per_turn`` timed calls per turn:
    ``ms``, ``ms_p20``, ``host_ms`` (median time until the call returned) and each one's ratio to
    ``baseline``'s (``<key>_vs_<baseline>``)."""
    host: dict[str, list[float]] = {}
    timed = bench_in_turn(
        fns, settings, reps=turns * per_turn, warm_per_turn=1, per_turn=per_turn, warm_up=False, host_ms=host
    )
    rows = {
        name: {"ms": row["ms"], "ms_p20": row["ms_p20"], "host_ms": statistics.median(host[name])}
        for name, row in timed.items()
    }
    for row in rows.values():
        for key in ("ms", "ms_p20", "host_ms"):
            row[f"{key}_vs_{baseline}"] = row[key] / rows[baseline][key]
    return rows


#: Timed calls of :func:`host_us` (each on an idle device, so its launches never wait for a full queue).
HOST_CALLS = 20


def host_us(
    fn: Callable[[], Any],
    settings: Settings,
    *,
    calls: int = HOST_CALLS,
    grad_to_none: Sequence[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Host time to enqueue one call of ``fn``, in microseconds: median and p80 over ``calls`` calls.

    Each call starts with the device idle (synchronized before) and is timed from entry to return, without
    waiting for the device: on a GPU that is the CPU time the call costs to issue its work (Python, PyTorch's
    dispatcher, kernel launches), which bounds small layers and decode. On the CPU (``--quick``) the ops run
    synchronously, so it is the whole call. ``grad_to_none`` tensors get ``.grad = None`` before every call
    (outside the timing), as in :func:`bench`.
    """
    device = settings.device
    for _ in range(2):
        fn()
    times = []
    for _ in range(calls):
        _drop_grads(grad_to_none)
        sync(device)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    sync(device)
    ordered = sorted(times)
    return {"host_us": statistics.median(ordered), "host_us_p80": ordered[int(0.8 * (len(ordered) - 1))]}


#: Calls of :func:`loop_us`, made back to back.
LOOP_CALLS = 50


def loop_us(
    fn: Callable[[], Any],
    settings: Settings,
    *,
    calls: int = LOOP_CALLS,
    grad_to_none: Sequence[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Time per call of ``calls`` calls of ``fn`` made back to back, in microseconds: from the first call's
    start until the device has finished the last, divided by ``calls``.

    That is what a loop repeating the call sees (decode steps, a layer's training calls), the host enqueuing
    each call while the device runs the ones before: a call bound by its host time costs its host time here,
    one bound by the device its device time. The row's ``ms`` times one call at a time from a CUDA event that
    the device reaches only after the L2 flush before it, while the host has already begun to enqueue the call:
    for a host-bound call that hides the host time spent while the flush runs from every provider alike, so
    the ratio of two such calls' ``ms`` overstates the ratio of their host times; here nothing is hidden.
    ``grad_to_none`` tensors get ``.grad = None`` before every call, inside the loop (a training loop's
    ``zero_grad(set_to_none=True)``). On the CPU the ops run synchronously: the whole call.
    """
    device = settings.device
    for _ in range(2):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        _drop_grads(grad_to_none)
        fn()
    sync(device)
    return {"loop_us": (time.perf_counter() - t0) / calls * 1e6}


#: Timed calls of :func:`device_us`.
DEVICE_CALLS = 5

_SLEEP_CYCLES_PER_US: dict[int, float] = {}


def _sleep_cycles_per_us(device: torch.device) -> float:
    """GPU clock cycles per microsecond of ``torch.cuda._sleep`` on ``device`` (measured once)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    rate = _SLEEP_CYCLES_PER_US.get(index)
    if rate is None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1_000_000)  # warm-up
        start.record()
        torch.cuda._sleep(10_000_000)
        end.record()
        end.synchronize()
        rate = _SLEEP_CYCLES_PER_US[index] = 10_000_000 / (start.elapsed_time(end) * 1e3)
    return rate


def device_us(
    fn: Callable[[], Any],
    settings: Settings,
    *,
    calls: int = DEVICE_CALLS,
    grad_to_none: Sequence[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Device time of one call of ``fn`` in microseconds, without the host: median over ``calls`` calls.

    Each call is enqueued while a sleep kernel holds the stream (L2 flushed before it, as in :func:`bench`),
    so its work runs back to back once the sleep ends, and CUDA events around it time the device alone: no
    host time and no launch gaps. The hold is three times the call's host time; a call whose enqueue outlasts
    its hold is timed again with a longer one. Next to :func:`host_us` and the wall time this shows what
    bounds a call (a ratio to LoRA near 1 here and far from it on the wall clock is host time). No profiler:
    CUPTI, once started, can slow every later launch of the process. Empty off CUDA. ``grad_to_none`` as in
    :func:`bench`.
    """
    if not settings.cuda:
        return {}
    from triton import runtime

    device = settings.device
    cycles_per_us = _sleep_cycles_per_us(device)
    cache = runtime.driver.active.get_empty_cache_for_benchmark()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    hold_us = max(500.0, 3e6 * (time.perf_counter() - t0))
    sync(device)
    times: list[float] = []
    attempts = 0
    while len(times) < calls and attempts < 4 * calls:
        attempts += 1
        _drop_grads(grad_to_none)
        runtime.driver.active.clear_cache(cache)
        torch.cuda._sleep(int(hold_us * cycles_per_us))
        start.record()
        t0 = time.perf_counter()
        fn()
        enqueue_us = (time.perf_counter() - t0) * 1e6
        end.record()
        end.synchronize()
        if enqueue_us > 0.8 * hold_us:  # the device may have caught up with the host: hold longer, again
            hold_us = 3 * enqueue_us
            continue
        times.append(start.elapsed_time(end) * 1e3)
    del cache
    return {"device_us": statistics.median(times)} if times else {}


def peak_extra_mib(
    fn: Callable[[], Any], settings: Settings, *, grad_to_none: Sequence[torch.Tensor] | None = None
) -> float | None:
    """Peak extra memory of one call of ``fn`` in MiB (None off CUDA)."""
    if not settings.cuda:
        return None
    _drop_grads(grad_to_none)
    gc.collect()
    sync(settings.device)
    torch.cuda.reset_peak_memory_stats(settings.device)
    before = torch.cuda.memory_allocated(settings.device)
    fn()
    sync(settings.device)
    peak = torch.cuda.max_memory_allocated(settings.device)
    return (peak - before) / 2**20


# --------------------------------------------------------------------------------------------- rows


def error_text(exc: BaseException) -> str:
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    tail = "".join(tb[-3:])
    return f"{type(exc).__name__}: {exc}"[:600] + "\n" + tail[-1400:]


def provider_rows(
    providers: Iterable[str],
    measure: Callable[[str], tuple[dict[str, Any], dict[str, Any]]],
    device: torch.device,
    *,
    rounds: int = 1,
) -> list[dict[str, Any]]:
    """Run ``measure(provider) -> (metrics, impl)`` for each provider; an exception becomes an error row.

    ``rounds > 1`` measures every provider that many times, interleaved (round ``i`` in the given order,
    the next reversed), and keeps each provider's median round (:func:`_median_round`): for host-bound cases,
    whose times follow the host CPU's speed, so that a drift of that speed during the case reaches every
    provider alike instead of whichever ran while it lasted.
    """
    providers = tuple(providers)
    measured: dict[str, list[dict[str, Any]]] = {p: [] for p in providers}
    for i in range(max(1, rounds)):
        for provider in providers if i % 2 == 0 else providers[::-1]:
            if measured[provider] and measured[provider][-1]["status"] != "ok":
                continue  # an error or a skip ends that provider's rounds
            measured[provider].append(_provider_row(provider, measure, device))
    return [_median_round(measured[p]) for p in providers]


def _provider_row(
    provider: str, measure: Callable[[str], tuple[dict[str, Any], dict[str, Any]]], device: torch.device
) -> dict[str, Any]:
    if _DEADLINE and time.perf_counter() >= _DEADLINE[0]:
        return {"provider": provider, "status": "skipped", "reason": "hard deadline of --time-budget passed"}
    try:
        metrics, impl = measure(provider)
        return {"provider": provider, "status": "ok", "metrics": metrics, "impl": impl}
    except Exception as exc:  # one provider failing (OOM, missing kernel...) must not end the run
        return {"provider": provider, "status": "error", "error": error_text(exc)}
    finally:
        free_memory(device)


def _median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One provider's row from its rounds: an error if a round failed (never averaged away); else the ok
    round with the median ``ms`` (the lower middle of an even count), its metrics extended with every ok
    round's ``ms``, ``host_us``, ``device_us`` and ``loop_us`` in run order (``ms_rounds``, ``host_us_rounds``,
    ...); a skip (the hard deadline
    passed) only where no round finished."""
    for row in rounds:
        if row["status"] == "error":
            return row
    done = [row for row in rounds if row["status"] == "ok"]
    if not done:
        return rounds[0]
    if len(done) == 1:
        return done[0]
    ordered = sorted(done, key=lambda row: row["metrics"].get("ms", float("inf")))
    chosen = ordered[(len(ordered) - 1) // 2]
    metrics = dict(chosen["metrics"])
    metrics["ms_rounds"] = [row["metrics"].get("ms") for row in done]
    for key in ("host_us", "device_us", "loop_us"):
        if all(key in row["metrics"] for row in done):
            metrics[f"{key}_rounds"] = [row["metrics"][key] for row in done]
    return {**chosen, "metrics": metrics}


# --------------------------------------------------------------------------------------------- metadata


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        try:
            return getattr(__import__(module), "__version__", None)
        except Exception:
            return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        return out or None
    except Exception:
        return None


def _driver_version() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        return out.splitlines()[0] if out else None
    except Exception:
        return None


def _source_sha() -> str:
    """sha256 over dorafactors' and the harness's sources: identifies the code when .git is absent."""
    digest = hashlib.sha256()
    for folder in ("dorafactors", "benchmarks"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            digest.update(str(path.relative_to(REPO_ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


_ENV_PREFIXES = ("PEFT_DORA", "DORA_", "PEFT_FORCE", "TRITON_", "CUDA_VISIBLE", "PYTORCH_CUDA_ALLOC", "TORCHINDUCTOR_")


def collect_metadata(settings: Settings, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Everything needed to tell two runs apart; stored once per run in the results file."""
    import dorafactors

    meta: dict[str, Any] = {
        "schema": SCHEMA,
        "run_id": uuid.uuid4().hex[:12],
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "quick": settings.quick,
        "device": str(settings.device),
        "gpu": None,
        "gpu_capability": None,
        "gpu_memory_gib": None,
        "driver": None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "peft": _version("peft"),
        "transformers": _version("transformers"),
        "dorafactors": dorafactors.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        # A copy of the tree on a remote GPU machine passes the commit in DORAFACTORS_GIT_COMMIT, which wins:
        # such a copy may carry a stale .git of its own.
        "git_commit": os.environ.get("DORAFACTORS_GIT_COMMIT") or _git("rev-parse", "HEAD") or None,
        "git_dirty": None,
        "source_sha": _source_sha(),
        "reps": settings.reps,
        "heavy_reps": settings.heavy_reps,
        "rounds": settings.rounds,
        "compile_backend": settings.compile_backend,
        "compile_mode": settings.compile_mode,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "torch_threads": torch.get_num_threads(),
        "argv": list(argv) if argv is not None else sys.argv[1:],
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(_ENV_PREFIXES)},
    }
    if meta["git_commit"] is not None and not os.environ.get("DORAFACTORS_GIT_COMMIT"):
        meta["git_dirty"] = bool(_git("status", "--porcelain", "--untracked-files=no"))
    if settings.cuda:
        props = torch.cuda.get_device_properties(settings.device)
        meta["gpu"] = props.name
        meta["gpu_capability"] = f"{props.major}.{props.minor}"
        meta["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        meta["sm_count"] = props.multi_processor_count
        meta["driver"] = _driver_version()
    return meta


# --------------------------------------------------------------------------------------------- results file


class ResultsFile:
    """``{"schema", "runs": {run_id: metadata}, "rows": [...]}``, rewritten atomically after every case.

    An existing file is appended to, so two calls (e.g. ``--suite model,decode`` then
    ``--suite layer,norm,compose,ranks``) can share one file; each call is its own ``run_id``.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.data: dict[str, Any] = {"schema": SCHEMA, "rows": []}
        if self.path.exists() and self.path.stat().st_size > 0:
            self.data["rows"] = load_results(self.path)["rows"]

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.data["rows"]

    def extend(self, rows: Iterable[dict[str, Any]]) -> None:
        self.rows.extend(rows)
        self.save()

    def save(self) -> None:
        write_results(self.path, self.rows, default=_json_default)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.dtype):
        return str(obj).replace("torch.", "")
    if isinstance(obj, (torch.device, Path)):
        return str(obj)
    if isinstance(obj, torch.Size):
        return list(obj)
    return repr(obj)


# --------------------------------------------------------------------------------------------- runner


def order_cases(cases: Iterable[Case]) -> list[Case]:
    """Headline first: required cases by suite order and priority, then the optional (compile) ones."""
    indexed = list(enumerate(cases))
    indexed.sort(key=lambda ic: (ic[1].optional, SUITE_ORDER.index(ic[1].suite), ic[1].priority, ic[0]))
    return [c for _, c in indexed]


def calibrated_estimates(paths: Sequence[str | os.PathLike[str]], quick: bool) -> dict[str, float]:
    """Measured ``wall_s`` per case key from earlier results (latest run wins); used instead of priors."""
    found: dict[str, tuple[str, float]] = {}
    for path in paths:
        for row in load_results(path)["rows"]:
            meta = row.get("meta", {})
            if bool(meta.get("quick")) != quick or row.get("status") == "skipped" or "case_wall_s" not in row:
                continue
            key = f"{row['suite']}:{row['case']}" + ("#compile" if row.get("optional") else "")
            stamp = meta.get("timestamp", "")
            if key not in found or stamp >= found[key][0]:
                found[key] = (stamp, float(row["case_wall_s"]))
    return {k: v for k, (_, v) in found.items()}


def _case_rows(
    case: Case, fragments: list[dict[str, Any]], meta: dict[str, Any], wall_s: float | None, est_s: float
) -> list[dict[str, Any]]:
    stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    rows = []
    for frag in fragments:
        row = {
            "suite": case.suite,
            "case": case.name,
            "provider": frag["provider"],
            "status": frag.get("status", "ok"),
            "params": case.params,
            "metrics": frag.get("metrics", {}),
            "impl": frag.get("impl", {}),
            "optional": case.optional,
            "est_s": round(est_s, 2),
            "timestamp": stamp,
            "run_id": meta["run_id"],
            "meta": meta,
        }
        if wall_s is not None:
            row["case_wall_s"] = round(wall_s, 3)
        for key in ("error", "reason"):
            if key in frag:
                row[key] = frag[key]
        rows.append(row)
    return rows


def run_cases(
    cases: Sequence[Case],
    settings: Settings,
    results: ResultsFile,
    *,
    time_budget: float | None = None,
    argv: Sequence[str] | None = None,
    progress: bool = True,
    estimates: dict[str, float] | None = None,
    log: Callable[[str], None] | None = None,
    on_finish: Callable[[], None] | None = None,
    grace_s: float | None = None,
) -> dict[str, Any]:
    """Run ``cases`` in :func:`order_cases` order, appending each case's rows to ``results`` as it ends.

    With ``time_budget``: a case starts only if its estimate fits in what is left; a case still running at
    ``time_budget + grace_s`` (default ``max(30, 0.15 * time_budget)``) is interrupted (SIGALRM, main
    thread, POSIX) and recorded as an error, and the providers it had not reached as skipped.
    """
    threads = torch.get_num_threads()
    if settings.quick and not settings.cuda:
        # Tiny shapes gain nothing from intra-op threads, and OpenMP threads on a shared, oversubscribed CPU
        # (CI) make each op 10-100x slower. One thread (restored afterwards) keeps the smoke run fast and steady.
        torch.set_num_threads(1)
    meta = collect_metadata(settings, argv)
    ordered = order_cases(cases)
    start = time.perf_counter()
    alarm = None
    if time_budget is not None:
        grace = max(30.0, 0.15 * time_budget) if grace_s is None else grace_s
        alarm = _HardDeadline(start + time_budget + grace)
    counts = {"ok": 0, "error": 0, "skipped": 0}
    bar, write = _progress(len(ordered), progress)
    say = log or write
    if not settings.quick:
        total = sum(c.estimate(estimates) for c in ordered if settings.compile or not c.optional)
        say(f"estimated duration ~{total:.0f} s (~{total / 60:.1f} min; priors unless --calibrate)")
    try:
        for case in ordered:
            est = case.estimate(estimates)
            elapsed = time.perf_counter() - start
            bar.set_description(case.key[:60])
            reason = None
            if case.optional and not settings.compile:
                reason = "compile cases disabled (--no-compile)"
            elif settings.quick and case.skip_quick:
                reason = f"not in the --quick smoke run: {case.skip_quick}"
            elif time_budget is not None and elapsed + (0.0 if settings.quick else est) > time_budget:
                reason = f"time budget: {elapsed:.0f}s spent + ~{est:.0f}s estimated > --time-budget {time_budget:.0f}s"
            if reason is not None:
                fragments = [{"provider": p, "status": "skipped", "reason": reason} for p in case.providers]
                rows = _case_rows(case, fragments, meta, None, est)
            else:
                t0 = time.perf_counter()
                try:
                    if alarm is not None:
                        alarm.arm()
                    try:
                        fragments = case.run(settings)
                    finally:
                        if alarm is not None:
                            alarm.disarm()  # before the handler below: a repeated alarm must not interrupt it
                except Exception as exc:  # a setup failure: every provider of the case gets the error
                    text = error_text(exc)
                    fragments = [{"provider": p, "status": "error", "error": text} for p in case.providers]
                finally:
                    free_memory(settings.device)
                wall = time.perf_counter() - t0
                rows = _case_rows(case, fragments, meta, wall, est)
            results.extend(rows)
            for row in rows:
                counts[row["status"]] = counts.get(row["status"], 0) + 1
            say(_one_line(case, rows, time.perf_counter() - start))
            bar.update(1)
    finally:
        bar.close()
        torch.set_num_threads(threads)
        if alarm is not None:
            alarm.close()
        if on_finish is not None:
            with contextlib.suppress(Exception):
                on_finish()
    return {"run_id": meta["run_id"], "wall_s": time.perf_counter() - start, "counts": counts, "meta": meta}


class BudgetExceeded(Exception):
    """Raised (from SIGALRM) in a case still running at the hard deadline of ``--time-budget``."""


_DEADLINE: list[float] = []  # the active hard deadline (perf_counter), read by provider_rows
_REFIRE_S = 10.0  # the hard deadline's alarm repeats this often until disarmed (see _HardDeadline)


class _HardDeadline:
    """Interrupts the running case at ``deadline`` (POSIX main thread only; otherwise only recorded).

    The alarm repeats every :data:`_REFIRE_S` seconds until disarmed: Python swallows an exception raised
    while a weak-reference callback or ``__del__`` runs ("Exception ignored in ..."), and the case would then
    run on past the deadline. The interval leaves a case that caught the first one (``_provider_row``: the
    providers left are skipped) time to return before the next."""

    def __init__(self, deadline: float) -> None:
        import signal
        import threading

        self.deadline = deadline
        self._signal = signal
        self._usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
        self._previous = None
        _DEADLINE[:] = [deadline]
        if self._usable:
            self._previous = signal.signal(signal.SIGALRM, self._fire)

    def _fire(self, signum, frame) -> None:
        raise BudgetExceeded("interrupted: still running at the hard deadline (--time-budget + grace)")

    def arm(self) -> None:
        if self._usable:
            left = self.deadline - time.perf_counter()
            self._signal.setitimer(self._signal.ITIMER_REAL, max(left, 0.01), _REFIRE_S)

    def disarm(self) -> None:
        if self._usable:
            self._signal.setitimer(self._signal.ITIMER_REAL, 0)

    def close(self) -> None:
        self.disarm()
        _DEADLINE.clear()
        if self._usable and self._previous is not None:
            self._signal.signal(self._signal.SIGALRM, self._previous)


def _progress(total: int, enabled: bool):
    """A tqdm bar (and its ``write``) if tqdm is installed, else a no-op bar and ``print`` to stderr."""
    try:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, disable=not enabled, unit="case", dynamic_ncols=True, file=sys.stderr)
        return bar, lambda msg: tqdm.write(msg, file=sys.stderr)
    except ImportError:

        class _NoBar:
            def update(self, n: int = 1) -> None:
                pass

            def set_description(self, text: str) -> None:
                pass

            def close(self) -> None:
                pass

        return _NoBar(), lambda msg: print(msg, file=sys.stderr, flush=True)


def _one_line(case: Case, rows: list[dict[str, Any]], elapsed: float) -> str:
    parts = []
    for row in rows:
        if row["status"] == "ok":
            m = row["metrics"]
            value = m.get("ms")
            parts.append(f"{row['provider']}={value:.4g}ms" if isinstance(value, (int, float)) else row["provider"])
        else:
            parts.append(f"{row['provider']}:{row['status']}")
    wall = rows[0].get("case_wall_s") if rows else None
    wall_txt = f" ({wall:.1f}s)" if wall is not None else ""
    return f"[{elapsed:7.1f}s] {case.key}{wall_txt}: " + ", ".join(parts)
