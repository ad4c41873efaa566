"""Fixtures shared by the layer tests."""

from __future__ import annotations

import pytest

from dorafactors.dispatch import config


@pytest.fixture(params=["torch", "kernels"])
def path(request, monkeypatch):
    """The PyTorch path, or every Triton kernel forced on (the CPU interpreter without a GPU)."""
    if request.param == "kernels":
        monkeypatch.setenv("PEFT_DORA_FUSED", "1")
        monkeypatch.setenv("PEFT_DORA_FUSED_BACKWARD", "1")
    config.invalidate_cache()
    return request.param
