"""Merged weights equal stock's; adapters saved patched load into stock PEFT and vice versa."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

import dorafactors
from tests._models import LayerCase, build_triplet, make_input
from tests._peft import MERGE_FIXED
from tests._tolerances import assert_dtype_close

CASES = [
    LayerCase(kind="linear", d_in=24, d_out=12, rank=4, scaling=1.7, adapters=2),
    LayerCase(kind="gpt2_conv1d", d_in=16, d_out=10, rank=3, scaling=-0.8),
    LayerCase(kind="embedding", d_in=30, d_out=8, rank=4, scaling=2.0, batch=(2, 5)),
    LayerCase(kind="conv1d", d_in=4, d_out=6, rank=2, scaling=0.5),
    LayerCase(kind="conv2d", d_in=3, d_out=5, rank=2, scaling=1.3, stride=2),
    LayerCase(kind="conv3d", d_in=2, d_out=4, rank=2, scaling=0.9),
]


def _base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.kind)
@pytest.mark.parametrize("safe_merge", [False, True], ids=["merge", "safe_merge"])
def test_merge_and_unload_matches_stock(case, dtype, safe_merge):
    stock, ours, _ = build_triplet(case, dtype)
    merged_s = copy.deepcopy(stock).merge_and_unload(safe_merge=safe_merge)
    merged_o = copy.deepcopy(ours).merge_and_unload(safe_merge=safe_merge)
    ws, wo = _base_weights(merged_s), _base_weights(merged_o)
    assert ws.keys() == wo.keys()
    for name in ws:
        assert_dtype_close(wo[name], ws[name], dtype, name=f"merged {name}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.kind)
def test_merge_unmerge_round_trip_and_forward(case):
    stock, ours, _ = build_triplet(case, torch.float32)
    x = make_input(case, torch.float32)
    ours.eval()
    stock.eval()
    before = ours(x)
    for model in (stock, ours):
        model.base_model.merge_adapter()
    assert_dtype_close(ours(x), stock(x), torch.float32, name="merged forward")
    if case.adapters == 1 or MERGE_FIXED:
        # Merging several DoRA adapters was wrong in PEFT < 0.21 (fixed upstream by PR #3609); the merge
        # code is PEFT's, so there ours equals stock (asserted above) but not the unmerged forward.
        assert_dtype_close(ours(x), before, torch.float32, name="merged forward vs unmerged")
    if case.kind == "gpt2_conv1d" and not MERGE_FIXED:
        # PEFT < 0.21 cannot unmerge DoRA on fan_in_fan_out layers (missing transpose, fixed upstream by
        # PR #3532): the unmerge code is PEFT's, so ours must fail exactly like stock.
        for model in (stock, ours):
            with pytest.raises(RuntimeError, match="must match the size"):
                model.base_model.unmerge_adapter()
        return
    for model in (stock, ours):
        model.base_model.unmerge_adapter()
    assert_dtype_close(
        _base_weights(ours)["base_model.model.target.base_layer.weight"],
        _base_weights(stock)["base_model.model.target.base_layer.weight"],
        torch.float32,
    )
    # after the unmerge the DoRA forward runs again: it must use the (slightly changed) restored W
    assert_dtype_close(ours(x), stock(x), torch.float32, name="forward after unmerge")


def _dora_modules(model) -> set[str]:
    return {
        type(m).__module__.split(".")[0]
        for mod in model.modules()
        for m in getattr(mod, "lora_magnitude_vector", {}).values()
    }


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.kind)
@pytest.mark.parametrize("direction", ["ours_to_stock", "stock_to_ours"])
def test_save_load_interop(tmp_path, case, direction):
    # scaling is not saved (it follows lora_alpha / r = 1): keep it at 1 so the reload is the same model
    case = LayerCase(**{**case.__dict__, "adapters": 1, "scaling": 1.0})
    stock, ours, _ = build_triplet(case, torch.float32)
    x = make_input(case, torch.float32)
    src = ours if direction == "ours_to_stock" else stock
    src.eval()
    expected = src(x)
    src.save_pretrained(tmp_path)
    fresh_base = copy.deepcopy(src).unload()  # the base model without any adapter
    if direction == "ours_to_stock":
        loaded = PeftModel.from_pretrained(fresh_base, tmp_path)
        assert _dora_modules(loaded) == {"peft"}
    else:
        with dorafactors.patched():
            loaded = PeftModel.from_pretrained(fresh_base, tmp_path)
        assert _dora_modules(loaded) == {"dorafactors"}
    loaded.eval()
    assert_dtype_close(loaded(x), expected, torch.float32, name=f"{direction} output")


class _TiedNet(torch.nn.Module):
    """An embedding and an output head that share one weight (``head.weight is emb.weight``), as a language
    model with ``tie_word_embeddings``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)
        self.head = torch.nn.Linear(8, 16, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(ids)))


