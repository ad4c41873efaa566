"""The norm cache is never stale: random sequences of everything that can change a norm, checked after
every operation against a fresh recomputation (bitwise) and against stock PEFT (fp32 tolerance); and it is
actually used: one norm per optimizer step under gradient accumulation / checkpointing, none per decode step.
"""

from __future__ import annotations

import copy
import gc
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

import dorafactors
from tests._lifecycle import check_against_stock
from tests._models import TinyLM
from tests._peft import HAS_DORA_CACHING, MERGE_FIXED


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.lin = nn.Linear(12, 10)
        self.gpt = __import__("transformers").pytorch_utils.Conv1D(9, 10)
        self.conv = nn.Conv1d(9, 6, 3, padding=1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = torch.tanh(self.lin(h))
        h = self.gpt(h)
        return self.conv(h.transpose(1, 2)).transpose(1, 2)


TARGETS = ["emb", "lin", "gpt", "conv"]


def _config(r: int = 3) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, use_dora=True, init_lora_weights=False)


def _pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    base = Net()
    nn.init.normal_(base.gpt.weight, std=0.3)
    stock = get_peft_model(copy.deepcopy(base), _config())
    stock.add_adapter("other", _config(r=2))
    with torch.no_grad():
        for name, p in stock.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_(0, 0.2)
            elif "magnitude" in name:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    with dorafactors.patched():
        ours = get_peft_model(copy.deepcopy(base), _config())
        ours.add_adapter("other", _config(r=2))
    ours.load_state_dict(stock.state_dict())
    return stock, ours


def _lora_layers(model: nn.Module) -> list[LoraLayer]:
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _norm_inputs(module: LoraLayer, adapter: str):
    """The arguments the DoRA forward of ``module`` passes to ``_forward_norm`` (same tensors)."""
    if adapter in getattr(module, "lora_embedding_A", {}):
        a, b = module.lora_embedding_A[adapter], module.lora_embedding_B[adapter]
        return a, b, (a.T, b.T), False
    a, b = module.lora_A[adapter], module.lora_B[adapter]
    return a.weight, b.weight, (a, b), not isinstance(module.get_base_layer(), nn.Conv1d)


def _check_cache_not_stale(model: nn.Module) -> None:
    """For every active DoRA adapter: the norm the layer would use now == a recomputation from scratch."""
    for module in _lora_layers(model):
        if module.merged:
            continue
        for adapter in module.active_adapters:
            layer = module.lora_magnitude_vector[adapter]
            if hasattr(layer, "_folded_lora_B"):
                _check_fold_not_stale(module, layer, adapter)  # first: the norm check below clears all caches
            a, b, gather, dequantize = _norm_inputs(module, adapter)
            args = (module.get_base_layer(), a, b, module.scaling[adapter], adapter)
            served = layer._forward_norm(*args, gather_modules=gather, dequantize=dequantize)
            saved = (dict(layer._df_norm_cache._entries), dict(layer._df_sumsq_cache._entries))
            layer.clear_norm_cache()
            fresh = layer._forward_norm(*args, gather_modules=gather, dequantize=dequantize)
            assert torch.equal(served, fresh), f"stale norm in {type(layer).__name__}[{adapter}]"
            layer._df_norm_cache._entries, layer._df_sumsq_cache._entries = saved


def _check_fold_not_stale(module: LoraLayer, layer, adapter: str) -> None:
    """The folded ``(B', c, g - 1)`` the decode path would serve now == a fold built from scratch (bitwise)."""
    x = torch.zeros(1, module.in_features)
    args = (module.lora_A[adapter], module.lora_B[adapter], module.scaling[adapter], module.get_base_layer())
    with torch.no_grad():
        result = torch.zeros(1, module.out_features)
        served = layer._folded_lora_B(x, *args, result, adapter)
        if served is None:  # the path does not apply in this state (e.g. PEFT's DoRA caching is on)
            return
        layer._df_fold_cache.clear()
        fresh = layer._folded_lora_B(x, *args, result, adapter)
    for a, b in zip(served, fresh):
        assert (a is None and b is None) or torch.equal(a, b), f"stale fold in {type(layer).__name__}[{adapter}]"


def _check_outputs(stock: nn.Module, ours: nn.Module, ids: torch.Tensor) -> None:
    """Ours == stock in fp32 elementwise, or failing that (cancellation), as close to the fp64 truth (stock
    upcast) as the fp32 tolerance: ``tests._lifecycle.check_against_stock``."""
    with torch.no_grad():
        check_against_stock(
            ours(ids), stock(ids), torch.float32, "output vs stock", lambda: copy.deepcopy(stock).double()(ids)
        )


