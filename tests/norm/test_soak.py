"""Soak: 10,000 optimizer steps of a tiny DoRA model, an ``inference_mode`` evaluation every 100 steps, stock
PEFT trained side by side on the same data. Memory must not grow and the result must equal stock's.

The memory measure is the total size of every live tensor reachable from Python, counted once per storage
(``gc`` enumeration of plain tensors and parameters after a collection). Every value dorafactors keeps between calls (norm, sum-of-squares
and fold caches, the ``m / norm`` memo, PEFT's own ``_dora_cache``) is a Python-held tensor, so an entry
added per step or per evaluation shows up in it, and so would any other leak (an autograd graph or
optimizer state kept alive); counting storages, not tensor objects, keeps views from being counted twice.
It is taken at the same point of the loop after step 100 and after step 10,000, so both see the same
transient tensors.

Both models run in fp64: over 10,000 AdamW steps fp32 rounding differences between two correct
implementations grow to the size of fp32's tolerance, while a stale cached value would not stay below
fp64's.
"""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import dorafactors
from tests._lifecycle import assert_caches_bounded, cache_sizes, one_thread, perturb
from tests._tolerances import assert_dtype_close

F64 = torch.float64
STEPS = 10_000
EVAL_EVERY = 100


def live_tensor_bytes() -> int:
    """Bytes of every live plain tensor or parameter storage reachable from Python (each storage once).

    Tensor subclasses are skipped: everything dorafactors keeps is a plain tensor, and subclasses left
    behind by earlier tests (the fake tensors of compiled graphs) have no storage to measure.
    """
    gc.collect()
    storages: dict[tuple[int, str], int] = {}
    for obj in gc.get_objects():
        if type(obj) in (torch.Tensor, nn.Parameter):  # type(): isinstance would touch dead weak proxies
            storage = obj.untyped_storage()
            storages[(storage.data_ptr(), str(obj.device))] = storage.nbytes()
    return sum(storages.values())


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(6, 8)
        self.down = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


@pytest.mark.slow
def test_ten_thousand_steps_with_inference_mode_evals_keep_memory_flat_and_equal_stock():
    torch.manual_seed(0)
    base = _Tiny().double()
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["down"], use_dora=True, init_lora_weights=False)
    stock = get_peft_model(copy.deepcopy(base), cfg)
    perturb(stock, seed=1)
    with dorafactors.patched():
        ours = get_peft_model(copy.deepcopy(base), cfg)
    ours.load_state_dict(stock.state_dict())
    optimizers = [
        torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3) for model in (stock, ours)
    ]
    teacher = torch.randn(6, 3, generator=torch.Generator().manual_seed(2), dtype=F64)
    data = torch.Generator().manual_seed(3)
    held_out = torch.randn(4, 6, generator=torch.Generator().manual_seed(4), dtype=F64)
    measured: dict[int, int] = {}
    with one_thread():
        for step in range(1, STEPS + 1):
            x = torch.randn(4, 6, generator=data, dtype=F64)
            y = torch.tanh(x @ teacher)
            for model, opt in zip((stock, ours), optimizers):
                (model(x) - y).square().mean().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            if step % EVAL_EVERY == 0:
                outs = []
                for model in (stock, ours):
                    model.eval()
                    with torch.inference_mode():
                        outs.append(model(held_out))
                    model.train()
                assert_dtype_close(outs[1], outs[0], F64, name=f"inference-mode eval at step {step}")
                assert_caches_bounded(ours)
                if step in (EVAL_EVERY, STEPS):
                    del outs
                    measured[step] = live_tensor_bytes()
    assert max(max(sizes) for sizes in cache_sizes(ours)) == 1  # the caches were used, not bypassed
    assert measured[STEPS] == measured[EVAL_EVERY], f"live tensor bytes grew: {measured}"
    with torch.no_grad():
        for train in (True, False):
            stock.train(train)
            ours.train(train)
            assert_dtype_close(ours(held_out), stock(held_out), F64, name=f"final output (train={train})")
    final_s = dict(stock.named_parameters())
    for name, p in ours.named_parameters():
        assert_dtype_close(p, final_s[name], F64, name=f"final {name}")
