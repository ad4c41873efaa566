"""Test-session setup shared by every test module.

Without a GPU, Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``), so CI executes the
real kernels; the variable must be set before any ``@triton.jit`` decorator runs, i.e. before dorafactors'
kernel modules are imported, hence here at the top of conftest.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # fp32 comparisons (ours vs stock, both vs fp64) mean fp32: no TF32 in convolutions or matmuls.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("DORAFACTORS_HYPOTHESIS_EXAMPLES", "25")),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("thorough", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("DORAFACTORS_HYPOTHESIS_PROFILE", "ci"))

_DORA_ENV = (
    "PEFT_DORA_FUSED",
    "PEFT_DORA_FUSED_BACKWARD",
    "PEFT_DORA_NORM_CHUNK_MB",
    "PEFT_DORA_FWD_CHUNK_MB",
    "DORA_AUTOTUNE_COMPREHENSIVE",
    "PEFT_DORA_ALLOW_PARTIAL_GATHER",
    "PEFT_FORCE_GATHER",
    "PEFT_DORA_NORM_CACHE",
)


@pytest.fixture(autouse=True)
def _isolated_dorafactors_state(monkeypatch):
    """Every test starts unpatched, with no dorafactors variables set and fresh config caches."""
    import dorafactors
    from dorafactors.dispatch import config

    for name in _DORA_ENV:
        monkeypatch.delenv(name, raising=False)
    config.invalidate_cache()
    dorafactors.unpatch()
    yield
    dorafactors.unpatch()
    config.invalidate_cache()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
