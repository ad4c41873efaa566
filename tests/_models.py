"""Build the same one-layer PEFT DoRA model three times: stock PEFT, dorafactors, and an fp64 stock truth.

All three share every weight (the truth gets them upcast exactly), lora_B is non-zero and the magnitudes
are perturbed away from the initial norms, so nothing is compared at DoRA's identity init. Dropout is
replaced by a fixed-mask module (identical masks in every dtype), which still makes PEFT take its
``base_result=None`` path because it is not ``nn.Identity``.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

import dorafactors

KINDS = ("linear", "gpt2_conv1d", "embedding", "conv1d", "conv2d", "conv3d")
#: Where the models live: ``DORAFACTORS_TEST_DEVICE=cuda`` runs the property tests on the GPU (kernels on).
DEVICE = torch.device(os.environ.get("DORAFACTORS_TEST_DEVICE", "cpu"))
ADAPTERS = ("default", "second")


@dataclass(frozen=True)
class LayerCase:
    kind: str
    d_in: int
    d_out: int
    rank: int
    bias: bool = True
    scaling: float = 1.0
    dropout: bool = False
    adapters: int = 1
    batch: tuple[int, ...] = (3,)
    kernel: int = 3
    stride: int = 1
    padding: int = 1
    dilation: int = 1
    groups: int = 1
    spatial: int = 5
    seed: int = 0
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def float_input(self) -> bool:
        return self.kind != "embedding"


class Holder(nn.Module):
    def __init__(self, target: nn.Module) -> None:
        super().__init__()
        self.target = target

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.target(x)


class FixedMaskDropout(nn.Module):
    """Deterministic stand-in for ``nn.Dropout``: multiplies by a mask drawn once per input shape."""

    def __init__(self, p: float, seed: int) -> None:
        super().__init__()
        self.p = p
        self.seed = seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        keep = (torch.rand(x.shape, generator=gen) >= self.p).to(torch.float64) / (1.0 - self.p)
        return x * keep.to(device=x.device, dtype=x.dtype)


class TinyLM(nn.Module):
    """Blocks of q / up / down projections (no downloads), optionally activation-checkpointed in training."""

    def __init__(self, width: int = 16, blocks: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(32, width)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {"q": nn.Linear(width, width), "up": nn.Linear(width, 2 * width), "down": nn.Linear(2 * width, width)}
            )
            for _ in range(blocks)
        )
        self.head = nn.Linear(width, 32)
        self.checkpointing = False

    @staticmethod
    def block(block, h):
        h = h + torch.tanh(block["q"](h))
        return h + block["down"](torch.relu(block["up"](h)))

    def forward(self, ids):
        h = self.emb(ids)
        for block in self.blocks:
            if self.checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(self.block, block, h, use_reentrant=False)
            else:
                h = self.block(block, h)
        return self.head(h)


def make_layer(case: LayerCase) -> nn.Module:
    if case.kind == "linear":
        return nn.Linear(case.d_in, case.d_out, bias=case.bias)
    if case.kind == "gpt2_conv1d":
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(case.d_out, case.d_in)
        nn.init.normal_(layer.weight, std=0.2)
        nn.init.normal_(layer.bias, std=0.2)
        return layer
    if case.kind == "embedding":
        return nn.Embedding(case.d_in, case.d_out)
    conv = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}[case.kind]
    return conv(
        case.d_in,
        case.d_out,
        case.kernel,
        stride=case.stride,
        padding=case.padding,
        dilation=case.dilation,
        groups=case.groups,
        bias=case.bias,
    )


def make_input(case: LayerCase, dtype: torch.dtype, seed: int = 123) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if case.kind == "embedding":
        return torch.randint(0, case.d_in, case.batch, generator=gen).to(DEVICE)
    if case.kind in ("linear", "gpt2_conv1d"):
        shape = (*case.batch, case.d_in)
    else:
        dims = {"conv1d": 1, "conv2d": 2, "conv3d": 3}[case.kind]
        shape = (case.batch[0], case.d_in) + (case.spatial,) * dims
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)


def _config(case: LayerCase) -> LoraConfig:
    return LoraConfig(
        r=case.rank,
        lora_alpha=case.rank,
        target_modules=["target"],
        use_dora=True,
        init_lora_weights=False,
        lora_dropout=0.1 if case.dropout else 0.0,
    )


def _build(base: nn.Module, case: LayerCase, *, autocast_adapter_dtype: bool) -> nn.Module:
    model = get_peft_model(copy.deepcopy(base), _config(case), autocast_adapter_dtype=autocast_adapter_dtype)
    for name in ADAPTERS[1 : case.adapters]:
        model.add_adapter(name, _config(case))  # (PEFT 0.18's add_adapter has no autocast flag)
    adapter_dtype = next(p.dtype for n, p in model.named_parameters() if "lora_" in n)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "lora_" in pname and param.dtype != adapter_dtype:
                param.data = param.data.to(adapter_dtype)  # every adapter in the same dtype as the first
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.set_adapter(list(ADAPTERS[: case.adapters]))
            for name in ADAPTERS[: case.adapters]:
                module.scaling[name] = case.scaling
                if case.dropout:
                    module.lora_dropout[name] = FixedMaskDropout(0.3, seed=case.seed + len(name))
    return model


@torch.no_grad()
def _perturb(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_magnitude_vector" in name:
            noise = 1.0 + 0.25 * torch.randn(param.shape, generator=gen, dtype=torch.float64)
            param.copy_((param.to(torch.float64) * noise.to(param.device)).to(param.dtype))
        elif "lora_B" in name or "lora_embedding_B" in name:
            noise = 0.3 * torch.randn(param.shape, generator=gen, dtype=torch.float64)
            param.copy_(noise.to(param.device, param.dtype))


def build_triplet(
    case: LayerCase, dtype: torch.dtype, *, fp32_adapters: bool = False
) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(stock, ours, truth): identical weights; truth is stock PEFT in fp64."""
    torch.manual_seed(case.seed)
    base = Holder(make_layer(case)).to(dtype).to(DEVICE)
    stock = _build(base, case, autocast_adapter_dtype=fp32_adapters)
    _perturb(stock, case.seed + 1)
    with dorafactors.patched():
        ours = _build(base, case, autocast_adapter_dtype=fp32_adapters)
    ours.load_state_dict(stock.state_dict())
    truth = _build(copy.deepcopy(base).to(torch.float64), case, autocast_adapter_dtype=False)
    truth.load_state_dict(stock.state_dict())
    assert _dora_layers(ours) and all(type(m).__module__.startswith("dorafactors.") for m in _dora_layers(ours))
    assert all(not type(m).__module__.startswith("dorafactors.") for m in _dora_layers(stock))
    return stock, ours, truth


