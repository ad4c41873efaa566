"""The doctor's per-layer section: the path each DoRA layer takes (norm, composition, decode fold, norm
cache) and the rule that turned a fast path down, one function per decision."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from .model import logical_base_weight, meta, stand_in

#: The decisions of one layer, in report order; each is ``{"value": ..., "reason": ...}``.
DECISIONS = ("norm", "compose_inference", "compose_training", "decode_fold", "norm_cache")


def _decision(value: str, reason: str = "") -> dict[str, str]:
    return {"value": value, "reason": reason}


def _stock_base(cls: type) -> type:
    """The stock PEFT class of a DoRA layer class (ours subclass it and list it last)."""
    return cls.__bases__[-1] if cls.__module__.startswith("dorafactors.") else cls


@dataclasses.dataclass(frozen=True)
class _LayerView:
    """One DoRA layer as the decisions see it; ``device`` is where its tensors live (or will)."""

    kind: str  # "Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d"
    lora_layer: nn.Module
    adapter: str
    weight: torch.Tensor  # meta tensor of the (dequantized) base weight, (d_out, d_in, ...)
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    magnitude: torch.Tensor  # (d_out,)
    dropout: nn.Module
    device: torch.device


def _layer_view(
    lora_layer: nn.Module, adapter: str, kind: str, dora_layer: nn.Module, device: torch.device
) -> _LayerView:
    if kind == "Embedding":
        lora_A, lora_B = lora_layer.lora_embedding_A[adapter], lora_layer.lora_embedding_B[adapter]
        dropout: nn.Module = nn.Identity()
    else:
        lora_A, lora_B = lora_layer.lora_A[adapter].weight, lora_layer.lora_B[adapter].weight
        dropout = lora_layer.lora_dropout[adapter]
    return _LayerView(
        kind=kind,
        lora_layer=lora_layer,
        adapter=adapter,
        weight=logical_base_weight(lora_layer.get_base_layer()),
        lora_A=lora_A,
        lora_B=lora_B,
        magnitude=dora_layer.weight,
        dropout=dropout,
        device=lora_A.device if lora_A.device.type != "meta" else device,
    )


def _layer_facts(name: str, view: _LayerView, shape: list[int], ours: bool) -> dict[str, Any]:
    """The layer's identity: name, adapter, kind (the base class for quantized Linears), shape, dtypes."""
    base_layer = view.lora_layer.get_base_layer()
    plain = type(base_layer) in (nn.Linear, nn.Embedding) or view.kind != "Linear"
    return {
        "layer": name,
        "adapter": view.adapter,
        "kind": view.kind if plain else type(base_layer).__name__,
        "implementation": "dorafactors" if ours else "stock PEFT",
        "shape": shape,
        "dtypes": {
            "weight": str(view.weight.dtype).removeprefix("torch."),
            "lora": str(view.lora_A.dtype).removeprefix("torch."),
            "magnitude": str(view.magnitude.dtype).removeprefix("torch."),
        },
        "device": str(view.device),
    }


def _norm_decision(w2: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor) -> dict[str, str]:
    """``norm.engine.norm_path`` for the norm factors, and why a faster path was not taken."""
    from ..dispatch import rules
    from ..norm import engine

    path = engine.norm_path(w2, a2, b2)
    if path == "dense":
        reason = f"d_in {w2.shape[1]} <= r {a2.shape[0]}: the exact dense form is as cheap"
    elif path == "torch":
        reason = rules.fused_norm_ok(w2, a2, b2)[1]
    elif path == "triton":
        reason = rules.norm_gemm_ok(w2, a2, b2)[1]  # why not the GEMM path (informational)
    else:
        reason = ""
    return _decision(path, reason)


def _compose_decisions(view: _LayerView, d_out: int, tokens: int) -> tuple[dict[str, str], dict[str, str]]:
    """The composition ``g * (base + lora)`` in inference and in training, for ``tokens`` activation rows."""
    from ..dispatch import rules

    if view.kind == "Embedding":
        skipped = _decision("n/a", "embeddings: PEFT composes g * base + result itself")
        return skipped, skipped
    if not isinstance(view.dropout, nn.Identity):
        note = "lora_dropout > 0: PEFT passes no base output; the base is recomputed in chunks (PEFT_DORA_FWD_CHUNK_MB)"
        return _decision("recompute-base", note), _decision("recompute-base", note)
    act_dtype, lora_dtype = view.weight.dtype, view.lora_A.dtype
    shape = (tokens, d_out) if view.kind == "Linear" else (1, d_out, tokens)
    lora_act, base_act = stand_in(shape, lora_dtype, view.device), stand_in(shape, act_dtype, view.device)
    scale = stand_in((d_out,), torch.promote_types(view.magnitude.dtype, torch.float32), view.device)
    ok, reason = rules.fused_compose_ok(lora_act, base_act, scale, torch.promote_types(lora_dtype, act_dtype))
    inference = _decision("triton" if ok else "torch", reason)
    if ok:
        ok, reason = rules.fused_backward_ok(tokens, d_out, view.kind == "Linear")
    return inference, _decision("triton" if ok else "torch", reason)


