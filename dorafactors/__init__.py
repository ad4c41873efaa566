"""dorafactors: DoRA for PEFT with factored norms, fused Triton kernels and a never-stale norm cache.

import dorafactors
dorafactors.patch()               # PEFT now builds dorafactors DoRA layers
with dorafactors.patched():       # or scoped: stock PEFT is restored on exit
    model = get_peft_model(base, LoraConfig(use_dora=True, ...))

``python -m dorafactors`` prints versions, settings and the path each DoRA layer takes (for bug reports).
The functional pieces are public too: :func:`weight_norm` (the row norm of ``W + s B A`` without ``B A``),
:func:`norm_path` (which implementation it uses) and :func:`dora_compose` (the composition with its
autograd). Reference: docs/api.md.
"""

from ._version import __version__
from .autograd.compose import dora_compose
from .dispatch.config import (
    get_dora_fwd_threshold_bytes,
    get_dora_fwd_threshold_mb,
    get_dora_norm_threshold_bytes,
    get_dora_norm_threshold_mb,
    set_dora_fwd_threshold_mb,
    set_dora_norm_threshold_mb,
)
from .norm.cache import StaleNormCacheError
from .norm.engine import norm_path, weight_norm
from .patching import (
    StockDoraLayersWarning,
    UntestedPeftWarning,
    clear_norm_caches,
    is_patched,
    patch,
    patched,
    unpatch,
)

__all__ = [
    "StaleNormCacheError",
    "StockDoraLayersWarning",
    "UntestedPeftWarning",
    "__version__",
    "clear_norm_caches",
    "dora_compose",
    "get_dora_fwd_threshold_bytes",
    "get_dora_fwd_threshold_mb",
    "get_dora_norm_threshold_bytes",
    "get_dora_norm_threshold_mb",
    "is_patched",
    "norm_path",
    "patch",
    "patched",
    "set_dora_fwd_threshold_mb",
    "set_dora_norm_threshold_mb",
    "unpatch",
    "weight_norm",
]
