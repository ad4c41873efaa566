"""dorafactors demo: the same DoRA fine-tuning run with stock PEFT and with dorafactors, side by side.

Builds a small Llama-shaped model from a config (random weights, no downloads), wraps it twice with
``LoraConfig(use_dora=True)`` (once stock, once inside ``dorafactors.patched()``), trains both on the same
batches with gradient accumulation, and prints losses, the largest output difference, how many weight
norms each computed, and timings: stock and dorafactors optimizer steps interleaved, and eval forwards of
plain LoRA, stock and dorafactors interleaved, each reported as a median. Runs on the CPU in under a minute.

    python examples/demo.py [--steps 6] [--accumulation 4] [--rank 16] [--repeats 20] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
import statistics
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


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _median(values: list[float]) -> float:
    return statistics.median(values) * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20, help="timed eval forwards per model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, use_dora=True, target_modules=targets)
    base = build_base(args.device)
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(**{**config.to_dict(), "use_dora": False}))
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
    runs = {}
    for name, model in (("stock PEFT", stock), ("dorafactors", ours)):
        counter = {"forwards": 0}
        hook = model.register_forward_pre_hook(lambda *_, c=counter: c.__setitem__("forwards", c["forwards"] + n_dora))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
        runs[name] = {"model": model, "opt": opt, "counter": counter, "hook": hook, "losses": [], "times": []}

    def optimizer_step(run: dict, step: int) -> None:
        model, total = run["model"], 0.0
        model.train()
        for micro in range(args.accumulation):
            ids = batches[step * args.accumulation + micro]
            loss = model(input_ids=ids, labels=ids).loss / args.accumulation
            loss.backward()
            total += loss.item()
        run["opt"].step()
        run["opt"].zero_grad()
        run["losses"].append(total)

    # Interleaved: step k of one model, then step k of the other (order alternating), so that load from
    # elsewhere on the machine hits both alike; the medians skip step 0 (first-call warm-up).
    order = list(runs)
    for step in range(args.steps):
        for name in order if step % 2 == 0 else order[::-1]:
            runs[name]["times"].append(_timed(lambda r=runs[name], s=step: optimizer_step(r, s)))
    for run in runs.values():
        run["hook"].remove()

    print(f"\n{'step':>4} | {'stock PEFT loss':>16} | {'dorafactors loss':>16} | {'|diff|':>9}")
    for step, (a, b) in enumerate(zip(runs["stock PEFT"]["losses"], runs["dorafactors"]["losses"])):
        print(f"{step:>4} | {a:>16.6f} | {b:>16.6f} | {abs(a - b):>9.2e}")

    ids = batches[0]
    models = {"LoRA": lora, "stock PEFT": stock, "dorafactors": ours}
    eval_times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model.eval()
            model(input_ids=ids)  # warm-up (and the norm caches' first fill)
        for _ in range(args.repeats):
            for name, model in models.items():
                eval_times[name].append(_timed(lambda m=model: m(input_ids=ids)))
        diff = (stock(input_ids=ids).logits - ours(input_ids=ids).logits).abs().max().item()
    print(f"\nmax |logits difference| after training: {diff:.3e}")

    print(f"\nTiming on {args.device} (interleaved, medians):")
    for name, run in runs.items():
        norms = count_norms(run["model"], run["counter"])
        per_step = _median(run["times"][1:] or run["times"])
        print(f"{name:>12}: {norms:4d} weight-norm computations, median {per_step:7.1f} ms per optimizer step")
    lora_ms = _median(eval_times["LoRA"])
    tokens = ids.numel()
    print(f"eval forward ({tokens} tokens), median of {args.repeats}:")
    for name in models:
        ms = _median(eval_times[name])
        print(f"{name:>12}: {ms:7.2f} ms ({ms / lora_ms:.2f}x LoRA)")
    print(
        "\n(stock PEFT recomputes every norm in every micro-batch; dorafactors once per optimizer step, after the\n"
        "first one: until the optimizer has stepped the adapters, once per micro-batch)"
    )
    if args.device == "cpu":
        print(
            "CPU timings of a model this small measure host overhead (Python, dispatch) more than arithmetic, and\n"
            "dorafactors' Triton kernels do not run on the CPU: its speed-ups are GPU speed-ups (see\n"
            "docs/user-guide.md, 'What speed and memory to expect'). On a shared machine, run it twice\n"
            "before reading much into a difference."
        )


if __name__ == "__main__":
    main()
