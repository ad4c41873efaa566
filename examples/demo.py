"""dorafactors demo: the same DoRA fine-tuning run with stock PEFT and with dorafactors, side by side.

Builds a small Llama-shaped model from a config (random weights, no downloads), wraps it twice with
``LoraConfig(use_dora=True)`` (once stock, once inside ``dorafactors.patched()``), trains both on the same
batches with gradient accumulation, and prints losses, the largest output difference, how many weight
norms each computed, and the time per optimizer step. Runs on the CPU in well under a minute.

    python examples/demo.py [--steps 6] [--accumulation 4] [--rank 16] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import dorafactors


def build_base(device: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).to(device)


def count_norms(model: torch.nn.Module, stock_counter: dict[str, int]) -> int:
    """Norm computations so far: dorafactors layers count cache misses; stock recomputes every forward."""
    ours = [
        getattr(layer, "norm_computations", None)
        for m in model.modules()
        for layer in getattr(m, "lora_magnitude_vector", {}).values()
    ]
    return sum(ours) if ours and None not in ours else stock_counter["forwards"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    config = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=0.0,
        use_dora=True,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    base = build_base(args.device)
    stock = get_peft_model(copy.deepcopy(base), config)
    with dorafactors.patched():  # stock PEFT is restored when the block exits; the model keeps our layers
        ours = get_peft_model(copy.deepcopy(base), config)
    ours.load_state_dict(stock.state_dict())
    n_dora = sum(len(getattr(m, "lora_magnitude_vector", {})) for m in ours.modules())
    print(f"dorafactors {dorafactors.__version__}: {n_dora} DoRA layers, rank {args.rank}, device {args.device}")
    print(
        f"layer classes: stock={type(stock.base_model.model.model.layers[0].self_attn.q_proj.lora_magnitude_vector['default']).__module__}"
        f", ours={type(ours.base_model.model.model.layers[0].self_attn.q_proj.lora_magnitude_vector['default']).__module__}"
    )

    gen = torch.Generator().manual_seed(1)
    batches = [
        torch.randint(0, 512, (2, 64), generator=gen).to(args.device) for _ in range(args.steps * args.accumulation)
    ]
    results = {}
    for name, model in (("stock PEFT", stock), ("dorafactors", ours)):
        counter = {"forwards": 0}
        hook = model.register_forward_pre_hook(lambda *_, c=counter: c.__setitem__("forwards", c["forwards"] + n_dora))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
        model.train()
        losses, times = [], []
        for step in range(args.steps):
            start = time.perf_counter()
            total = 0.0
            for micro in range(args.accumulation):
                ids = batches[step * args.accumulation + micro]
                loss = model(input_ids=ids, labels=ids).loss / args.accumulation
                loss.backward()
                total += loss.item()
            opt.step()
            opt.zero_grad()
            if args.device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            losses.append(total)
        hook.remove()
        results[name] = (losses, times, count_norms(model, counter))

    print(f"\n{'step':>4} | {'stock PEFT loss':>16} | {'dorafactors loss':>16} | {'|diff|':>9}")
    for step, (a, b) in enumerate(zip(results["stock PEFT"][0], results["dorafactors"][0])):
        print(f"{step:>4} | {a:>16.6f} | {b:>16.6f} | {abs(a - b):>9.2e}")
    with torch.no_grad():
        stock.eval()
        ours.eval()
        ids = batches[0]
        diff = (stock(input_ids=ids).logits - ours(input_ids=ids).logits).abs().max().item()
    print(f"\nmax |logits difference| after training: {diff:.3e}")
    for name, (_, times, norms) in results.items():
        per_step = sorted(times)[len(times) // 2] * 1e3
        print(f"{name:>12}: {norms:4d} weight-norm computations, median {per_step:7.1f} ms per optimizer step")
    print("\n(stock PEFT recomputes every norm in every micro-batch; dorafactors once per optimizer step)")


if __name__ == "__main__":
    main()
