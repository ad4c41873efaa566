"""What a real training run does to a model, through the public API, against stock PEFT holding the same
weights: many optimizer steps (bounded caches), ``torch.inference_mode`` validation, ``torch.func``
transforms, ``torch.compile`` without recompiles, ``torch.jit.trace`` of a warm model, and the writes the
norm cache cannot see (``PEFT_DORA_NORM_CACHE=verify``).

Each test runs on the PyTorch path and, where the layers take it, on the Triton kernels (the CPU
interpreter here; ``PEFT_DORA_FUSED=1``).
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import dorafactors
from dorafactors.dispatch import config
from tests._lifecycle import (
    VOCAB,
    assert_caches_bounded,
    assert_matches_stock,
    build_pair,
    cache_sizes,
    dora_layers,
    one_thread,
    stepped_by_an_optimizer,
    sync_weights,
    trainable,
)
from tests._tolerances import assert_dtype_close


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


F32 = torch.float32
ON_GPU = torch.cuda.is_available()


def _ids(seed: int, shape=(2, 5), device="cpu") -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed)).to(device)


def _loss(out: torch.Tensor) -> torch.Tensor:
    return out.square().mean()


# ------------------------------------------------------------------------------------ 1. bounded caches


@pytest.mark.parametrize("optimizer", ["plain", "foreach", "fused"])
@pytest.mark.parametrize("schedule", ["train", "eval_rollouts"])
def test_caches_hold_one_entry_per_layer_and_purpose_over_many_steps(optimizer, schedule):
    """12 AdamW steps with 2 micro-batches each (``schedule="eval_rollouts"``: the model stays in eval and
    no-grad rollouts run between the gradient steps, as in RL fine-tuning): every norm, sum-of-squares and
    fold cache holds at most one entry the whole time, and the model still equals stock PEFT."""
    stock, ours = build_pair()
    kind = {"plain": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}[optimizer]
    opt = torch.optim.AdamW(trainable(ours).values(), lr=1e-2, **kind)
    ours.train(schedule == "train")
    for step in range(12):
        if schedule == "eval_rollouts":
            with torch.no_grad():
                ours(_ids(1000 + step, (1, 4)))  # decode-sized: the folded path
        for micro in range(2):
            (_loss(ours(_ids(2 * step + micro))) / 2).backward()
        opt.step()
        opt.zero_grad()
        assert_caches_bounded(ours)
    assert max(max(s) for s in cache_sizes(ours)) == 1  # the caches were in use (bounded, not bypassed)
    assert_matches_stock(ours, stock, _ids(99), what="after 12 steps")


# ------------------------------------------------------------------------------------ 2. inference_mode


@pytest.mark.parametrize("eval_mode", [True, False], ids=["eval", "train-mode"])
def test_inference_mode_validation_between_training_steps(path, eval_mode):
    """Lightning's loop: training steps, a validation forward under ``torch.inference_mode`` (first before
    any training, then between steps), then the next training step. Nothing computed under inference mode
    may reach autograd; every output and gradient equals stock PEFT's."""
    stock, ours = build_pair()
    opt = torch.optim.AdamW(trainable(ours).values(), lr=1e-2)
    for step in range(3):
        ours.train(not eval_mode)
        stock.train(not eval_mode)
        sync_weights(ours, stock)
        stock.train(not eval_mode)
        with torch.inference_mode():
            for ids in (_ids(50 + step), _ids(60 + step, (1, 3))):
                assert_dtype_close(ours(ids), stock(ids), F32, name="inference-mode output")
        ours.train()
        _loss(ours(_ids(step))).backward()  # raised "Inference tensors cannot be saved for backward"
        opt.step()
        opt.zero_grad()
        assert_matches_stock(ours, stock, _ids(70 + step), what=f"after step {step}")
    assert_caches_bounded(ours)


