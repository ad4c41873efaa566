"""Training loops beyond ``optimizer.step()``, against stock PEFT holding the same weights (and fp64 where fp32
results differ): hand-written parameter updates (of gradients from autograd and from ``torch.func``; of the
adapters and of a base bias), adapters frozen while a fused optimizer still steps them, adapters trained by a
fused optimizer between two frozen evaluations, parameters swapped (``torch.utils.swap_tensors``), ``.data``
aliases handed to ``functional_call``, selective activation checkpointing, DPO-style reference forwards with the
adapters disabled, and fp16 autocast with a grad scaler that skips a step. Every loop checks the values after each
step: a norm served from a cache that missed a write shows up as a wrong output.
"""

from __future__ import annotations

import contextlib
import copy
import functools

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from tests._lifecycle import (
    VOCAB,
    assert_matches_stock,
    build_pair,
    check_against_stock,
    dora_layers,
    one_thread,
    outputs_and_grads,
    stepped_by_an_optimizer,
    sync_weights,
    trainable,
)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


def _ids(seed: int, shape=(2, 6)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).square().mean()


def _hand_written_step(model: nn.Module, how: str, lr: float = 0.5) -> None:
    """One update of every trainable parameter by its gradient, as loops without ``torch.optim`` write it."""
    for param in trainable(model).values():
        if param.grad is None:
            continue
        if how == "data":  # no version bump: `.data` has a counter of its own
            param.data.add_(param.grad, alpha=-lr)
        else:
            with torch.no_grad():
                param.sub_(lr * param.grad)
        param.grad = None


@pytest.mark.parametrize("how", ["data", "no_grad"])
@pytest.mark.parametrize("eval_first", [False, True], ids=["train-first", "eval-first"])
def test_hand_written_updates_without_an_optimizer_match_stock(how, eval_first):
    """A loop that updates the parameters itself (``p.data.add_``: no version bump, no optimizer step): every
    training forward and every evaluation afterwards (``no_grad``, ``inference_mode``) sees the updated
    weights. ``eval_first``: a ``no_grad`` forward caches the norm before the first training step."""
    stock, ours = build_pair(seed=3)
    for model in (stock, ours):
        model.train()
    if eval_first:
        with torch.no_grad():
            ours(_ids(0))
    for step in range(3):
        ids = _ids(step + 1)
        for model in (stock, ours):
            _loss(model, ids).backward()
            _hand_written_step(model, how)
        assert_matches_stock(ours, stock, ids, what=f"{how} step {step}", modes=("no_grad", "inference", "grad"))


@pytest.mark.parametrize("how", ["data", "no_grad"])
def test_hand_written_updates_after_the_optimizer_is_freed_match_stock(how):
    """A run that warms up with ``torch.optim.AdamW``, drops it and goes on with a hand-written rule: once the
    optimizer is freed nothing counts the writes of the parameters it stepped, so its training forwards do not
    use the cache again, and every forward after each hand-written update sees it."""
    import gc

    from dorafactors.norm.cache import optimizer_untracked

    stock, ours = build_pair(seed=5)
    for model in (stock, ours):
        model.train()
        optimizer = torch.optim.AdamW(list(trainable(model).values()), lr=1e-2)
        _loss(model, _ids(0)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert_matches_stock(ours, stock, _ids(1), what="after the AdamW step", modes=("no_grad", "grad"))
    adapters = tuple(trainable(ours).values())
    assert not optimizer_untracked(adapters)  # the optimizer lives: its step counts their writes
    del optimizer
    gc.collect()
    assert optimizer_untracked(adapters)
    for step in range(3):
        ids = _ids(step + 2)
        for model in (stock, ours):
            _loss(model, ids).backward()
            _hand_written_step(model, how)
        assert_matches_stock(ours, stock, ids, what=f"{how} step {step}", modes=("grad", "no_grad", "inference"))


def test_fused_optimizer_keeps_stepping_adapters_frozen_mid_training():
    """``lora_A`` / ``lora_B`` frozen (``requires_grad_(False)``) after two steps, the fused AdamW kept, with
    ``zero_grad(set_to_none=False)``: their zero gradients stay, so the optimizer keeps moving them (weight
    decay, momentum) without a version bump; the norm must follow."""
    stock, ours = build_pair(seed=4)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True) for m in (stock, ours)]
    for step in range(5):
        if step == 2:
            for model in (stock, ours):
                for name, param in model.named_parameters():
                    if "lora_A" in name or "lora_B" in name or "lora_embedding" in name:
                        param.requires_grad_(False)
        ids = _ids(10 + step)
        for model, optimizer in zip((stock, ours), optimizers):
            optimizer.zero_grad(set_to_none=False)
            _loss(model, ids).backward()
            optimizer.step()
        assert_matches_stock(ours, stock, ids, what=f"step {step}", modes=("no_grad", "grad"))


