"""Fresh distributed-detection state (cached ZeRO-3 / FSDP2 positives, logged reasons) for every test."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _fresh_distributed_state(monkeypatch):
    from dorafactors.distributed import gather

    monkeypatch.delenv("DS_ZERO_STAGE", raising=False)
    gather._reset_for_tests()
    yield
    gather._reset_for_tests()
