"""Gather helpers for sharded parameters (FSDP1, FSDP2, DeepSpeed ZeRO-3): no-ops when nothing is sharded."""

from .gather import GatherInfo, gathered_for_norm, norm_cache_allowed

__all__ = ["GatherInfo", "gathered_for_norm", "norm_cache_allowed"]