def _set_on_both(stock, ours, fn):
    for model in (stock, ours):
        fn(model)


OPS = (
    "forward",
    "backward",
    "step",
    "edit_A",
    "edit_B",
    "edit_magnitude",
    "edit_W",
    "load_state_dict",
    "load_state_dict_assign",
    "switch_adapter",
    "both_adapters",
    "set_scale",
    "scale_layer",
    "merge_unmerge",
    "train",
    "eval",
    "dtype_roundtrip",
    "data_edit_with_clear",
    "delete_and_readd",
)
if not MERGE_FIXED:  # the model has a Conv1D layer, which stock PEFT < 0.21 cannot unmerge
    OPS = tuple(op for op in OPS if op != "merge_unmerge")


@settings(max_examples=12)
@given(ops=st.lists(st.sampled_from(OPS), min_size=6, max_size=18), seed=st.integers(0, 100))
def test_random_op_sequences_never_serve_a_stale_norm(ops, seed):
    stock, ours = _pair()
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 20, (2, 5), generator=gen)
    fused = seed % 2 == 0  # fused optimizers write parameters without bumping their version counters
    opt_s = torch.optim.AdamW([p for p in stock.parameters() if p.requires_grad], lr=0.05, fused=fused)
    opt_o = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=0.05, fused=fused)
    for op in ops:
        noise = torch.Generator().manual_seed(zlib.crc32(op.encode()) % 1000 + seed)  # hash() varies per process
        if op == "forward":
            _set_on_both(stock, ours, lambda m: m(ids))
        elif op == "backward":
            _set_on_both(stock, ours, lambda m: m(ids).square().mean().backward())
        elif op == "step":
            opt_s.step()
            opt_o.step()
        elif op in ("edit_A", "edit_B", "edit_magnitude", "edit_W"):
            key = {"edit_A": "lora_A", "edit_B": "lora_B", "edit_magnitude": "magnitude", "edit_W": "base_layer"}[op]
            names = [n for n, _ in stock.named_parameters() if key in n or key.replace("lora_", "lora_embedding_") in n]
            name = names[int(torch.randint(0, len(names), (1,), generator=noise))]
            factor = 1.0 + 0.1 * torch.randn((), generator=noise).item()
            with torch.no_grad():
                for model in (stock, ours):
                    dict(model.named_parameters())[name].mul_(factor)
        elif op in ("load_state_dict", "load_state_dict_assign"):
            state = {k: v + 0.01 * torch.randn(v.shape, generator=noise) for k, v in stock.state_dict().items()}
            assign = op.endswith("assign")
            for model in (stock, ours):
                model.load_state_dict({k: v.clone() for k, v in state.items()}, assign=assign)
            opt_s = torch.optim.AdamW([p for p in stock.parameters() if p.requires_grad], lr=0.05)
            opt_o = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=0.05)
        elif op == "switch_adapter":
            target = "other" if stock.active_adapter == "default" else "default"
            _set_on_both(stock, ours, lambda m, target=target: m.set_adapter(target))
        elif op == "both_adapters":
            _set_on_both(stock, ours, lambda m: [layer.set_adapter(["default", "other"]) for layer in _lora_layers(m)])
        elif op == "set_scale":
            value = 0.5 + torch.rand((), generator=noise).item()
            _set_on_both(stock, ours, lambda m, v=value: [layer.set_scale("default", v) for layer in _lora_layers(m)])
        elif op == "scale_layer":
            _set_on_both(stock, ours, lambda m: [layer.scale_layer(1.3) for layer in _lora_layers(m)])
        elif op == "merge_unmerge":
            _set_on_both(stock, ours, lambda m: m.base_model.merge_adapter())
            _check_outputs(stock, ours, ids)
            _set_on_both(stock, ours, lambda m: m.base_model.unmerge_adapter())
        elif op == "train":
            _set_on_both(stock, ours, lambda m: m.train())
        elif op == "eval":
            _set_on_both(stock, ours, lambda m: m.eval())
        elif op == "dtype_roundtrip":
            _set_on_both(stock, ours, lambda m: m.double())
            _check_outputs(stock.float(), ours.float(), ids)  # compared back in fp32 (modules converted)
        elif op == "data_edit_with_clear":
            # A write PyTorch cannot see (through .data): the documented contract is clear_norm_caches().
            with torch.no_grad():
                for model in (stock, ours):
                    model.base_model.model.lin.base_layer.weight.data.mul_(1.05)
            dorafactors.clear_norm_caches(ours)
        elif op == "delete_and_readd":
            for model, build in ((stock, False), (ours, True)):
                model.set_adapter("default")
                model.delete_adapter("other")
                if build:
                    with dorafactors.patched():
                        model.add_adapter("other", _config(r=2))
                else:
                    model.add_adapter("other", _config(r=2))
            ours.load_state_dict(stock.state_dict())
            opt_s = torch.optim.AdamW([p for p in stock.parameters() if p.requires_grad], lr=0.05)
            opt_o = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=0.05)
        _check_cache_not_stale(ours)
        _check_outputs(stock, ours, ids)


