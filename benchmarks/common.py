"""Torch-free pieces shared by the runner, the report and the plots (``report``/``plot`` never import torch)."""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import SCHEMA

__all__ = [
    "DECODE_LAYER",
    "DECODE_LAYER_SMALL",
    "LAYER_SHAPES",
    "QUICK_DECODE_LAYER",
    "QUICK_DECODE_LAYER_SMALL",
    "QUICK_LAYER_SHAPES",
    "SUITE_ORDER",
    "device_label",
    "file_form",
    "host_us_per_call",
    "load_results",
    "write_results",
]

#: Run order of the suites (headline first); ``--suite`` lists are run in this order whatever their order.
SUITE_ORDER = ("model", "decode", "layer", "norm", "compose", "ranks")

#: (d_in, d_out) of the layer suite: anchors.md's shapes, and the --quick stand-ins (same order).
LAYER_SHAPES = ((4096, 4096), (8192, 8192), (4096, 14336), (14336, 4096))
QUICK_LAYER_SHAPES = ((64, 64), (128, 128), (64, 160), (160, 64))
#: Square layers of the decode suite (the large one of anchors.md, and a 4096 x 4096 one), and --quick stand-ins.
DECODE_LAYER = 8192
QUICK_DECODE_LAYER = 128
DECODE_LAYER_SMALL = 4096
QUICK_DECODE_LAYER_SMALL = 64


def device_label(meta: dict[str, Any]) -> str:
    """Name of the machine a row was measured on: the GPU name, or ``CPU (quick smoke run)``."""
    if meta.get("gpu"):
        return str(meta["gpu"])
    return "CPU (quick smoke run)" if meta.get("quick") else "CPU"


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a results file: ``{"schema", "runs": {run_id: metadata}, "rows": [...]}``.

    Every row gets its run's metadata as ``row["meta"]`` (one dict shared by the rows of a run), so readers
    need not look it up. Files of schema 1, whose rows each carried a copy of the metadata, and bare lists of
    such rows are read too (:func:`write_results` then stores them in the current form).
    """
    with open(path) as fh:
        data = json.load(fh)
    if isinstance(data, list):
        data = {"rows": data}
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"{path} is not a dorafactors benchmark results file")
    runs: dict[str, Any] = dict(data.get("runs") or {})
    for row in data["rows"]:
        run_id = row.get("run_id", "")
        if "meta" in row:  # schema 1
            runs.setdefault(run_id, row["meta"])
        row["meta"] = runs.setdefault(run_id, {})
    return {"schema": SCHEMA, "runs": runs, "rows": data["rows"]}


def file_form(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The stored form of ``rows``: each run's metadata once under ``runs``, the rows without it."""
    runs: dict[str, Any] = {}
    stored = []
    for row in rows:
        if "meta" in row:
            runs.setdefault(row.get("run_id", ""), row["meta"])
        stored.append({k: v for k, v in row.items() if k != "meta"})
    return {"schema": SCHEMA, "runs": runs, "rows": stored}


def write_results(path: str | os.PathLike[str], rows: list[dict[str, Any]], default: Callable | None = None) -> None:
    """Write ``rows`` (:func:`file_form`) atomically: a temporary file, flushed to disk, renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(file_form(rows), fh, indent=1, default=default, allow_nan=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def host_us_per_call(
    fn: Callable[[], object], calls: int, sync: Callable[[], None], warmup: int = 10
) -> tuple[float, float]:
    """``(host, host + sync)`` microseconds per call of ``calls`` back-to-back calls of ``fn`` after
    ``warmup`` calls: the first is what the Python side costs while the device keeps up, the second adds the
    wait for the device (``sync``) at the end."""
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    sync()
    t2 = time.perf_counter()
    return (t1 - t0) / calls * 1e6, (t2 - t0) / calls * 1e6


def cprofile_text(fn: Callable[[], object], calls: int, sync: Callable[[], None], top: int) -> str:
    """cProfile of ``calls`` calls of ``fn``, the ``top`` functions by own time, as text. Backward runs on this
    thread (autograd multithreading off), so that the Python side of backward Functions shows up too (cProfile
    sees only the thread it runs on)."""
    import torch

    prof = cProfile.Profile()
    with torch.autograd.set_multithreading_enabled(False):
        prof.enable()
        for _ in range(calls):
            fn()
        prof.disable()
    sync()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()
