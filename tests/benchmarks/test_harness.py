"""The benchmark harness end to end on CPU (``--quick``), plus its robustness rules.

One quick run of every suite (shared by the tests below) checks rows, providers, metadata, the report's
ratios and targets, and the plots. Smaller tests check the runner's error capture, incremental writes,
the time budget, and that providers get identical, non-identity adapters.
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import SCHEMA
from benchmarks import providers as P
from benchmarks.__main__ import main
from benchmarks.common import load_results, write_results
from benchmarks.harness import Case, ResultsFile, Settings, run_cases
from benchmarks.report import PROVIDER_ORDER
from benchmarks.suites import model as model_suite

pytestmark = pytest.mark.slow

META_KEYS = (
    "gpu",
    "driver",
    "cuda",
    "torch",
    "triton",
    "peft",
    "transformers",
    "dorafactors",
    "git_commit",
    "timestamp",
    "hostname",
    "quick",
    "run_id",
)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bench")
    out = out_dir / "quick.json"
    assert main(["run", "--quick", "--suite", "all", "--out", str(out), "--no-progress"]) == 0
    report = out_dir / "RESULTS.md"
    assert main(["report", str(out), "--output", str(report)]) == 0
    plots = out_dir / "plots"
    assert main(["plot", str(out), "--outdir", str(plots)]) == 0
    return {"json": out, "report": report, "plots": plots, "rows": load_results(out)["rows"]}


def _by(rows, suite):
    out: dict[str, dict[str, dict]] = {}
    for row in rows:
        if row["suite"] == suite and not row.get("optional"):
            out.setdefault(row["case"], {})[row["provider"]] = row
    return out


def test_every_suite_and_provider_ran(quick_run):
    rows = quick_run["rows"]
    assert {r["suite"] for r in rows} == {"model", "decode", "layer", "norm", "compose", "ranks"}
    errors = [(r["suite"], r["case"], r["provider"], r.get("error", "")[:300]) for r in rows if r["status"] == "error"]
    assert not errors, errors
    settings = Settings.make(quick=True, device="cpu")
    for suite in ("model", "decode", "layer", "ranks"):
        cases = _by(rows, suite)
        assert cases, suite
        for case, by in cases.items():
            assert {"lora", "stock", "dorafactors"} <= set(by), (suite, case, set(by))
            # a QDoRA setup runs wherever bitsandbytes can quantize it; elsewhere its rows say why not
            why_not = model_suite.unavailable(case.split("/")[0], settings) if suite == "model" else None
            if why_not:
                assert all(r["status"] == "skipped" and r["reason"] == why_not for r in by.values()), (suite, case)
            else:
                assert all(r["status"] == "ok" for r in by.values()), (suite, case)
    for case, by in _by(rows, "norm").items():
        assert set(by) == {"gemm_floor", "stock", "dorafactors_cold", "dorafactors_warm"}, case
        assert by["dorafactors_cold"]["metrics"]["rel_err_vs_fp64"] < 1e-3
    for case, by in _by(rows, "compose").items():
        assert "copy" in by, case
        if not case.startswith("copy/"):
            assert by["dorafactors"]["metrics"]["gbps"] > 0
    compiled = [r for r in rows if r.get("optional")]
    assert any(r["status"] == "skipped" and r["suite"] == "model" for r in compiled)  # not in --quick
    ran = {(r["suite"], r["case"], r["provider"]) for r in compiled if r["status"] == "ok"}
    for suite, case in (
        ("model", "bf16/infer_prefill"),
        ("model", "bf16/train_step_accum8"),
        ("decode", "model/bf16/tokens=1"),
    ):
        for provider in ("lora+compile", "stock+compile", "dorafactors+compile"):
            assert (suite, case, provider) in ran, (suite, case, provider)


def test_compiled_rows_record_compilation_and_do_not_recompile(quick_run):
    """Every compiled row: its compile time, graph breaks, and zero graphs compiled after the warm-up call;
    dorafactors compiles its inference and decode models whole (no graph break) and is compared with
    compiled LoRA and compiled stock of the same run."""
    rows = [r for r in quick_run["rows"] if r.get("optional") and r["status"] == "ok"]
    assert rows
    for row in rows:
        impl = row["impl"]
        assert row["metrics"]["compile_s"] > 0 and impl["graphs_compiled"] >= 1, (row["case"], row["provider"])
        assert impl["recompiles_after_warmup"] == 0, (row["case"], row["provider"], impl)
        if row["provider"] == "dorafactors+compile":
            if row["params"].get("workload") in ("infer", "decode"):
                assert impl["graph_breaks"] == 0, (row["case"], impl)
            by = {r["provider"]: r for r in rows if r["case"] == row["case"] and r["suite"] == row["suite"]}
            ratios = row["ratios"]
            assert ratios["ms_vs_lora"] == pytest.approx(row["metrics"]["ms"] / by["lora+compile"]["metrics"]["ms"])
            assert ratios["ms_vs_stock"] == pytest.approx(row["metrics"]["ms"] / by["stock+compile"]["metrics"]["ms"])
    text = quick_run["report"].read_text()
    assert "### Targets under torch.compile" in text
    # the compiled decode case, timed in turn, is marked so; a compiled model-suite case is not
    in_turn = [r for r in rows if r["suite"] == "decode" and r["provider"] == "dorafactors+compile"]
    assert in_turn and all("in turn" in r["metrics"]["timer"] for r in in_turn)
    assert "| decode 1 token, bf16 ‡ | `decode:model/bf16/tokens=1` |" in text
    # its stock row was timed alone, after the pair: its cell says so
    decode_line = next(line for line in text.splitlines() if "| decode 1 token, bf16 ‡ |" in line)
    assert decode_line.split(" | ")[3].endswith("§"), decode_line
    prefill_line = next(line for line in text.splitlines() if "| prefill 4096, bf16 |" in line)
    assert "§" not in prefill_line, prefill_line
    assert "| prefill 4096, bf16 | `model:bf16/infer_prefill` |" in text


def test_rows_carry_metrics_and_metadata(quick_run):
    for row in quick_run["rows"]:
        for key in META_KEYS:
            assert key in row["meta"], key
        assert row["meta"]["quick"] is True
        for key in ("suite", "case", "provider", "params", "status", "run_id", "timestamp"):
            assert key in row
        if row["status"] == "ok":
            metrics = row["metrics"]
            assert metrics["ms"] > 0 and metrics["reps"] >= 3
            assert metrics["ms_p20"] <= metrics["ms"] <= metrics["ms_p80"]


def test_layer_decode_and_model_training_rows_record_host_time(quick_run):
    """Every layer and decode row (eager providers) has the host time to enqueue one call and the time per call
    back to back, shown in RESULTS.md next to LoRA's and stock's, and so has every eager model-suite training
    fwd+bwd row (not the inference, step or compiled ones); the decode suite has the one-token
    4096x4096-layer case (quick: 64x64)."""
    rows = quick_run["rows"]
    for suite in ("layer", "decode"):
        for case, by in _by(rows, suite).items():
            for provider, row in by.items():
                metrics = row["metrics"]
                assert metrics["host_us"] > 0 and metrics["host_us_p80"] >= metrics["host_us"], (suite, case, provider)
                assert metrics["loop_us"] > 0, (suite, case, provider)
    assert {"lora", "stock", "dorafactors"} <= set(_by(rows, "decode")["layer/64x64/tokens=1"])
    model_training = 0
    for row in rows:
        if row["suite"] == "model" and row["status"] == "ok":
            timed = row["params"]["workload"] == "train_fwd_bwd" and not row["provider"].endswith("+compile")
            model_training += timed
            assert ("host_us" in row["metrics"]) == timed and ("loop_us" in row["metrics"]) == timed, row["case"]
            assert "device_us" not in row["metrics"]  # its hold cannot keep a model call's launches queued
    assert model_training >= 3
    text = quick_run["report"].read_text()
    assert text.count("Host time to enqueue one call") == 3  # the model, layer and decode sections
    assert text.count("Time per call of calls made back to back") == 3
    assert "| decode: one 4096x4096 layer, 1 token (eval) | `decode:layer/64x64/tokens=1` |" in text
    json_rows = json.loads(quick_run["json"].read_text())["rows"]  # the report wrote the ratios back
    df = next(r for r in json_rows if r["case"] == "layer/64x64/tokens=1" and r["provider"] == "dorafactors")
    assert df["ratios"]["host_vs_lora"] > 0 and df["ratios"]["loop_vs_lora"] > 0


def test_results_file_stores_the_metadata_once_per_run(quick_run):
    stored = json.loads(quick_run["json"].read_text())
    assert stored["schema"] == SCHEMA
    assert not any("meta" in row for row in stored["rows"])
    assert set(stored["runs"]) == {row["run_id"] for row in stored["rows"]}
    for run_id, meta in stored["runs"].items():
        assert meta["run_id"] == run_id


def test_schema_1_files_are_read_and_rewritten_once_per_run(tmp_path):
    """Files whose every row carried a copy of its run's metadata load as before and are stored compactly."""
    meta = {"run_id": "r1", "gpu": "G", "timestamp": "t", "quick": False}
    old_rows = [
        {"suite": "norm", "case": c, "provider": "dorafactors", "status": "ok", "run_id": "r1", "meta": dict(meta)}
        for c in ("a", "b")
    ]
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"schema": "dorafactors-bench/1", "rows": old_rows}))
    loaded = load_results(path)
    assert [row["meta"] for row in loaded["rows"]] == [meta, meta]
    write_results(path, loaded["rows"])
    stored = json.loads(path.read_text())
    assert stored["runs"] == {"r1": meta} and not any("meta" in row for row in stored["rows"])
    assert load_results(path)["rows"] == old_rows


