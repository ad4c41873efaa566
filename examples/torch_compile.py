"""DoRA under ``torch.compile`` with dorafactors: the compose kernels are ``torch.library`` ops, so a
compiled graph runs them without a graph break (on CUDA; on the CPU the PyTorch reference is traced).

    python examples/torch_compile.py                       # CPU, tiny model, aot_eager backend, seconds
    python examples/torch_compile.py --model meta-llama/Llama-3.2-1B --bf16 --backend inductor \\
        --steps 50 --batch 8 --seq 1024 --rank 64          # GPU, real size

Trains the compiled dorafactors model and an eager stock-PEFT copy on the same batches and asserts that the
losses agree. Under ``torch.compile`` the norm is the op ``dorafactors::cached_weight_norm``: the compiled
graph runs the norm kernels and the norm cache at run time (one norm per optimizer step).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
from peft import LoraConfig, get_peft_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _tiny

import dorafactors


def train(model: torch.nn.Module, batches: list[torch.Tensor], lr: float, bf16: bool) -> list[float]:
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for ids in batches:
        ids = ids.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=_tiny.TINY, help="'tiny' or a Hugging Face id / local folder")
    parser.add_argument(
        "--backend", default=None, help="torch.compile backend (default: inductor on CUDA, aot_eager on CPU)"
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--tiny-layers", type=int, default=2, help="decoder layers of the tiny model")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = args.backend or ("inductor" if device == "cuda" else "aot_eager")

    base = _tiny.load_base(args.model, layers=args.tiny_layers).to(device)
    lora = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        use_dora=True,
        target_modules=_tiny.TARGET_MODULES,
        lora_dropout=0.0,
        init_lora_weights=False,  # non-trivial adapters from the start, so the comparison means something
    )
    stock = get_peft_model(copy.deepcopy(base), lora)
    with dorafactors.patched():
        model = get_peft_model(base, lora)
    model.load_state_dict(stock.state_dict())
    compiled = torch.compile(model, backend=backend)

    batches = _tiny.token_batches(_tiny.vocab_size(model), args.steps, args.batch, args.seq)
    losses = train(compiled, batches, args.lr, args.bf16)
    stock_losses = train(stock, batches, args.lr, args.bf16)
    print(f"torch.compile(backend={backend!r}) dorafactors losses:", " ".join(f"{x:.5f}" for x in losses))
    print("eager stock PEFT losses:                     ", " ".join(f"{x:.5f}" for x in stock_losses))
    tolerance = 2e-2 if args.bf16 else 1e-4
    assert all(abs(a - b) <= tolerance * max(1.0, abs(b)) for a, b in zip(losses, stock_losses)), (losses, stock_losses)
    return {"losses": losses, "stock_losses": stock_losses, "backend": backend}


if __name__ == "__main__":
    main()
