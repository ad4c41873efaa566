"""Two processes on CPU (gloo): FSDP2, FSDP1 and (when installed) DeepSpeed ZeRO-3 train a tiny DoRA Llama
for a few SGD steps and must reproduce the single-process losses and gradients (fp32).

One ``torchrun --nproc_per_node=2`` launch runs every backend in a row (``_dist_worker.py``); the reference
runs here, in this process, without a process group. Gradients are compared through the parameters: with
SGD, ``p1 = p0 - lr * g0``, so equal parameters after the first step mean equal first-step gradients (and
equal parameters after the last step mean every update matched). Tolerance: the fp32 row of the table
(rtol 1e-5): the runs differ only in reduction order (gradient averaging over two ranks, gathered vs local
matmuls), a few ulps.

Each backend must also show that its gather path ran (counters), so a run that silently did nothing
cannot pass.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests._tolerances import TOLERANCES

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

BACKENDS = ["fsdp2", "fsdp2:adapters", "fsdp2:base", "fsdp1", "fsdp1-orig", "zero3"]


def _deepspeed_importable() -> bool:
    try:
        import deepspeed  # noqa: F401
    except Exception:
        return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("this torch build has no gloo backend")
    backends = [b for b in BACKENDS if b != "zero3" or _deepspeed_importable()]
    out = tmp_path_factory.mktemp("dist") / "results.json"
    env = dict(os.environ)
    env.update(PEFT_DORA_FUSED="0", OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT))
    env.pop("PEFT_FORCE_GATHER", None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        str(HERE / "_dist_worker.py"),
        "--out",
        str(out),
    ]
    for b in backends:
        cmd += ["--backend", b]
    proc = subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"torchrun failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    results = json.loads(out.read_text())

    # the single-process reference, same code path (PEFT_DORA_FUSED=0), no process group
    sys.path.insert(0, str(HERE))
    try:
        import _dist_worker as worker
    finally:
        sys.path.remove(str(HERE))
    saved = os.environ.get("PEFT_DORA_FUSED")
    os.environ["PEFT_DORA_FUSED"] = "0"
    from dorafactors.dispatch import config

    config.invalidate_cache()
    try:
        assert not torch.distributed.is_initialized()
        ref = worker.reference()
    finally:
        if saved is None:
            os.environ.pop("PEFT_DORA_FUSED", None)
        else:
            os.environ["PEFT_DORA_FUSED"] = saved
        config.invalidate_cache()
    return results, ref, worker


def _get(runs, backend):
    results, ref, worker = runs
    if backend not in results:
        pytest.skip("deepspeed is not installed (optional extra)")
    res = results[backend]
    if "error" in res:
        pytest.fail(f"{backend} failed in the worker: {res['error']}\n{res['traceback']}")
    return res, ref, worker


def _compare(res, ref, worker):
    rtol, atol = TOLERANCES[torch.float32]
    torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(ref["losses"]), rtol=rtol, atol=atol)
    for which in ("first", "last"):
        assert set(res[which]) == set(ref[which]), f"parameter names differ ({which})"
        for name, value in ref[which].items():
            got = torch.tensor(res[which][name], dtype=value.dtype)
            torch.testing.assert_close(
                got, value, rtol=rtol, atol=atol, msg=lambda m, n=name, w=which: f"{n} ({w}): {m}"
            )
    # gradients of the first step, recovered from the SGD update
    assert len(ref["first"]) > 0
    moved = sum(bool((ref["first"][n] != ref["last"][n]).any()) for n in ref["first"])
    assert moved == len(ref["first"]), "every trainable parameter must receive gradient"


def test_reference_is_not_identity(runs):
    """Guard: lora_B is random, so DoRA differs from the base model (the comparison is meaningful)."""
    _, ref, _ = runs
    b = [v for n, v in ref["first"].items() if "lora_B" in n]
    assert b and all(v.abs().max() > 0 for v in b)


def test_fsdp2_layer_wrap_matches_single_process(runs):
    """fully_shard on decoder layers + root: weights are unsharded in forward, nothing to gather; cache off."""
    res, ref, worker = _get(runs, "fsdp2")
    _compare(res, ref, worker)
    c = res["counters"]
    assert c["full_tensor"] == 0 and "fsdp2" in c["backends"] and c["cache_refused"] > 0


def test_fsdp2_adapters_sharded_on_their_own_match(runs):
    """PEFT's wrap policy with fully_shard: lora_A / lora_B are DTensor shards at norm time -> full_tensor()."""
    res, ref, worker = _get(runs, "fsdp2:adapters")
    _compare(res, ref, worker)
    assert res["counters"]["full_tensor"] > 0


def test_fsdp2_base_sharded_on_its_own_matches(runs):
    res, ref, worker = _get(runs, "fsdp2:base")
    _compare(res, ref, worker)
    assert res["counters"]["full_tensor"] > 0


@pytest.mark.parametrize("backend", ["fsdp1", "fsdp1-orig"])
def test_fsdp1_peft_wrap_policy_matches(runs, backend):
    """FSDP1 with PEFT's fsdp_auto_wrap_policy (lora_A / lora_B wrapped alone), use_orig_params False / True."""
    res, ref, worker = _get(runs, backend)
    _compare(res, ref, worker)
    c = res["counters"]
    assert c["summoned"] > 0 and "fsdp1" in c["backends"]


def test_deepspeed_zero3_matches(runs):
    res, ref, worker = _get(runs, "zero3")
    _compare(res, ref, worker)
    assert res["counters"]["zero3_gathered"] > 0 and "deepspeed" in res["counters"]["backends"]
    assert res["shadow_gather_max_diff"] == 0.0  # the in-flight reader rebuilds DeepSpeed's exact layout
