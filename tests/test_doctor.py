"""``python -m dorafactors`` (dorafactors/doctor/): versions, settings and per-layer paths, on the CPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import transformers
import triton
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import dorafactors
from dorafactors import doctor
from dorafactors.dispatch import config, rules
from dorafactors.norm import engine

ROOT = Path(__file__).resolve().parents[1]


def _names(model: torch.nn.Module) -> list[str]:
    return [
        name
        for name, module in model.named_modules()
        if isinstance(getattr(module, "lora_magnitude_vector", None), torch.nn.ModuleDict)
        and len(module.lora_magnitude_vector)
    ]


def _tiny_reference_names() -> list[str]:
    """The DoRA layers of the built-in tiny model, built here independently of the doctor."""
    with torch.device("meta"):
        base = LlamaForCausalLM(doctor._tiny_config())
    model = get_peft_model(base, LoraConfig(r=4, use_dora=True, target_modules=list(doctor._TINY_TARGETS)))
    return _names(model)


def test_cli_prints_versions_settings_and_every_layer():
    env = dict(os.environ, PEFT_DORA_NORM_CHUNK_MB="64", PEFT_DORA_FUSSED="1")
    env.pop("PEFT_DORA_NORM_CACHE", None)
    run = subprocess.run(
        [sys.executable, "-m", "dorafactors"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    out = run.stdout
    lines = out.splitlines()

    def row(first: str) -> str:
        found = [line for line in lines if line.split() and line.split()[0] == first]
        assert found, f"no line for {first}:\n{out}"
        return found[0]

    assert row("torch").split()[1] == torch.__version__
    assert row("peft").split()[1] == peft.__version__
    assert row("transformers").split()[1] == transformers.__version__
    assert row("triton").split()[1] == triton.__version__
    assert row("dorafactors").split()[1] == dorafactors.__version__
    assert row("python").split()[1] == ".".join(map(str, sys.version_info[:3]))
    chunk = row("PEFT_DORA_NORM_CHUNK_MB").split()
    assert chunk[1:4] == ["64", "(='64')", "environment"]
    assert row("PEFT_DORA_NORM_CACHE").split()[1:3] == ["on", "default"]
    assert row("PEFT_DORA_FUSSED").split()[1:3] == ["ignored", "unknown"]  # the typo is flagged
    assert "PEFT patched in this process: no" in out
    for name in _tiny_reference_names():
        assert row(name).split()[1] == "Linear"
    assert f"{len(_tiny_reference_names())} DoRA layers." in out


def test_report_in_process_matches_imported_modules_and_environment(monkeypatch):
    monkeypatch.setenv("PEFT_FORCE_GATHER", "0")
    info = doctor.report(None)
    assert "model" not in info
    v = info["versions"]
    assert (v["torch"], v["peft"], v["transformers"], v["triton"]) == (
        torch.__version__,
        peft.__version__,
        transformers.__version__,
        triton.__version__,
    )
    assert v["dorafactors"] == dorafactors.__version__
    assert v["cuda_available"] is torch.cuda.is_available()
    rows = {row["name"]: row for row in info["environment"]}
    assert rows["PEFT_FORCE_GATHER"]["source"] == "environment"
    assert rows["PEFT_FORCE_GATHER"]["value"] == "off"
    assert rows["PEFT_DORA_FUSED"]["source"] == "default" and rows["PEFT_DORA_FUSED"]["value"] == "auto"
    assert info["peft"]["ok"] and info["peft"]["patched"] is False
    dorafactors.patch()
    assert doctor.report(None)["peft"]["patched"] is True


def test_a_malformed_value_is_reported_not_raised(monkeypatch, capsys):
    monkeypatch.setenv("PEFT_DORA_FUSED", "maybe")
    assert doctor.main(["--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    bad = next(row for row in info["environment"] if row["name"] == "PEFT_DORA_FUSED")
    assert bad["value"] == "INVALID" and bad["source"] == "environment"
    assert "PEFT_DORA_FUSED='maybe'" in bad["error"] and "1/true/yes/on" in bad["error"]
    assert "PEFT_DORA_FUSED='maybe'" in info["model"]["error"]
    assert doctor.main([]) == 0
    text = capsys.readouterr().out
    assert "ERROR PEFT_DORA_FUSED: PEFT_DORA_FUSED='maybe' is not a valid value" in text
    assert "cannot evaluate the model" in text


def test_every_variable_config_reads_is_listed():
    source = Path(config.__file__).read_text()
    read = set(re.findall(r'"((?:PEFT|DORA|DS|TRITON)_[A-Z_]+)"', source))
    listed = {row["name"] for row in doctor.environment()}
    assert read and read <= listed, read - listed


def test_local_model_folder_every_dora_layer(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    info = doctor.report(str(tmp_path / "base"), rank=4, device="cpu")
    section = info["model"]
    assert "error" not in section, section
    with torch.device("meta"):
        reference = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, use_dora=True, target_modules="all-linear"))
    expected = _names(reference)
    assert len(expected) == 14
    assert [layer["layer"] for layer in section["layers"]] == expected
    assert {layer["dtypes"]["weight"] for layer in section["layers"]} == {"bfloat16"}  # the saved dtype
    down = next(layer for layer in section["layers"] if layer["layer"].endswith("layers.1.mlp.down_proj"))
    assert down["shape"] == [32, 48, 4] and down["implementation"] == "dorafactors"


def _live_model(dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    ).to(torch.bfloat16)
    targets = ["q_proj", "down_proj", "embed_tokens"]
    lora = LoraConfig(r=4, use_dora=True, target_modules=targets, init_lora_weights=False, lora_dropout=dropout)
    with dorafactors.patched():
        return get_peft_model(base, lora)


@pytest.mark.parametrize("fused", [None, "0", "1"])
def test_live_model_paths_are_the_paths_taken(monkeypatch, fused):
    """The doctor's stand-ins reach the decisions the real tensors reach; the fold it promises happens."""
    if fused is not None:
        monkeypatch.setenv("PEFT_DORA_FUSED", fused)
    config.invalidate_cache()
    model = _live_model()
    section = doctor.report(model)["model"]
    rows = {layer["layer"]: layer for layer in section["layers"]}
    assert list(rows) == _names(model)
    for name, module in model.named_modules():
        if name not in rows:
            continue
        dora = module.lora_magnitude_vector["default"]
        if rows[name]["kind"] == "Embedding":
            w, a, b = dora._norm_factors(
                module.base_layer.weight, module.lora_embedding_A["default"], module.lora_embedding_B["default"]
            )
        else:
            w, a, b = dora._norm_factors(
                module.base_layer.weight, module.lora_A["default"].weight, module.lora_B["default"].weight
            )
        assert rows[name]["norm"]["value"] == engine.norm_path(w, a, b), name
    q = next(layer for name, layer in rows.items() if name.endswith("q_proj"))
    expected_norm = {None: "torch", "0": "torch", "1": "triton"}[fused]  # TRITON_INTERPRET=1 on CPU (conftest)
    if torch.cuda.is_available() and fused is None:
        expected_norm = q["norm"]["value"]  # GPUs: triton or gemm by size, checked against norm_path above
    assert q["norm"]["value"] == expected_norm
    assert q["compose_inference"]["value"] == ("triton" if fused == "1" else "torch")
    assert ("PEFT_DORA_FUSED=0" in q["norm"]["reason"]) is (fused == "0")
    assert q["decode_fold"]["value"] == ("no" if fused == "1" else "yes")
    # run one decode-sized no-grad call: layers promised the fold fill their fold cache, the others do not
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[3]]))
    for name, module in model.named_modules():
        if name in rows and rows[name]["kind"] == "Linear":
            folded = "_df_fold_cache_obj" in module.lora_magnitude_vector["default"].__dict__  # created by a fold
            assert folded is (rows[name]["decode_fold"]["value"] == "yes"), name


