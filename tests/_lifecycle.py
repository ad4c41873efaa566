"""A tiny model with every DoRA layer kind, built stock and patched with the same non-identity weights, and
the checks the lifecycle tests share: outputs and gradients against stock PEFT, cache sizes.

``MixedNet`` chains an ``nn.Embedding``, an ``nn.Linear``, a transformers ``Conv1D`` (fan_in_fan_out) and an
``nn.Conv1d``; every one gets a DoRA adapter whose ``lora_B`` and magnitude are perturbed away from DoRA's
identity init. The stock model is built unpatched in the same process; :func:`sync_weights` copies our
current weights into it so that every comparison is against stock PEFT holding exactly our weights.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import dorafactors
from tests._tolerances import TOLERANCES, assert_dtype_close, rel_error

VOCAB = 20
TARGETS = ["emb", "lin", "gpt", "conv"]


class MixedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(VOCAB, 12)
        self.lin = nn.Linear(12, 10)
        self.gpt = Conv1D(9, 10)
        self.conv = nn.Conv1d(9, 6, 3, padding=1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = torch.tanh(self.lin(h))
        h = self.gpt(h)
        return self.conv(h.transpose(-1, -2)).transpose(-1, -2)


def dora_config(r: int = 3, targets: list[str] | None = None) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets or TARGETS, use_dora=True, init_lora_weights=False)


@torch.no_grad()
def perturb(model: nn.Module, seed: int) -> None:
    """``lora_B`` random and magnitudes scaled by 1 +- 0.25: away from DoRA's identity init."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name or "lora_embedding_B" in name:
            p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=torch.float64))
        elif "lora_magnitude_vector" in name:
            p.mul_(1 + 0.25 * torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype))


def build_pair(seed: int = 0, base: nn.Module | None = None, targets: list[str] | None = None):
    """(stock, ours): stock PEFT built unpatched, ours built patched, identical perturbed weights."""
    torch.manual_seed(seed)
    base = MixedNet() if base is None else base
    nn.init.normal_(base.gpt.weight, std=0.3) if hasattr(base, "gpt") else None
    stock = get_peft_model(copy.deepcopy(base), dora_config(targets=targets))
    perturb(stock, seed + 1)
    with dorafactors.patched():
        ours = get_peft_model(copy.deepcopy(base), dora_config(targets=targets))
    ours.load_state_dict(stock.state_dict())
    assert dora_layers(ours) and all(type(m).__module__.startswith("dorafactors.") for m in dora_layers(ours))
    assert not any(type(m).__module__.startswith("dorafactors.") for m in dora_layers(stock))
    return stock, ours


def dora_layers(model: nn.Module) -> list[nn.Module]:
    return [
        layer
        for module in model.modules()
        if isinstance(getattr(module, "lora_magnitude_vector", None), nn.ModuleDict)
        for layer in module.lora_magnitude_vector.values()
    ]


def cache_sizes(model: nn.Module) -> list[tuple[int, int, int, int]]:
    """Per DoRA layer of ours: (norm entries, sum-of-squares entries, fold entries, scale memos)."""
    sizes = []
    for layer in dora_layers(model):
        caches = [
            layer.__dict__.get(slot) for slot in ("_df_norm_cache_obj", "_df_sumsq_cache_obj", "_df_fold_cache_obj")
        ]
        sizes.append((*(0 if c is None else len(c) for c in caches), int("_df_scale_memo" in layer.__dict__)))
    return sizes


def assert_caches_bounded(model: nn.Module) -> None:
    """Every cache holds at most one entry per (layer, adapter, purpose); each DoRA layer serves one adapter."""
    for sizes in cache_sizes(model):
        assert max(sizes) <= 1, f"a DoRA layer holds more than one cached entry per purpose: {sizes}"


def sync_weights(ours: nn.Module, stock: nn.Module) -> None:
    """Stock PEFT holding exactly our current weights (and our train/eval mode)."""
    stock.load_state_dict(ours.state_dict())
    stock.train(ours.training)


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def stepped_by_an_optimizer(model: nn.Module) -> None:
    """Make ``model``'s trainable parameters what they are in a training run after its first step (the
    benchmarks' ``providers.stepped_by_an_optimizer``). Until then the norm cache serves no forward that records
    autograd through them (a hand-written update could follow: "Training without an optimizer" in
    ``norm/cache.py``); tests of what the cache serves in training start here."""
    from benchmarks.providers import stepped_by_an_optimizer as step_all

    step_all(list(trainable(model).values()))


