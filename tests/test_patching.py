"""patch / unpatch / patched: identity restore, idempotence, nesting, exceptions, threads, conversion."""

from __future__ import annotations

import builtins
import copy
import gc
import threading
import warnings

import peft
import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners import tuners_utils
from peft.tuners.lora import dora as peft_dora
from peft.tuners.lora import layer as peft_layer
from peft.tuners.lora import variants
from torch import nn

import dorafactors
from dorafactors import layers, patching

NAMES = ("DoraLinearLayer", "DoraEmbeddingLayer", "DoraConv1dLayer", "DoraConv2dLayer", "DoraConv3dLayer")


def _snapshot():
    objs = {(ns.__name__, n): getattr(ns, n) for ns in (variants, peft_dora) for n in NAMES}
    objs.update(
        {(ns.__name__, "check_adapters_to_merge"): ns.check_adapters_to_merge for ns in (tuners_utils, peft_layer)}
    )
    objs.update(
        {(cls.__name__, "unmerge"): cls.__dict__["unmerge"] for cls in (peft_layer.Linear, peft_layer.Embedding)}
    )
    objs[variants.__name__, "DoraLinearVariant"] = variants.DoraLinearVariant
    return objs


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 6)
        self.emb = nn.Embedding(10, 4)
        self.conv = nn.Conv2d(3, 5, 3)

    def forward(self, x):
        return self.lin(x)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return get_peft_model(
        Net(), LoraConfig(r=2, target_modules=["lin", "emb", "conv"], use_dora=True, init_lora_weights=False)
    )


def _dora_types(model):
    return [
        type(m)
        for mod in model.modules()
        if hasattr(mod, "lora_magnitude_vector")
        for m in mod.lora_magnitude_vector.values()
    ]


def test_patch_rebinds_and_unpatch_restores_identity():
    before = _snapshot()
    dorafactors.patch()
    assert dorafactors.is_patched()
    for name in NAMES:
        assert getattr(variants, name) is getattr(layers, name)
        assert getattr(peft_dora, name) is getattr(layers, name)
        assert issubclass(getattr(layers, name), before[("peft.tuners.lora.dora", name)])
    dorafactors.unpatch()
    assert not dorafactors.is_patched()
    after = _snapshot()
    assert all(after[k] is v for k, v in before.items())


def test_only_peft_names_are_touched():
    import torch.nn.functional as F

    torch_objs = (F.linear, F.conv2d, F.embedding, torch.linalg.norm, nn.Linear.forward)
    dorafactors.patch()
    for namespace, _attr, _original in patching._applied:
        # PEFT modules, and PEFT's LoRA layer classes (their unmerge)
        owner = namespace.__module__ if isinstance(namespace, type) else namespace.__name__
        assert owner.startswith("peft."), namespace
    assert (F.linear, F.conv2d, F.embedding, torch.linalg.norm, nn.Linear.forward) == torch_objs


def test_idempotent():
    before = _snapshot()
    dorafactors.patch()
    applied = list(patching._applied)
    dorafactors.patch()
    dorafactors.patch()
    assert patching._applied == applied  # nothing wrapped twice
    dorafactors.unpatch()
    assert all(_snapshot()[k] is v for k, v in before.items())
    dorafactors.unpatch()  # unpatching twice is harmless


def test_layers_built_while_patched_are_ours_and_subclass_stock():
    stock_types = set(_dora_types(_model()))
    with dorafactors.patched():
        model = _model()
    ours = _dora_types(model)
    assert {t.__module__.split(".")[0] for t in ours} == {"dorafactors"}
    assert all(any(issubclass(t, s) for s in stock_types) for t in ours)
    assert not dorafactors.is_patched()
    # still ours after the block: that is what `with patched(): get_peft_model(...)` is for
    assert _dora_types(model) == ours


def test_nesting_and_explicit_patch():
    before = _snapshot()
    with dorafactors.patched():
        with dorafactors.patched():
            assert dorafactors.is_patched()
        assert dorafactors.is_patched()  # inner exit keeps the outer scope
    assert not dorafactors.is_patched()
    dorafactors.patch()
    with dorafactors.patched():
        pass
    assert dorafactors.is_patched()  # explicit patch() outlives scopes
    dorafactors.unpatch()
    assert all(_snapshot()[k] is v for k, v in before.items())