def test_reference_forwards_with_the_adapters_disabled_between_training_steps():
    """A DPO-style loop whose reference model is the policy with its adapters off (TRL's way when both share
    one PEFT model): each step runs the training forward, a ``no_grad`` reference forward of the same model
    under ``disable_adapter()``, and an AdamW step on a loss of both. The reference forward is the base
    model's (stock's, bitwise) and computes no norm; the losses, outputs and gradients follow stock's."""
    stock, ours = build_pair(seed=6)
    optimizers = [torch.optim.AdamW(trainable(m).values(), lr=1e-2) for m in (stock, ours)]
    layers = dora_layers(ours)
    for step in range(4):
        ids = _ids(30 + step)
        results = []
        for model, optimizer in zip((stock, ours), optimizers):
            model.train()
            policy = model(ids)
            norms = sum(layer.norm_computations for layer in layers)
            with torch.no_grad(), model.disable_adapter():
                reference = model(ids)
            assert sum(layer.norm_computations for layer in layers) == norms, f"step {step}: the reference forward"
            loss = (policy - reference).square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            results.append((loss.detach(), reference))
        (loss_s, reference_s), (loss_o, reference_o) = results
        torch.testing.assert_close(reference_o, reference_s, rtol=0, atol=0)
        torch.testing.assert_close(loss_o, loss_s)
        assert_matches_stock(ours, stock, ids, what=f"step {step}", modes=("no_grad", "inference", "grad"))