def test_a_write_through_data_without_clear_is_the_documented_blind_spot():
    """Documents (and pins) the one channel a stamp cannot see, between two forwards that record no autograd;
    `clear_norm_caches` is the remedy."""
    stock, ours = _pair()
    ids = torch.randint(0, 20, (2, 5))
    with torch.no_grad():
        ours(ids)
    with torch.no_grad():
        for model in (stock, ours):
            model.base_model.model.lin.base_layer.weight.data.mul_(1.5)
    with pytest.raises(AssertionError):
        _check_outputs(stock, ours, ids)
    dorafactors.clear_norm_caches(ours)
    _check_outputs(stock, ours, ids)


@pytest.mark.skipif(not MERGE_FIXED, reason="stock PEFT < 0.21 cannot unmerge this model (Conv1D)")
def test_merge_hook_clears_the_cache_although_merge_writes_through_data():
    """Plain-LoRA merge/unmerge writes the base weight in place through .data (no version bump); the
    patched check_adapters_to_merge clears the DoRA caches of that module."""
    torch.manual_seed(0)
    base = Net()
    with dorafactors.patched():
        model = get_peft_model(copy.deepcopy(base), _config())
        model.add_adapter("plain", LoraConfig(r=2, target_modules=["lin"], init_lora_weights=False))
        stock = get_peft_model(copy.deepcopy(base), _config())
    dorafactors.patch()  # the hook is active while patched
    stock.add_adapter("plain", LoraConfig(r=2, target_modules=["lin"], init_lora_weights=False))
    dorafactors.unpatch()
    stock.load_state_dict(model.state_dict())
    ids = torch.randint(0, 20, (2, 5))
    dorafactors.patch()
    for m in (stock, model):
        m.eval()
        m(ids)
        m.base_model.model.lin.merge(adapter_names=["plain"])
        m.base_model.model.lin.base_layer.weight.data.add_(0.5)  # merged W edited while merged
        m.base_model.model.lin.unmerge()
    _check_outputs(stock, model, ids)


def _norm_count(model) -> int:
    return sum(
        layer.norm_computations for module in _lora_layers(model) for layer in module.lora_magnitude_vector.values()
    )


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("fused_optimizer", [False, True], ids=["foreach", "fused"])
def test_one_norm_per_optimizer_step_with_accumulation(checkpointing, fused_optimizer):
    torch.manual_seed(0)
    with dorafactors.patched():
        model = get_peft_model(
            TinyLM(), LoraConfig(r=4, target_modules=["q", "up", "down"], use_dora=True, init_lora_weights=False)
        )
    model.base_model.model.checkpointing = checkpointing
    layers = len(_lora_layers(model))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=fused_optimizer)
    model.train()
    for step in range(4):
        before = _norm_count(model)
        for micro in range(8):
            ids = torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(step * 8 + micro))
            (model(ids).logsumexp(-1).mean() / 8).backward()
        if step == 0:
            # before the optimizer's first step nothing says it, and not a hand-written update, will write the
            # adapters: every forward that records autograd computes the norm (the checkpoint's recompute too)
            assert _norm_count(model) - before == 8 * layers * (2 if checkpointing else 1)
        else:
            assert _norm_count(model) - before == layers  # one per DoRA layer per optimizer step
        opt.step()
        opt.zero_grad()


