"""Weight-norm engine (picks the Triton kernel or its PyTorch reference, both in ``kernels/``), dense norm, caches."""

from ..kernels.row_norm_reference import factored_row_norm_sq, plan_chunk_columns, row_sumsq
from .cache import NormCache, StaleNormCacheError, TensorStamp
from .dense import dense_row_norm
from .engine import clamp_eps, conv_factors, norm_path, weight_norm, weight_sumsq

__all__ = [
    "NormCache",
    "StaleNormCacheError",
    "TensorStamp",
    "clamp_eps",
    "conv_factors",
    "dense_row_norm",
    "factored_row_norm_sq",
    "norm_path",
    "plan_chunk_columns",
    "row_sumsq",
    "weight_norm",
    "weight_sumsq",
]