def test_dropout_and_cache_off_are_explained(monkeypatch):
    monkeypatch.setenv("PEFT_DORA_NORM_CACHE", "0")
    config.invalidate_cache()
    layers = doctor.report(_live_model(dropout=0.1))["model"]["layers"]
    q = next(layer for layer in layers if layer["layer"].endswith("q_proj"))
    assert q["norm_cache"] == {"value": "off", "reason": "PEFT_DORA_NORM_CACHE=0"}
    assert q["compose_training"]["value"] == "recompute-base"
    assert q["decode_fold"]["value"] == "no"
    emb = next(layer for layer in layers if layer["kind"] == "Embedding")
    assert emb["compose_inference"]["value"] == "n/a" and emb["decode_fold"]["value"] == "n/a"


def test_stock_layers_are_named_stock():
    torch.manual_seed(0)
    stock = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(8, 8)), LoraConfig(r=2, use_dora=True, target_modules=["0"])
    )
    info = doctor.report(stock)
    assert info["stock_dora_layers_alive"] >= 1
    (layer,) = info["model"]["layers"]
    assert layer["implementation"] == "stock PEFT" and "patch(model)" in layer["norm"]["reason"]
    assert "stock PEFT DoRA layers alive in this process" in doctor.format_report(info)


@pytest.mark.gpu
def test_gpu_decisions_take_the_kernels_and_match_live_tensors():
    section = doctor.report(doctor.TINY_MODEL, dtype="bfloat16", device="cuda")["model"]
    assert "error" not in section, section
    for layer in section["layers"]:
        assert layer["norm"]["value"] in ("triton", "gemm"), layer
        assert layer["compose_inference"]["value"] == "triton", layer
        assert layer["decode_fold"]["value"] == "yes", layer
        # the training compose follows the size rule of dispatch/rules.py at the report's 4096 tokens
        d_out = layer["shape"][0]
        expected = d_out >= rules.FUSED_BACKWARD_MIN_COLS and 4096 * d_out >= rules.FUSED_BACKWARD_MIN_ELEMENTS
        assert (layer["compose_training"]["value"] == "triton") is expected, layer
    model = _live_model().cuda()
    rows = {layer["layer"]: layer for layer in doctor.report(model)["model"]["layers"]}
    for name, module in model.named_modules():
        if name in rows and rows[name]["kind"] == "Linear":
            dora = module.lora_magnitude_vector["default"]
            w, a, b = dora._norm_factors(
                module.base_layer.weight, module.lora_A["default"].weight, module.lora_B["default"].weight
            )
            assert rows[name]["norm"]["value"] == engine.norm_path(w, a, b), name


def test_cli_target_modules_select_the_layers(capsys):
    assert doctor.main(["--target-modules", "q_proj, v_proj", "--rank", "4", "--json"]) == 0
    layers = json.loads(capsys.readouterr().out)["model"]["layers"]
    assert [layer["layer"].rsplit(".", 1)[1] for layer in layers] == ["q_proj", "v_proj"] * 2
    assert {layer["shape"][2] for layer in layers} == {4}
