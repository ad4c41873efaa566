"""The norm recomputation replayed from a CUDA graph (``norm/replay.py``) is the eager computation, bitwise,
after every optimizer step and every change of what it reads; it captures once per layout and never replays a
graph for other tensors, another scaling or another stream. The layout stamp, the CPU path (no replay) and
the layout state machine (with a stand-in graph) run everywhere; the rest needs a CUDA GPU (``gpu``-marked).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import dorafactors
from dorafactors.norm import engine
from dorafactors.norm.cache import TensorStamp
from dorafactors.norm.replay import NormReplay, capture_failure, replay_disabled
from dorafactors.norm.scale import scale_divisor
from tests._lifecycle import stepped_by_an_optimizer


def test_same_layout_ignores_the_version_not_the_memory():
    weight = nn.Parameter(torch.randn(6, 4))
    stamp = TensorStamp(weight)
    with torch.no_grad():
        weight.mul_(2.0)
    assert not stamp.matches(weight) and stamp.same_layout(weight)
    view = TensorStamp(weight.T)
    assert view.same_layout(weight.T) and not view.same_layout(weight)  # the view's own strides
    assert not stamp.same_layout(weight.detach())  # another tensor object over the same storage
    weight.data = weight.data.clone()  # new storage behind the same Parameter
    assert not stamp.same_layout(weight)


def test_no_replay_off_cuda():
    x = torch.randn(8)
    replay = NormReplay()
    for step in range(4):
        with torch.no_grad():
            x.add_(1.0)
        out = replay.run(lambda: x * 2.0, (x,), (1.0,), lambda: True)
        assert torch.equal(out, x * 2.0), step
    assert (replay.captures, replay.replays) == (0, 0)


def test_replay_state_is_per_adapter_and_derived():
    """One NormReplay per adapter of a Linear layer (bounded), dropped by deepcopy, pickling and
    clear_norm_caches like the layer's other derived state (a graph cannot be copied)."""
    import pickle

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=True, init_lora_weights=False)
    with dorafactors.patched():
        model = get_peft_model(nn.Sequential(nn.Linear(12, 10)), config)
        model.add_adapter("other", config)
    dora = model.base_model.model[0].lora_magnitude_vector
    for adapter in ("default", "other", "default"):
        model.set_adapter(adapter)
        for _ in range(3):
            with torch.no_grad():
                model.base_model.model[0].lora_B[adapter].weight.add_(0.01)
            model(torch.randn(3, 12)).sum().backward()
    replays = dora["default"].__dict__["_df_norm_replays"]
    assert set(replays) == {"default"} and set(dora["other"].__dict__["_df_norm_replays"]) == {"other"}
    assert all(isinstance(r, NormReplay) for r in replays.values())
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        layer = copied.base_model.model[0].lora_magnitude_vector["default"]
        assert "_df_norm_replays" not in layer.__dict__
    dorafactors.clear_norm_caches(model)
    assert "_df_norm_replays" not in dora["default"].__dict__


class _FakeGraph:
    """Stands in for a captured CUDA graph on the CPU: a replay reruns the captured computation into the
    output it returned at capture, reading the tensors' current values as a graph does."""

    def __init__(self, compute):
        self.compute = compute
        self.out = compute()

    def replay(self):
        self.out.copy_(self.compute())


def test_layout_state_machine(monkeypatch):
    """Eager, eager + capture, then replays while the layout holds; a new tensor, value or stream starts over;
    at most MAX_CAPTURES graphs. Replays serve the current values and a tensor no later replay writes."""
    from dorafactors.norm import replay as rp

    stream = [7]
    monkeypatch.setattr(rp, "_replay_stream", lambda device: stream[0])

    def fake_capture(self, compute, index, stream):
        self.captures += 1
        graph = _FakeGraph(compute)
        return graph, graph.out

    monkeypatch.setattr(rp.NormReplay, "_capture", fake_capture)
    x = torch.randn(8)
    replay = rp.NormReplay()

    def call(t, scaling=2.0):
        with torch.no_grad():
            t.add_(1.0)
        out = replay.run(lambda: t * scaling, (t,), (scaling,), lambda: True)
        assert torch.equal(out, t * scaling)
        return out

    call(x), call(x)
    assert (replay.captures, replay.replays) == (1, 0)
    first = call(x)
    second = call(x)
    assert (replay.captures, replay.replays) == (1, 2)
    assert not torch.equal(first, second) and first.data_ptr() != second.data_ptr()  # copies, current values
    call(x, scaling=3.0)  # another value: a new layout, eager
    assert replay.replays == 2
    stream[0] = 8  # another stream: a new layout
    call(x, scaling=3.0), call(x, scaling=3.0), call(x, scaling=3.0)
    assert (replay.captures, replay.replays) == (2, 3)
    y = x.clone()  # another tensor: a new layout
    call(y), call(y), call(y)
    assert (replay.captures, replay.replays) == (3, 4)
    for _ in range(3):  # a new tensor every time: captures stop at MAX_CAPTURES
        fresh = torch.randn(8)
        call(fresh), call(fresh)
    assert replay.captures == rp.MAX_CAPTURES
    with replay_disabled():
        call(y), call(y)
    replay.clear()
    call(y)
    assert replay.replays == 4


