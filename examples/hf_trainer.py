"""DoRA with ``transformers.Trainer`` and dorafactors: train, evaluate, save; the saved adapter then loads in
stock, unpatched PEFT and gives the same outputs (asserted).

    python examples/hf_trainer.py                                   # CPU, tiny model, seconds
    python examples/hf_trainer.py --model meta-llama/Llama-3.2-1B --bf16 --steps 200 --batch 8 --seq 1024 --rank 64

The only dorafactors line is ``with dorafactors.patched():`` around ``get_peft_model``: the layers built
inside are dorafactors layers, and everything else (Trainer, saving, PEFT's adapter format) is unchanged.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _tiny

import dorafactors


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=_tiny.TINY, help="'tiny' or a Hugging Face id / local folder")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (weights stay fp32)")
    parser.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    args = parser.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="dorafactors-trainer-")
    cuda = torch.cuda.is_available()

    base = _tiny.load_base(args.model)
    lora = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=0.0,
        use_dora=True,
        target_modules=_tiny.TARGET_MODULES,
        task_type="CAUSAL_LM",
    )
    with dorafactors.patched():  # PEFT builds dorafactors DoRA layers in here; stock PEFT is back afterwards
        model = get_peft_model(base, lora)
    assert _tiny.all_dorafactors(model)

    vocab = _tiny.vocab_size(model)
    train_data = _tiny.TokenDataset(vocab, args.steps * args.batch, args.seq, seed=1)
    eval_data = _tiny.TokenDataset(vocab, 2 * args.batch, args.seq, seed=2)
    training_args = TrainingArguments(
        output_dir=os.path.join(out, "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=args.batch,
        learning_rate=args.lr,
        logging_steps=max(1, args.steps // 3),
        save_strategy="no",
        report_to="none",
        bf16=args.bf16,
        use_cpu=not cuda,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train_data, eval_dataset=eval_data)
    train_loss = trainer.train().training_loss
    eval_loss = trainer.evaluate()["eval_loss"]
    adapter_dir = os.path.join(out, "adapter")
    trainer.save_model(adapter_dir)  # PEFT's adapter files, exactly as stock PEFT writes them

    # The adapter in stock PEFT: same base weights, no dorafactors anywhere.
    ids = eval_data.ids[: args.batch].to(model.device)
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=ids).logits.float()
    assert not dorafactors.is_patched()
    stock = PeftModel.from_pretrained(_tiny.load_base(args.model), adapter_dir).to(model.device).eval()
    assert _tiny.all_stock(stock)
    trained = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    loaded = {k: v for k, v in stock.state_dict().items() if "lora_" in k}
    assert trained.keys() == loaded.keys() and all(torch.equal(trained[k], loaded[k]) for k in trained)
    with torch.no_grad():
        reference = stock(input_ids=ids).logits.float()
    diff = (ours - reference).abs().max().item()
    # fp32 weights on both sides: the two norms differ only in summation order
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    print(f"train loss {train_loss:.4f}, eval loss {eval_loss:.4f}; adapter saved to {adapter_dir}")
    print(f"stock PEFT loaded it: {len(trained)} adapter tensors identical, max |logits difference| {diff:.2e}")
    return {"train_loss": train_loss, "eval_loss": eval_loss, "max_logit_diff": diff, "adapter_dir": adapter_dir}


if __name__ == "__main__":
    main()
