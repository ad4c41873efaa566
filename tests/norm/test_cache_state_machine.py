"""The operation sequences of a real fine-tuning run, as a hypothesis state machine, against stock PEFT.

Steps: micro-batches that accumulate gradients, optimizer steps (AdamW plain / foreach / fused; the fused
kernel writes parameters without bumping their version counters), the steps of a loop without an optimizer
(updates through ``.data`` or in place), parameter swaps (``torch.utils.swap_tensors``), eval / train, ``no_grad`` and
``inference_mode`` forwards (decode-sized and larger), ``load_state_dict`` (copy and assign), in-place edits
of every kind of tensor, ``.data`` writes followed by ``clear_norm_caches`` (the documented contract), adapter
add / switch / delete, merge / unmerge, dtype moves and ``torch.func.functional_call`` (outputs and
``grad``).

Invariant after every step: stock PEFT (built unpatched, in the same process) holding exactly our current
weights gives the same no-grad outputs, grad-mode outputs and gradients; the gradients our micro-batches
accumulated equal the sum of the per-batch gradients, each checked against stock's for the same batch at the
same weights; and no cache holds more than one entry per (layer, adapter, purpose).
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from torch import nn

import dorafactors
from tests._lifecycle import (
    VOCAB,
    assert_caches_bounded,
    assert_matches_stock,
    build_pair,
    check_against_stock,
    dora_config,
    one_thread,
    perturb,
    sync_weights,
)
from tests._peft import MERGE_FIXED
from tests._tolerances import assert_dtype_close


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


OPTIMIZERS = {"plain": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
EDIT_TARGETS = ("base_layer.weight", "base_layer.bias", "lora_A", "lora_B", "lora_embedding", "magnitude")
EXTRA_ADAPTERS = ("second", "third")


#: What runs right after a change of weights, adapters or dtype: the first forward after a change is the one
#: that recomputes (and caches) every value, so its mode matters (an inference-mode value must never reach a
#: later grad-mode call). ``rows`` 1-2 of 5 tokens take the folded decode path in no-grad calls.
NEXT_FORWARD = st.sampled_from(["none", "no_grad", "inference", "grad"])
ROWS = st.sampled_from([1, 2, 60])


def _ids(seed: int, rows: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, 5), generator=torch.Generator().manual_seed(seed))


class DoraLifecycle(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.stock, self.ours = build_pair(seed=3)
        self.dtype = torch.float32
        self.adapters = ["default"]
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.expected_grads: dict[str, torch.Tensor] = {}
        self.check_ids = _ids(12345, 2)
        #: an optimizer has stepped the adapter parameters in their current storage (its writes are counted; a
        #: ``.data`` write into them is then the documented blind spot)
        self.stepped = False

    # ------------------------------------------------------------------ helpers
    def _lora_params(self) -> list[torch.Tensor]:
        return [p for n, p in self.ours.named_parameters() if "lora_" in n]

    def _reset_training_state(self) -> None:
        """After the parameter set or the parameters' dtypes changed: new optimizers, no gradients."""
        self.optimizers.clear()
        self._reset_gradients()

    def _reset_gradients(self) -> None:
        self.ours.zero_grad(set_to_none=True)
        self.expected_grads.clear()

    def _forward(self, mode: str, seed: int, rows: int) -> None:
        """One forward of ours in ``mode`` (``none``: skip), compared with stock holding the same weights."""
        if mode != "none":
            assert_matches_stock(self.ours, self.stock, _ids(seed, rows), self.dtype, what=mode, modes=(mode,))

    # ------------------------------------------------------------------ training
    @rule(seed=st.integers(0, 10_000))
    def micro_batch(self, seed):
        """A micro-batch: its gradient (the first forward after whatever came before) is checked against
        stock's at the same weights, then a forward + ``backward()`` accumulates it into ``.grad``."""
        ids = _ids(seed, 2)
        grads = assert_matches_stock(self.ours, self.stock, ids, self.dtype, what="micro-batch", modes=("grad",))
        for name, grad in grads.items():
            if grad is not None:
                self.expected_grads[name] = self.expected_grads.get(name, 0) + grad
        out = self.ours(ids)
        probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        (out.double() * probe).sum().backward()

    @rule(kind=st.sampled_from(sorted(OPTIMIZERS)), then=NEXT_FORWARD, seed=st.integers(0, 10_000), rows=ROWS)
    def optimizer_step(self, kind, then, seed, rows):
        if kind not in self.optimizers:
            self.optimizers[kind] = torch.optim.AdamW(self._lora_params(), lr=0.05, **OPTIMIZERS[kind])
        self.optimizers[kind].step()
        self.stepped = True
        self._reset_gradients()
        self._forward(then, seed, rows)

    @precondition(lambda self: not self.stepped)
    @rule(seed=st.integers(0, 10_000), through_data=st.booleans(), then=NEXT_FORWARD, rows=ROWS)
    def hand_written_step(self, seed, through_data, then, rows):
        """A step of a loop without an optimizer: a forward and backward, then every adapter parameter moved by
        its gradient in place, through ``.data`` (no version bump) or under ``no_grad``."""
        self._reset_gradients()
        self.ours(_ids(seed, 2)).square().mean().backward()
        for param in self._lora_params():
            if param.grad is None:
                continue
            if through_data:
                param.data.add_(param.grad, alpha=-0.1)
            else:
                with torch.no_grad():
                    param.sub_(0.1 * param.grad)
        self._reset_gradients()
        self._forward(then, seed, rows)

    @rule(train=st.booleans())
    def set_mode(self, train):
        self.ours.train(train)

    # ------------------------------------------------------------------ evaluation
    @rule(mode=NEXT_FORWARD, seed=st.integers(0, 10_000), rows=ROWS)
    def evaluate(self, mode, seed, rows):
        """A no-grad, inference-mode or grad-mode forward (in the current train / eval mode)."""
        self._forward(mode, seed, rows)

    @rule(seed=st.integers(0, 10_000), with_grad=st.booleans())
    def functional_call(self, seed, with_grad):
        gen = torch.Generator().manual_seed(seed)
        params = {
            n: (p.detach() * (1 + 0.05 * torch.randn(p.shape, generator=gen, dtype=torch.float64))).to(p.dtype)
            for n, p in self.ours.named_parameters()
        }
        ids = _ids(seed, 2)
        sync_weights(self.ours, self.stock)

        def loss(model, params):
            return torch.func.functional_call(model, params, (ids,)).square().mean()

        def run(model, params):
            if with_grad:
                return torch.func.grad(lambda p: loss(model, p))(params)
            with torch.no_grad():
                return {"output": torch.func.functional_call(model, params, (ids,))}

        got, want = run(self.ours, params), run(self.stock, params)
        truth = {}

        def truth_of(name):
            def value():
                if not truth:
                    truth.update(run(copy.deepcopy(self.stock).double(), {k: v.double() for k, v in params.items()}))
                return truth[name]

            return value

        for name in want:
            check_against_stock(got[name], want[name], self.dtype, f"functional_call {name}", truth_of(name))

    # ------------------------------------------------------------------ weight changes
    @rule(assign=st.booleans(), seed=st.integers(0, 10_000), then=NEXT_FORWARD, rows=ROWS)
    def load_state_dict(self, assign, seed, then, rows):
        gen = torch.Generator().manual_seed(seed)
        state = {
            k: (v.double() + 0.02 * torch.randn(v.shape, generator=gen, dtype=torch.float64)).to(v.dtype)
            for k, v in self.ours.state_dict().items()
        }
        self.ours.load_state_dict(state, assign=assign)
        if assign:  # new Parameter objects: the optimizers hold the old ones
            self._reset_training_state()
            self.stepped = False
        self._forward(then, seed, rows)

    @rule(
        layer=st.sampled_from(["emb", "lin", "gpt", "conv"]),
        part=st.sampled_from(EDIT_TARGETS),
        factor=st.floats(0.5, 1.5),
        through_data=st.booleans(),
        then=NEXT_FORWARD,
        rows=ROWS,
    )
    def edit_in_place(self, layer, part, factor, through_data, then, rows):
        """An in-place edit under no_grad (seen by the version counter), or through ``.data`` followed by
        ``clear_norm_caches`` (the documented contract for writes the counter cannot see)."""
        prefix = f"base_model.model.{layer}."
        names = [n for n, _ in self.ours.named_parameters() if n.startswith(prefix) and part in n]
        if not names:
            return
        param = dict(self.ours.named_parameters())[names[0]]
        with torch.no_grad():
            if through_data:
                param.data.mul_(factor)
                dorafactors.clear_norm_caches(self.ours)
            else:
                param.mul_(factor)
        self._forward(then, int(factor * 1000), rows)

    @rule(
        layer=st.sampled_from(["emb", "lin", "gpt", "conv"]),
        part=st.sampled_from(EDIT_TARGETS),
        factor=st.floats(0.5, 1.5),
        then=NEXT_FORWARD,
        rows=ROWS,
    )
    def swap_parameter(self, layer, part, factor, then, rows):
        """``torch.utils.swap_tensors`` of a parameter with a scaled copy, as a swapping ``.to()`` or
        ``load_state_dict`` does (``torch.__future__.set_swap_module_params_on_conversion``); the gradients are
        dropped first (a swap moves them with the content)."""
        prefix = f"base_model.model.{layer}."
        names = [n for n, _ in self.ours.named_parameters() if n.startswith(prefix) and part in n]
        if not names:
            return
        param = dict(self.ours.named_parameters())[names[0]]
        self._reset_gradients()
        torch.utils.swap_tensors(param, nn.Parameter(param.detach() * factor, requires_grad=param.requires_grad))
        self._forward(then, int(factor * 1000), rows)

    # ------------------------------------------------------------------ adapters
    @precondition(lambda self: len(self.adapters) < 1 + len(EXTRA_ADAPTERS))
    @rule(seed=st.integers(0, 10_000), then=NEXT_FORWARD, rows=ROWS)
    def add_adapter(self, seed, then, rows):
        name = next(a for a in EXTRA_ADAPTERS if a not in self.adapters)
        with dorafactors.patched():
            self.ours.add_adapter(name, dora_config(r=2))
        self.stock.add_adapter(name, dora_config(r=2))
        perturb(self.ours, seed)  # every adapter away from identity init (the new one included)
        self.adapters.append(name)
        self._reset_training_state()
        self._forward(then, seed, rows)

    @rule(index=st.integers(0, len(EXTRA_ADAPTERS)), then=NEXT_FORWARD, rows=ROWS)
    def switch_adapter(self, index, then, rows):
        name = self.adapters[index % len(self.adapters)]
        for model in (self.ours, self.stock):
            model.set_adapter(name)
        self._forward(then, index, rows)

    @precondition(lambda self: len(self.adapters) > 1)
    @rule(index=st.integers(1, len(EXTRA_ADAPTERS)))
    def delete_adapter(self, index):
        name = self.adapters[1 + (index - 1) % (len(self.adapters) - 1)]
        for model in (self.ours, self.stock):
            if model.active_adapter == name:
                model.set_adapter("default")
            model.delete_adapter(name)
        self.adapters.remove(name)
        self._reset_training_state()

    # ------------------------------------------------------------------ merge, dtype
    @precondition(lambda self: MERGE_FIXED)  # PEFT < 0.21 cannot unmerge the Conv1D layer
    @rule(seed=st.integers(0, 10_000), then=NEXT_FORWARD, rows=ROWS)
    def merge_unmerge(self, seed, then, rows):
        ids = _ids(seed, 2)
        sync_weights(self.ours, self.stock)
        for model in (self.ours, self.stock):
            model.base_model.merge_adapter()
        with torch.no_grad():
            assert_dtype_close(self.ours(ids), self.stock(ids), self.dtype, name="merged output")
        for model in (self.ours, self.stock):
            model.base_model.unmerge_adapter()
        self._forward(then, seed, rows)

    @rule(dtype=st.sampled_from([torch.float32, torch.float64]), then=NEXT_FORWARD, rows=ROWS)
    def move_dtype(self, dtype, then, rows):
        for model in (self.ours, self.stock):
            model.to(dtype)
        self.stepped = self.stepped and dtype == self.dtype  # a cast moves every parameter to new storage
        self.dtype = dtype
        self._reset_training_state()
        self._forward(then, 7, rows)

    # ------------------------------------------------------------------ invariant
    @invariant()
    def equals_stock_and_stays_bounded(self):
        assert_caches_bounded(self.ours)
        assert_matches_stock(self.ours, self.stock, self.check_ids, self.dtype, what="invariant")
        params = dict(self.ours.named_parameters())
        for name, expected in self.expected_grads.items():
            grad = params[name].grad
            assert grad is not None, f"{name}: the micro-batches accumulated no gradient"
            # each summand was checked against stock when its micro-batch ran: here the accumulation itself
            assert_dtype_close(grad, expected, self.dtype, name=f"accumulated grad {name}")


DoraLifecycle.TestCase.settings = settings(stateful_step_count=20)
TestDoraLifecycle = pytest.mark.filterwarnings("ignore::UserWarning")(DoraLifecycle.TestCase)