@pytest.mark.parametrize("cache", ["1", "0"], ids=["cache-on", "cache-off"])
def test_model_built_and_run_inside_inference_mode(path, cache, monkeypatch):
    """A model created inside ``inference_mode`` holds inference tensors (no version counter): it must run
    like stock, also after an in-place edit of a weight inside inference mode (nothing may be cached for
    tensors whose writes cannot be seen)."""
    monkeypatch.setenv("PEFT_DORA_NORM_CACHE", cache)
    config.invalidate_cache()
    with torch.inference_mode():
        stock, ours = build_pair()
        assert ours.base_model.model.lin.base_layer.weight.is_inference()
        for model in (stock, ours):
            model.eval()
        for ids in (_ids(1), _ids(2, (1, 3)), _ids(1)):
            assert_dtype_close(ours(ids), stock(ids), F32, name="output")
        for model in (stock, ours):
            inner = model.base_model.model
            inner.lin.base_layer.weight.mul_(1.5)
            inner.lin.lora_B.default.weight.add_(0.1)
            inner.conv.lora_magnitude_vector.default.weight.mul_(0.7)
        for ids in (_ids(1), _ids(2, (1, 3))):
            assert_dtype_close(ours(ids), stock(ids), F32, name="output after in-place edits")
    assert all(max(sizes) == 0 for sizes in cache_sizes(ours))  # nothing was cached for inference tensors


# ------------------------------------------------------------------------------------ 3. torch.func


def _functional_loss(model):
    def loss(params, ids):
        return _loss(torch.func.functional_call(model, params, (ids,)))

    return loss


def test_grad_of_functional_call_matches_stock(path):
    stock, ours = build_pair()
    ids = _ids(3)
    ours(ids).sum().backward()  # warm caches first: a transform must not be served them
    for model in (stock, ours):
        model.zero_grad()
    perturbed = {n: p.detach() * 1.1 for n, p in ours.named_parameters()}  # weights the caches never saw
    grads_o = torch.func.grad(_functional_loss(ours))(perturbed, ids)
    grads_s = torch.func.grad(_functional_loss(stock))(perturbed, ids)
    assert grads_o.keys() == grads_s.keys()
    for name in grads_s:
        assert_dtype_close(grads_o[name], grads_s[name], F32, name=f"grad {name}")
    assert_matches_stock(ours, stock, ids, what="after the transform")


def test_vmap_grad_per_sample_gradients_match_stock(path):
    stock, ours = build_pair()
    ids = _ids(4, (3, 5))
    with torch.no_grad():
        ours(ids)  # warm caches
    params = {n: p.detach() for n, p in ours.named_parameters()}

    def per_sample(model):
        return torch.func.vmap(torch.func.grad(_functional_loss(model)), in_dims=(None, 0))(params, ids[:, None])

    grads_o, grads_s = per_sample(ours), per_sample(stock)
    for name in grads_s:
        assert grads_o[name].shape[0] == 3
        assert_dtype_close(grads_o[name], grads_s[name], F32, name=f"per-sample grad {name}")


def _stacked_adapters(model, copies: int, seed: int) -> dict[str, torch.Tensor]:
    """Every adapter tensor (``lora_*``), ``copies`` perturbed versions stacked on a new first dim."""
    gen = torch.Generator().manual_seed(seed)
    return {
        name: p.detach() + 0.2 * torch.randn((copies, *p.shape), generator=gen)
        for name, p in model.named_parameters()
        if "lora_" in name
    }


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval-no-grad"])
def test_vmap_over_stacked_adapter_weights_matches_stock(path, train):
    """Ensembling: ``vmap`` of ``functional_call`` over several sets of adapter weights (A, B and the
    magnitude batched, the base weights shared). The norm may not write a batched value into an unbatched
    buffer (the chunked reference did, and raised), and must use each set's own weights: warm caches and a
    decode fold exist and must not be served."""
    stock, ours = build_pair()
    ids = _ids(7, (1, 4))
    for model in (stock, ours):
        model.train(train)
    with torch.no_grad():
        ours(ids)  # warm: the norm cache and, in eval, the decode fold
    stacked = _stacked_adapters(stock, copies=3, seed=8)

    def ensemble(model):
        shared = {n: p.detach() for n, p in model.named_parameters() if n not in stacked}
        run = torch.func.vmap(lambda adapters: torch.func.functional_call(model, {**shared, **adapters}, (ids,)))
        with contextlib.nullcontext() if train else torch.no_grad():
            return run(stacked)

    out_o, out_s = ensemble(ours), ensemble(stock)
    assert out_o.shape[0] == 3
    assert_dtype_close(out_o, out_s, F32, name="ensemble output")
    truth = torch.stack(
        [
            torch.func.functional_call(
                copy.deepcopy(stock).double(), {n: v[i].double() for n, v in stacked.items()}, (ids,)
            )
            for i in range(3)
        ]
    )
    assert_dtype_close(out_o, truth.float(), F32, name="ensemble output vs fp64")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval-no-grad"])