def test_merging_a_plain_lora_adapter_into_a_tied_weight_refreshes_the_dora_norm():
    """DoRA on the head, a plain LoRA adapter on the embedding that shares its weight. PEFT merges and unmerges
    the plain adapter with ``weight.data += delta`` / ``-= delta``, which no version counter sees; the head's
    cached norm must follow both writes (it served the unmerged weight's norm after the merge, and the merged
    weight's after the unmerge)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = _TiedNet()
    dora = LoraConfig(r=2, lora_alpha=4, target_modules=["head"], use_dora=True, init_lora_weights=False)
    plain = LoraConfig(r=2, lora_alpha=4, target_modules=["emb"], init_lora_weights=False)
    stock = get_peft_model(copy.deepcopy(base), copy.deepcopy(dora))
    stock.add_adapter("plain", copy.deepcopy(plain))
    dorafactors.patch()
    ours = get_peft_model(copy.deepcopy(base), copy.deepcopy(dora))
    ours.add_adapter("plain", copy.deepcopy(plain))
    with torch.no_grad():
        for name, p in stock.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn_like(p))
    ours.load_state_dict(stock.state_dict())
    ids = torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(1))
    for model in (stock, ours):
        model.set_adapter("default")
        model.eval()
    with torch.no_grad():
        assert_dtype_close(ours(ids), stock(ids), torch.float32, name="before the merge")  # warms the cache
        for model in (stock, ours):  # the embedding's own merge: PEFT's model-level merge also visits the head
            model.base_model.model.emb.merge(adapter_names=["plain"])
        assert_dtype_close(ours(ids), stock(ids), torch.float32, name="plain adapter merged")
        for model in (stock, ours):
            model.base_model.model.emb.unmerge()
        assert_dtype_close(ours(ids), stock(ids), torch.float32, name="plain adapter unmerged")


def test_adding_an_olora_adapter_refreshes_the_norm_of_the_active_dora_adapter():
    """OLoRA initializes a new adapter by subtracting its ``B A`` from an fp32 base weight in place
    (``weight.data -= ...``, no version bump); the active DoRA adapter's cached norm and base sum of squares
    must follow (the sum of squares is not keyed by optimizer steps: it stayed stale through training)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 24))
    dora = LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], use_dora=True, init_lora_weights=False)
    olora = LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights="olora")
    stock = get_peft_model(copy.deepcopy(base), copy.deepcopy(dora))
    dorafactors.patch()
    ours = get_peft_model(copy.deepcopy(base), copy.deepcopy(dora))
    ours.load_state_dict(stock.state_dict())
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_dtype_close(ours(x), stock(x), torch.float32, name="before the second adapter")  # warms the caches
        for model in (stock, ours):
            model.add_adapter("second", copy.deepcopy(olora))  # active adapter: still "default"
        assert_dtype_close(ours(x), stock(x), torch.float32, name="after adding an OLoRA adapter")


def test_low_cpu_mem_usage_loading_matches_the_saved_model(tmp_path):
    """``PeftModel.from_pretrained(..., low_cpu_mem_usage=True)`` builds the adapters on the meta device and
    loads them by assignment; PEFT then moves them to the base layer's device. Our layers' norm store, made
    beside the meta magnitude, has no data to move: that raised ``Cannot copy out of meta tensor``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 5))
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], use_dora=True, init_lora_weights=False)
    with dorafactors.patched():
        saved = get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for name, p in saved.named_parameters():
            if "lora_magnitude" in name:
                p.mul_(1.0 + 0.3 * torch.rand_like(p))
    saved.save_pretrained(tmp_path)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = saved(x)
        with dorafactors.patched():
            loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, low_cpu_mem_usage=True)
        assert all(not p.is_meta for p in loaded.parameters())
        assert_dtype_close(loaded(x), want, torch.float32, name="loaded with low_cpu_mem_usage")
