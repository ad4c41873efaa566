"""QDoRA: DoRA on a bitsandbytes 4-bit (NF4) or 8-bit base model with dorafactors (CUDA, ``pip install
dorafactors[qdora]``), trained side by side with stock PEFT on the same batches.

    python examples/qdora.py --bits 4                      # tiny model (saved to a temporary folder, reloaded in 4-bit)
    python examples/qdora.py --bits 4 --model meta-llama/Llama-3.1-8B --steps 50 --batch 4 --seq 2048 --rank 64

The recipe is the usual QLoRA one (``BitsAndBytesConfig``, ``prepare_model_for_kbit_training``) with
``use_dora=True`` and ``get_peft_model`` inside ``dorafactors.patched()``. The norm of a quantized layer is
computed from the dequantized weight once per optimizer step (the cache keys on the packed weight and its
quantization state), where stock PEFT dequantizes and builds ``B @ A`` in every forward.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _tiny

import dorafactors


def load_quantized(model: str, bits: int, device: str) -> torch.nn.Module:
    if bits == 4:
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
    else:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    base = AutoModelForCausalLM.from_pretrained(
        model, quantization_config=quantization, dtype=torch.bfloat16, device_map={"": device}
    )
    return prepare_model_for_kbit_training(base, use_gradient_checkpointing=True)


def train(model: torch.nn.Module, batches: list[torch.Tensor], lr: float) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for ids in batches:
        ids = ids.to(model.device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, choices=(4, 8), default=4)
    parser.add_argument("--model", default=_tiny.TINY, help="'tiny' or a Hugging Face id / local folder")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)

    source = args.model
    if source == _tiny.TINY:  # quantization happens at load time: save the tiny model first
        source = tempfile.mkdtemp(prefix="dorafactors-qdora-")
        _tiny.load_base(_tiny.TINY, dtype=torch.bfloat16).save_pretrained(source)
    lora = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=0.0,
        use_dora=True,
        target_modules=_tiny.TARGET_MODULES,
        task_type="CAUSAL_LM",
    )
    stock = get_peft_model(load_quantized(source, args.bits, args.device), lora)
    with dorafactors.patched():
        ours = get_peft_model(load_quantized(source, args.bits, args.device), lora)
    with torch.no_grad():  # the same adapter initialization on both
        ours_params = dict(ours.named_parameters())
        for name, param in stock.named_parameters():
            if param.requires_grad:
                ours_params[name].copy_(param)

    batches = _tiny.token_batches(_tiny.vocab_size(ours), args.steps, args.batch, args.seq)
    losses = train(ours, batches, args.lr)
    stock_losses = train(stock, batches, args.lr)
    print(f"QDoRA {args.bits}-bit, dorafactors losses:", " ".join(f"{x:.4f}" for x in losses))
    print(f"QDoRA {args.bits}-bit, stock PEFT losses: ", " ".join(f"{x:.4f}" for x in stock_losses))
    # bf16 compute on both sides: the losses agree to bf16 accuracy, not bitwise
    assert all(abs(a - b) <= 2e-2 * max(1.0, abs(b)) for a, b in zip(losses, stock_losses)), (losses, stock_losses)
    return {"losses": losses, "stock_losses": stock_losses, "all_dorafactors": _tiny.all_dorafactors(ours)}


if __name__ == "__main__":
    main()