def test_providers_are_what_they_claim(quick_run):
    for row in quick_run["rows"]:
        if row["status"] != "ok" or row["suite"] not in ("model", "decode", "layer", "ranks"):
            continue
        cls = row["impl"].get("dora_class")
        base = P.model_of(row["provider"])
        if base == "lora":
            assert cls is None
        elif base == "stock":
            assert cls == "peft.tuners.lora.dora.DoraLinearLayer"
        else:
            assert cls.startswith("dorafactors.")


def test_norm_recomputed_in_training_reused_in_inference(quick_run):
    """Training rows must not profit from a norm cache across optimizer steps; serving rows may."""
    for row in quick_run["rows"]:
        if row["status"] != "ok" or P.model_of(row["provider"]) != "dorafactors" or row["suite"] == "norm":
            continue
        per_call = row["impl"].get("df_norm_computations_per_call")
        if per_call is None:
            continue
        modules = row["impl"]["lora_modules"]
        workload = row["params"].get("workload")
        if row["provider"].startswith("dorafactors_cold") or workload in (
            "train_fwd_bwd",
            "fwd_bwd",
            "train_step",
            "accum_step",  # one norm per optimizer step: 8 micro-batches share it
        ):
            assert per_call == modules, (row["case"], row["provider"], per_call, modules)
        elif row["params"].get("quantization"):
            # PEFT's dequantize_module_weight re-creates a bitsandbytes weight parameter on every call on the
            # CPU (on a GPU it leaves it alone): a new tensor object, so the norm is (rightly) recomputed
            assert per_call in (0, modules), (row["case"], row["provider"], per_call)
        elif row["suite"] == "decode" or workload == "infer":  # compiled rows too (the norm op counts)
            assert per_call == 0, (row["case"], row["provider"], per_call)


