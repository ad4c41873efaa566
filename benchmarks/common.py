"""Torch-free pieces shared by the runner, the report and the plots (``report``/``plot`` never import torch)."""

from __future__ import annotations

import json
import os
from typing import Any

from . import SCHEMA

__all__ = [
    "DECODE_LAYER",
    "LAYER_SHAPES",
    "QUICK_DECODE_LAYER",
    "QUICK_LAYER_SHAPES",
    "SUITE_ORDER",
    "device_label",
    "load_results",
]

#: Run order of the suites (headline first); ``--suite`` lists are run in this order whatever their order.
SUITE_ORDER = ("model", "decode", "layer", "norm", "compose", "ranks")

#: (d_in, d_out) of the layer suite: anchors.md's shapes, and the --quick stand-ins (same order).
LAYER_SHAPES = ((4096, 4096), (8192, 8192), (4096, 14336), (14336, 4096))
QUICK_LAYER_SHAPES = ((64, 64), (128, 128), (64, 160), (160, 64))
#: Square layer of the decode suite.
DECODE_LAYER = 8192
QUICK_DECODE_LAYER = 128


def device_label(meta: dict[str, Any]) -> str:
    """Name of the machine a row was measured on: the GPU name, or ``CPU (quick smoke run)``."""
    if meta.get("gpu"):
        return str(meta["gpu"])
    return "CPU (quick smoke run)" if meta.get("quick") else "CPU"


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a results file (also a bare list of rows)."""
    with open(path) as fh:
        data = json.load(fh)
    if isinstance(data, list):
        data = {"schema": SCHEMA, "rows": data}
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise ValueError(f"{path} is not a dorafactors benchmark results file")
    return data