def _decode_fold_decision(view: _LayerView, decode_tokens: int) -> dict[str, str]:
    """Whether a decode call of ``decode_tokens`` rows folds the DoRA scale into one Linear."""
    from peft.tuners.lora import dora as peft_dora

    from .. import distributed
    from ..dispatch import rules

    if view.kind != "Linear":
        return _decision("n/a", "the decode fold is for Linear layers")
    fold_ok, reason = rules.inference_fold_ok(decode_tokens)
    lora_B_module = view.lora_layer.lora_B[view.adapter]
    checks = (
        (not isinstance(view.dropout, nn.Identity), "lora_dropout > 0"),
        (type(lora_B_module) is not nn.Linear, f"lora_B is a {type(lora_B_module).__name__}, not nn.Linear"),
        (getattr(lora_B_module, "bias", None) is not None, "lora_B has a bias"),
        (view.lora_A.dtype != view.lora_B.dtype, "lora_A and lora_B dtypes differ"),
        (distributed.process_group_active(), "a torch.distributed process group is initialized"),
        (bool(getattr(peft_dora, "ENABLE_DORA_CACHING", False)), "PEFT's ENABLE_DORA_CACHING is on"),
    )
    for failed, why in checks:
        if fold_ok and failed:
            fold_ok, reason = False, why
    return _decision("yes" if fold_ok else "no", reason)


def _norm_cache_decision() -> dict[str, str]:
    from ..dispatch import config

    if config.norm_cache_verify():
        return _decision("verify", "PEFT_DORA_NORM_CACHE=verify (every served value checked)")
    if config.norm_cache_enabled():
        return _decision("on")
    return _decision("off", "PEFT_DORA_NORM_CACHE=0")


def _layer_paths(
    name: str,
    lora_layer: nn.Module,
    adapter: str,
    dora_layer: nn.Module,
    device: torch.device,
    tokens: int,
    decode_tokens: int,
) -> dict[str, Any]:
    """Every dispatch decision for one DoRA layer, as plain data (value and reason per decision)."""
    from .. import layers

    stock_cls = _stock_base(type(dora_layer))
    ours_cls = getattr(layers, stock_cls.__name__)
    ours = type(dora_layer) is ours_cls
    kind = stock_cls.__name__.removeprefix("Dora").removesuffix("Layer")
    view = _layer_view(lora_layer, adapter, kind, dora_layer, device)
    factors = ours_cls._norm_factors(dora_layer, view.weight, meta(view.lora_A), meta(view.lora_B))
    w2, a2, b2 = (stand_in(t.shape, t.dtype, view.device) for t in factors)
    d_out = w2.shape[0]
    row = _layer_facts(name, view, [d_out, w2.shape[1], a2.shape[0]], ours)
    if not ours:
        stock = _decision("stock", "a stock PEFT layer: dorafactors.patch(model) converts it")
        return row | dict.fromkeys(DECISIONS, stock)
    row["norm"] = _norm_decision(w2, a2, b2)
    row["compose_inference"], row["compose_training"] = _compose_decisions(view, d_out, tokens)
    row["decode_fold"] = _decode_fold_decision(view, decode_tokens)
    row["norm_cache"] = _norm_cache_decision()
    return row


def _dora_layers(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Module]]:
    found = []
    for name, module in model.named_modules():
        magnitudes = getattr(module, "lora_magnitude_vector", None)
        if isinstance(magnitudes, nn.ModuleDict):
            for adapter, layer in magnitudes.items():
                found.append((name, module, adapter, layer))
    return found


def model_paths(
    model: nn.Module, *, device: str | torch.device | None = None, tokens: int = 4096, decode_tokens: int = 1
) -> dict[str, Any]:
    """The per-layer decisions of every DoRA layer of ``model`` (a PEFT model, live or on the meta device)."""
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    layers = [
        _layer_paths(name, lora_layer, adapter, dora_layer, target, tokens, decode_tokens)
        for name, lora_layer, adapter, dora_layer in _dora_layers(model)
    ]
    return {"tokens": tokens, "decode_tokens": decode_tokens, "target_device": str(target), "layers": layers}