# ---------------------------------------------------------------------------------------------------- GPU


def _model(adapter_dtype: torch.dtype, seed: int = 0, device: str = "cuda") -> nn.Module:
    """Two bias-free bf16 Linear layers with DoRA, non-zero lora_B and perturbed magnitudes (on CUDA)."""
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(256, 384, bias=False), nn.GELU(), nn.Linear(384, 320, bias=False))
    base = base.to(device, torch.bfloat16)
    config = LoraConfig(r=24, lora_alpha=48, target_modules=["0", "2"], use_dora=True, init_lora_weights=False)
    with dorafactors.patched():
        model = get_peft_model(base, config, autocast_adapter_dtype=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.data = p.data.to(adapter_dtype)
            if "lora_B" in name:
                p.normal_(0, 0.05)
            elif "magnitude" in name:
                p.mul_(1 + 0.1 * torch.randn_like(p))
    stepped_by_an_optimizer(model)  # the norm is then cached (and replayed on a miss) from the first step
    return model


def _dora_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "lora_magnitude_vector")]


def _replay(layer: nn.Module) -> NormReplay:
    dora = layer.lora_magnitude_vector["default"]
    return dora.__dict__["_df_norm_replays"]["default"]


def _served_norm(layer: nn.Module) -> torch.Tensor:
    """The norm the layer's forward uses now (the cache's, or computed through the replay)."""
    dora = layer.lora_magnitude_vector["default"]
    return dora._forward_norm(
        layer.base_layer, layer.lora_A["default"], layer.lora_B["default"], layer.scaling["default"], "default",
        gather_modules=(),
    )  # fmt: skip