def outputs_and_grads(model: nn.Module, ids: torch.Tensor, probe_seed: int = 5):
    """Forward in grad mode and the gradients of ``sum(out * probe)`` w.r.t. every trainable parameter
    (``autograd.grad``: accumulated ``.grad`` fields are left alone)."""
    params = trainable(model)
    out = model(ids)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(probe_seed), dtype=torch.float64)
    probe = probe.to(out.device)
    grads = torch.autograd.grad((out.double() * probe).sum(), list(params.values()), allow_unused=True)
    return out.detach(), dict(zip(params, grads))


def check_against_stock(actual, expected, dtype, name: str, truth) -> None:
    """``actual`` (ours) == ``expected`` (stock) elementwise within the dtype's tolerance; in fp32, failing
    that, within the fp32 tolerance of the fp64 truth ``truth()`` in norm (``rel_error <= rtol``).

    Two correct fp32 implementations can differ elementwise by more than the tolerance where a value
    cancels (a reduction of terms much larger than the result, e.g. a gradient element near zero), and
    their distances to fp64 are rounding noise of 1e-7..1e-6 whose ratio varies by 2x from tensor to
    tensor; a stale or wrong value is orders of magnitude further from the truth than 1e-5."""
    try:
        assert_dtype_close(actual, expected, dtype, name=name)
    except AssertionError:
        if dtype != torch.float32:
            raise
        rtol = TOLERANCES[torch.float32][0]
        err = rel_error(actual, truth())
        assert err <= rtol, f"{name}: relative error {err:.3e} against fp64 truth > {rtol} (fp32 tolerance)"


def assert_matches_stock(
    ours: nn.Module, stock: nn.Module, ids: torch.Tensor, dtype=torch.float32, what="", modes=("no_grad", "grad")
) -> dict[str, torch.Tensor | None]:
    """Outputs (``no_grad``, ``inference``: under that mode) and the grad-mode output and every gradient
    (``grad``) of ours == stock holding our weights, in the order of ``modes``; see
    :func:`check_against_stock` (the fp64 truth is stock upcast, built only when needed). Returns our
    gradients (of ``sum(out * probe)``, see :func:`outputs_and_grads`) when ``grad`` is in ``modes``."""
    sync_weights(ours, stock)
    truth_cache: dict[str, object] = {}

    def truth(key):
        def value():
            if not truth_cache:
                model = copy.deepcopy(stock).double()
                with torch.no_grad():
                    truth_cache["no_grad output"] = truth_cache["inference output"] = model(ids)
                truth_cache["grad output"], grads = outputs_and_grads(model, ids)
                truth_cache.update({f"grad {name}": grad for name, grad in grads.items()})
            return truth_cache[key]

        return value

    grads_o: dict[str, torch.Tensor | None] = {}
    for mode in modes:
        if mode != "grad":
            with torch.inference_mode() if mode == "inference" else torch.no_grad():
                check_against_stock(ours(ids), stock(ids), dtype, f"{what} {mode} output", truth(f"{mode} output"))
            continue
        out_o, grads_o = outputs_and_grads(ours, ids)
        out_s, grads_s = outputs_and_grads(stock, ids)
        check_against_stock(out_o, out_s, dtype, f"{what} grad output", truth("grad output"))
        assert grads_o.keys() == grads_s.keys()
        for name, grad in grads_o.items():
            if grads_s[name] is None:
                assert grad is None or not grad.any(), f"{what} {name}: gradient where stock has none"
                continue
            assert grad is not None, f"{what} {name}: no gradient where stock has one"
            check_against_stock(grad, grads_s[name], dtype, f"{what} grad {name}", truth(f"grad {name}"))
    return grads_o


@contextlib.contextmanager
def one_thread():
    """Tiny models run faster on one intra-op thread (no OpenMP spin-up per op; on a loaded 2-core CI
    machine two threads cost 20-30x per forward)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