def test_restores_on_exception():
    before = _snapshot()
    with pytest.raises(RuntimeError, match="boom"), dorafactors.patched():
        raise RuntimeError("boom")
    assert not dorafactors.is_patched()
    assert all(_snapshot()[k] is v for k, v in before.items())


def test_thread_safety():
    before = _snapshot()
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker():
        try:
            barrier.wait()
            for _ in range(20):
                with dorafactors.patched():
                    assert dorafactors.is_patched()
                    assert variants.DoraLinearLayer is layers.DoraLinearLayer
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert not dorafactors.is_patched()
    assert len(patching._applied) == 0
    assert all(_snapshot()[k] is v for k, v in before.items())


def test_convert_built_model_and_revert():
    model = _model()
    stock_types = _dora_types(model)
    x = torch.randn(3, 8)
    expected = model(x)
    dorafactors.patch(model)
    assert all(t.__module__.startswith("dorafactors.") for t in _dora_types(model))
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    dorafactors.unpatch()
    assert _dora_types(model) == stock_types
    for mod in model.modules():
        for layer in getattr(mod, "lora_magnitude_vector", {}).values():
            assert "_df_norm_cache_obj" not in layer.__dict__
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_scoped_conversion_is_reverted_on_exit():
    model = _model()
    stock_types = _dora_types(model)
    with dorafactors.patched(model):
        assert all(t.__module__.startswith("dorafactors.") for t in _dora_types(model))
    assert _dora_types(model) == stock_types


def test_peft_older_than_supported_raises(monkeypatch):
    for version in ("0.17.1", "0.17.0", "0.9.0"):
        monkeypatch.setattr(peft, "__version__", version)
        with pytest.raises(
            ImportError,
            match=r"needs peft>=0\.18\.0 \(tested: 0\.18\.x to 0\.21\.x\); peft " + version.replace(".", r"\."),
        ):
            dorafactors.patch()
        assert not dorafactors.is_patched()
    monkeypatch.setattr(peft, "__version__", "0.18.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error", patching.UntestedPeftWarning)
        dorafactors.patch()  # inside the tested range: no warning
    assert dorafactors.is_patched()


def test_peft_newer_than_tested_warns_once_and_patches(monkeypatch):
    monkeypatch.setattr(patching, "_warned_peft_versions", set())
    for version in ("0.22.0", "0.22.0.dev0", "1.0.0"):
        dorafactors.unpatch()
        monkeypatch.setattr(peft, "__version__", version)
        with pytest.warns(
            patching.UntestedPeftWarning,
            match=r"tested with peft 0\.18\.x to 0\.21\.x; peft " + version.replace(".", r"\."),
        ) as caught:
            dorafactors.patch()
        assert "python -m dorafactors" in str(caught[0].message)
        assert dorafactors.is_patched()
        with warnings.catch_warnings():
            warnings.simplefilter("error", patching.UntestedPeftWarning)
            dorafactors.patch()  # once per version and process


def _failing_peft_import(monkeypatch, error: ImportError) -> None:
    """Make ``import peft`` raise ``error``, as it does when its own imports fail."""
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "peft":
            raise error
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_missing_transformers_is_named(monkeypatch):
    _failing_peft_import(monkeypatch, ModuleNotFoundError("No module named 'transformers'", name="transformers"))
    with pytest.raises(ImportError) as info:
        dorafactors.patch()
    message = str(info.value)
    assert f"peft {peft.__version__} is installed but cannot be imported" in message
    assert "'transformers' it needs is missing" in message and "pip install 'transformers>=4.57'" in message
    assert "needs PEFT" not in message
    assert not dorafactors.is_patched()


def test_incompatible_transformers_is_named(monkeypatch):
    import transformers

    error = ImportError("cannot import name 'EncoderDecoderCache' from 'transformers'", name="transformers")
    _failing_peft_import(monkeypatch, error)
    with pytest.raises(ImportError) as info:
        dorafactors.patch()
    message = str(info.value)
    assert "cannot import name 'EncoderDecoderCache'" in message
    assert f"installed: transformers {transformers.__version__}" in message and "too old or too new" in message


