"""``python -m benchmarks tune``: the derivations from measurements, on synthetic measurements (no GPU)."""

from __future__ import annotations

import json

import pytest

from benchmarks import tune


def _norm_samples(gemm_wins, shapes=tune.NORM_PATH_SHAPES):
    """One-pass 100 us; the GEMM path 50 us where ``gemm_wins(d_out, d_in, r)``, 130 us elsewhere."""
    out = []
    for d_out, d_in, r in shapes:
        alt = 0.05 if gemm_wins(d_out, d_in, r) else 0.13
        out.append({"d_out": d_out, "d_in": d_in, "rank": r, "base_ms": 0.1, "alt_ms": alt})
    return out


def _decisions(measurements, current):
    return {d.name: d for d in tune.derive(measurements, current)}


def _current(**overrides):
    values = {
        "NORM_GEMM_MIN_DIN_RANK": 4 << 20,
        "NORM_GEMM_MIN_MACS": 1 << 34,
        "NORM_GEMM_FP32_MIN_MACS": 1 << 32,
        "SPLIT_MIN_STEPS": 64,
        "GRAM_SHARE": 4,
        "GEMM_PATH_LOOP": (4, 32, 3),
        "FUSED_BACKWARD_MIN_COLS": 1024,
        "FUSED_BACKWARD_MIN_ELEMENTS": 1 << 20,
        "BACKWARD_PROGRAMS_PER_SM": 8,
        "INFERENCE_FOLD_MAX_ROWS": 256,
    }
    values.update(overrides)
    return values


def _configs(split=None, share=None, loop=None):
    return {
        "SPLIT_MIN_STEPS": split or dict.fromkeys(tune.SPLIT_MIN_STEPS_CANDIDATES, 1.0),
        "GRAM_SHARE": share or dict.fromkeys(tune.GRAM_SHARE_CANDIDATES, 1.0),
        "GEMM_PATH_LOOP": loop or dict.fromkeys(tune.GEMM_PATH_LOOP_CANDIDATES, 1.0),
    }


def test_norm_thresholds_recover_the_crossover_from_any_start():
    """The GEMM path wins from d_in * r >= 2**23 or d_out * d_in * r >= 2**35 on; started from thresholds
    that send everything one way, the fit finds a rule that loses no time on any measured shape."""
    wins = lambda d_out, d_in, r: d_in * r >= 1 << 23 or d_out * d_in * r >= 1 << 35  # noqa: E731
    samples = _norm_samples(wins)
    assert {s["alt_ms"] < s["base_ms"] for s in samples} == {True, False}  # both paths win somewhere
    for start in ((1, 1), (1 << 40, 1 << 60)):
        got = _decisions({"norm": {"paths": samples, "configs": _configs()}}, _current(
            NORM_GEMM_MIN_DIN_RANK=start[0], NORM_GEMM_MIN_MACS=start[1]
        ))  # fmt: skip
        tx, ty = got["NORM_GEMM_MIN_DIN_RANK"].derived, got["NORM_GEMM_MIN_MACS"].derived
        for s in samples:
            takes_gemm = s["d_in"] * s["rank"] >= tx or s["d_out"] * s["d_in"] * s["rank"] >= ty
            assert takes_gemm == wins(s["d_out"], s["d_in"], s["rank"]), (s, tx, ty)


def test_fp32_adapter_threshold_recovers_the_crossover_from_any_start():
    """fp32 adapters: one size threshold on d_out * d_in * r. The GEMM path wins from 2**33 multiply-adds on;
    started below and above, the fit sends exactly the winning shapes to it (and leaves the bf16 rule alone
    when only the fp32 paths moved)."""
    wins = lambda d_out, d_in, r: d_out * d_in * r >= 1 << 33  # noqa: E731
    fp32 = _norm_samples(wins, shapes=tune.NORM_FP32_PATH_SHAPES)
    assert {s["alt_ms"] < s["base_ms"] for s in fp32} == {True, False}
    for start in (1, 1 << 50):
        norm = {"paths": _norm_samples(lambda *s: False), "fp32_paths": fp32, "configs": _configs()}
        got = _decisions({"norm": norm}, _current(NORM_GEMM_FP32_MIN_MACS=start))
        threshold = got["NORM_GEMM_FP32_MIN_MACS"].derived
        for s in fp32:
            assert (s["d_out"] * s["d_in"] * s["rank"] >= threshold) == wins(s["d_out"], s["d_in"], s["rank"])
    without = _decisions({"norm": {"paths": _norm_samples(lambda *s: False), "configs": _configs()}}, _current())
    assert "NORM_GEMM_FP32_MIN_MACS" not in without  # an older tune.json: no fp32 measurements, no decision


def test_current_thresholds_stay_when_they_fit_or_the_gain_is_noise():
    wins = lambda d_out, d_in, r: d_in * r >= 4 << 20 or d_out * d_in * r >= 1 << 34  # noqa: E731
    got = _decisions({"norm": {"paths": _norm_samples(wins), "configs": _configs()}}, _current())
    assert got["NORM_GEMM_MIN_DIN_RANK"].derived == 4 << 20 and got["NORM_GEMM_MIN_MACS"].derived == 1 << 34
    # a rule that is wrong on one shape by 0.1% of the total stays: that is measurement noise
    samples = _norm_samples(wins)
    samples[0]["alt_ms"] = samples[0]["base_ms"] - 1e-5
    got = _decisions({"norm": {"paths": samples, "configs": _configs()}}, _current())
    assert got["NORM_GEMM_MIN_DIN_RANK"].derived == 4 << 20 and got["NORM_GEMM_MIN_MACS"].derived == 1 << 34


