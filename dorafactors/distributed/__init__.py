"""Gather helpers for sharded parameters (FSDP1, FSDP2, DeepSpeed ZeRO-3): no-ops when nothing is sharded."""

from .gather import NOT_SHARDED, GatherInfo, gathered_for_norm, norm_cache_allowed, process_group_active

__all__ = ["NOT_SHARDED", "GatherInfo", "gathered_for_norm", "norm_cache_allowed", "process_group_active"]
