"""Under ``torch.autocast`` (fp32 weights, half-precision activations) ours is at least as close to fp64 as stock.

Stock PEFT's DoRA composes in the dtype of ``g = m / ||W + s B A||``: under autocast the magnitude and the
input are fp32, so ``g`` and the whole extra output stay fp32 while the GEMMs run in half precision, and
PEFT rounds the layer's output to the activation dtype once, at its end. A composition into the half
activation dtype (or a fold of ``g s`` into a ``lora_B`` that autocast rounds to half) adds roundings stock
does not make, and a norm of the unrounded factors does not normalize the adapter the forward applies (the
factors as autocast rounds them; stock builds its ``B A`` through the same autocast modules). Checked for
Linear (decode-sized calls, which take the fold without autocast, and larger ones), GPT-2 ``Conv1D``,
Conv2d and Embedding (a lookup autocast leaves alone), in evaluation and in training (output and every
gradient), and that the norm cache follows autocast.
"""

from __future__ import annotations

import pytest
import torch

from tests._models import DEVICE, LayerCase, build_triplet, make_input, run_forward_backward
from tests._tolerances import StockFidelity

HALF = (torch.bfloat16, torch.float16)

CASES = [
    LayerCase(kind="linear", d_in=96, d_out=160, rank=8, batch=(2, 3), scaling=2.0),  # fold-sized
    LayerCase(kind="linear", d_in=96, d_out=160, rank=8, batch=(4, 80), bias=False),  # above the fold's rows
    LayerCase(kind="gpt2_conv1d", d_in=64, d_out=96, rank=4, batch=(2, 5)),
    LayerCase(kind="conv2d", d_in=6, d_out=10, rank=4, batch=(2,), spatial=7),
    LayerCase(kind="conv2d", d_in=6, d_out=10, rank=4, batch=(2,), spatial=7, bias=False, scaling=2.0),
    LayerCase(kind="embedding", d_in=50, d_out=48, rank=4, batch=(2, 6)),  # a lookup: autocast leaves it alone
]


def _autocast_call(model, x, dtype, *, train: bool):
    with torch.autocast(DEVICE.type, dtype=dtype):
        if train:
            return run_forward_backward(model, x, train=True)
        model.eval()
        with torch.no_grad():
            model(x)  # the first call fills the caches (and would build the fold)
            return model(x), {}


@pytest.mark.parametrize("kernels", [False, True], ids=["reference", "kernels"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_autocast_as_close_to_fp64_as_stock(dtype, train, kernels, monkeypatch) -> None:
    """Every output and gradient within the per-tensor bound, and the geometric mean over all the cases' half
    outputs at most stock's (``tests/_tolerances.py``). One mean over every case: ours and stock differ at
    fp32 level in ``g`` (stock rounds ``B A`` to half for its norm), which moves single ratios by about 1%
    either way, so a mean over three draws of one case would be noise. ``kernels``: the Triton kernels forced
    (the CPU interpreter here), with the dtype mixes autocast brings (half GEMM outputs, an fp32 extra)."""
    from dorafactors.dispatch import config

    if kernels:
        monkeypatch.setenv("PEFT_DORA_FUSED", "1")
        monkeypatch.setenv("PEFT_DORA_FUSED_BACKWARD", "1")
        config.invalidate_cache()
    fidelity = StockFidelity(f"autocast {dtype} {'train' if train else 'eval'}")
    for base_case in CASES:
        for seed in range(3):
            case = LayerCase(**{**base_case.__dict__, "seed": seed})
            stock, ours, truth = build_triplet(case, torch.float32)
            x = make_input(case, torch.float32)
            out_s, grads_s = _autocast_call(stock, x, dtype, train=train)
            out_o, grads_o = _autocast_call(ours, x, dtype, train=train)
            x_t = x.double() if x.is_floating_point() else x
            if train:
                out_t, grads_t = run_forward_backward(truth, x_t, train=True)
            else:
                with torch.no_grad():
                    out_t, grads_t = truth.eval()(x_t), {}
            assert out_o.dtype == out_s.dtype, (case.kind, out_o.dtype, out_s.dtype)
            name = f"{case.kind} {tuple(case.batch)} seed {seed}"
            fidelity.add(f"{name} output", out_o, out_s, out_t, dtype=out_s.dtype)
            for key, grad_t in grads_t.items():
                fidelity.add(f"{name} grad {key}", grads_o[key], grads_s[key], grad_t, dtype=grads_s[key].dtype)
    fidelity.assert_geomean()


def test_the_norm_follows_autocast_and_verify_agrees(monkeypatch) -> None:
    """The cached norm is the norm of the adapter the forward applies: from ``A`` and ``B`` as autocast rounds
    them while autocast is on, from the factors themselves when it is off; switching autocast recomputes it
    (the cache's signature holds the autocast dtype), and ``verify`` recomputes it the same way."""
    from dorafactors.dispatch import config, rules
    from dorafactors.norm import engine

    monkeypatch.setattr(rules, "INFERENCE_FOLD_MAX_ROWS", 0)  # every call reads the norm cache (no fold)
    case = LayerCase(kind="linear", d_in=96, d_out=160, rank=8, batch=(2, 3), scaling=2.0)
    _, ours, _ = build_triplet(case, torch.float32)
    x = make_input(case, torch.float32)
    target = ours.base_model.model.target
    layer = target.lora_magnitude_vector["default"]
    W, A, B = target.base_layer.weight, target.lora_A["default"].weight, target.lora_B["default"].weight

    def cached_norm():
        return layer._df_norm_cache.peek("default")

    def expected(rounded_to=None):
        a, b = (A, B) if rounded_to is None else (A.to(rounded_to).float(), B.to(rounded_to).float())
        with torch.no_grad():
            return engine.weight_norm(W, a, b, case.scaling)

    # the norm paths agree to 1e-5 (fp32 sums in different orders; the GPU kernels); the rounding of A and B
    # moves this case's norm by far more, so each comparison below tells the two apart
    rtol = 1e-5
    for dtype in (torch.bfloat16, torch.float16):
        assert ((expected(dtype) - expected()).abs() / expected()).max() > 10 * rtol, dtype
    ours.eval()
    with torch.no_grad():
        ours(x)
        torch.testing.assert_close(cached_norm(), expected(), rtol=rtol, atol=0)
        for dtype in (torch.bfloat16, torch.float16):
            with torch.autocast(DEVICE.type, dtype=dtype):
                ours(x)
            torch.testing.assert_close(cached_norm(), expected(dtype), rtol=rtol, atol=0)
        ours(x)
        torch.testing.assert_close(cached_norm(), expected(), rtol=rtol, atol=0)  # autocast off: the factors
        monkeypatch.setenv("PEFT_DORA_NORM_CACHE", "verify")
        config.invalidate_cache()
        try:
            for _ in range(2):  # the second call is served and verified against a recomputation
                with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
                    ours(x)
        finally:
            monkeypatch.delenv("PEFT_DORA_NORM_CACHE")
            config.invalidate_cache()