def test_an_optimizer_step_records_parameters_moved_since_it_was_built():
    """``model.double()`` with the optimizer already built (its parameters keep their objects, in new storage):
    the cycle after the move computes the norm per micro-batch (nothing has stepped the moved parameters yet),
    and from the next step on one norm per step again."""
    torch.manual_seed(0)
    with dorafactors.patched():
        model = get_peft_model(
            TinyLM(), LoraConfig(r=4, target_modules=["q", "up", "down"], use_dora=True, init_lora_weights=False)
        )
    layers = len(_lora_layers(model))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    counts = []
    for step in range(4):
        if step == 2:
            model.double()
        before = _norm_count(model)
        for micro in range(3):
            ids = torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(step * 3 + micro))
            model(ids).logsumexp(-1).mean().backward()
        counts.append(_norm_count(model) - before)
        opt.step()
        opt.zero_grad()
    assert counts == [3 * layers, layers, 3 * layers, layers]


def test_the_step_record_is_bounded_and_follows_copies_and_compiled_steps():
    """The optimizers' step record (``norm/cache.py``) forgets a parameter whose storage is freed; a deep copy's
    parameters are new ones, not recorded until an optimizer steps them; a compiled ``step()`` records too; a
    parameter whose optimizer is freed counts as stepped by none."""
    import gc

    from dorafactors.norm import cache

    cache.install_step_hook()
    p = nn.Parameter(torch.randn(3))
    optimizer = torch.optim.SGD([p], lr=0.0)
    optimizer.step()
    assert not cache.optimizer_untracked((p,))
    copied = copy.deepcopy(p)
    assert cache.optimizer_untracked((copied,))
    recorded = len(cache._stepped_params)
    del p, optimizer
    gc.collect()
    assert len(cache._stepped_params) == recorded - 1
    q = nn.Parameter(torch.randn(3))
    q.grad = torch.ones(3)
    torch._dynamo.reset()
    compiled = torch.optim.SGD([q], lr=0.1)
    torch.compile(compiled.step, backend="aot_eager")()
    assert not cache.optimizer_untracked((q,))
    del compiled  # nothing counts q's writes any more: a hand-written update may follow
    torch._dynamo.reset()  # (the compiled step's guards hold the optimizer)
    gc.collect()
    assert cache.optimizer_untracked((q,))


class _WritesWithoutABump(torch.optim.Optimizer):
    """Stands for a fused or raw-pointer optimizer: its step writes nothing PyTorch's version counters see."""

    def __init__(self, params) -> None:
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure=None):
        return None


@pytest.mark.parametrize("kind", ["sgd", "no-bump"])
def test_a_compiled_optimizer_step_compiles_once_and_still_counts_every_step(kind):
    """``torch.compile(optimizer.step)`` (PyTorch's compiled-optimizer recipe): the step post-hook runs outside
    Dynamo, so the compiled step does not recompile as the write epoch advances, and every step still advances
    it and bumps the version of each parameter it had a gradient for."""
    from dorafactors.norm import cache

    cache.install_step_hook()
    params = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3))]
    # stateless optimizers: no state tensors outlive the test (the soak test counts every live tensor)
    optimizer = torch.optim.SGD(params, lr=1e-2) if kind == "sgd" else _WritesWithoutABump(params)
    torch._dynamo.reset()
    step = torch.compile(optimizer.step, backend="aot_eager")

    def one_step() -> None:
        for p in params:
            p.grad = torch.ones_like(p)
        step()

    try:
        for _ in range(3):
            one_step()
        with torch.compiler.set_stance("fail_on_recompile"):
            for _ in range(4):
                epoch, versions = cache.write_epoch(), [p._version for p in params]
                one_step()
                assert cache.write_epoch() == epoch + 1
                assert all(p._version > v for p, v in zip(params, versions))
    finally:
        torch._dynamo.reset()


def test_no_norm_per_decode_step_after_the_first():
    torch.manual_seed(0)
    with dorafactors.patched():
        model = get_peft_model(
            TinyLM(), LoraConfig(r=4, target_modules=["q", "up", "down"], use_dora=True, init_lora_weights=False)
        )
    model.eval()
    ids = torch.randint(0, 32, (1, 4))
    with torch.no_grad():
        model(ids)
        first = _norm_count(model)
        for _ in range(16):
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    assert first == len(_lora_layers(model)) and _norm_count(model) == first