def _eager_norm(layer: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return engine.weight_norm(
            layer.base_layer.weight,
            layer.lora_A["default"].weight,
            layer.lora_B["default"].weight,
            layer.scaling["default"],
            cached_sumsq=engine.weight_sumsq(layer.base_layer.weight),
        )


@pytest.mark.gpu
@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32-adapters"])
def test_training_with_replayed_norms_is_bitwise_the_eager_run(adapter_dtype):
    """Six AdamW steps of a model whose norms are replayed and of its twin with replay off: the same losses,
    gradients and parameters, bitwise; the norm is captured once per layer and replayed from the third step."""
    ours = _model(adapter_dtype)
    twin = copy.deepcopy(ours)
    stepped_by_an_optimizer(twin)
    assert all(engine.norm_path(m.base_layer.weight, m.lora_A["default"].weight, m.lora_B["default"].weight)
               in ("gemm", "triton") for m in _dora_layers(ours))  # fmt: skip
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    opt_twin = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=1e-2)
    gen = torch.Generator(device="cuda").manual_seed(1)
    steps = 6
    for step in range(steps):
        x = torch.randn(4, 32, 256, device="cuda", dtype=torch.bfloat16, generator=gen)
        loss = ours(x).float().square().mean()
        loss.backward()
        with replay_disabled():
            loss_twin = twin(x).float().square().mean()
            loss_twin.backward()
        assert torch.equal(loss, loss_twin), step
        for (name, p), q in zip(ours.named_parameters(), twin.parameters(), strict=True):
            if p.requires_grad:
                assert torch.equal(p.grad, q.grad), (step, name)
        for layer in _dora_layers(ours):
            assert torch.equal(_served_norm(layer), _eager_norm(layer)), step
        opt_ours.step()
        opt_twin.step()
        opt_ours.zero_grad()
        opt_twin.zero_grad()
    for layer in _dora_layers(ours):
        replay = _replay(layer)
        assert (replay.captures, replay.replays) == (1, steps - 2), capture_failure()
    for p, q in zip(ours.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_norm_computation_also_rounds_the_norm_for_a_half_precision_magnitude(device):
    """With a bf16 magnitude the norm computation (on CUDA: the replayed graph) also computes the divisor of
    ``g = m / divisor`` (the norm rounded to bf16): the layer's divisor memo holds it for the norm the forward
    serves, bitwise the eager ``scale_divisor`` of the eager norm, and the training forward's ``g`` divides by
    exactly that."""
    model = _model(torch.bfloat16, device=device)
    x = torch.randn(2, 16, 256, device=device, dtype=torch.bfloat16)
    for _ in range(4):  # on CUDA: a new layout, its capture, then replays
        with torch.no_grad():
            for layer in _dora_layers(model):
                layer.lora_B["default"].weight.add_(0.01)
        model(x).float().square().mean().backward()
    for layer in _dora_layers(model):
        dora = layer.lora_magnitude_vector["default"]
        if device == "cuda":
            assert _replay(layer).replays >= 1, capture_failure()
        norm = _served_norm(layer)
        memo = dora.__dict__["_df_divisor_memo"]
        divisor = scale_divisor(_eager_norm(layer), torch.bfloat16, norm.device)
        assert memo[0] is norm and memo[1] == torch.bfloat16 and torch.equal(memo[3], divisor)
        assert norm._base is not None and memo[3]._base is norm._base  # both rows of the computation's output
        assert torch.equal(norm, _eager_norm(layer))
        g = dora._magnitude_scale(dora.weight, norm)
        assert g.requires_grad and torch.equal(g, dora.weight / divisor)


@pytest.mark.gpu
def test_replay_follows_every_change_of_what_the_norm_reads():
    """After the capture: an in-place load (same tensors: replayed, new values), a new scaling, a new lora_A
    Parameter, new storage behind lora_B (``.data``), each served norm is the eager one, and only the unchanged
    layout is replayed."""
    model = _model(torch.bfloat16)
    layer = _dora_layers(model)[0]
    bump = torch.Generator(device="cuda").manual_seed(3)

    def written() -> None:  # an optimizer-like in-place write of both factors
        with torch.no_grad():
            for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                p.add_(torch.randn(p.shape, device="cuda", generator=bump, dtype=p.dtype), alpha=0.01)

    for _ in range(3):
        written()
        assert torch.equal(_served_norm(layer), _eager_norm(layer))
    replay = _replay(layer)
    assert (replay.captures, replay.replays) == (1, 1)

    state = {k: v + 0.01 for k, v in model.state_dict().items() if "lora_B" in k}
    model.load_state_dict(state, strict=False)  # copy_ into the same tensors
    assert torch.equal(_served_norm(layer), _eager_norm(layer))
    assert replay.replays == 2

    layer.scaling["default"] = 0.75
    written()
    assert torch.equal(_served_norm(layer), _eager_norm(layer))
    assert replay.replays == 2  # a new layout: eager

    old = layer.lora_A["default"].weight
    layer.lora_A["default"].weight = nn.Parameter(old.detach().clone() * 1.5)
    assert torch.equal(_served_norm(layer), _eager_norm(layer))
    written()
    assert torch.equal(_served_norm(layer), _eager_norm(layer))
    assert replay.captures == 2
    written()
    assert torch.equal(_served_norm(layer), _eager_norm(layer))
    assert replay.replays == 3

    b = layer.lora_B["default"].weight
    b.data = b.data.clone() * 0.5  # new storage behind the same Parameter: a new layout
    assert torch.equal(_served_norm(layer), _eager_norm(layer))
    assert replay.replays == 3

    dorafactors.clear_norm_caches(model)  # drops the replays with the caches
    assert "_df_norm_replays" not in layer.lora_magnitude_vector["default"].__dict__


@pytest.mark.gpu
def test_replay_per_stream():
    """A graph is replayed only on the stream it was captured for (its pool's temporaries are the stream's)."""
    model = _model(torch.bfloat16)
    layer = _dora_layers(model)[0]
    weight_b = layer.lora_B["default"].weight
    side = torch.cuda.Stream()
    for stream in (torch.cuda.current_stream(), side, torch.cuda.current_stream(), side):
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                with torch.no_grad():
                    weight_b.mul_(1.01)
                served = _served_norm(layer)
                assert torch.equal(served, _eager_norm(layer))
        torch.cuda.current_stream().wait_stream(stream)
    replay = _replay(layer)
    assert (replay.captures, replay.replays) == (4, 4)  # a new layout on every switch of stream


_FAILING_CAPTURE = """
import torch
from dorafactors.norm.replay import NormReplay, capture_failure

x = torch.randn(64, device="cuda")
first, second = NormReplay(), NormReplay()
for _ in range(4):
    with torch.no_grad():
        x.add_(1.0)
    # a host synchronization inside the computation: it cannot be captured
    assert torch.equal(first.run(lambda: x * float(x.abs().sum().item() > 0), (x,), (), lambda: True), x)
    assert torch.equal(second.run(lambda: x * 2.0, (x,), (), lambda: True), x * 2.0)
assert capture_failure() and first.captures == 1 and first.replays == 0
assert second.captures == 0 and second.replays == 0  # capturing is off in the whole process
torch.manual_seed(0)
assert torch.randn(8, device="cuda").isfinite().all()  # the device and its generator still work
print("ok")
"""


@pytest.mark.gpu
def test_a_failed_capture_keeps_the_eager_values_and_turns_capturing_off():
    """Run in a process of its own: a failed capture leaves state in PyTorch's allocator."""
    done = subprocess.run(
        [sys.executable, "-c", _FAILING_CAPTURE], capture_output=True, text=True, timeout=300, env=dict(os.environ)
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr


@pytest.mark.gpu
def test_graphs_share_one_pool_per_stream():
    """Eight layers' graphs add far less reserved memory than eight pools (a pool takes whole segments)."""
    torch.manual_seed(0)
    layers = [nn.Linear(1024, 1024, bias=False) for _ in range(9)]
    base = nn.Sequential(*layers).to("cuda", torch.bfloat16)
    config = LoraConfig(r=64, lora_alpha=64, target_modules=[str(i) for i in range(9)], use_dora=True,
                        init_lora_weights=False)  # fmt: skip
    with dorafactors.patched():
        model = get_peft_model(base, config, autocast_adapter_dtype=False)
    primer, *dora = _dora_layers(model)
    for layer, runs in ((primer, 3), *((m, 1) for m in dora)):  # the primer's capture makes the pool
        for _ in range(runs):
            with torch.no_grad():
                layer.lora_B["default"].weight.mul_(1.01)
            _served_norm(layer)
    assert _replay(primer).captures == 1, capture_failure()
    torch.cuda.synchronize()
    before = torch.cuda.memory_reserved()
    for layer in dora:
        with torch.no_grad():
            layer.lora_B["default"].weight.mul_(1.01)
        _served_norm(layer)  # the second run of this layout: captures
    for layer in dora:
        with torch.no_grad():
            layer.lora_B["default"].weight.mul_(1.01)
        assert torch.equal(_served_norm(layer), _eager_norm(layer))
    assert all((_replay(m).captures, _replay(m).replays) == (1, 1) for m in dora), capture_failure()
    grown = torch.cuda.memory_reserved() - before
    assert grown <= 6 * 2**20, f"{grown / 2**20:.1f} MiB reserved for 8 graphs"


@pytest.mark.gpu
def test_no_replay_inside_another_capture():
    """Inside a user's CUDA graph capture the computation is captured with it, not replayed or captured apart."""
    x = torch.randn(64, device="cuda")
    replay = NormReplay()
    for _ in range(3):
        replay.run(lambda: x * 2.0, (x,), (), lambda: True)
    assert replay.captures == 1
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        replay.run(lambda: x * 2.0, (x,), (), lambda: True)  # warm-up on the capture stream
        with torch.cuda.graph(graph, stream=side):
            out = replay.run(lambda: x * 2.0, (x,), (), lambda: True)
    torch.cuda.current_stream().wait_stream(side)
    with torch.no_grad():
        x.add_(1.0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, x * 2.0)
