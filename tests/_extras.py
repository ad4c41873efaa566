"""Optional test dependencies: skipped where they are not installed, an error where they must be.

The ``test`` extra of ``pyproject.toml`` installs bitsandbytes and HQQ, so CI runs the QDoRA tests on the
CPU. CI (``.ci/run``, ``nox -s tests``) sets ``DORAFACTORS_REQUIRE_TEST_EXTRAS=1``: there a missing
package fails the test instead of skipping it silently. A development environment without them (an
older ``pip install -e .[test]``) skips, with the install command in the reason.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

__all__ = ["REQUIRE_ENV", "require"]

#: Set to ``1`` where the ``test`` extra is installed and every optional test dependency must import.
REQUIRE_ENV = "DORAFACTORS_REQUIRE_TEST_EXTRAS"


def require(module: str) -> ModuleType:
    """``import module``; skip when it is missing, unless ``DORAFACTORS_REQUIRE_TEST_EXTRAS=1`` (then raise)."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        if os.environ.get(REQUIRE_ENV) == "1":
            raise ImportError(
                f"{module} is part of the test extra and {REQUIRE_ENV}=1: pip install -e '.[test]' ({error})"
            ) from error
        pytest.skip(f"{module} is not installed (pip install -e '.[test]'): {error}")