def test_cache_switch_off_recomputes_every_forward(monkeypatch):
    monkeypatch.setenv("PEFT_DORA_NORM_CACHE", "0")
    from dorafactors.dispatch import config

    config.invalidate_cache()
    torch.manual_seed(0)
    with dorafactors.patched():
        model = get_peft_model(TinyLM(), LoraConfig(r=4, target_modules=["q"], use_dora=True, init_lora_weights=False))
    model.eval()
    ids = torch.randint(0, 32, (1, 4))
    with torch.no_grad():
        for _ in range(3):
            model(ids)
    assert _norm_count(model) == 3 * len(_lora_layers(model))


@pytest.mark.skipif(not HAS_DORA_CACHING, reason="PEFT < 0.19 has no ENABLE_DORA_CACHING")
def test_pefts_enable_dora_caching_flag_keeps_its_observable_semantics():
    """_dora_cache filled in eval under the flag, cleared by a forward without it and by train()."""
    from peft.helpers import DoraCaching

    torch.manual_seed(0)
    with dorafactors.patched():
        model = get_peft_model(TinyLM(), LoraConfig(r=4, target_modules=["q"], use_dora=True, init_lora_weights=False))
    caches = [layer._dora_cache for m in _lora_layers(model) for layer in m.lora_magnitude_vector.values()]
    ids = torch.randint(0, 32, (1, 4))
    model(ids)
    assert caches and not any(caches)
    model.eval()
    with DoraCaching():
        model(ids)
        assert all(caches)
    model(ids)
    assert not any(caches)
    model.eval()
    with DoraCaching():
        model(ids)
    model.train()
    assert not any(caches)


def _stamp_set_changes():
    """``(name, change, seen)``: a change to a stamped tensor and whether its stamp must see it."""

    def write(t):
        with torch.no_grad():
            t.mul_(2.0)

    def swap_data(t):
        t.data = torch.randn_like(t)

    def same_storage_view(t):
        t.data = t.data.t()  # same storage, address and version: only the layout tells

    def dtype_view(t):
        t.data = t.data.view(torch.bfloat16)  # fp16 bits read as bf16: only the dtype tells

    def set_storage(t):
        with torch.no_grad():
            t.set_(torch.randn_like(t))

    def alias_storage(t):
        t.data = torch.from_dlpack(t.detach())  # another storage object over the same memory: only identity tells

    return [
        ("write", write, True),
        ("swap .data", swap_data, True),
        ("same-storage view", same_storage_view, True),
        ("dtype view", dtype_view, True),
        ("set_", set_storage, True),
        ("aliased storage", alias_storage, True),
        ("nothing", lambda t: None, False),
    ]


@pytest.mark.parametrize("kind", ["a view", "parameters", "plain tensors"])
@pytest.mark.parametrize("position", [0, 1, 2])
@pytest.mark.parametrize("case", range(7))
def test_a_stamp_set_sees_exactly_what_each_tensors_stamp_sees(kind, position, case):
    """``StampSet`` (the cache entries' flat stamps) against a ``TensorStamp`` per tensor: after every kind of
    change to one tensor (in place, ``.data`` swaps, same-storage layouts and dtypes, ``set_``) both answer
    alike, for ``matches`` and for ``same_layout`` (which ignores the version only), a change to a parameter is
    seen whichever position it holds, a transposed view follows its base's writes; another tensor object or a
    different count never matches. ``matches_in_layout`` answers as ``matches`` except for the changes only a
    layout tells (its caller's guards fix dtype, shape and strides: a compiled graph's), both in its loop (a
    set with a view) and in its column-wise check (no view: parameters, or plain tensors held weakly), which
    takes an aliased storage over the same memory for the stamped one."""
    from dorafactors.norm.cache import StampSet, TensorStamp

    name, change, seen = _stamp_set_changes()[case]
    plain = kind == "plain tensors"
    params = [
        torch.randn(4, 4, dtype=torch.float16) if plain else nn.Parameter(torch.randn(4, 4, dtype=torch.float16))
        for _ in range(3)
    ]
    with_view = kind == "a view"
    # a view is stamped through its base (PEFT's embedding .T)
    tensors = (params[0], params[1].T if with_view else params[1], params[2])
    stamps, each = StampSet(tensors), [TensorStamp(t) for t in tensors]
    assert stamps.matches(tensors) and all(s.matches(t) for s, t in zip(each, tensors))
    assert stamps.same_layout(tensors)
    change(params[position])
    expected = all(s.matches(t) for s, t in zip(each, tensors))
    assert stamps.matches(tensors) is expected, name
    same_layout = all(s.same_layout(t) for s, t in zip(each, tensors))
    assert stamps.same_layout(tensors) is same_layout, name
    layout_only = name in ("same-storage view", "dtype view")
    # the column-wise check watches the stamped storages rather than comparing them: another storage object over
    # the very same memory (still alive, same address, dtype and layout) holds the same values
    same_memory = name == "aliased storage" and not with_view
    assert stamps.matches_in_layout(tensors) is (expected or layout_only or same_memory), name
    assert (stamps._columns is None) is with_view  # the check that ran: the loop, or the columns
    if not with_view or position != 1 or name == "write":  # a .data swap of a base leaves its view where it was
        assert expected is not seen, name
        assert same_layout is (expected or name == "write"), name  # a write keeps the layout, nothing else
    for check in (stamps.matches, stamps.same_layout, stamps.matches_in_layout):
        assert not check(tensors[:2])
        assert not check((tensors[0].detach(), *tensors[1:]))


