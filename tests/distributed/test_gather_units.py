"""Every branch of dorafactors.distributed with fakes: no DeepSpeed, no process group, no GPU needed.

The fakes mimic exactly the surface the helpers use: ZeRO-3 parameters carry ``ds_id`` / ``ds_status`` /
``ds_numel`` / ``ds_shape`` / ``ds_tensor`` and ``GatheredParameters`` swaps ``param.data``; FSDP1 units are
instances of the class the helper resolves and expose ``summon_full_params`` / ``training_state`` /
``_handle.needs_unshard()``; FSDP2 shards are instances of the resolved DTensor class with ``full_tensor()``.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import logging
import types
import weakref
from typing import ClassVar

import pytest
import torch
from torch import nn

import dorafactors
from dorafactors.dispatch import config
from dorafactors.distributed import deepspeed as dsm
from dorafactors.distributed import fsdp as fsdpm
from dorafactors.distributed import gather
from tests._lifecycle import stepped_by_an_optimizer
from tests._tolerances import TOLERANCES


class Status(enum.Enum):
    AVAILABLE = 1
    NOT_AVAILABLE = 2
    INFLIGHT = 3


_ids = itertools.count(1)


def make_zero(p: torch.Tensor, status: Status = Status.NOT_AVAILABLE, world: int = 2) -> torch.Tensor:
    """Turn ``p`` into a fake ZeRO-3 parameter; rank 0's partition is ``ds_tensor``, the full value stashed."""
    full = p.data.clone()
    part = -(-full.numel() // world)
    padded = torch.zeros(part * world, dtype=full.dtype)
    padded[: full.numel()] = full.reshape(-1)
    p.ds_id = next(_ids)
    p.ds_numel = full.numel()
    p.ds_shape = full.shape
    p.ds_status = status
    p.ds_process_group = "fake-group"
    p.ds_tensor = padded[:part].clone()
    p._fake_full = full
    p._fake_partitions = padded.view(world, part)
    if status is not Status.AVAILABLE:
        p.data = torch.empty(0, dtype=full.dtype)
    return p


class FakeGathered:
    """Stands in for ``deepspeed.zero.GatheredParameters``; records each call; can fail for chosen params."""

    calls: ClassVar[list[list[int]]] = []
    fail_for: ClassVar[set[int]] = set()

    def __init__(self, params, modifier_rank=None, fwd_module=None, enabled=True):
        self.params = list(params)
        self.modifier_rank = modifier_rank
        FakeGathered.calls.append([p.ds_id for p in self.params])
        if any(p.ds_id in FakeGathered.fail_for for p in self.params):
            raise RuntimeError("fake gather failure")

    def __enter__(self):
        for p in self.params:
            p.data = p._fake_full.clone()
            p.ds_status = Status.AVAILABLE

    def __exit__(self, *exc):
        for p in self.params:
            p.data = torch.empty(0, dtype=p._fake_full.dtype)
            p.ds_status = Status.NOT_AVAILABLE


@pytest.fixture
def fake_zero(monkeypatch):
    FakeGathered.calls = []
    FakeGathered.fail_for = set()
    monkeypatch.setattr(dsm, "_api", lambda: types.SimpleNamespace(GatheredParameters=FakeGathered))
    monkeypatch.setattr(gather, "_dist_initialized", lambda: True)
    monkeypatch.setattr(dsm, "_hf_zero3_enabled", lambda: False)
    return FakeGathered


def dora_linear(d_in=12, d_out=10, r=3, seed=0):
    """A patched PEFT DoRA Linear with random lora_B and a perturbed magnitude (never identity)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = nn.Sequential()
    base.add_module("lin", nn.Linear(d_in, d_out))
    with dorafactors.patched():
        model = get_peft_model(
            base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["lin"], use_dora=True, init_lora_weights=False)
        )
    layer = model.base_model.model.lin
    with torch.no_grad():
        mag = layer.lora_magnitude_vector["default"].weight
        mag.mul_(1 + 0.3 * torch.randn_like(mag))
    return layer


def dora_out(layer, x):
    """The DoRA module's extra output, given the base output computed from the full weight."""
    base_result = nn.functional.linear(x, layer.base_layer._ref_weight, layer.base_layer.bias_ref)
    return layer.lora_magnitude_vector["default"](
        x,
        lora_A=layer.lora_A["default"],
        lora_B=layer.lora_B["default"],
        scaling=layer.scaling["default"],
        base_layer=layer.base_layer,
        base_result=base_result,
    )


def _gathering_hooks(module: nn.Module) -> None:
    """Emulate DeepSpeed's module hooks: a module call gathers its own ZeRO-3 parameters."""

    def pre(mod, args):
        for p in mod.parameters(recurse=False):
            if hasattr(p, "ds_id") and p.ds_status is not Status.AVAILABLE:
                p.data = p._fake_full.clone()
                p.ds_status = Status.AVAILABLE
                p._hooked = True

    def post(mod, args, out):
        for p in mod.parameters(recurse=False):
            if getattr(p, "_hooked", False):
                p.data = torch.empty(0, dtype=p._fake_full.dtype)
                p.ds_status = Status.NOT_AVAILABLE
                p._hooked = False

    module.register_forward_pre_hook(pre)
    module.register_forward_hook(post)


# ============================================================================ no process group: the no-cost path
def test_no_process_group_returns_shared_noop_and_never_detects(monkeypatch):
    assert not torch.distributed.is_initialized()
    monkeypatch.setenv("PEFT_DORA_FUSED", "0")  # the torch path: no Triton interpreter needed here

    def boom(*a, **k):
        raise AssertionError("detection must not run without a process group")

    monkeypatch.setattr(dsm, "enter_gather", boom)
    monkeypatch.setattr(fsdpm, "enter_fsdp1_summon", boom)
    monkeypatch.setattr(fsdpm, "fsdp2_managed", boom)
    monkeypatch.setenv("PEFT_FORCE_GATHER", "1")  # even forced on: nothing can be sharded without a group
    layer = dora_linear()
    ctx = gather.gathered_for_norm(layer.base_layer, layer.lora_A["default"], layer.lora_B["default"])
    assert ctx is gather._NOOP
    with ctx as info:
        assert info is gather._NOT_SHARDED
        assert info.backend is None
        assert info.full(layer.lora_A["default"]) is layer.lora_A["default"].weight
    assert gather.norm_cache_allowed(info, (layer.base_layer.weight,)) == (True, "")
    # and the layer still runs (its forward and norm cache work exactly as without the helpers)
    layer.base_layer._ref_weight = layer.base_layer.weight
    layer.base_layer.bias_ref = layer.base_layer.bias
    x = torch.randn(4, 12)
    stepped_by_an_optimizer(layer)  # training forwards are served from the cache
    dora_out(layer, x)
    dora_out(layer, x)
    assert layer.lora_magnitude_vector["default"].norm_computations == 1  # cache hit on the second call


# ============================================================================ ZeRO-3 detection
@pytest.mark.parametrize(("value", "expected"), [("1", True), ("true", True), ("0", False), ("off", False)])
def test_force_gather_ternary_is_cached(monkeypatch, value, expected):
    monkeypatch.setattr(dsm, "_hf_zero3_enabled", lambda: not expected)
    monkeypatch.setenv("PEFT_FORCE_GATHER", value)
    monkeypatch.setenv("DS_ZERO_STAGE", "0" if expected else "3")  # the override wins over the env fast path
    assert dsm.zero3_active() is expected
    monkeypatch.setenv("PEFT_FORCE_GATHER", "0" if expected else "1")
    assert dsm.zero3_active() is expected  # cached: read once
    config.invalidate_cache()
    assert dsm.zero3_active() is (not expected)


def test_force_gather_rejects_garbage(monkeypatch):
    monkeypatch.setenv("PEFT_FORCE_GATHER", "maybe")
    with pytest.raises(ValueError, match="PEFT_FORCE_GATHER"):
        dsm.zero3_active()


def test_ds_zero_stage_env_fast_path_caches_true(monkeypatch):
    calls = []
    monkeypatch.setattr(dsm, "_hf_zero3_enabled", lambda: calls.append(1) or False)
    monkeypatch.setenv("DS_ZERO_STAGE", "3")
    assert dsm.zero3_active() is True
    assert calls == []  # fast path: no HF check
    monkeypatch.delenv("DS_ZERO_STAGE")
    assert dsm.zero3_active() is True  # a detected True is cached


def test_late_deepspeed_initialization_is_seen(monkeypatch):
    """Model -> PEFT wrap -> deepspeed.initialize: False is re-checked on every call until ZeRO-3 appears."""
    state = {"zero3": False, "calls": 0}

    def hf():
        state["calls"] += 1
        return state["zero3"]

    monkeypatch.setattr(dsm, "_hf_zero3_enabled", hf)
    assert dsm.zero3_active() is False
    assert dsm.zero3_active() is False
    assert state["calls"] == 2  # False is not cached
    state["zero3"] = True
    assert dsm.zero3_active() is True
    state["zero3"] = False
    assert dsm.zero3_active() is True  # True is cached
    assert state["calls"] == 3


def test_zero3_parameter_itself_is_detection(monkeypatch):
    """Plain deepspeed.initialize (no HF config, no DS_ZERO_STAGE): a ds_id on a parameter the norm reads."""
    monkeypatch.setattr(dsm, "_hf_zero3_enabled", lambda: False)
    p = nn.Parameter(torch.randn(3, 4))
    assert dsm.zero3_active([p]) is False
    make_zero(p)
    assert dsm.zero3_active([p]) is True
    assert dsm.zero3_active([]) is True  # cached


def test_hf_check_failures_are_false(monkeypatch):
    import peft.utils.integrations as integ

    def broken():
        raise RuntimeError("no config")

    monkeypatch.setattr(integ, "check_deepspeed_zero3_enabled", broken)
    assert dsm._hf_zero3_enabled() is False


# ============================================================================ ZeRO-3 gathering
def test_zero3_gathers_all_partitioned_params_in_one_call_and_norm_is_exact(fake_zero):
    layer = dora_linear()
    x = torch.randn(5, 12)
    layer.base_layer._ref_weight = layer.base_layer.weight.detach().clone()
    layer.base_layer.bias_ref = layer.base_layer.bias.detach().clone()
    expected = dora_out(layer, x).detach()

    lora_A, lora_B = layer.lora_A["default"], layer.lora_B["default"]
    for p in (layer.base_layer.weight, lora_A.weight, lora_B.weight):
        make_zero(p)
    # the bias is read by the layer *outside* the norm (base_result - bias), like stock PEFT: under ZeRO-3 it
    # must be available then; DeepSpeed keeps parameters below stage3_param_persistence_threshold (1e5) gathered
    make_zero(layer.base_layer.bias, Status.AVAILABLE)
    _gathering_hooks(lora_A)
    _gathering_hooks(lora_B)
    dora = layer.lora_magnitude_vector["default"]
    dora.clear_norm_cache()
    got = dora_out(layer, x)
    rtol, atol = TOLERANCES[torch.float32]
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
    wanted = sorted(p.ds_id for p in (layer.base_layer.weight, lora_A.weight, lora_B.weight))
    assert [sorted(c) for c in fake_zero.calls] == [wanted]  # ONE GatheredParameters call
    for p in (layer.base_layer.weight, lora_A.weight, lora_B.weight):
        assert p.data.numel() == 0 and p.ds_status is Status.NOT_AVAILABLE  # re-partitioned after the norm
    # the cache is off under ZeRO-3: nothing was stored, and a second forward gathers again
    assert len(dora._df_norm_cache) == 0 and len(dora._df_sumsq_cache) == 0
    dora_out(layer, x)
    assert len(fake_zero.calls) == 2


def test_zero3_available_params_are_used_not_gathered_nor_released(fake_zero):
    layer = dora_linear()
    lora_A, lora_B = layer.lora_A["default"], layer.lora_B["default"]
    make_zero(layer.base_layer.weight)
    make_zero(lora_A.weight, Status.AVAILABLE)  # persistent / fetched by DeepSpeed's coordinator
    make_zero(lora_B.weight, Status.AVAILABLE)
    with gather.gathered_for_norm(layer.base_layer, lora_A, lora_B) as info:
        assert info.backend == "deepspeed"
        assert info.gathered == ("base_layer.weight",)
        assert layer.base_layer.weight.shape == layer.base_layer.weight.ds_shape
    assert fake_zero.calls == [[layer.base_layer.weight.ds_id]]
    assert lora_A.weight.ds_status is Status.AVAILABLE and lora_A.weight.numel() > 0  # untouched


def test_zero3_update_layer_runs_under_the_gather(fake_zero):
    """Magnitude init (update_layer) of a layer whose base is already partitioned (zero.Init flow)."""
    layer = dora_linear()
    dora = layer.lora_magnitude_vector["default"]
    base = layer.base_layer
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    dora.update_layer(base_layer=base, lora_A=A, lora_B=B, scaling=layer.scaling["default"])
    expected = dora.weight.detach().clone()
    make_zero(base.weight)
    dora.update_layer(base_layer=base, lora_A=A, lora_B=B, scaling=layer.scaling["default"])
    torch.testing.assert_close(dora.weight.detach(), expected, rtol=1e-6, atol=1e-7)
    assert fake_zero.calls == [[base.weight.ds_id]]


def test_zero3_partial_gather_raises_by_default(fake_zero):
    layer = dora_linear()
    lora_A, lora_B = layer.lora_A["default"], layer.lora_B["default"]
    for p in (layer.base_layer.weight, lora_A.weight, lora_B.weight):
        make_zero(p)
    fake_zero.fail_for = {lora_B.weight.ds_id}  # the one-call gather fails, then only lora_B fails
    with (
        pytest.raises(RuntimeError, match=r"partial gather.*factor1.weight.*PEFT_DORA_ALLOW_PARTIAL_GATHER=1"),
        gather.gathered_for_norm(layer.base_layer, lora_A, lora_B),
    ):
        pass
    # everything the fallback gathered was released again by the exit stack
    assert layer.base_layer.weight.ds_status is Status.NOT_AVAILABLE
    assert layer.base_layer.weight.data.numel() == 0


def test_zero3_partial_gather_allowed_warns_once(fake_zero, monkeypatch, caplog):
    monkeypatch.setenv("PEFT_DORA_ALLOW_PARTIAL_GATHER", "1")
    layer = dora_linear()
    lora_A, lora_B = layer.lora_A["default"], layer.lora_B["default"]
    for p in (layer.base_layer.weight, lora_A.weight, lora_B.weight):
        make_zero(p)
    fake_zero.fail_for = {lora_B.weight.ds_id}
    with caplog.at_level(logging.WARNING, logger="dorafactors.distributed"):
        for _ in range(2):
            with gather.gathered_for_norm(layer.base_layer, lora_A, lora_B) as info:
                assert layer.base_layer.weight.numel() == layer.base_layer.weight.ds_numel
                assert lora_A.weight.numel() == lora_A.weight.ds_numel
                assert lora_B.weight.numel() == 0
                assert info.gathered == ("base_layer.weight", "factor0.weight")
    warnings = [r for r in caplog.records if "partial gather" in r.getMessage()]
    assert len(warnings) == 1
    assert "PEFT_DORA_ALLOW_PARTIAL_GATHER=1" in warnings[0].getMessage()


def test_zero3_total_failure_is_an_error_too(fake_zero):
    layer = dora_linear()
    make_zero(layer.base_layer.weight)
    fake_zero.fail_for = {layer.base_layer.weight.ds_id}
    with (
        pytest.raises(RuntimeError, match=r"base_layer.weight"),
        gather.gathered_for_norm(layer.base_layer, layer.lora_A["default"], layer.lora_B["default"]),
    ):
        pass


def test_zero3_forced_off_gathers_nothing_and_refuses_cache(fake_zero, monkeypatch):
    monkeypatch.setenv("PEFT_FORCE_GATHER", "0")
    layer = dora_linear()
    make_zero(layer.base_layer.weight)
    with gather.gathered_for_norm(layer.base_layer, layer.lora_A["default"], layer.lora_B["default"]) as info:
        assert info.backend is None
        assert layer.base_layer.weight.numel() == 0
        ok, reason = gather.norm_cache_allowed(info, (layer.base_layer.weight,))
    assert fake_zero.calls == []
    assert not ok and "ZeRO-3" in reason


def test_zero3_bare_tensor_factors_gather_their_parameters(fake_zero):
    """Bare tensors (update_layer passes the factor parameters; embedding forward passes `.T` views): the
    parameters behind them are gathered, all in one call."""
    base = nn.Embedding(7, 5)
    A = nn.Parameter(torch.randn(3, 7))  # lora_embedding_A [r, V]
    B = nn.Parameter(torch.randn(5, 3))  # lora_embedding_B [d, r]
    make_zero(base.weight)
    make_zero(A, Status.AVAILABLE)
    A_view = A.T  # taken while A is available: a valid view of its data
    make_zero(B)
    with gather.gathered_for_norm(base, A_view, B) as info:
        assert info.backend == "deepspeed"
        assert B.shape == (5, 3) and base.weight.shape == (7, 5)
    assert sorted(fake_zero.calls[0]) == sorted([base.weight.ds_id, B.ds_id])


def test_zero3_stale_view_of_partitioned_param_is_reported(fake_zero):
    base = nn.Embedding(7, 5)
    B = nn.Parameter(torch.randn(5, 3))
    make_zero(B)  # partitioned: its data is a 0-element placeholder
    stale = B.T  # a view of the placeholder: gathering B cannot refresh it
    with (
        pytest.raises(RuntimeError, match=r"factor0.*view taken while its parameter was partitioned"),
        gather.gathered_for_norm(base, stale),
    ):
        pass


class _FakeAllGather:
    """all_gather_single / get_world_size on a fake 2-rank group: the other rank's partition comes from the stash."""

    def __init__(self, param):
        self.param = param
        self.calls = 0

    def get_world_size(self, group=None):
        assert group == "fake-group"
        return 2

    def all_gather(self, out, local, group=None):
        self.calls += 1
        parts = self.param._fake_partitions.clone()
        parts[0] = local
        out.copy_(parts.reshape(-1))


def test_zero3_in_flight_params_are_read_from_partitions_and_left_alone(fake_zero, monkeypatch):
    layer = dora_linear()
    lora_A, lora_B = layer.lora_A["default"], layer.lora_B["default"]
    make_zero(layer.base_layer.weight)
    p = make_zero(lora_B.weight, Status.INFLIGHT)
    placeholder = torch.empty(0)
    p.data = placeholder
    fake = _FakeAllGather(p)
    monkeypatch.setattr(torch.distributed, "get_world_size", fake.get_world_size)
    monkeypatch.setattr(torch.distributed, "all_gather_single", fake.all_gather, raising=False)
    before = p.data
    with gather.gathered_for_norm(layer.base_layer, lora_A, lora_B) as info:
        torch.testing.assert_close(lora_B.weight.data, p._fake_full)
        assert "factor1.weight (in flight)" in info.gathered
    assert fake.calls == 1
    assert p.ds_status is Status.INFLIGHT  # DeepSpeed's handle still owns it
    assert p.data.data_ptr() == before.data_ptr() and p.data.shape == before.shape  # the same placeholder
    assert fake_zero.calls == [[layer.base_layer.weight.ds_id]]  # never passed to GatheredParameters


def test_zero3_in_flight_quantized_partition_is_a_partial_gather(fake_zero):
    layer = dora_linear()
    p = make_zero(layer.lora_B["default"].weight, Status.INFLIGHT)
    p.ds_tensor.ds_quant_scale = torch.ones(1)
    with (
        pytest.raises(RuntimeError, match=r"qwZ"),
        gather.gathered_for_norm(layer.base_layer, layer.lora_A["default"], layer.lora_B["default"]),
    ):
        pass


def test_zero3_nothing_partitioned_is_not_a_backend(fake_zero, monkeypatch):
    monkeypatch.setenv("PEFT_FORCE_GATHER", "1")
    layer = dora_linear()
    with gather.gathered_for_norm(layer.base_layer, layer.lora_A["default"], layer.lora_B["default"]) as info:
        assert info.backend is None
    assert fake_zero.calls == []
    assert gather.norm_cache_allowed(info, (layer.base_layer.weight,)) == (True, "")


def test_zero3_status_names_match_real_deepspeed():
    """If DeepSpeed is installed, the enum member names the helper reads exist (skip otherwise: optional extra)."""
    pp = pytest.importorskip("deepspeed.runtime.zero.partition_parameters", reason="deepspeed is an optional extra")
    names = {s.name for s in pp.ZeroParamStatus}
    assert {"AVAILABLE", "NOT_AVAILABLE", "INFLIGHT"} <= names
    assert hasattr(pp, "GatheredParameters")
    assert dsm._api() is pp


# ============================================================================ FSDP1
class FakeFSDP(nn.Module):
    """Stands in for FullyShardedDataParallel: a wrapper whose attribute access reaches the wrapped module."""

    summons: ClassVar[list[tuple]] = []

    def __init__(self, module, state="IDLE", needs_unshard=True):
        super().__init__()
        self.module = module
        self.training_state = types.SimpleNamespace(name=state)
        self._handle = types.SimpleNamespace(needs_unshard=lambda: needs_unshard)

    @property
    def weight(self):
        return self.module.weight

    @staticmethod
    @contextlib.contextmanager
    def summon_full_params(
        module, recurse=True, writeback=True, rank0_only=False, offload_to_cpu=False, with_grads=False
    ):
        FakeFSDP.summons.append((module, recurse, writeback, with_grads))
        yield


@pytest.fixture
def fake_fsdp1(monkeypatch):
    FakeFSDP.summons = []
    monkeypatch.setattr(fsdpm, "_fsdp1_cls", FakeFSDP)
    monkeypatch.setattr(gather, "_dist_initialized", lambda: True)
    monkeypatch.setattr(fsdpm, "fsdp2_in_use", lambda: False)
    return FakeFSDP


def test_fsdp1_summons_wrapped_base_and_adapter_modules_without_writeback(fake_fsdp1):
    base = FakeFSDP(nn.Linear(6, 4))
    A = FakeFSDP(nn.Linear(6, 2, bias=False))
    B = FakeFSDP(nn.Linear(2, 4, bias=False))
    with gather.gathered_for_norm(base, A, B) as info:
        assert info.backend == "fsdp1"
        assert info.gathered == ("base_layer", "factor0", "factor1")
        assert info.full(A) is A.module.weight  # read now, inside the summon
    assert [s[0] for s in fake_fsdp1.summons] == [base, A, B]
    assert all(s[1:] == (False, False, False) for s in fake_fsdp1.summons)  # recurse, writeback, with_grads
    ok, reason = gather.norm_cache_allowed(info, ())
    assert not ok and "fsdp1" in reason


def test_fsdp1_unwrapped_modules_and_bare_tensors_are_not_summoned(fake_fsdp1):
    base = nn.Linear(6, 4)
    A = FakeFSDP(nn.Linear(6, 2, bias=False))
    with gather.gathered_for_norm(base, A, torch.randn(4, 2)) as info:
        assert info.gathered == ("factor0",)
    assert [s[0] for s in fake_fsdp1.summons] == [A]


def test_fsdp1_not_wrapped_at_all_is_a_noop(fake_fsdp1):
    base, A, B = nn.Linear(6, 4), nn.Linear(6, 2), nn.Linear(2, 4)
    with gather.gathered_for_norm(base, A, B) as info:
        assert info.backend is None
    assert fake_fsdp1.summons == []
    assert gather.norm_cache_allowed(info, (base.weight, A.weight, B.weight)) == (True, "")


def test_fsdp1_unit_already_unsharded_in_its_forward_is_left_alone(fake_fsdp1):
    base = FakeFSDP(nn.Linear(6, 4), state="FORWARD_BACKWARD", needs_unshard=False)
    with gather.gathered_for_norm(base) as info:
        assert info.gathered == ()
    assert fake_fsdp1.summons == []


def test_fsdp1_resharded_busy_unit_raises(fake_fsdp1):
    base = FakeFSDP(nn.Linear(6, 4), state="FORWARD_BACKWARD", needs_unshard=True)
    with pytest.raises(RuntimeError, match="FORWARD_BACKWARD"), gather.gathered_for_norm(base):
        pass


def test_fsdp1_enclosing_unit_flattened_weights_refuse_the_cache(fake_fsdp1):
    """Decoder-layer wrap: no unit to summon, but the weights are FSDP1's (flag on the param or its flat base)."""
    base = nn.Linear(6, 4)
    base.weight._fsdp_flattened = True  # use_orig_params=True marks the original parameters
    with gather.gathered_for_norm(base) as info:
        assert info.backend == "fsdp1"
        assert info.gathered == ()
    flat = nn.Parameter(torch.randn(24))
    flat._fsdp_flattened = True
    view = flat[:24].view(4, 6)  # use_orig_params=False: module attributes are views of the FlatParameter
    assert fsdpm.is_fsdp1_flat(view)
    assert not fsdpm.is_fsdp1_flat(torch.randn(4, 6))


# ============================================================================ FSDP2
class FakeDTensor(torch.Tensor):
    """Stands in for DTensor: a tensor subclass with full_tensor() (counts calls)."""

    full_calls = 0

    @staticmethod
    def __new__(cls, shard, full):
        t = torch.Tensor._make_subclass(cls, shard)
        t._full = full
        return t

    def full_tensor(self):
        assert not torch.is_grad_enabled()
        FakeDTensor.full_calls += 1
        return self._full.clone()


@pytest.fixture
def fake_fsdp2(monkeypatch):
    FakeDTensor.full_calls = 0
    monkeypatch.setattr(fsdpm, "_dtensor_cls", FakeDTensor)
    monkeypatch.setattr(gather, "_dist_initialized", lambda: True)
    monkeypatch.setattr(fsdpm, "fsdp2_in_use", lambda: False)


def test_fsdp2_dtensor_factors_are_materialized_once_under_no_grad(fake_fsdp2):
    base = nn.Linear(6, 4)
    A_full = torch.randn(2, 6)
    A = FakeDTensor(A_full[:1].clone(), A_full)
    with gather.gathered_for_norm(base, A) as info:
        assert info.backend == "fsdp2"
        first = info.full(A)
        second = info.full(A)
        torch.testing.assert_close(first, A_full)
        assert first is second
        assert info.full(base) is base.weight  # a plain (already unsharded) weight is used as is
    assert FakeDTensor.full_calls == 1


def test_fsdp2_plain_weights_without_fsdp2_in_process_is_not_sharded(fake_fsdp2):
    base, A = nn.Linear(6, 4), nn.Linear(6, 2)
    with gather.gathered_for_norm(base, A) as info:
        assert info.backend is None
    assert FakeDTensor.full_calls == 0


def test_fsdp2_enclosing_wrap_uses_weights_as_is_but_refuses_the_cache(fake_fsdp2, monkeypatch):
    monkeypatch.setattr(fsdpm, "fsdp2_in_use", lambda: True)
    base, A = nn.Linear(6, 4), nn.Linear(6, 2)
    with gather.gathered_for_norm(base, A) as info:
        assert info.backend == "fsdp2"
        assert info.full(A) is A.weight
        ok, reason = gather.norm_cache_allowed(info, (base.weight, A.weight))
    assert FakeDTensor.full_calls == 0
    assert not ok and "FSDP2" in reason


def test_fsdp2_in_use_scans_the_composable_registry(monkeypatch):
    class FakeState:
        pass

    class OtherState:
        pass

    m1, m2 = nn.Linear(2, 2), nn.Linear(2, 2)
    other, fsdp_state = OtherState(), FakeState()
    registry = types.SimpleNamespace(_module_state_mapping=weakref.WeakKeyDictionary({m1: weakref.ref(other)}))
    monkeypatch.setattr(fsdpm, "_composable_mod", registry)
    monkeypatch.setattr(fsdpm, "_fsdp2_state_cls", FakeState)
    assert fsdpm.fsdp2_in_use() is False
    registry._module_state_mapping[m2] = weakref.ref(fsdp_state)
    assert fsdpm.fsdp2_in_use() is True  # re-checked, then seen
    registry._module_state_mapping.clear()
    assert fsdpm.fsdp2_in_use() is True  # cached positive


def test_fsdp2_managed_module_detection(monkeypatch):
    class FakeState:
        pass

    m, n = nn.Linear(2, 2), nn.Linear(2, 2)
    states = {m: FakeState()}
    monkeypatch.setattr(fsdpm, "_composable_mod", types.SimpleNamespace(_get_module_state=states.get))
    monkeypatch.setattr(fsdpm, "_fsdp2_state_cls", FakeState)
    assert fsdpm.is_fsdp2_managed(m)
    assert not fsdpm.is_fsdp2_managed(n)
    assert not fsdpm.is_fsdp2_managed(torch.randn(2))


def test_real_dtensor_class_resolves_and_plain_tensors_are_not_dtensors():
    assert fsdpm._dtensor() is not None
    assert not fsdpm.is_dtensor(torch.randn(2))
    assert not fsdpm.is_dtensor(nn.Parameter(torch.randn(2)))
    assert fsdpm._fsdp2_state() is not None  # the FSDPState import path of this torch is known
    assert fsdpm._fsdp1() is not None


# ============================================================================ the norm-cache gate
def test_norm_cache_reason_is_logged_once(caplog):
    info = gather.GatherInfo("fsdp2", fsdpm.FSDP2_CACHE_REASON)
    with caplog.at_level(logging.INFO, logger="dorafactors.distributed"):
        for _ in range(3):
            ok, reason = gather.norm_cache_allowed(info, ())
            assert not ok
    assert reason.startswith("norm cache off under fsdp2")
    assert len([r for r in caplog.records if "norm cache off" in r.getMessage()]) == 1


def test_norm_cache_input_check_catches_sharded_inputs(fake_fsdp2):
    info = gather.GatherInfo()
    assert gather.norm_cache_allowed(info, (torch.randn(2),)) == (True, "")
    dt = FakeDTensor(torch.randn(1), torch.randn(2))
    ok, reason = gather.norm_cache_allowed(info, (torch.randn(2), dt))
    assert not ok and "DTensor" in reason
    flat = torch.randn(3)
    flat._fsdp_flattened = True
    assert not gather.norm_cache_allowed(info, (flat,))[0]


def test_optional_deepspeed_is_not_imported_by_dorafactors():
    """Importing and patching works when DeepSpeed is absent (hidden the way the import system reports it)."""
    import pathlib
    import subprocess
    import sys

    code = (
        "import sys\n"
        "sys.modules['deepspeed'] = None  # import deepspeed -> ModuleNotFoundError; find_spec -> None\n"
        "import dorafactors, dorafactors.distributed\n"
        "from dorafactors.distributed import deepspeed as dsm\n"
        "dorafactors.patch(); dorafactors.unpatch()\n"
        "assert sys.modules['deepspeed'] is None\n"
        "assert dsm.zero3_active() is False\n"
        "print('ok')\n"
    )
    root = pathlib.Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=str(root))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