def test_fp16_autocast_with_a_grad_scaler_that_skips_a_step():
    """Mixed-precision training as on GPUs without bf16: fp16 autocast, ``torch.amp.GradScaler`` (unscale, clip,
    ``scaler.step``); one step gets an infinite gradient, so the scaler skips ``optimizer.step()`` and the
    weights stay as they were. After every step, skipped or not, our outputs and gradients are stock's for the
    same weights: the norm follows the steps taken and survives the one skipped."""
    stock, ours = build_pair(seed=8)
    optimizer = torch.optim.AdamW(trainable(ours).values(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for step in range(4):
        ids = _ids(40 + step)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = _loss(ours, ids)
        scaler.scale(loss).backward()
        if step == 2:
            next(iter(trainable(ours).values())).grad[0] = float("inf")
        before = {name: param.detach().clone() for name, param in trainable(ours).items()}
        scale = scaler.get_scale()
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(trainable(ours).values(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        changed = any(not torch.equal(before[name], param) for name, param in trainable(ours).items())
        assert changed == (step != 2) and (scaler.get_scale() < scale) == (step == 2), f"step {step}"
        assert_matches_stock(ours, stock, ids, what=f"step {step}", modes=("no_grad", "inference", "grad"))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
@pytest.mark.parametrize("train_between", [True, False], ids=["train-mode", "eval-mode"])
def test_adapters_trained_between_two_frozen_evaluations_are_seen(fused, train_between):
    """Evaluate with the adapter frozen (PEFT's ``set_adapter(..., inference_mode=True)``), unfreeze it, train
    it, freeze it again with its gradients dropped (``zero_grad()``), evaluate again. A fused optimizer writes
    the adapters without a version bump, and in both frozen evaluations nothing requires or has a gradient:
    the second must not be served the norm or decode fold of the first. ``train_between=False``: the steps
    run with the model left in ``eval()``, so no ``train()`` call drops the fold in between."""
    stock, ours = build_pair(seed=6)
    ids = _ids(20)
    for step in range(3):
        for model in (stock, ours):
            model.set_adapter("default", inference_mode=True)
            model.eval()
        assert_matches_stock(ours, stock, ids, what=f"frozen evaluation {step}", modes=("no_grad", "inference"))
        for model in (stock, ours):
            model.set_adapter("default")
            model.train(train_between)
        optimizers = [
            torch.optim.AdamW(trainable(m).values(), lr=1e-2, fused=fused, foreach=not fused) for m in (stock, ours)
        ]
        for model, optimizer in zip((stock, ours), optimizers):
            _loss(model, _ids(30 + step)).backward()
            optimizer.step()
            optimizer.zero_grad()


def test_an_optimizer_step_bumps_the_version_of_what_it_wrote():
    """After any ``torch.optim`` step, every parameter it was given a gradient for has a new version (fused
    optimizers write without one): parameters without a gradient keep theirs."""
    stock, ours = build_pair(seed=7)
    del stock
    params = list(trainable(ours).values())
    optimizer = torch.optim.AdamW(params, lr=1e-2, fused=True)
    _loss(ours, _ids(1)).backward()
    skipped = params[0]
    skipped.grad = None
    versions = [p._version for p in params]
    optimizer.step()
    assert skipped._version == versions[0]
    assert all(p._version != v for p, v in zip(params[1:], versions[1:]))


@contextlib.contextmanager
def _swap_on_conversion():
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        yield
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)


def test_parameters_swap_after_training_steps():
    """No weak reference is kept to a parameter, which ``torch.utils.swap_tensors`` refuses: after training
    steps (warm caches, an optimizer that has stepped), a swapping ``.to(float64)`` converts every parameter,
    direct swaps of the base weight, ``lora_A`` and the magnitude take effect, and a model without DoRA in the
    same process swaps too."""
    stock, ours = build_pair(seed=5)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (stock, ours)]
    for step in range(2):
        ids = _ids(20 + step)
        for model, optimizer in zip((stock, ours), optimizers):
            _loss(model, ids).backward()
            optimizer.step()
            optimizer.zero_grad()
    ids = _ids(30)
    assert_matches_stock(ours, stock, ids, what="before the swaps")
    inner = ours.base_model.model
    for param in (inner.lin.base_layer.weight, inner.lin.lora_A["default"].weight,
                  inner.lin.lora_magnitude_vector["default"].weight):  # fmt: skip
        replacement = nn.Parameter(param.detach() * 1.25, requires_grad=param.requires_grad)
        torch.utils.swap_tensors(param, replacement)
        assert_matches_stock(ours, stock, ids, what=f"after swapping a {tuple(param.shape)} parameter")
    with _swap_on_conversion():
        for model in (stock, ours):
            model.to(torch.float64)
        assert all(p.dtype == torch.float64 for p in ours.parameters())
        assert_matches_stock(ours, stock, ids, dtype=torch.float64, what="after a swapping .to(float64)")
        plain = nn.Linear(4, 3)
        torch.optim.SGD(plain.parameters(), lr=0.1).step()  # its parameters are now an optimizer's
        plain.to(torch.float64)
        assert plain.weight.dtype == torch.float64


def _policy(saved_ops):
    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved_ops else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


@pytest.mark.parametrize(
    "saved",
    [("mm",), ("mul", "add"), ("mm", "mul", "add")],
    ids=lambda ops: "+".join(ops),
)
def test_selective_activation_checkpointing_matches_stock(saved):
    """``checkpoint(..., context_fn=create_selective_checkpoint_contexts(policy))`` hands the recomputation the
    outputs the forward saved, by their position in the operator sequence: the norm (computed in one, served
    from the cache in the other, or worked on in place) must not shift them. Checked before and after an
    optimizer step (the first forward after a step misses the cache), outputs and gradients against stock."""
    ops = {name: getattr(torch.ops.aten, name) for name in ("mm", "mul", "add")}
    policy = _policy({ops[name].default if name == "mm" else ops[name].Tensor for name in saved})
    stock, ours = build_pair(seed=6)
    stepped_by_an_optimizer(ours)  # the norm cache serves training forwards from the start

    def checkpointed(model: nn.Module) -> nn.Module:
        class Checkpointed(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.inner = model

            def forward(self, ids: torch.Tensor) -> torch.Tensor:
                context = functools.partial(create_selective_checkpoint_contexts, policy)
                return checkpoint(self.inner, ids, use_reentrant=False, context_fn=context)

        return Checkpointed()

    optimizer = torch.optim.SGD(ours.parameters(), lr=0.1)
    for step in range(3):
        ids = _ids(40 + step)
        sync_weights(ours, stock)
        out_t, grads_t = outputs_and_grads(checkpointed(copy.deepcopy(stock).double()), ids)
        out_o, grads_o = outputs_and_grads(checkpointed(ours), ids)
        out_s, grads_s = outputs_and_grads(checkpointed(stock), ids)
        truth = {"output": out_t, **grads_t}
        check_against_stock(out_o, out_s, torch.float32, f"step {step} output", functools.partial(truth.get, "output"))
        assert grads_o.keys() == grads_s.keys() == grads_t.keys()
        for name, grad in grads_o.items():
            check_against_stock(
                grad, grads_s[name], torch.float32, f"step {step} grad {name}", functools.partial(truth.get, name)
            )
        _loss(ours, ids).backward()  # then a step: the next checkpointed forward misses the norm cache
        optimizer.step()
        optimizer.zero_grad()


def test_hand_written_updates_of_gradients_from_torch_func_match_stock():
    """Gradients from ``torch.func.grad`` over ``functional_call`` (inside the transform nothing is cached, and
    a forward through trainable tensors still ends what ``no_grad`` calls cached), applied through ``.data``."""
    from torch.func import functional_call, grad

    stock, ours = build_pair(seed=7)
    ids = _ids(50)
    assert_matches_stock(ours, stock, ids, what="before", modes=("no_grad",))  # caches the norms
    for step in range(2):
        params = {name: p.detach() for name, p in trainable(ours).items()}
        grads = grad(lambda ps, x: functional_call(ours, ps, (x,)).square().mean())(params, _ids(51 + step))
        for name, param in trainable(ours).items():
            param.data.add_(grads[name], alpha=-0.5)
        assert_matches_stock(ours, stock, ids, what=f"after step {step}", modes=("no_grad",))


def test_a_hand_trained_base_bias_reaches_the_decode_fold():
    """Adapters frozen, the base layer's bias trained by hand (BitFit-style): the decode path's folded values,
    which include the bias, follow each update."""
    stock, ours = build_pair(seed=8)
    for model in (stock, ours):
        for param in model.parameters():
            param.requires_grad_(False)
    stock.base_model.model.lin.base_layer.bias.requires_grad_(True)  # (as ours: the fp64 truth has gradients)
    bias = ours.base_model.model.lin.base_layer.bias
    bias.requires_grad_(True)
    one_token = _ids(60, (1, 1))
    assert_matches_stock(ours, stock, one_token, what="before", modes=("no_grad",))  # caches the fold
    for step in range(2):
        _loss(ours, _ids(61 + step)).backward()
        bias.data.add_(bias.grad, alpha=-20.0)
        bias.grad = None
        assert_matches_stock(ours, stock, one_token, what=f"after step {step}", modes=("no_grad",))


def test_functional_call_with_data_aliases_follows_writes_into_the_parameter():
    """``functional_call(model, {name: p.data})``: every ``.data`` access is a new tensor with a version counter
    of its own, over the parameter's storage, often at the freed alias's address. An in-place write into the
    parameter between calls must still be seen (the alias's stamp holds a weak reference to the alias)."""
    from torch.func import functional_call

    stock, ours = build_pair(seed=9)
    key = "base_model.model.lin.lora_B.default.weight"
    ids = _ids(70)
    for step in range(12):
        sync_weights(ours, stock)
        with torch.no_grad():
            got = functional_call(ours, {key: dict(ours.named_parameters())[key].data}, (ids,))
            want = stock(ids)
        check_against_stock(got, want, torch.float32, f"call {step}", lambda: copy.deepcopy(stock).double()(ids))
        with torch.no_grad():
            dict(ours.named_parameters())[key].mul_(1.1)  # a write the parameter's version counter sees