@pytest.mark.parametrize("plain", [False, True], ids=["parameters", "plain tensors"])
def test_the_column_wise_stamp_check_never_matches_once_a_stamped_storage_was_freed(plain):
    """``matches_in_layout``'s columns watch the stamped storages: once one is freed (its tensor moved to new
    memory by a ``.data`` swap, the old storage released), no later call matches, not even one that finds every
    id, version and address as stamped (new memory at the freed address, as a caching allocator hands out)."""
    from dorafactors.norm.cache import StampSet

    def make():
        t = torch.randn(4, 4)
        return t if plain else nn.Parameter(t)

    tensors = (make(), make(), make())
    stamps = StampSet(tensors)
    assert stamps.matches_in_layout(tensors)
    columns = stamps._columns
    assert columns is not None and not columns.freed[0]
    tensors[1].data = torch.randn(4, 4)  # the only reference to its old storage goes
    gc.collect()
    assert columns.freed[0], "freeing a stamped storage must be seen"
    columns.data_ptrs[1] = tensors[1].data_ptr()  # as if the new memory sat at the old address
    assert list(map(torch.Tensor.data_ptr, tensors)) == columns.data_ptrs
    assert [t._version for t in tensors] == columns.versions and list(map(id, tensors)) == columns.ids
    assert not stamps.matches_in_layout(tensors)


def test_a_pickled_or_copied_norm_cache_starts_empty_and_keeps_working():
    """A ``NormCache`` travels as an empty cache (weak references cannot): after ``pickle`` or ``copy.copy`` it
    stores, serves and counts its changes as a new one does."""
    import pickle

    from dorafactors.norm.cache import NormCache

    tensor = nn.Parameter(torch.randn(3, 4))
    cache = NormCache()
    cache.put("slot", 1, (tensor,), "value")
    for copied in (pickle.loads(pickle.dumps(cache)), copy.copy(cache), copy.deepcopy(cache)):
        assert len(copied) == 0 and copied.get("slot", 1, (tensor,)) is None
        changes = copied.changes
        copied.put("slot", 1, (tensor,), "value")
        assert copied.get("slot", 1, (tensor,)) == "value" and copied.peek("slot") == "value"
        assert copied.changes == changes + 1


def test_hit_serves_what_get_serves_and_leaves_a_failed_lookup_to_get():
    """``NormCache.hit`` (the decode fast path's lookup): a valid entry is served and counted as a hit, as by
    ``get``; a wrong signature, a changed tensor or an empty slot return None and leave the entry, the miss
    count and the change count alone, so the ``get`` that follows drops and counts exactly as without it."""
    from dorafactors.norm.cache import NormCache

    tensor = nn.Parameter(torch.randn(3, 4))
    cache = NormCache()
    assert cache.hit("slot", 1, (tensor,)) is None and (cache.hits, cache.misses, cache.changes) == (0, 0, 0)
    cache.put("slot", 1, (tensor,), "value")
    changes = cache.changes
    assert cache.hit("slot", 1, (tensor,)) == "value" and cache.hits == 1
    assert cache.hit("slot", 2, (tensor,)) is None  # another signature
    with torch.no_grad():
        tensor.mul_(2)
    assert cache.hit("slot", 1, (tensor,)) is None  # a write
    assert cache.hit("other", 1, (tensor,)) is None
    assert (len(cache), cache.hits, cache.misses, cache.changes) == (1, 1, 0, changes)
    assert cache.get("slot", 1, (tensor,)) is None  # the general path's lookup drops the stale entry
    assert (len(cache), cache.misses, cache.changes) == (0, 1, changes + 1)
