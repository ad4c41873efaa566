"""Facts about the installed PEFT release that tests depend on."""

from __future__ import annotations

import peft
from packaging.version import Version

PEFT_MINOR: tuple[int, int] = Version(peft.__version__).release[:2]

#: PEFT < 0.21 cannot unmerge DoRA on fan_in_fan_out layers (PR #3532) nor merge several DoRA adapters
#: correctly (PR #3609): PEFT's own merge code, inherited unchanged by dorafactors.
MERGE_FIXED = PEFT_MINOR >= (0, 21)
#: ``ENABLE_DORA_CACHING`` / ``peft.helpers.DoraCaching`` exist from PEFT 0.19.
HAS_DORA_CACHING = PEFT_MINOR >= (0, 19)
