"""Smoke tests of the examples in examples/: each runs at its tiny CPU size and checks what it claims
(the saved adapter loads in stock PEFT with the same outputs; losses agree with stock PEFT)."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _example(name: str):
    """Import ``examples/<name>.py`` as a module (the examples import their ``_tiny`` helper by path)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hf_trainer_example_adapter_loads_in_stock_peft(tmp_path):
    result = _example("hf_trainer").main(["--steps", "4", "--out", str(tmp_path)])
    assert math.isfinite(result["train_loss"]) and math.isfinite(result["eval_loss"])
    assert result["max_logit_diff"] <= 1e-4  # asserted inside too, against the stock-PEFT reload
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"] is True and config["r"] == 8
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_accelerate_example_matches_stock(tmp_path):
    result = _example("accelerate_loop").main(["--compare", "--steps", "3", "--out", str(tmp_path)])
    assert len(result["losses"]) == 3 and result["losses"][-1] < result["losses"][0]
    assert (tmp_path / "adapter_config.json").is_file()


def test_trl_sft_example(tmp_path):
    pytest.importorskip("trl")  # part of the test extra; skips only in environments installed without it
    result = _example("trl_sft").main(["--steps", "3", "--out", str(tmp_path)])
    assert len(result["losses"]) >= 1 and all(math.isfinite(x) for x in result["losses"])
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_torch_compile_example_matches_eager_stock():
    result = _example("torch_compile").main(["--steps", "2", "--tiny-layers", "1"])
    assert result["backend"] == ("inductor" if torch.cuda.is_available() else "aot_eager")
    assert len(result["losses"]) == 2


def test_demo_runs_and_reports_medians(capsys):
    _example("demo").main(["--steps", "2", "--accumulation", "1", "--repeats", "2"])
    out = capsys.readouterr().out
    assert "median" in out and "interleaved" in out


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_qdora_example_matches_stock(bits):
    pytest.importorskip("bitsandbytes")
    result = _example("qdora").main(["--bits", str(bits), "--steps", "3"])
    assert len(result["losses"]) == 3 and result["all_dorafactors"]


def test_failed_torchrun_mode_reports_the_workers_error(tmp_path):
    """run_2gpu.sh's failure line comes from first_error.py: the worker's exception, not torchrun's banner."""
    import subprocess

    script = tmp_path / "fails.py"
    # one failing rank: two unprefixed tracebacks written at once interleave line by line in the log, and
    # no parser can tell their frames apart (that case is the [rankN]:-prefixed log below)
    script.write_text(
        "import os\n\ndef build():\n    raise ValueError(f'bad shape on rank {os.environ[\"RANK\"]}')\n\n"
        "if os.environ['RANK'] == '1':\n    build()\n"
    )
    log = tmp_path / "mode.log"
    with log.open("w") as handle:
        run = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            timeout=300,
        )
    assert run.returncode != 0
    assert "ChildFailedError" in log.read_text()  # the banner the old grep picked its line from
    helper = [sys.executable, str(EXAMPLES / "distributed" / "first_error.py"), str(log)]
    one_line = subprocess.run([*helper, "--one-line"], capture_output=True, text=True, check=True).stdout.strip()
    assert re.fullmatch(r"ValueError: bad shape on rank [01]", one_line), one_line
    full = subprocess.run(helper, capture_output=True, text=True, check=True).stdout
    assert 'fails.py", line 4, in build' in full and "raise ValueError" in full
    prefixed = tmp_path / "prefixed.log"  # torch versions that prefix worker lines with [rankN]:
    prefixed.write_text("".join(f"[rank1]: {line}\n" for line in log.read_text().splitlines()))
    out = subprocess.run([*helper[:2], str(prefixed), "--one-line"], capture_output=True, text=True, check=True)
    assert re.fullmatch(r"rank 1: ValueError: bad shape on rank [01]", out.stdout.strip()), out.stdout
    assert "first_error.py" in (EXAMPLES / "distributed" / "run_2gpu.sh").read_text()
