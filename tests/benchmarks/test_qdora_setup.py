"""The model suite's QDoRA setups on CPU: a bitsandbytes NF4 base built like a ``BitsAndBytesConfig`` load,
LoRA / stock / dorafactors over it, and rows that say ``skipped`` (never ``error``) without bitsandbytes."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from benchmarks import providers as P
from benchmarks.harness import ResultsFile, Settings, run_cases
from benchmarks.suites import model as model_suite

SPEC = P.ModelSpec(hidden=64, intermediate=160, heads=4, kv_heads=2, layers=1, vocab=128, seq=16)


def _qdora_cases(settings: Settings):
    return [c for c in model_suite.cases(settings) if c.name.startswith("qdora-")]


def test_qdora_rows_are_skipped_with_the_reason_without_bitsandbytes(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes raises ImportError
    settings = Settings.make(quick=True, device="cpu")
    cases = _qdora_cases(settings)
    assert {c.name for c in cases} >= {"qdora-nf4/train_fwd_bwd", "qdora-nf4/infer_prefill"}
    results = ResultsFile(tmp_path / "r.json")
    run_cases(cases, settings, results, progress=False, log=lambda _: None)
    assert results.rows and all(r["status"] == "skipped" for r in results.rows)
    assert all("bitsandbytes is not importable" in r["reason"] for r in results.rows)
    nf4 = next(r for r in results.rows if r["case"] == "qdora-nf4/train_fwd_bwd")
    assert nf4["params"]["base_dtype"] == "nf4 (bf16 compute)" and "NF4" in nf4["params"]["quantization"]


def test_nf4_base_is_what_a_bitsandbytes_config_load_builds():
    bnb = pytest.importorskip("bitsandbytes")
    dense = P.llama_base(SPEC, torch.device("cpu"), torch.bfloat16, seed=5)
    quantized = P.llama_base_quantized(SPEC, torch.device("cpu"), "nf4", seed=5)
    assert quantized.is_loaded_in_4bit
    linears = {n: m for n, m in dense.named_modules() if type(m) is nn.Linear}
    assert "lm_head" in linears and type(quantized.lm_head) is nn.Linear  # lm_head stays bf16
    for name, layer in linears.items():
        if name == "lm_head":
            continue
        q = quantized.get_submodule(name)
        assert isinstance(q, bnb.nn.Linear4bit), name
        assert q.compute_dtype == torch.bfloat16 and q.weight.quant_type == "nf4" and q.weight.compress_statistics
        w = P.dense_weight(q)
        packed, state = bnb.functional.quantize_4bit(
            layer.weight.data, blocksize=64, compress_statistics=True, quant_type="nf4"
        )
        assert torch.equal(w, bnb.functional.dequantize_4bit(packed, state)), name  # the same NF4 round trip
        assert not torch.equal(w, layer.weight), name


def test_qdora_nf4_cases_run_every_provider_on_the_4bit_base(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    settings = Settings.make(quick=True, device="cpu")
    cases = [c for c in _qdora_cases(settings) if c.name.startswith("qdora-nf4/")]
    results = ResultsFile(tmp_path / "r.json")
    run_cases(cases, settings, results, progress=False, log=lambda _: None)
    by = {(r["case"], r["provider"]): r for r in results.rows}
    assert set(by) == {
        *(("qdora-nf4/train_fwd_bwd", p) for p in P.BASE_PROVIDERS),
        *(("qdora-nf4/infer_prefill", p) for p in (*P.BASE_PROVIDERS, "dorafactors_cold")),
    }
    for (case, provider), row in by.items():
        assert row["status"] == "ok", (case, provider, row.get("error"))
        assert row["metrics"]["ms"] > 0
        assert row["impl"]["base_dtype"] == "nf4 (bfloat16 compute)"
        assert row["impl"]["adapter_dtype"] == "float32"
    assert by[("qdora-nf4/train_fwd_bwd", "stock")]["impl"]["dora_class"] == "peft.tuners.lora.dora.DoraLinearLayer"
    assert by[("qdora-nf4/train_fwd_bwd", "dorafactors")]["impl"]["dora_class"].startswith("dorafactors.")
    # training recomputes every norm on every call (the adapters are marked as written)
    df = by[("qdora-nf4/train_fwd_bwd", "dorafactors")]["impl"]
    assert df["df_norm_computations_per_call"] == df["lora_modules"]

    # the providers' models: PEFT's bnb LoRA layer over Linear4bit, same adapters, magnitude from the
    # dequantized rows (perturbed), stock and dorafactors agreeing on the same quantized base
    models = model_suite.model_set(settings, "qdora-nf4", model_suite.rank(settings))
    layers = {p: models[p].base_model.model.model.layers[0].mlp.down_proj for p in P.BASE_PROVIDERS}
    for p, layer in layers.items():
        assert isinstance(layer.get_base_layer(), bnb.nn.Linear4bit), p
        assert type(layer).__module__ == "peft.tuners.lora.bnb", (p, type(layer))
    mags = {p: layers[p].lora_magnitude_vector["default"].weight for p in ("stock", "dorafactors")}
    torch.testing.assert_close(mags["stock"], mags["dorafactors"], rtol=0, atol=0)
    rows = P.dense_weight(layers["stock"].get_base_layer()).float().norm(dim=1)
    assert mags["stock"].shape == rows.shape
    assert not torch.allclose(mags["stock"], rows) and torch.allclose(mags["stock"], rows, rtol=0.3)
    ids = torch.randint(0, SPEC.vocab, (1, model_suite.spec(settings).seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = {p: models[p](input_ids=ids, use_cache=False).logits.float() for p in P.BASE_PROVIDERS}
    torch.testing.assert_close(logits["dorafactors"], logits["stock"], rtol=2e-2, atol=2e-2)
    assert (logits["stock"] - logits["lora"]).abs().max() > 1e-3  # the magnitude matters: not LoRA's output
