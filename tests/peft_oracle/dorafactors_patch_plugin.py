"""pytest plugin that runs a foreign test suite (PEFT's own tests) with ``dorafactors.patch()`` applied.

    python -m pytest -p dorafactors_patch_plugin <peft-sdist>/tests/test_custom_models.py -k "dora and not delora"

with this folder on ``PYTHONPATH``. It also asserts, at the end of the session, that PEFT really built
dorafactors layers (a run that silently tested stock PEFT must not pass).
"""

from __future__ import annotations

import pytest

import dorafactors

_seen: dict[str, int] = {"ours": 0}


def pytest_configure(config: pytest.Config) -> None:
    dorafactors.patch()
    from peft.tuners.lora import variants

    original_init = variants.DoraLinearLayer.__init__

    def counting_init(self, *args, **kwargs):
        _seen["ours"] += 1
        original_init(self, *args, **kwargs)

    for name in ("DoraLinearLayer", "DoraEmbeddingLayer", "DoraConv1dLayer", "DoraConv2dLayer", "DoraConv3dLayer"):
        cls = getattr(variants, name)
        assert cls.__module__.startswith("dorafactors."), f"{name} is not patched"
    variants.DoraLinearLayer.__init__ = counting_init  # type: ignore[method-assign]


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    terminalreporter.write_line(f"dorafactors: DoraLinearLayer instances built while patched: {_seen['ours']}")
