"""The profiling scripts run end to end on the CPU (``--dry-run-cpu``: tiny shapes, not a measurement) and
report what they claim: per provider, host time, and for a compiled eval model the norms its dorafactors
layers computed while it was timed (none: a frozen model's norm is served from the layer's cache)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_profile_compiled_layer_mode_reports_each_provider_and_no_norm_per_call(tmp_path):
    command = [sys.executable, "benchmarks/profile_compiled.py", "--dry-run-cpu", "--backend", "aot_eager"]
    command += ["--layer", "64", "--tokens", "8"]
    done = subprocess.run(
        command, cwd=ROOT, env={**os.environ, "OUT": str(tmp_path)}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "profile_compiled.json").read_text())
    assert report["layer"] == 64 and set(report["rows"]) == {"lora", "dorafactors"}
    for name, row in report["rows"].items():
        assert row["host_us"] > 0 and row["norms_computed"] == 0, (name, row)
        assert row["decode_mode"] == "layer 64, 8 rows"


def test_profile_compiled_times_the_providers_in_interleaved_rounds_without_recompiling(tmp_path):
    """``--rounds 3``: both providers compiled side by side, then timed in three interleaved rounds; each row
    keeps its median round and all three, and no graph was compiled during the rounds."""
    command = [sys.executable, "benchmarks/profile_compiled.py", "--dry-run-cpu", "--backend", "aot_eager"]
    command += ["--tokens", "1", "--rounds", "3"]
    done = subprocess.run(
        command, cwd=ROOT, env={**os.environ, "OUT": str(tmp_path)}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "profile_compiled.json").read_text())
    assert report["rounds"] == 3 and set(report["rows"]) == {"lora", "dorafactors"}
    assert report["meta"]["torch"] == torch.__version__ and report["meta"]["device"] == "cpu"  # the run's metadata
    for name, row in report["rows"].items():
        assert len(row["host_us_rounds"]) == 3 and row["host_us"] == sorted(row["host_us_rounds"])[1], (name, row)
        assert row["norms_computed"] == 0, (name, row)
    assert "graphs compiled during the rounds: 0" in done.stdout
    refused = subprocess.run(
        [*command, "--providers", "lora,stock"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert refused.returncode != 0 and "stock breaks the graph" in refused.stderr


def test_profile_host_reports_the_training_phases_of_each_provider(tmp_path):
    """The training call's phases per provider, and for dorafactors the A/B pair of the magnitude divided
    inside the training node and by autograd before it (``rules.magnitude_division_outside_node``)."""
    command = [sys.executable, "benchmarks/profile_host.py", "--dry-run-cpu"]
    done = subprocess.run(
        command, cwd=ROOT, env={**os.environ, "OUT": str(tmp_path)}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    train = json.loads((tmp_path / "profile_host.json").read_text())["train"]
    assert set(train) == {"lora", "stock", "dorafactors"}
    for name, row in train.items():
        phases = row["phases"]
        assert row["host_us"] > 0 and phases["forward, adapters written"] > 0, (name, row)
        # the backward phase is the whole call less the forward, two separate timings: on a loaded CPU with
        # these tiny shapes the difference may come out negative, so only its presence is the script's to show
        assert math.isfinite(phases["backward"]), (name, row)
        assert phases["whole call, autograd multithreading off"] > 0, (name, row)
    phases = train["dorafactors"]["phases"]
    for phase in ("norm recomputation", "whole call, division outside the node", "whole call, again"):
        assert phases[phase] > 0, phase


def test_host_counts_times_each_provider_interleaved(tmp_path):
    """``python -m benchmarks.host_counts --time``: the counts, and a CPU wall time per call for every provider
    and workload, written to the JSON too."""
    out = tmp_path / "counts.json"
    command = [sys.executable, "-m", "benchmarks.host_counts", "--time", "--calls", "5", "--json", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report) == {"train", "decode"}
    for workload, rows in report.items():
        assert set(rows) == {"lora", "stock", "dorafactors"}
        for name, row in rows.items():
            assert row["cpu_us"] > 0 and row["python_calls"] > 0, (workload, name, row)
    assert "wall us per call on this CPU" in done.stdout


def test_host_counts_times_a_compiled_decode_call(tmp_path):
    """``python -m benchmarks.host_counts --compiled N``: an Inductor-compiled one-token call of N stacked
    layers per provider, timed on the CPU, the host time of dorafactors' norm op inside it (it ran), and each
    provider's first call after another's and its calls after that, timed in turn."""
    out = tmp_path / "counts.json"
    command = [sys.executable, "-m", "benchmarks.host_counts", "--compiled", "2", "--calls", "20", "--json", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["compiled_decode"]
    assert set(rows) == {"lora", "stock", "dorafactors"}
    assert all(row["cpu_us"] > 0 for row in rows.values()), rows
    assert rows["dorafactors"]["norm_op_us"] > 0, "the compiled call ran no norm op"
    assert all(row["first_after_switch_us"] > 0 and row["warm_in_turn_us"] > 0 for row in rows.values()), rows
    assert "compiled decode, 2 layers" in done.stdout
    assert "first call after another model's" in done.stdout


def test_profile_timeline_places_each_kernel_of_a_call_after_its_flush():
    """``profile_timeline.timelines`` on a hand-built chrome trace of two do_bench repetitions: per rep, the
    kernels launched inside its annotation, times from the end of the flush enqueued just before it (not an
    earlier rep's), and the device's idle time before each kernel."""
    from benchmarks import profile_timeline

    def op(cat, name, ts, dur, corr=None):
        return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": {"correlation": corr}}

    events = [
        # rep 0: flush (memset) enqueued at 0, runs 10..110; the call is annotated 5..158 on the host
        op("cuda_runtime", "cudaMemsetAsync", 0, 2, 1),
        op("gpu_memset", "Memset (Device)", 10, 100, 1),
        op("user_annotation", "rep0", 5, 153),
        op("cuda_runtime", "cudaLaunchKernel", 20, 3, 2),
        op("kernel", "gemm", 110, 40, 2),
        op("cuda_driver", "cuLaunchKernel", 150, 4, 3),  # enqueued after the device went idle at 150
        op("kernel", "triton_compose", 160, 5, 3),
        # rep 1: the flush is a fill kernel this time; the call enqueues one kernel
        op("cuda_runtime", "cudaLaunchKernel", 200, 2, 4),
        op("kernel", "vectorized_elementwise_kernel<FillFunctor>", 205, 50, 4),
        op("user_annotation", "rep1", 203, 20),
        op("cuda_runtime", "cudaLaunchKernel", 210, 3, 5),
        op("kernel", "gemm", 255, 40, 5),
        op("cpu_op", "aten::mm", 210, 3),  # host-only events are ignored
    ]
    reps = profile_timeline.timelines({"traceEvents": events}, wall_us=[55.0, 40.0])
    assert [r["wall_us"] for r in reps] == [55.0, 40.0]
    first, second = reps
    assert (first["host_start"], first["host_end"]) == (-105, 48)
    assert [k["kernel"] for k in first["kernels"]] == ["gemm", "triton_compose"]
    assert first["kernels"][0] == {"kernel": "gemm", "enqueued": -87, "start": 0, "end": 40, "waited": 0}
    assert first["kernels"][1] == {"kernel": "triton_compose", "enqueued": 44, "start": 50, "end": 55, "waited": 10}
    assert second["kernels"] == [{"kernel": "gemm", "enqueued": -42, "start": 0, "end": 40, "waited": 0}]
    # a rep without a flush before it reports nothing rather than times from another rep's flush
    no_flush = [e for e in events if e["args"].get("correlation") not in (4,)]
    assert len(profile_timeline.timelines({"traceEvents": no_flush}, wall_us=[55.0, 40.0])) == 1


def test_compiled_decode_floor_times_the_pair_and_the_unchecked_floor_in_turn(tmp_path):
    """``compiled_decode_floor.py`` (Inductor, which merges the norm ops): LoRA, dorafactors and dorafactors
    with its merged op's check skipped, timed in turn; the floor variant skipped the check on every one of its
    calls (two turns of one untimed and four timed calls) and no other variant's."""
    command = [sys.executable, "benchmarks/compiled_decode_floor.py", "--dry-run-cpu", "--setups", "bf16"]
    done = subprocess.run(
        command, cwd=ROOT, env={**os.environ, "OUT": str(tmp_path)}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "compiled_decode_floor.json").read_text())
    rows = report["rows"]["bf16/pair"]
    assert set(rows) == {"lora", "dorafactors", "dorafactors-unchecked"}
    assert report["unchecked_calls"] == {"bf16": report["turns"] * 5} and report["turns"] == 2
    for name, row in rows.items():
        assert row["ms"] > 0 and row["host_ms"] > 0, (name, row)
        assert math.isclose(row["ms_vs_lora"], row["ms"] / rows["lora"]["ms"]), (name, row)
    assert report["meta"]["device"] == "cpu"