def test_vmap_over_stacked_base_weights_matches_stock(train):
    """``vmap`` of ``functional_call`` over several base weights of the Linear (the adapters shared), in a
    forward that records autograd and in a no-grad one: each ``W``'s own ``||W||^2`` (no host read of a batched
    value, which a transform cannot give)."""
    stock, ours = build_pair()
    key = "base_model.model.lin.base_layer.weight"
    ids = _ids(9, (1, 4))
    for model in (stock, ours):
        model.train(train)
    weight = dict(stock.named_parameters())[key].detach()
    stacked = torch.stack([weight * (1.0 + 0.1 * k) for k in range(3)])

    def ensemble(model):
        run = torch.func.vmap(lambda w: torch.func.functional_call(model, {key: w}, (ids,)))
        with contextlib.nullcontext() if train else torch.no_grad():
            return run(stacked)

    assert_dtype_close(ensemble(ours), ensemble(stock), F32, name="ensemble over base weights")


def test_vmap_over_grouped_conv_adapters_matches_stock(path):
    """The grouped-conv factors (``engine.conv_factors`` builds a block-sparse ``B``) under ``vmap`` with a
    batched ``lora_B``."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2, padding=1))
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["0"], use_dora=True, init_lora_weights=False)
    stock = get_peft_model(copy.deepcopy(base), cfg)
    with dorafactors.patched():
        ours = get_peft_model(copy.deepcopy(base), cfg)
    ours.load_state_dict(stock.state_dict())
    x = torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(1))
    stacked = {n: v for n, v in _stacked_adapters(stock, copies=3, seed=2).items() if "lora_B" in n}

    def ensemble(model):
        shared = {n: p.detach() for n, p in model.named_parameters() if n not in stacked}
        return torch.func.vmap(lambda b: torch.func.functional_call(model, {**shared, **b}, (x,)))(stacked)

    assert_dtype_close(ensemble(ours), ensemble(stock), F32, name="grouped-conv ensemble output")


@pytest.mark.parametrize("api", ["torch.func.jvp", "forward_ad"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval-no-grad"])
def test_forward_mode_tangents_match_stock(path, api, train):
    """Forward-mode AD along every adapter tensor (``jvp``, or ``torch.autograd.forward_ad`` dual tensors
    through ``functional_call``) gives stock's tangent: the norm is a detached value (``torch.no_grad`` does
    not stop a tangent, it flowed through the norm), and no cached value derived from an adapter (the decode
    fold of ``lora_B``, warm here) may drop that adapter's tangent."""
    import torch.autograd.forward_ad as fwAD

    stock, ours = build_pair()
    ids = _ids(9, (1, 4))
    for model in (stock, ours):
        model.train(train)
    with torch.no_grad():
        ours(ids)
        ours(ids)  # warm: the norm cache and, in eval, the decode fold
    gen = torch.Generator().manual_seed(10)
    adapters = {n: p.detach() for n, p in stock.named_parameters() if "lora_" in n}
    tangents = {n: torch.randn(p.shape, generator=gen) for n, p in adapters.items()}

    def tangent_out(model):
        shared = {n: p.detach() for n, p in model.named_parameters() if n not in adapters}
        with contextlib.nullcontext() if train else torch.no_grad():
            if api == "torch.func.jvp":
                run = lambda a: torch.func.functional_call(model, {**shared, **a}, (ids,))  # noqa: E731
                return torch.func.jvp(run, (adapters,), (tangents,))[1]
            with fwAD.dual_level():
                duals = {n: fwAD.make_dual(p, tangents[n]) for n, p in adapters.items()}
                out = torch.func.functional_call(model, {**shared, **duals}, (ids,))
                return fwAD.unpack_dual(out).tangent.clone()

    assert_dtype_close(tangent_out(ours), tangent_out(stock), F32, name=f"{api} tangent")
    assert_matches_stock(ours, stock, _ids(11), what="after forward-mode AD")


