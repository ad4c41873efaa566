"""The model the doctor inspects: built on the meta device, and zero-memory stand-ins for its tensors."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch

TINY_MODEL = "tiny"
_TINY_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHORT_DTYPE = {
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
}


def _resolve_dtype(name: str, config: Any) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    # transformers v5 names it ``dtype`` (``torch_dtype`` is deprecated there); 4.x ``torch_dtype``
    found = getattr(config, "dtype", None) if hasattr(config, "dtype") else getattr(config, "torch_dtype", None)
    if isinstance(found, str):
        found = getattr(torch, found, None)
    return found if isinstance(found, torch.dtype) and found.is_floating_point else torch.float32


def _tiny_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )


def build_model(
    model: str = TINY_MODEL, *, dtype: str = "auto", rank: int = 16, target_modules: Sequence[str] | str | None = None
) -> tuple[torch.nn.Module, str]:
    """A PEFT DoRA model built on the meta device while PEFT is patched, and a one-line description.

    ``model``: ``"tiny"`` (a 2-layer Llama from a config), a local folder or Hugging Face id of a
    transformers model (only its config is read), or a PEFT adapter folder (its LoraConfig is used on its
    base model). ``target_modules`` defaults to the adapter's, else every Linear but the output head.
    """
    from peft import LoraConfig, PeftConfig, get_peft_model
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from ..patching import patched

    lora_config = None
    if model == TINY_MODEL:
        config = _tiny_config()
        targets: Any = target_modules or list(_TINY_TARGETS)
        described = "tiny built-in Llama (2 layers, hidden 128)"
    else:
        if os.path.isfile(os.path.join(model, "adapter_config.json")):
            lora_config = PeftConfig.from_pretrained(model)
            base_name = lora_config.base_model_name_or_path
            if not base_name:
                raise ValueError(f"the adapter in {model} does not name its base model (base_model_name_or_path)")
            described = f"adapter {model} on {base_name}"
            model = base_name
        else:
            described = model
        config = AutoConfig.from_pretrained(model)
        targets = target_modules or "all-linear"
    torch_dtype = _resolve_dtype(dtype, config)
    with torch.device("meta"):
        try:
            base = AutoModelForCausalLM.from_config(config)
        except ValueError:  # not a causal LM: the plain backbone
            base = AutoModel.from_config(config)
    base = base.to(torch_dtype)
    if lora_config is None:
        if isinstance(targets, str) and targets != "all-linear":
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        lora_config = LoraConfig(r=rank, lora_alpha=2 * rank, use_dora=True, target_modules=targets)
    with patched(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation notes, not ours
        peft_model = get_peft_model(base, lora_config)
    return peft_model, f"{described}, {SHORT_DTYPE.get(torch_dtype, str(torch_dtype))}"


def stand_in(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-stride tensor with this shape, dtype and device: one element of memory."""
    return torch.empty((), dtype=dtype, device=device).expand(*shape)


def meta(t: torch.Tensor) -> torch.Tensor:
    """A meta tensor with ``t``'s shape and dtype."""
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def logical_base_weight(base_layer: torch.nn.Module) -> torch.Tensor:
    """A meta tensor with the shape and dtype of the (dequantized) base weight, without dequantizing."""
    weight = getattr(base_layer, "W_q", None)
    if not isinstance(weight, torch.Tensor):
        weight = base_layer.weight
    if weight.is_floating_point() and type(weight) in (torch.nn.Parameter, torch.Tensor):
        return meta(weight)
    quant_state = getattr(weight, "quant_state", None)
    dtype = getattr(quant_state, "dtype", None) or getattr(base_layer, "compute_dtype", None) or torch.float16
    shape = (base_layer.out_features, base_layer.in_features)
    return torch.empty(shape, dtype=dtype, device="meta")
