"""dorafactors: DoRA for PEFT with factored norms, fused Triton kernels and a never-stale norm cache.

import dorafactors
dorafactors.patch()               # PEFT now builds dorafactors DoRA layers
with dorafactors.patched():       # or scoped: stock PEFT is restored on exit
    model = get_peft_model(base, LoraConfig(use_dora=True, ...))
"""

from ._version import __version__
from .dispatch.config import (
    get_dora_fwd_threshold_bytes,
    get_dora_fwd_threshold_mb,
    get_dora_norm_threshold_bytes,
    get_dora_norm_threshold_mb,
    set_dora_fwd_threshold_mb,
    set_dora_norm_threshold_mb,
)
from .norm.cache import StaleNormCacheError
from .patching import clear_norm_caches, is_patched, patch, patched, unpatch

__all__ = [
    "StaleNormCacheError",
    "__version__",
    "clear_norm_caches",
    "get_dora_fwd_threshold_bytes",
    "get_dora_fwd_threshold_mb",
    "get_dora_norm_threshold_bytes",
    "get_dora_norm_threshold_mb",
    "is_patched",
    "patch",
    "patched",
    "set_dora_fwd_threshold_mb",
    "set_dora_norm_threshold_mb",
    "unpatch",
]