# ------------------------------------------------------------------------------------ 4. frozen parts


def _stock_and_ours(base: nn.Module, targets: list[str], rank: int = 3):
    """(stock, ours) DoRA models of ``base`` with ``targets``: random ``lora_B`` (``init_lora_weights=False``),
    magnitudes scaled by 1..1.3, the same weights in both."""
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, use_dora=True, init_lora_weights=False)
    stock = get_peft_model(copy.deepcopy(base), cfg)
    with dorafactors.patched():
        ours = get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for name, p in stock.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.3 * torch.rand_like(p))
    ours.load_state_dict(stock.state_dict())
    return stock, ours


@pytest.mark.parametrize("input_grad", [False, True], ids=["x-frozen", "x-grad"])
@pytest.mark.parametrize(
    "frozen",
    [("lora_A",), ("lora_B",), ("lora_magnitude",), ("lora_A", "lora_magnitude"), ("lora_B", "lora_magnitude"),
     ("lora_A", "lora_B"), ("lora_A", "lora_B", "lora_magnitude")],
    ids=lambda names: "+".join(names),
)  # fmt: skip
def test_partially_frozen_adapters_match_stock(path, frozen, input_grad):
    """Training with some adapter tensors frozen (LoRA-FA freezes ``lora_A``; magnitude-only or ``B``-only
    training), the input with or without a gradient: our node saves and returns exactly what is needed
    (``lora_B`` alone trainable, with a frozen input, raised in the backward), with stock's gradients."""
    torch.manual_seed(0)
    stock, ours = _stock_and_ours(nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 6)), ["0", "2"])
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    grads = {}
    for tag, model in (("stock", stock), ("ours", ours)):
        for name, p in model.named_parameters():
            if any(part in name for part in frozen):
                p.requires_grad_(False)
        params = trainable(model)
        inputs = x.clone().requires_grad_(input_grad)
        wrt = [*params.values(), *([inputs] if input_grad else [])]
        out = model(inputs)
        grads[tag] = (out, torch.autograd.grad(out.square().sum(), wrt) if wrt else ())
    assert_dtype_close(grads["ours"][0], grads["stock"][0], F32, name="output")
    assert len(grads["ours"][1]) == len(grads["stock"][1])
    for got, want in zip(grads["ours"][1], grads["stock"][1]):
        assert_dtype_close(got, want, F32, name="gradient")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval-no-grad"])