def test_fused_backward_thresholds_are_an_and_rule():
    """Fused wins from 2048 columns and 2**18 elements on: both conditions are needed."""
    samples = []
    for rows in tune.COMPOSE_ROWS:
        for cols in tune.COMPOSE_COLS:
            fused_wins = cols >= 2048 and rows * cols >= 1 << 18
            samples.append({"rows": rows, "cols": cols, "base_ms": 0.05, "alt_ms": 0.03 if fused_wins else 0.08})
    measurements = {"compose": {"fused_backward": samples, "programs_per_sm": {4: 3.0, 8: 2.0, 16: 2.5, 32: 4.0}}}
    got = _decisions(measurements, _current(FUSED_BACKWARD_MIN_COLS=1, FUSED_BACKWARD_MIN_ELEMENTS=1))
    tc, te = got["FUSED_BACKWARD_MIN_COLS"].derived, got["FUSED_BACKWARD_MIN_ELEMENTS"].derived
    for s in samples:
        assert (s["cols"] >= tc and s["rows"] * s["cols"] >= te) == (s["alt_ms"] < s["base_ms"]), (s, tc, te)
    assert got["BACKWARD_PROGRAMS_PER_SM"].derived == 8


def test_fold_limit_is_the_largest_measured_count_the_fold_wins():
    samples = [{"rows": r, "base_ms": 0.1, "alt_ms": 0.05 if r <= 128 else 0.2} for r in tune.FOLD_ROWS]
    got = _decisions({"fold": samples}, _current(INFERENCE_FOLD_MAX_ROWS=1024))
    assert got["INFERENCE_FOLD_MAX_ROWS"].derived == 128
    got = _decisions({"fold": samples}, _current(INFERENCE_FOLD_MAX_ROWS=200))  # between measured counts
    assert got["INFERENCE_FOLD_MAX_ROWS"].derived == 200  # fits every measurement: kept


def test_config_choices_take_the_fastest_total_unless_within_noise():
    split = {8: 10.0, 16: 9.0, 32: 8.0, 64: 8.1, 128: 9.5}  # 32 is 1.2% faster than the current 64: noise
    loop = {(4, 32, 3): 5.0, (4, 32, 4): 5.0, (4, 64, 2): 4.0, (8, 32, 3): 6.0, (8, 64, 2): 5.5}
    norm = {"paths": _norm_samples(lambda *s: True), "configs": _configs(split=split, loop=loop)}
    got = _decisions({"norm": norm}, _current())
    assert got["SPLIT_MIN_STEPS"].derived == 64
    assert got["GEMM_PATH_LOOP"].derived == (4, 64, 2)
    assert got["GRAM_SHARE"].derived == 4  # all equal: the current value


def test_derive_reads_its_own_json(tmp_path):
    """tune.json stores candidate values as strings (JSON keys); derive gives the same answers from it."""
    loop = {(4, 32, 3): 5.0, (4, 32, 4): 5.0, (4, 64, 2): 4.0, (8, 32, 3): 6.0, (8, 64, 2): 5.5}
    measurements = {
        "norm": {"paths": _norm_samples(lambda *s: False), "configs": _configs(loop=loop)},
        "compose": {
            "fused_backward": [{"rows": 8, "cols": 512, "base_ms": 1.0, "alt_ms": 2.0}],
            "programs_per_sm": {4: 1.0, 8: 2.0},
        },
        "fold": [{"rows": 1, "base_ms": 1.0, "alt_ms": 0.5}],
    }
    direct = tune.derive(measurements, _current())
    reread = tune.derive(json.loads(json.dumps(tune.jsonable(measurements))), _current())
    assert [(d.name, d.derived) for d in reread] == [(d.name, d.derived) for d in direct]
    assert dict((d.name, d.derived) for d in direct)["GEMM_PATH_LOOP"] == (4, 64, 2)


def test_the_command_prints_current_and_derived_values_and_saves_them(tmp_path, monkeypatch, capsys):
    samples = [{"rows": r, "base_ms": 0.1, "alt_ms": 0.05 if r <= 64 else 0.2} for r in tune.FOLD_ROWS]
    monkeypatch.setenv("OUT", str(tmp_path))
    assert tune.run(["fold"], quick=False, measure_fn=lambda parts, quick: {"fold": samples}) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("INFERENCE_FOLD_MAX_ROWS"))
    assert "256" in line and "64" in line and "<- change" in line  # the code's value, then the derived one
    saved = json.loads((tmp_path / "tune.json").read_text())
    assert saved["decisions"][0]["derived"] == 64 and saved["measurements"]["fold"] == samples


def test_unknown_part_is_a_clear_error(capsys):
    from benchmarks.__main__ import main

    assert main(["tune", "--only", "norm,kernels"]) == 2
    assert "--only takes a comma list of norm, compose, fold" in capsys.readouterr().err


@pytest.mark.parametrize("values", [[3, 5], [100, 4096], [1 << 20]])
def test_threshold_candidates_cover_the_measured_range(values):
    cands = tune.powers_of_two_around(values)
    assert cands[0] <= min(values) / 2 and cands[-1] >= max(values)