def _dora_layers(model: nn.Module) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for module in model.modules():
        magnitudes = getattr(module, "lora_magnitude_vector", None)
        if isinstance(magnitudes, nn.ModuleDict):
            layers.extend(magnitudes.values())
    return layers


def run_forward_backward(
    model: nn.Module, x: torch.Tensor, *, train: bool, probe_seed: int = 7
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward, then backward of ``sum(out * probe)``; returns the output and every gradient (and x's)."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    x = x.detach().clone()
    if x.is_floating_point():
        x.requires_grad_(True)
    out = model(x)
    gen = torch.Generator().manual_seed(probe_seed)
    probe = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device)
    (out.to(torch.float64) * probe).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    if x.is_floating_point():
        grads["<input>"] = x.grad.detach().clone()
    return out.detach(), grads


# ---------------------------------------------------------------------------------------------------
# hypothesis strategies


@st.composite
def layer_cases(draw, kinds: tuple[str, ...] = KINDS) -> LayerCase:
    kind = draw(st.sampled_from(kinds))
    scaling = draw(st.sampled_from([0.0, -1.5, 0.37, 1.0, 2.0, 40.0]))
    rank = draw(st.sampled_from([1, 2, 3, 4, 8]))
    common = dict(
        rank=rank,
        scaling=scaling,
        seed=draw(st.integers(0, 10_000)),
        adapters=draw(st.sampled_from([1, 1, 2])),
        dropout=draw(st.booleans()),
    )
    if kind in ("linear", "gpt2_conv1d"):
        return LayerCase(
            kind=kind,
            d_in=draw(st.sampled_from([1, 2, 5, 16, 33])),
            d_out=draw(st.sampled_from([1, 3, 8, 17])),
            bias=draw(st.booleans()) if kind == "linear" else True,
            batch=draw(st.sampled_from([(1,), (4,), (2, 3)])),
            **common,
        )
    if kind == "embedding":
        return LayerCase(
            kind=kind,
            d_in=draw(st.sampled_from([3, 11, 40])),
            d_out=draw(st.sampled_from([1, 4, 9])),
            batch=draw(st.sampled_from([(5,), (2, 6)])),
            **{**common, "dropout": False},
        )
    groups = draw(st.sampled_from([1, 1, 2]))
    rank = rank * groups
    kernel = draw(st.sampled_from([1, 2, 3]))
    # PEFT's lora_A conv does not copy the base layer's dilation, so stock PEFT itself only runs
    # dilation > 1 with kernel 1 (otherwise the two branches' shapes differ and stock raises).
    dilation = draw(st.sampled_from([1, 2])) if kernel == 1 else 1
    return LayerCase(
        kind=kind,
        d_in=groups * draw(st.sampled_from([1, 2, 3])),
        d_out=groups * draw(st.sampled_from([1, 2, 5])),
        bias=draw(st.booleans()),
        kernel=kernel,
        stride=draw(st.sampled_from([1, 2])),
        padding=draw(st.sampled_from([0, 1])),
        dilation=dilation,
        groups=groups,
        batch=(draw(st.sampled_from([1, 2])),),
        spatial=draw(st.sampled_from([5, 6])) if kind != "conv3d" else 5,
        **{**common, "rank": rank},
    )