def test_one_dimensional_input_keeps_the_linear_shape(path, train):
    """A 1-D input: stock PEFT's DoRA broadcasts it to ``[1, d_out]``; ours returns ``nn.Linear``'s ``[d_out]``
    (as PEFT's LoRA does) with stock's values (``docs/limitations.md``)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 6))
    stock, ours = _stock_and_ours(base, ["0", "2"])
    x = torch.randn(8, generator=torch.Generator().manual_seed(1))
    for model in (stock, ours):
        model.train(train)
    with contextlib.nullcontext() if train else torch.no_grad():
        out, want = ours(x), stock(x)
    assert out.shape == base(x).shape == (6,)
    assert_dtype_close(out, want.reshape(out.shape), F32, name="1-D input output")


@pytest.mark.parametrize("pruned", ["lora_A", "lora_B"])
def test_adapter_weights_set_by_a_forward_pre_hook_match_stock(path, pruned):
    """``torch.nn.utils.prune`` on an adapter: its forward pre-hook sets ``weight = weight_orig * mask`` on every
    call. Ours must read the weights after the hooks ran (it read the previous call's, one optimizer step
    behind), in training and evaluation, on Linear and Conv layers. Stock's Linear norm calls the modules
    first; its conv norm reads ``lora_B.weight`` before calling them (one call behind, like ours was), so
    the reference is refreshed by a no-grad call before each of its forwards."""
    import torch.nn.utils.prune as prune

    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(40, 6))
    stock, ours = _stock_and_ours(base, ["0", "3"])
    for model in (stock, ours):
        for name, module in model.named_modules():
            if name.endswith(f"{pruned}.default"):
                prune.random_unstructured(module, "weight", amount=0.3)
    ours.load_state_dict(stock.state_dict())  # the same weight_orig and mask
    opts = {id(m): torch.optim.SGD(trainable(m).values(), lr=0.3) for m in (stock, ours)}
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        x = torch.randn(4, 3, 5, generator=gen)
        outs = {}
        for tag, model in (("stock", stock), ("ours", ours)):
            model.train()
            if model is stock:
                with torch.no_grad():
                    model(x)  # stock's pre-hooks set this step's weights
            loss = model(x).square().mean()
            loss.backward()
            opts[id(model)].step()
            opts[id(model)].zero_grad()
            model.eval()
            with torch.no_grad():
                if model is stock:
                    model(x[:1])
                outs[tag] = (loss.detach(), model(x[:1]))
        assert_dtype_close(outs["ours"][0], outs["stock"][0], F32, name=f"step {step} loss")
        assert_dtype_close(outs["ours"][1], outs["stock"][1], F32, name=f"step {step} evaluation")


# ------------------------------------------------------------------------------------ 5. torch.compile


class _LinearNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _compile_pair(device: str):
    torch.manual_seed(0)
    return _stock_and_ours(_LinearNet().to(device), ["fc1", "fc2"], rank=4)


def _compiled_run_without_recompiles(order: str, device: str, backend) -> None:
    """Eager forwards first (an eval or a training step), then compiled training steps and compiled
    evaluations in ``order``: Dynamo compiles each mode once, never again, with ``fullgraph=True``."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    stock, ours = _compile_pair(device)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1)).to(device)
    opt = torch.optim.AdamW(trainable(ours).values(), lr=1e-2)
    ours.eval()
    with torch.no_grad():
        ours(x)  # the eager forward that made every later compiled step recompile
    ours.train()
    _loss(ours(x)).backward()
    opt.step()
    opt.zero_grad()
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(ours, backend=counter, fullgraph=True)

    def train_steps():
        ours.train()
        frames = []
        for _ in range(4):
            _loss(compiled(x)).backward()
            opt.step()
            opt.zero_grad()
            frames.append(counter.frame_count)
        assert frames[1:] == frames[:1] * 3, f"training recompiled: frames after each step {frames}"

    def eval_steps():
        ours.eval()
        frames = []
        for _ in range(3):
            with torch.no_grad():
                out = compiled(x)
            frames.append(counter.frame_count)
        assert frames[1:] == frames[:1] * 2, f"evaluation recompiled: frames after each call {frames}"
        sync_weights(ours, stock)
        with torch.no_grad():
            assert_dtype_close(out, stock(x), F32, name="compiled eval output")

    for phase in (eval_steps, train_steps) if order == "eval_then_train" else (train_steps, eval_steps):
        phase()
    assert counter.frame_count == 2, "one graph for training, one for evaluation"
    assert counters["stats"]["unique_graphs"] == 2
    # compiled training still matches stock PEFT holding the same weights, gradients included
    ours.train()
    sync_weights(ours, stock)
    out = compiled(x)
    _loss(out).backward()
    _loss(stock(x)).backward()
    assert_dtype_close(out.detach(), stock(x).detach(), F32, name="compiled training output")
    grads_s = dict(stock.named_parameters())
    for name, p in trainable(ours).items():
        assert_dtype_close(p.grad, grads_s[name].grad, F32, name=f"compiled grad {name}")
    # eager forwards after compiled ones still count their norms (eager norm-count semantics kept)
    layer = dora_layers(ours)[0]
    before = layer.norm_computations
    with torch.no_grad():
        ours.base_model.model.fc1.lora_B.default.weight.mul_(1.01)
        ours(x)
    assert layer.norm_computations == before + 1
    torch._dynamo.reset()