def test_decode_layer_floor_times_the_layers_the_unchecked_call_and_the_bare_ops_in_turn(tmp_path):
    """``decode_layer_floor.py``: PEFT's LoRA and dorafactors layers, dorafactors with its fold check skipped and
    the bare operations, timed in turn and in back-to-back loops; the floor variants compute bitwise the
    layer's output, and only the unchecked variant skipped the check: on every one of its calls (two turns of one
    untimed and four timed calls, two loop turns of one untimed and three timed calls)."""
    command = [sys.executable, "benchmarks/decode_layer_floor.py", "--dry-run-cpu"]
    done = subprocess.run(
        command, cwd=ROOT, env={**os.environ, "OUT": str(tmp_path)}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "decode_layer_floor.json").read_text())
    (case,) = report["cases"].values()
    rows = case["rows"]
    assert set(rows) == {"lora", "dorafactors", "dorafactors-unchecked", "lora-bare", "dorafactors-bare"}
    assert case["floors_bitwise_the_layer"] == {"dorafactors-unchecked": True, "dorafactors-bare": True}
    assert case["unchecked_calls"] == case["turns"] * 5 + case["loop_turns"] * (1 + case["loop_calls"]) == 18
    for name, row in rows.items():
        assert row["ms"] > 0 and row["host_ms"] > 0 and row["loop_us"] > 0, (name, row)
        assert math.isclose(row["loop_us_vs_lora"], row["loop_us"] / rows["lora"]["loop_us"]), (name, row)
        assert math.isclose(row["host_ms_vs_lora"], row["host_ms"] / rows["lora"]["host_ms"]), (name, row)
    assert report["meta"]["device"] == "cpu"


def test_train_layer_floor_times_the_layers_and_their_bare_calls_in_turn(tmp_path):
    """``train_layer_floor.py``: PEFT's LoRA and dorafactors layers and the bare calls of their operations,
    timed in turn; the bare dorafactors call computes bitwise what the layer computes (output and every
    gradient), so that its time is a floor of the same work."""
    command = [sys.executable, "benchmarks/train_layer_floor.py", "--dry-run-cpu"]
    done = subprocess.run(
        command, cwd=ROOT, env={**os.environ, "OUT": str(tmp_path)}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "train_layer_floor.json").read_text())
    rows = report["rows"]
    assert set(rows) == {"lora", "dorafactors", "lora-bare", "dorafactors-bare", "dorafactors-bare-cached-norm"}
    assert report["bare_vs_layer_max_rel_diff"] == 0.0
    for name, row in rows.items():
        assert row["ms"] > 0 and row["host_ms"] > 0, (name, row)
        assert math.isclose(row["host_ms_vs_lora"], row["host_ms"] / rows["lora"]["host_ms"]), (name, row)
    assert report["meta"]["device"] == "cpu"
