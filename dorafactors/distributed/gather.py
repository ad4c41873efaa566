"""Single entry point the layers use around the norm computation.

Until the distributed backends land (issue: FSDP1/FSDP2/ZeRO-3), nothing is ever sharded here: the
context yields an info object saying so and the norm cache is allowed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["GatherInfo", "gathered_for_norm", "norm_cache_allowed"]


@dataclass(frozen=True)
class GatherInfo:
    """What :func:`gathered_for_norm` did: ``backend`` is ``None`` when no parameter was sharded."""

    backend: str | None = None


@contextlib.contextmanager
def gathered_for_norm(base_layer: torch.nn.Module, *factors: Any) -> Iterator[GatherInfo]:
    """Make the full base weight and LoRA factors visible for the duration of the norm computation."""
    yield GatherInfo()


def norm_cache_allowed(info: GatherInfo, inputs: tuple[torch.Tensor, ...]) -> tuple[bool, str]:
    """May the norm / sum-of-squares caches be used for these gathered inputs?"""
    if info.backend is not None:
        return False, f"parameters are sharded ({info.backend})"
    return True, ""