@pytest.mark.parametrize("order", ["eval_then_train", "train_then_eval"])
def test_compiled_training_does_not_recompile(order, path):
    with torch._functorch.config.patch(decompose_custom_triton_ops=False):  # interpreted kernels stay opaque
        _compiled_run_without_recompiles(order, "cpu", "aot_eager")


@pytest.mark.parametrize("train", [True, False], ids=["train", "infer"])
def test_first_compiled_call_leaves_no_guard_to_fail(train, monkeypatch):
    """A process whose first DoRA call is compiled: nothing the traced code reads may change after that
    call (a run-time memo filled by the first call was a guard that failed once: one recompile after
    warm-up on every compiled benchmark row). The dtype-promotion table starts empty here, as on a first
    call, so a path that writes it at run time recompiles."""
    from dorafactors.kernels import operands

    monkeypatch.setattr(operands, "_PROMOTED", {})
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 32, bias=False), nn.ReLU(), nn.Linear(32, 24, bias=False))
    config_ = LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], use_dora=True, init_lora_weights=False)
    with dorafactors.patched():
        model = get_peft_model(base.to(torch.bfloat16), config_, autocast_adapter_dtype=False)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    x = torch.randn(8, 32, dtype=torch.bfloat16, requires_grad=train)
    params = [p for p in model.parameters() if p.requires_grad]
    graphs = []
    try:
        for _ in range(3):
            with torch.no_grad():
                for p in params:
                    p.add_(0.0)  # a write, as an optimizer step: the norm is recomputed
            if train:
                compiled(x).float().sum().backward()
            else:
                with torch.no_grad():
                    compiled(x)
            graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    finally:
        torch._dynamo.reset()
    assert graphs[1:] == graphs[:1] * 2, f"graphs compiled after each call: {graphs}"


@pytest.mark.gpu
@pytest.mark.parametrize("order", ["eval_then_train", "train_then_eval"])
def test_gpu_inductor_compiled_training_does_not_recompile(order):
    _compiled_run_without_recompiles(order, "cuda", "inductor")


# ------------------------------------------------------------------------------------ 6. torch.jit.trace


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_jit_trace_of_a_warm_model_follows_later_weight_edits(path, mode):
    """Tracing a model whose caches are warm must not bake a cached norm into the trace, and the kernel path
    must trace (it failed with ``'Tensor' object has no attribute 'bit_length'``)."""
    stock, ours = build_pair(targets=["emb", "lin", "gpt", "conv"])
    ids = _ids(5)
    ours.train(mode == "train")
    for _ in range(2):
        with torch.no_grad():
            ours(ids)  # warm: the norms are cached
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(ours, ids, check_trace=False)
    with torch.no_grad():
        for model in (stock, ours):
            inner = model.base_model.model
            inner.lin.base_layer.weight.mul_(1.5)
            inner.gpt.lora_B.default.weight.add_(0.2)
            inner.emb.lora_embedding_A.default.mul_(0.5)
    sync_weights(ours, stock)
    stock.train(mode == "train")
    with torch.no_grad():
        assert_dtype_close(traced(ids), stock(ids), F32, name="traced output after weight edits")
    if mode == "train":
        out = traced(ids)
        _loss(out).backward()
        _loss(stock(ids)).backward()
        grads_s = dict(stock.named_parameters())
        for name, p in trainable(ours).items():
            assert_dtype_close(p.grad, grads_s[name].grad, F32, name=f"traced grad {name}")


# ------------------------------------------------------------------------------------ 9. unseen writes


