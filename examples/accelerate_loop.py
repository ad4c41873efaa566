"""DoRA in a plain ``accelerate`` training loop (gradient accumulation, optional bf16) with dorafactors.

    python examples/accelerate_loop.py --compare                  # CPU, tiny model; also trains stock PEFT
    accelerate launch examples/accelerate_loop.py --model meta-llama/Llama-3.2-1B --bf16 --steps 100 \\
        --batch 8 --seq 1024 --rank 64                            # GPU(s), real size

``--compare`` trains a stock-PEFT copy on the same batches and asserts that the losses agree.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile

import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _tiny

import dorafactors


def train(model: torch.nn.Module, batches: list[torch.Tensor], args: argparse.Namespace) -> list[float]:
    """One loss per optimizer step."""
    accelerator = Accelerator(
        gradient_accumulation_steps=args.accumulation,
        mixed_precision="bf16" if args.bf16 else "no",
        cpu=not torch.cuda.is_available(),
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    losses, running = [], 0.0
    for index, ids in enumerate(batches, 1):
        ids = ids.to(accelerator.device)
        with accelerator.accumulate(model):
            loss = model(input_ids=ids, labels=ids).loss
            accelerator.backward(loss)
            optimizer.step()  # a no-op until the last micro-batch of the step (accelerate decides)
            optimizer.zero_grad()
        running += loss.item() / args.accumulation
        if index % args.accumulation == 0:
            losses.append(running)
            running = 0.0
    if args.out:
        accelerator.unwrap_model(model).save_pretrained(args.out)
    return losses


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=_tiny.TINY, help="'tiny' or a Hugging Face id / local folder")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--compare", action="store_true", help="also train stock PEFT and compare the losses")
    parser.add_argument("--out", default=None, help="save the adapter here")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="dorafactors-accelerate-")

    base = _tiny.load_base(args.model)
    lora = LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, use_dora=True, target_modules=_tiny.TARGET_MODULES, lora_dropout=0.0
    )
    stock = get_peft_model(copy.deepcopy(base), lora) if args.compare else None
    with dorafactors.patched():
        model = get_peft_model(base, lora)
    assert _tiny.all_dorafactors(model)
    if stock is not None:
        model.load_state_dict(stock.state_dict())
    batches = _tiny.token_batches(_tiny.vocab_size(model), args.steps * args.accumulation, args.batch, args.seq)
    losses = train(model, batches, args)
    print("dorafactors losses:", " ".join(f"{x:.5f}" for x in losses), f"(adapter saved to {args.out})")
    result = {"losses": losses}
    if stock is not None:
        out, args.out = args.out, None
        stock_losses = train(stock, batches, args)
        args.out = out
        print("stock PEFT losses: ", " ".join(f"{x:.5f}" for x in stock_losses))
        tolerance = 2e-2 if args.bf16 else 1e-4
        assert all(abs(a - b) <= tolerance * max(1.0, abs(b)) for a, b in zip(losses, stock_losses)), (
            losses,
            stock_losses,
        )
        result["stock_losses"] = stock_losses
    return result


if __name__ == "__main__":
    main()