def test_report_ratios_and_results_md(quick_run):
    rows = json.loads(quick_run["json"].read_text())["rows"]  # the report writes the ratios back
    for row in rows:
        if row["status"] != "ok":
            continue
        ratios = row["ratios"]
        if row["suite"] in ("model", "decode", "layer", "ranks") and not row.get("optional"):
            assert "ms_vs_lora" in ratios and "ms_vs_stock" in ratios, (row["case"], row["provider"])
            if row["provider"] == "lora":
                assert ratios["ms_vs_lora"] == pytest.approx(1.0)
        if row["suite"] == "norm":
            assert "ms_vs_gemm_floor" in ratios
        if row["suite"] == "compose" and row["provider"] == "dorafactors":
            assert {"ms_vs_eager", "gbps_vs_copy"} <= set(ratios)
    text = quick_run["report"].read_text()
    assert "## CPU (quick smoke run)" in text and "Smoke run on CPU" in text
    assert "### Targets" in text and ("**pass**" in text or "**miss**" in text)
    for suite in ("model", "decode", "layer", "norm", "compose", "ranks"):
        assert f"### {suite}" in text


def test_report_shows_device_time_beside_host_time(quick_run, tmp_path):
    """Rows with ``device_us`` (CUDA runs of the layer and decode suites) get device ratios to LoRA and stock,
    a device-time table in their suite's section and, on a target row, the host and device ratios beside the
    wall-clock one; a CPU run records none (the profiler sees no device there)."""
    from benchmarks import report

    rows = load_results(quick_run["json"])["rows"]  # with each row's run metadata (the report reads it)
    assert not any("device_us" in r.get("metrics", {}) for r in rows)
    case = report._layer_case(0, "fwd_bwd", True)
    device = {"lora": 400.0, "stock": 900.0, "dorafactors": 480.0}
    for row in rows:
        if row["suite"] == "layer" and row["case"] == case and row["provider"] in device:
            row["metrics"]["device_us"] = device[row["provider"]]
    report.add_ratios(rows)
    df = next(r for r in rows if r["suite"] == "layer" and r["case"] == case and r["provider"] == "dorafactors")
    assert df["ratios"]["device_vs_lora"] == pytest.approx(1.2)
    assert df["ratios"]["device_vs_stock"] == pytest.approx(480 / 900)
    text = report.render(rows, [tmp_path / "quick.json"])
    assert "Device time of one call, µs" in text
    assert f"| {case} | 400 | 900 (2.25x) | 480 (1.20x) |" in text
    target = next(line for line in text.splitlines() if line.startswith("| layer 4096->4096 fwd+bwd |"))
    host, loop = df["ratios"]["host_vs_lora"], df["ratios"]["loop_vs_lora"]
    assert f"| {host:.2f}x, 1.20x, {loop:.2f}x |" in target


def test_loop_us_times_calls_made_back_to_back():
    """``loop_us`` is the time per call of ``calls`` calls in a row (after two untimed ones), with the given
    tensors' gradients set to None before each call: a call that sleeps 2 ms costs about 2 ms."""
    import time

    from benchmarks.harness import loop_us

    seen: list[object] = []
    param = torch.zeros(2, requires_grad=True)

    def call() -> None:
        seen.append(param.grad)
        param.grad = torch.ones(2)
        time.sleep(0.002)

    out = loop_us(call, Settings.make(quick=True, device="cpu"), calls=5, grad_to_none=[param])
    assert len(seen) == 7 and all(g is None for g in seen[2:])
    assert 2000 <= out["loop_us"] < 20_000