def test_missing_peft_is_named(monkeypatch):
    _failing_peft_import(monkeypatch, ModuleNotFoundError("No module named 'peft'", name="peft"))
    real = patching._distribution_version
    monkeypatch.setattr(patching, "_distribution_version", lambda name: None if name == "peft" else real(name))
    with pytest.raises(
        ImportError, match=r"dorafactors needs PEFT, which is not installed: pip install 'peft>=0\.18\.0'"
    ):
        dorafactors.patch()


def test_patch_warns_about_stock_layers_built_before_it():
    gc.collect()
    stock = _model()
    stock_layers = [m for mod in stock.modules() for m in getattr(mod, "lora_magnitude_vector", {}).values()]
    assert len(stock_layers) == 3
    with pytest.warns(patching.StockDoraLayersWarning, match=r"DoRA layer\(s\).*dorafactors\.patch\(model\)"):
        dorafactors.patch()
    alive = patching.live_stock_dora_layers()
    assert all(any(layer is found for found in alive) for layer in stock_layers)
    del alive
    dorafactors.patch(stock)  # converting the model leaves none of its layers stock
    alive = patching.live_stock_dora_layers()
    assert not any(layer is found for found in alive for layer in stock_layers)


def test_patch_before_get_peft_model_does_not_warn():
    gc.collect()
    if patching.live_stock_dora_layers():
        pytest.skip("stock DoRA layers of other tests are still alive")
    with warnings.catch_warnings():
        warnings.simplefilter("error", patching.StockDoraLayersWarning)
        dorafactors.patch()
        _model()


def test_state_dict_keys_identical_and_no_extra_parameters():
    stock = _model()
    with dorafactors.patched():
        ours = _model()
    assert list(stock.state_dict().keys()) == list(ours.state_dict().keys())
    assert [n for n, _ in stock.named_parameters()] == [n for n, _ in ours.named_parameters()]
    for mod in ours.modules():
        for layer in getattr(mod, "lora_magnitude_vector", {}).values():
            assert not list(layer.children()) and [n for n, _ in layer.named_parameters()] == ["weight"]
            assert not list(layer.buffers())


def test_repr_and_pickle_and_deepcopy():
    with dorafactors.patched():
        model = _model()
    model(torch.randn(2, 8))  # fill the norm caches
    assert "lora.dora." in repr(model)
    clone = copy.deepcopy(model)
    torch.testing.assert_close(clone(torch.ones(2, 8)), model(torch.ones(2, 8)))
    import io

    buffer = io.BytesIO()
    torch.save(model, buffer)  # whole-module pickling must not trip over weak references
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(torch.ones(2, 8)), model(torch.ones(2, 8)))


def test_public_functional_api():
    """The functional pieces exported at the top level compute what docs/api.md says, against fp64 formulas."""
    gen = torch.Generator().manual_seed(3)
    weight, lora_A, lora_B = (torch.randn(*s, generator=gen) for s in ((12, 20), (4, 20), (12, 4)))
    truth = (weight.double() + 0.7 * lora_B.double() @ lora_A.double()).norm(dim=1)
    norm = dorafactors.weight_norm(weight, lora_A, lora_B, 0.7)
    assert norm.dtype == torch.float32 and norm.shape == (12,) and not norm.requires_grad
    torch.testing.assert_close(norm.double(), truth, rtol=1e-6, atol=0)
    assert dorafactors.norm_path(weight, lora_A, lora_B) == "torch"  # CPU tensors, no PEFT_DORA_FUSED=1
    assert dorafactors.norm_path(weight[:, :3], lora_A[:, :3], lora_B) == "dense"  # d_in <= r
    lora, base = torch.randn(5, 12, generator=gen), torch.randn(5, 12, generator=gen)
    scale = (1 + 0.2 * torch.randn(12, generator=gen)).requires_grad_(True)
    out = dorafactors.dora_compose(lora, base, scale, 0.7)
    expected = (scale.double() - 1) * base.double() + scale.double() * 0.7 * lora.double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-6)
    out.sum().backward()
    torch.testing.assert_close(scale.grad.double(), (base.double() + 0.7 * lora.double()).sum(0), rtol=1e-6, atol=1e-6)
