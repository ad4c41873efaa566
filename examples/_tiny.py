"""Shared by the examples: a model (a tiny Llama built from a config, or a Hugging Face model) and
synthetic token data, so every example runs offline on a CPU in seconds and at real sizes on a GPU."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

TINY = "tiny"
#: The Llama projections DoRA adapts in every example.
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_base(
    model: str = TINY, *, dtype: torch.dtype = torch.float32, seed: int = 0, layers: int = 2
) -> torch.nn.Module:
    """``"tiny"``: a ``layers``-layer Llama with random weights (seeded); otherwise ``from_pretrained(model)``."""
    if model == TINY:
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=176,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
        )
        return LlamaForCausalLM(config).to(dtype)
    return AutoModelForCausalLM.from_pretrained(model, dtype=dtype)


def vocab_size(model: torch.nn.Module) -> int:
    return model.get_input_embeddings().num_embeddings


def token_batches(vocab: int, count: int, batch: int, seq: int, *, seed: int = 1) -> list[torch.Tensor]:
    """``count`` batches of random token ids ``[batch, seq]`` (a repeated pattern, so the loss can fall)."""
    gen = torch.Generator().manual_seed(seed)
    pattern = torch.randint(0, vocab, (seq,), generator=gen)
    out = []
    for _ in range(count):
        noise = torch.randint(0, vocab, (batch, seq), generator=gen)
        keep = torch.rand(batch, seq, generator=gen) < 0.7
        out.append(torch.where(keep, pattern.expand(batch, seq), noise))
    return out


class TokenDataset(torch.utils.data.Dataset):
    """Rows ``{"input_ids", "labels"}`` for ``transformers.Trainer`` (causal LM: labels = inputs)."""

    def __init__(self, vocab: int, rows: int, seq: int, *, seed: int = 1) -> None:
        self.ids = torch.cat(token_batches(vocab, 1, rows, seq, seed=seed))

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def dora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every DoRA layer object (PEFT keeps one per adapted module and adapter)."""
    return [layer for module in model.modules() for layer in getattr(module, "lora_magnitude_vector", {}).values()]


def all_dorafactors(model: torch.nn.Module) -> bool:
    layers = dora_layers(model)
    return bool(layers) and all(type(layer).__module__.startswith("dorafactors.") for layer in layers)


def all_stock(model: torch.nn.Module) -> bool:
    layers = dora_layers(model)
    return bool(layers) and all(type(layer).__module__.startswith("peft.") for layer in layers)