def _numpy_write(param: torch.Tensor) -> None:
    param.detach().numpy()[:] *= 1.5


def _dlpack_write(param: torch.Tensor) -> None:
    torch.from_dlpack(param.detach()).mul_(1.5)


def _unseen_writers(model) -> dict[str, object]:
    """Each entry writes ``lin``'s base weight in a way its version counter does not see (two of them
    rebind the weight first, in a way the stamps do see, and return the writer of the new alias)."""
    weight = model.base_model.model.lin.base_layer.weight

    def rebind_data():
        alias = weight.detach().clone()
        weight.data = alias
        return lambda: alias.mul_(1.5)

    def rebind_vector():
        vector = torch.nn.utils.parameters_to_vector([weight])
        torch.nn.utils.vector_to_parameters(vector, [weight])
        return lambda: vector.mul_(1.5)

    return {
        "numpy_view": lambda: lambda: _numpy_write(weight),
        "dlpack_alias": lambda: lambda: _dlpack_write(weight),
        "param_data_then_write": rebind_data,
        "vector_to_parameters_then_write": rebind_vector,
    }


@pytest.mark.parametrize(
    "write", ["numpy_view", "dlpack_alias", "param_data_then_write", "vector_to_parameters_then_write"]
)
def test_writes_the_version_counter_cannot_see_are_caught_by_verify(write, monkeypatch):
    """The documented blind spot, pinned: by default such a write leaves the cached norm stale (the rule:
    any write that bypasses PyTorch's version counter); ``PEFT_DORA_NORM_CACHE=verify`` raises naming the
    layer; ``clear_norm_caches`` is the remedy."""
    ids = _ids(6)
    for mode in ("1", "verify"):
        monkeypatch.setenv("PEFT_DORA_NORM_CACHE", mode)
        config.invalidate_cache()
        stock, ours = build_pair()
        stepped_by_an_optimizer(ours)  # else training forwards would not cache: nothing to go stale
        rebound = {}
        for name, model in (("stock", stock), ("ours", ours)):
            rebound[name] = _unseen_writers(model)[write]()
        assert_matches_stock(ours, stock, ids, what="before the write")  # caches warm, rebinding seen
        with torch.no_grad():
            for name in ("stock", "ours"):
                rebound[name]()
        if mode == "1":
            stale = ours(ids).detach()
            with pytest.raises(AssertionError):
                assert_dtype_close(stale, stock(ids), F32)
            assert dorafactors.clear_norm_caches(ours) == len(dora_layers(ours))
            assert_matches_stock(ours, stock, ids, what="after clear_norm_caches")
        else:
            with pytest.raises(
                dorafactors.StaleNormCacheError, match=r"'base_model\.model\.lin\.lora_magnitude_vector\.default'"
            ):
                ours(ids)


@pytest.mark.parametrize("purpose", ["weight norm", "sum of squares", "folded lora_B", "magnitude scale"])
def test_verify_checks_every_cached_value(purpose, monkeypatch):
    """``verify`` recomputes each kind of cached value when it is served: the norm, the base weight's sum of
    squares, the folded ``lora_B`` of the decode path and the ``m / norm`` memo; an unseen write behind
    exactly one of them raises, naming the value and the layer."""
    monkeypatch.setenv("PEFT_DORA_NORM_CACHE", "verify")
    config.invalidate_cache()
    stock, ours = build_pair()
    stepped_by_an_optimizer(ours)
    inner = ours.base_model.model
    ids = _ids(7, (1, 4))
    layer_name = "lin"
    if purpose == "weight norm":
        ours(ids)
        _numpy_write(inner.lin.lora_B.default.weight)
    elif purpose == "sum of squares":
        ours(ids)
        _numpy_write(inner.lin.base_layer.weight)
        with torch.no_grad():
            inner.lin.lora_A.default.weight.mul_(1.1)  # seen: the norm is recomputed, the stale sum reused
    elif purpose == "folded lora_B":
        ours.eval()
        with torch.no_grad():
            ours(ids)  # decode-sized no-grad call: the fold is cached
        assert cache_sizes(ours)[1][2] == 1
        _numpy_write(inner.lin.lora_magnitude_vector.default.weight)  # the norm does not depend on it
    else:
        ours.eval()
        layer_name = "conv"
        with torch.no_grad():
            ours(ids)  # conv layers memoize m / norm
        _numpy_write(inner.conv.lora_magnitude_vector.default.weight)
    grad_mode = torch.no_grad() if not ours.training else torch.enable_grad()
    with pytest.raises(dorafactors.StaleNormCacheError, match=purpose) as err, grad_mode:
        ours(ids)
    assert f"'base_model.model.{layer_name}.lora_magnitude_vector.default'" in str(err.value)
    assert "clear_norm_caches" in str(err.value)
    dorafactors.clear_norm_caches(ours)
    assert_matches_stock(ours, stock, ids, what="after clear_norm_caches")