def test_device_us_is_empty_off_cuda():
    from benchmarks.harness import device_us

    assert device_us(lambda: torch.ones(4) @ torch.ones(4), Settings.make(quick=True, device="cpu")) == {}


@pytest.mark.gpu
def test_gpu_device_us_sums_the_kernels_of_one_call():
    """Three matmuls take about three times one's device time, and a host-side sleep inside the call adds
    nothing to it (the call is timed on the device alone)."""
    import time

    from benchmarks.harness import device_us

    a = torch.randn(2048, 2048, device="cuda")
    settings = Settings.make(quick=True, device="cuda")
    one = device_us(lambda: a @ a, settings)["device_us"]
    three = device_us(lambda: [a @ a for _ in range(3)], settings)["device_us"]
    slept = device_us(lambda: (a @ a, time.sleep(0.01)), settings)["device_us"]
    assert 2 * one < three < 4 * one
    assert slept < 3 * one < 10_000  # the 10 ms sleep is host time


def test_plots_written(quick_run):
    pngs = sorted(quick_run["plots"].glob("*.png"))
    names = {p.name.split("quick-", 1)[-1] for p in pngs}
    assert {"ratio-model.png", "ratio-layer.png", "compose-bandwidth.png", "norm-time.png", "ranks.png"} <= names
    assert all(p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG" for p in pngs)


def test_every_reported_provider_has_its_own_plot_colour():
    """A provider without a colour takes matplotlib's first default colour, dorafactors' blue: two bars of one
    chart would look alike."""
    from benchmarks.plot import _COLORS

    colours = [_COLORS.get(p) for p in PROVIDER_ORDER]
    assert None not in colours, [p for p in PROVIDER_ORDER if p not in _COLORS]
    assert len(set(colours)) == len(colours)


# --------------------------------------------------------------------------------------------- runner rules


def _case(name, run, providers=("a", "b"), est=0.0):
    return Case(suite="compose", name=name, params={}, providers=providers, run=run, est_s=est)


def _ok(settings):
    return [{"provider": p, "status": "ok", "metrics": {"ms": 1.0}} for p in ("a", "b")]


def test_errors_are_recorded_and_the_run_goes_on(tmp_path):
    def boom(settings):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    results = ResultsFile(tmp_path / "r.json")
    settings = Settings.make(quick=True)
    run_cases([_case("x", boom), _case("y", _ok)], settings, results, progress=False, log=lambda _: None)
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [(r["case"], r["status"]) for r in rows] == [("x", "error")] * 2 + [("y", "ok")] * 2
    assert "OutOfMemoryError" in rows[0]["error"]


def test_rows_are_on_disk_before_a_crash(tmp_path):
    def killed(settings):
        raise KeyboardInterrupt  # e.g. the command's time limit

    path = tmp_path / "r.json"
    results = ResultsFile(path)
    with pytest.raises(KeyboardInterrupt):
        run_cases(
            [_case("first", _ok), _case("second", killed)],
            Settings.make(quick=True),
            results,
            progress=False,
            log=lambda _: None,
        )
    rows = json.loads(path.read_text())["rows"]
    assert [r["case"] for r in rows] == ["first", "first"]
    # a second call appends to the same file under a new run id
    run_cases([_case("third", _ok)], Settings.make(quick=True), ResultsFile(path), progress=False, log=lambda _: None)
    rows = json.loads(path.read_text())["rows"]
    assert [r["case"] for r in rows] == ["first", "first", "third", "third"]
    assert rows[0]["run_id"] != rows[-1]["run_id"]


def test_time_budget_skips_and_records(tmp_path):
    settings = Settings.make(quick=False, device="cpu")  # estimates are honoured outside --quick
    results = ResultsFile(tmp_path / "r.json")
    run_cases(
        [_case("cheap", _ok, est=0.0), _case("dear", _ok, est=1e6)],
        settings,
        results,
        time_budget=60,
        progress=False,
        log=lambda _: None,
    )
    status = {(r["case"], r["status"]) for r in results.rows}
    assert status == {("cheap", "ok"), ("dear", "skipped")}
    assert all("time budget" in r["reason"] for r in results.rows if r["status"] == "skipped")


def _run_past_a_tight_deadline(tmp_path, cases) -> ResultsFile:
    """``run_cases`` with a hard deadline 0.6 s after its start; asserts that it returned well before the
    cases' 20 s sleeps would have ended."""
    import time as _time

    results = ResultsFile(tmp_path / "r.json")
    t0 = _time.perf_counter()
    run_cases(
        cases,
        Settings.make(quick=True),
        results,
        time_budget=0.3,
        grace_s=0.3,
        progress=False,
        log=lambda _: None,
    )
    assert _time.perf_counter() - t0 < 10
    return results


def test_a_case_running_past_the_hard_deadline_is_interrupted(tmp_path):
    import time as _time

    from benchmarks.harness import provider_rows

    def slow(settings):
        def measure(provider):
            _time.sleep(20)
            return {"ms": 1.0}, {}

        return provider_rows(("a", "b"), measure, settings.device)

    results = _run_past_a_tight_deadline(tmp_path, [_case("slow", slow), _case("after", _ok)])
    status = [(r["case"], r["provider"], r["status"]) for r in results.rows]
    assert status == [
        ("slow", "a", "error"),
        ("slow", "b", "skipped"),
        ("after", "a", "skipped"),
        ("after", "b", "skipped"),
    ]
    assert "hard deadline" in results.rows[0]["error"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped first interrupt
def test_a_deadline_interrupt_swallowed_by_a_finalizer_fires_again(tmp_path, monkeypatch):
    """Python drops an exception raised while a ``__del__`` (or weak-reference callback) runs; the alarm
    repeats, so the case is still interrupted, not left running to its end."""
    import time as _time

    from benchmarks import harness

    monkeypatch.setattr(harness, "_REFIRE_S", 0.2)
    swallowed = []

    class SlowFinalizer:
        def __del__(self):
            t = _time.perf_counter()
            try:
                while _time.perf_counter() - t < 1.0:  # the first alarm (at 0.6 s) fires in here
                    pass
            except BaseException as exc:
                swallowed.append(exc)
                raise

    def slow(settings):
        SlowFinalizer()  # finalized at once: the case is inside __del__ when the deadline passes
        _time.sleep(20)
        return [{"provider": "a", "status": "ok", "metrics": {"ms": 1.0}, "impl": {}}]

    results = _run_past_a_tight_deadline(tmp_path, [_case("slow", slow)])
    assert swallowed and isinstance(swallowed[0], harness.BudgetExceeded)  # the first interrupt was dropped
    assert {r["status"] for r in results.rows} == {"error"}
    assert all("hard deadline" in r["error"] for r in results.rows)


def test_providers_share_weights_and_adapters_not_at_identity():
    base = P.one_linear_base(48, 40, torch.device("cpu"), torch.float32, seed=3)
    built = {
        p: P.build_peft(base, p, r=4, alpha=8, targets=("proj",), autocast_adapter_dtype=False, seed=3)
        for p in P.BASE_PROVIDERS
    }
    layers = {p: m.base_model.model.proj for p, m in built.items()}
    for p in ("stock", "dorafactors"):
        assert torch.equal(layers[p].base_layer.weight, layers["lora"].base_layer.weight)
        assert torch.equal(layers[p].lora_A["default"].weight, layers["lora"].lora_A["default"].weight)
        assert torch.equal(layers[p].lora_B["default"].weight, layers["lora"].lora_B["default"].weight)
    assert layers["lora"].lora_B["default"].weight.abs().min() > 0  # not PEFT's zero init
    mag = {p: layers[p].lora_magnitude_vector["default"].weight for p in ("stock", "dorafactors")}
    assert torch.equal(mag["stock"], mag["dorafactors"])
    row_norm = layers["stock"].base_layer.weight.norm(dim=1)
    assert not torch.allclose(mag["stock"], row_norm)  # the magnitude is perturbed too
    x = torch.randn(5, 48)
    with torch.no_grad():
        outs = {p: m(x) for p, m in built.items()}
        base_out = base(x)
    for p in P.BASE_PROVIDERS:
        assert (outs[p] - base_out).abs().max() > 1e-3, p  # every adapter changes the output
    torch.testing.assert_close(outs["stock"], outs["dorafactors"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fp32_adapters", [False, True], ids=["bf16", "peft-default"])
def test_dropout_floor_adds_the_base_gemm_on_the_dropped_input_and_its_gradient(fp32_adapters):
    """``lora_dropout_floor`` is LoRA plus ``W @ dropout(x)`` (same dropout mask as LoRA's branch, the GEMM in
    ``W``'s dtype), with that GEMM's input gradient in the backward; the hooks are gone on exit."""
    base = P.one_linear_base(48, 40, torch.device("cpu"), torch.bfloat16, seed=5)
    model = P.build_peft(base, "lora", r=4, alpha=8, targets=("proj",), autocast_adapter_dtype=fp32_adapters, seed=5)
    P.set_lora_dropout(model, 0.3)
    model.train()
    layer = model.base_model.model.proj
    weight = layer.base_layer.weight
    x = torch.randn(6, 48, dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(6, 40, dtype=torch.bfloat16)
    with P.dropout_floor_hooks(model):
        torch.manual_seed(11)
        out = model(x)
        out.backward(grad_out)
    floor_grad = x.grad.clone()
    x.grad = None
    torch.manual_seed(11)  # the same dropout mask, without the hooks
    plain = model(x)
    plain.backward(grad_out)
    lora_in = layer.lora_dropout["default"]
    assert type(lora_in) is torch.nn.Dropout and not layer._forward_hooks  # undone
    torch.manual_seed(11)
    adapter_dtype = torch.float32 if fp32_adapters else torch.bfloat16
    dropped = torch.nn.functional.dropout(x.detach().to(adapter_dtype), 0.3, training=True)
    extra = torch.nn.functional.linear(dropped.to(torch.bfloat16), weight)
    torch.testing.assert_close(out, (plain + extra).to(out.dtype), rtol=2e-2, atol=2e-2)
    assert (out - plain).abs().max() > 0.1  # the GEMM's output is in the sum
    # the extra input gradient: (mask * c) * (grad_out @ W), the dropped positions get none of it
    mask_scale = (dropped != 0).float() / (1.0 - 0.3)
    extra_grad = mask_scale * (grad_out.float() @ weight.float())
    torch.testing.assert_close(floor_grad.float() - x.grad.float(), extra_grad, rtol=5e-2, atol=5e-2)
    assert extra_grad.abs().max() > 0.1


def test_compiled_gradient_check_rejects_a_graph_that_drops_gradients():
    """The check compiled training rows run before timing: a runner whose gradients do not reach the model's
    adapters fails it (a compiled graph that dropped them looked fast); the model itself passes exactly."""
    from benchmarks.suites import _workloads as W

    spec = P.ModelSpec(hidden=32, intermediate=64, heads=2, kv_heads=1, layers=1, vocab=64, seq=8)
    base = P.llama_base(spec, torch.device("cpu"), torch.float32, seed=0)
    model = P.build_peft(
        base, "dorafactors", r=4, alpha=8, targets=("q_proj", "v_proj"), autocast_adapter_dtype=False, seed=0
    )
    ids = torch.randint(0, spec.vocab, (1, spec.seq), generator=torch.Generator().manual_seed(0))
    params = P.trainable(model)
    workload = W.Workload("train_fwd_bwd")
    assert W._compiled_grad_error(model, model, ids, params, workload, torch.device("cpu")) == 0.0

    def dropped(**kwargs):  # the same loss, no gradient reaching the adapters (as the broken graph's)
        for p in params:
            p.requires_grad_(False)
        try:
            out = model(**kwargs)
            return type(out)(loss=out.loss.detach().requires_grad_(), logits=out.logits)
        finally:
            for p in params:
                p.requires_grad_(True)

    with pytest.raises(RuntimeError, match="compiled gradients differ"):
        W._compiled_grad_error(model, dropped, ids, params, workload, torch.device("cpu"))


def test_static_cache_decode_step_matches_the_cropped_dynamic_cache():
    """``--compile-mode reduce-overhead`` decode runs on a ``StaticCache`` (a CUDA-graph replay cannot use the
    cropped ``DynamicCache``): every call of its step sees the same context as the cropped cache gives, so
    both steps compute the same logits, call after call."""
    from benchmarks.suites import _workloads as W

    spec = P.ModelSpec(hidden=32, intermediate=64, heads=2, kv_heads=1, layers=2, vocab=64, seq=8)
    base = P.llama_base(spec, torch.device("cpu"), torch.float32, seed=0)
    model = P.build_peft(
        base, "dorafactors", r=4, alpha=8, targets=P.LLAMA_TARGETS, autocast_adapter_dtype=False, seed=0
    )
    model.eval()
    gen = torch.Generator().manual_seed(1)
    inputs = {
        "context_ids": torch.randint(0, 64, (1, 6), generator=gen),
        "new_ids": torch.randint(0, 64, (1, 3), generator=gen),
    }
    logits: dict[str, list[torch.Tensor]] = {"dynamic": [], "static": []}

    def recording(into):
        def call(**kwargs):
            out = model(**kwargs)
            into.append(out.logits.detach().clone())
            return out

        return call

    workload = W.Workload("decode", new_tokens=3, context=6)
    for kind in ("dynamic", "static"):
        step, mode = W._decode_fn(recording(logits[kind]), model, inputs, workload, static=kind == "static")
        assert mode == ("static_cache" if kind == "static" else "kv_cache")
        for _ in range(3):
            step()
    assert len(logits["dynamic"]) == 4 and len(logits["static"]) == 3  # the dynamic check call, then 3 steps
    for got in logits["static"]:
        torch.testing.assert_close(got, logits["dynamic"][-1], rtol=1e-5, atol=1e-5)
        assert torch.equal(got, logits["static"][0])


def test_compiled_cases_under_another_compile_mode_have_their_own_names():
    from benchmarks.report import COMPILED_TARGETS
    from benchmarks.suites import build_cases

    default = build_cases(["model", "decode"], Settings(quick=True))
    graphs = build_cases(["model", "decode"], Settings(quick=True, compile_mode="reduce-overhead"))
    compiled_default = {c.key for c in default if c.optional}
    compiled_graphs = {c.key for c in graphs if c.optional}
    assert compiled_default and len(compiled_graphs) == len(compiled_default)
    assert compiled_graphs.isdisjoint(compiled_default)  # a CUDA-graph row never replaces a default-mode row
    assert all(k.endswith("/mode=reduce-overhead#compile") for k in compiled_graphs)
    assert {c.key for c in default if not c.optional} == {c.key for c in graphs if not c.optional}
    targets = {f"{suite}:{name}#compile" for _, suite, name, _ in COMPILED_TARGETS}
    assert {"decode:model/bf16/tokens=1/mode=reduce-overhead#compile"} <= targets & compiled_graphs


def test_provider_rows_interleaves_rounds_and_keeps_each_providers_median_round():
    from benchmarks.harness import provider_rows

    calls: list[str] = []
    times = {"a": iter([5.0, 1.0, 3.0]), "b": iter([2.0, 4.0, 9.0]), "c": iter([7.0, 7.5, 6.0])}

    def measure(provider):
        calls.append(provider)
        ms = next(times[provider])
        return {"ms": ms, "host_us": ms * 10, "device_us": ms * 5, "loop_us": ms * 2}, {"round_ms": ms}

    rows = provider_rows(("a", "b", "c"), measure, torch.device("cpu"), rounds=3)
    assert calls == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    by = {r["provider"]: r for r in rows}
    assert [r["provider"] for r in rows] == ["a", "b", "c"]
    assert by["a"]["metrics"]["ms"] == 3.0 and by["a"]["impl"] == {"round_ms": 3.0}
    assert by["b"]["metrics"]["ms"] == 4.0 and by["b"]["metrics"]["host_us"] == 40.0
    assert by["c"]["metrics"]["ms"] == 7.0
    assert by["a"]["metrics"]["ms_rounds"] == [5.0, 1.0, 3.0]
    assert by["c"]["metrics"]["host_us_rounds"] == [70.0, 75.0, 60.0]
    assert by["c"]["metrics"]["device_us_rounds"] == [35.0, 37.5, 30.0]
    assert by["c"]["metrics"]["loop_us_rounds"] == [14.0, 15.0, 12.0]


def test_provider_rows_rounds_report_an_error_and_stop_that_provider():
    from benchmarks.harness import provider_rows

    calls: list[str] = []

    def measure(provider):
        calls.append(provider)
        if provider == "b" and calls.count("b") == 2:
            raise RuntimeError("out of memory in round 2")
        return {"ms": 1.0}, {}

    rows = provider_rows(("a", "b"), measure, torch.device("cpu"), rounds=3)
    assert calls == ["a", "b", "b", "a", "a"]
    assert rows[0]["status"] == "ok" and rows[0]["metrics"]["ms_rounds"] == [1.0, 1.0, 1.0]
    assert rows[1]["status"] == "error" and "round 2" in rows[1]["error"]


def test_provider_rows_rounds_keep_the_finished_rounds_when_the_deadline_passes(monkeypatch):
    import benchmarks.harness as H

    calls: list[str] = []

    def measure(provider):
        calls.append(provider)
        if len(calls) == 3:  # the deadline passes during round 2 ("b" then "a" are left)
            monkeypatch.setattr(H, "_DEADLINE", [0.0])
        return {"ms": float(len(calls))}, {}

    rows = H.provider_rows(("a", "b"), measure, torch.device("cpu"), rounds=3)
    assert calls == ["a", "b", "b"]
    assert rows[0]["status"] == "ok" and rows[0]["metrics"]["ms"] == 1.0 and "ms_rounds" not in rows[0]["metrics"]
    assert rows[1]["status"] == "ok" and rows[1]["metrics"]["ms_rounds"] == [2.0, 3.0]
    assert rows[1]["metrics"]["ms"] == 2.0  # the lower middle of two


def test_settings_rounds_default_three_on_full_runs_one_in_the_quick_run():
    assert Settings.make(quick=False, device="cpu").rounds == 3
    assert Settings.make(quick=True).rounds == 1
    assert Settings.make(quick=True, rounds=5).rounds == 5


def test_decode_cases_run_in_rounds_or_in_turn_except_under_another_compile_mode(monkeypatch):
    """Every decode case is host-bound and timed while the host's speed drifts: the eager ones (model and
    layer) measure their providers in ``--rounds`` interleaved rounds; the compiled model cases in Inductor's
    default mode measure each provider once and then time them in turn, ``--reps`` times ``--rounds`` calls
    each; under ``--compile-mode`` (CUDA graphs) a compiled case is measured once, not in turn."""
    from benchmarks.suites import build_cases
    from benchmarks.suites import decode as decode_suite
    from benchmarks.suites import layer as layer_suite

    seen: dict[tuple[str, ...], list[int]] = {}
    in_turn: list[int] = []

    def recorded(providers, measure, device, *, rounds=1):
        seen.setdefault(tuple(sorted(providers)), []).append(rounds)
        return [{"provider": p, "status": "skipped", "reason": "recorded"} for p in providers]

    for module in (decode_suite, layer_suite):
        monkeypatch.setattr(module, "provider_rows", recorded)
    monkeypatch.setattr(
        decode_suite,
        "_compiled_rows_in_turn",
        lambda s, m, w, i, providers: (
            in_turn.append(decode_suite.compiled_in_turn(s, providers)) or recorded(providers, None, None)
        ),
    )
    monkeypatch.setattr(model_suite, "model_set", lambda *args, **kwargs: {})
    monkeypatch.setattr(model_suite, "token_ids", lambda *args, **kwargs: torch.zeros(1, 1, dtype=torch.long))
    monkeypatch.setattr(layer_suite, "layer_set", lambda *args, **kwargs: {})
    compiled = tuple(sorted(model_suite.COMPILED))
    for mode, calls_in_turn in ((None, 3 * 4), ("reduce-overhead", 0)):
        seen.clear()
        in_turn.clear()
        settings = Settings(quick=True, reps=3, rounds=4, compile_mode=mode)
        cases = build_cases(["decode"], settings)
        for case in cases:
            rows = case.run(settings)
            assert [row["provider"] for row in rows] == list(case.providers)  # in the case's order
        eager = [c for c in cases if not c.optional]
        assert {c.name.split("/")[0] for c in eager} == {"model", "layer"}
        assert seen[tuple(sorted(decode_suite.PROVIDERS))] == [4] * len(eager)
        assert seen[compiled] == [1] * (len(cases) - len(eager))
        assert in_turn == ([calls_in_turn] * (len(cases) - len(eager)) if calls_in_turn else [])


def test_compiled_decode_in_turn_compiles_each_provider_once_and_times_it_call_by_call(tmp_path, monkeypatch):
    """A compiled decode case in Inductor's default mode (``--reps 2 --rounds 3``): LoRA and dorafactors are
    each compiled once, beside each other, measured once, then timed in turn, six timed calls each, in turns of
    one untimed call and up to four timed ones per provider, the order reversed every other turn; their rows
    keep the compile time, the measurement alone (``ms_alone``), the timing in turn as ``ms`` and no graph
    compiled after the first call. Stock is compiled and measured after that timing, alone."""
    from benchmarks import harness
    from benchmarks import providers as P

    compiled_in_order: list[str] = []
    alongside = P.compiled_alongside

    def counting(model, tag, *args, **kwargs):
        compiled_in_order.append(tag)
        return alongside(model, tag, *args, **kwargs)

    turns: list[list[str]] = []
    in_turn = harness.bench_in_turn

    def recording(fns, settings, *, reps, warm_per_turn, per_turn):
        turns.append(list(fns))
        wrapped = {name: (lambda name=name, fn=fn: (order.append(name), fn())) for name, fn in fns.items()}
        order: list[str] = []
        out = in_turn(wrapped, settings, reps=reps, warm_per_turn=warm_per_turn, per_turn=per_turn)
        turns.append(order)
        return out

    monkeypatch.setattr(P, "compiled_alongside", counting)
    monkeypatch.setattr(P, "compiled", lambda *args, **kwargs: pytest.fail("the timing in turn compiled again"))
    monkeypatch.setattr("benchmarks.suites._workloads.bench_in_turn", recording)
    out = tmp_path / "in_turn.json"
    argv = ["run", "--quick", "--suite", "decode", "--case", "tokens=1#compile", "--reps", "2", "--rounds", "3"]
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    rows = [r for r in load_results(out)["rows"] if r.get("optional") and r["status"] != "skipped"]
    assert sorted(r["provider"] for r in rows) == sorted(model_suite.COMPILED)  # the quick run's one case
    assert compiled_in_order == ["lora+compile", "dorafactors+compile", "stock+compile"]
    names, order = turns
    assert names == ["lora+compile", "dorafactors+compile"]
    # a warm-up call each, then turn 0 (1 untimed + 4 timed calls per provider), turn 1 reversed (1 + 2)
    assert order == names + [n for n in names for _ in range(5)] + [n for n in names[::-1] for _ in range(3)]
    for row in rows:
        metrics, impl = row["metrics"], row["impl"]
        assert row["status"] == "ok", row
        assert metrics["ms"] > 0 and "ms_rounds" not in metrics
        assert metrics["tokens_per_s"] == pytest.approx(1 / (metrics["ms"] / 1e3))
        assert metrics["compile_s"] > 0 and impl["graphs_compiled"] >= 1, (row["provider"], impl)
        assert impl["recompiles_after_warmup"] == 0, (row["provider"], impl)
        if row["provider"] in names:
            assert metrics["reps"] == 6 and "in turn" in metrics["timer"], (row["provider"], metrics)
            assert "1 untimed call(s) after each switch, 4 timed" in metrics["timer"], metrics["timer"]
            assert metrics["ms_alone"] > 0
        else:
            assert "in turn" not in metrics["timer"] and "ms_alone" not in metrics, metrics
