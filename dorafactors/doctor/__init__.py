"""``python -m dorafactors``: what a bug report needs, in one printout.

Three sections:

* versions of Python, torch (CUDA build, GPUs), Triton, PEFT, transformers, accelerate, DeepSpeed,
  bitsandbytes and dorafactors, and whether PEFT is patched in this process;
* every environment variable dorafactors reads, with its effective value and where it came from
  (``environment`` or ``default``); a malformed value is reported with the error ``patch()`` would raise,
  and unknown ``PEFT_DORA_*`` / ``DORA_*`` variables are flagged as likely typos;
* for a model (``--model``: a Hugging Face id, a local model folder or a PEFT adapter folder; default a tiny
  built-in Llama), which path each DoRA layer takes: the norm (``dense`` / ``gemm`` / ``triton`` /
  ``torch``, ``norm.engine.norm_path``), the composition in inference and in training, the folded decode
  path, the norm cache, and the rule that turned a fast path down (``dispatch/rules.py``).

Models given by name are built on the ``meta`` device (no weights are read or allocated). The decisions that
look at tensors get zero-stride stand-ins with the real shapes and dtypes on the target device
(``--device``, default CUDA when available), so even a 70B model costs no memory here.

In a running program, ``dorafactors.doctor.report(model)`` returns the same information for a live model
(the paths of its real tensors) and ``format_report`` renders it.

Modules: ``system`` (versions, PEFT status, environment variables), ``model`` (the meta-device model
and tensor stand-ins), ``paths`` (the per-layer decisions), ``reporting`` (the dict and its text), ``cli``.
"""

from __future__ import annotations

from typing import Any

from .cli import main
from .model import _TINY_TARGETS as _TINY_TARGETS
from .model import TINY_MODEL as TINY_MODEL
from .model import _tiny_config as _tiny_config
from .model import build_model
from .paths import model_paths as model_paths
from .reporting import format_report, report
from .system import EnvVariable, env_variables
from .system import environment as environment
from .system import versions as versions

__all__ = ["ENV_VARIABLES", "EnvVariable", "build_model", "format_report", "main", "report"]


def __getattr__(name: str) -> Any:
    # ``ENV_VARIABLES`` is built on first access: it imports ``dispatch.config``
    if name == "ENV_VARIABLES":
        return env_variables()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