def test_verify_is_silent_and_exact_in_a_clean_run(path, monkeypatch):
    """A run whose writes are all visible never trips ``verify`` (recomputations are bitwise the cached
    values), and the cached values are still used (hits counted)."""
    monkeypatch.setenv("PEFT_DORA_NORM_CACHE", "verify")
    config.invalidate_cache()
    stock, ours = build_pair()
    opt = torch.optim.AdamW(trainable(ours).values(), lr=1e-2, fused=True)
    for step in range(3):
        for micro in range(2):
            (_loss(ours(_ids(10 * step + micro))) / 2).backward()
        opt.step()
        opt.zero_grad()
        ours.eval()
        with torch.no_grad():
            for _ in range(2):
                ours(_ids(step, (1, 3)))
        ours.train()
    hits = sum(layer._df_norm_cache.hits for layer in dora_layers(ours))
    assert hits > 0
    assert_matches_stock(ours, stock, _ids(42), what="verify mode")


# ------------------------------------------------------------------------------------ the CUDA paths


@pytest.mark.gpu
def test_gpu_inference_mode_torch_func_and_trace_match_stock(monkeypatch):
    """On CUDA the layers take the real Triton kernels (the compose and its one-pass backward, forced on for
    these small shapes) and the folded decode path: the same lifecycle checks there."""
    monkeypatch.setenv("PEFT_DORA_FUSED_BACKWARD", "1")
    config.invalidate_cache()
    stock, ours = build_pair()
    stock.cuda()
    ours.cuda()
    ids = _ids(1, device="cuda")
    opt = torch.optim.AdamW(trainable(ours).values(), lr=1e-2, fused=True)
    for step in range(3):
        ours.eval()
        sync_weights(ours, stock)
        with torch.inference_mode():
            assert_dtype_close(ours(ids), stock(ids), F32, name="inference-mode output")
        ours.train()
        _loss(ours(_ids(step, device="cuda"))).backward()
        opt.step()
        opt.zero_grad()
        assert_matches_stock(ours, stock, ids, what=f"after step {step}")
        assert_caches_bounded(ours)
    params = {n: p.detach() * 1.1 for n, p in ours.named_parameters()}
    grads_o = torch.func.grad(_functional_loss(ours))(params, ids)
    grads_s = torch.func.grad(_functional_loss(stock))(params, ids)
    for name in grads_s:
        assert_dtype_close(grads_o[name], grads_s[name], F32, name=f"grad {name}")
    per_sample = torch.func.vmap(torch.func.grad(_functional_loss(ours)), in_dims=(None, 0))(params, ids[:, None])
    per_sample_s = torch.func.vmap(torch.func.grad(_functional_loss(stock)), in_dims=(None, 0))(params, ids[:, None])
    for name in per_sample_s:
        assert_dtype_close(per_sample[name], per_sample_s[name], F32, name=f"per-sample grad {name}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(ours, ids, check_trace=False)
    with torch.no_grad():
        for model in (stock, ours):
            model.base_model.model.lin.base_layer.weight.mul_(1.5)
        assert_dtype_close(traced(ids), stock(ids), F32, name="traced output after a weight edit")
