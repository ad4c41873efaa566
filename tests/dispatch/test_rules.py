"""The size rules of the dispatch (``dorafactors/dispatch/rules.py``) under each ``PEFT_DORA_FUSED`` mode."""

from __future__ import annotations

import pytest

from dorafactors.dispatch import config, rules

LIMIT = rules.INFERENCE_EAGER_MAX_ELEMENTS


def _mode(monkeypatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("PEFT_DORA_FUSED", raising=False)
    else:
        monkeypatch.setenv("PEFT_DORA_FUSED", value)
    config.invalidate_cache()


@pytest.mark.parametrize("numel", [1, 8192, 16 * 8192, LIMIT])
def test_auto_mode_keeps_decode_sized_inference_on_pytorch(monkeypatch, numel):
    _mode(monkeypatch, None)
    ok, reason = rules.fused_inference_size_ok(numel)
    assert not ok
    assert "size threshold" in reason


@pytest.mark.parametrize("numel", [LIMIT + 1, 2048 * 4096, 4096 * 8192])
def test_auto_mode_sends_larger_inference_to_the_kernel(monkeypatch, numel):
    _mode(monkeypatch, None)
    assert rules.fused_inference_size_ok(numel) == (True, "")


@pytest.mark.parametrize("numel", [1, LIMIT, LIMIT + 1])
def test_forced_kernels_ignore_the_inference_threshold(monkeypatch, numel):
    _mode(monkeypatch, "1")
    assert rules.fused_inference_size_ok(numel) == (True, "")


def test_threshold_covers_the_measured_decode_shapes():
    # 16 tokens x 8192 columns is the largest compose the H200 run measured as faster on PyTorch.
    assert 16 * 8192 <= LIMIT < 2048 * 4096
