"""DoRA with TRL's ``SFTTrainer`` and dorafactors (``pip install dorafactors[examples]`` brings TRL).

    python examples/trl_sft.py                                      # CPU, tiny model and tokenizer, seconds
    python examples/trl_sft.py --model Qwen/Qwen2.5-0.5B --bf16 --steps 200 --batch 8 --seq 1024 --rank 64

``SFTTrainer`` builds the PEFT model itself from ``peft_config``: construct it inside
``dorafactors.patched()`` (or call ``dorafactors.patch()`` first) and its DoRA layers are dorafactors'.
The tiny run uses a character-level tokenizer made here (no downloads) and a few synthetic sentences.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _tiny

import dorafactors

_CHARS = "abcdefghijklmnopqrstuvwxyz .,!?"


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer built in memory (ids < 64, inside the tiny model's vocabulary)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<unk>", *_CHARS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def sentences(count: int) -> Dataset:
    subjects = ["the cat", "a dog", "my friend", "the teacher", "our team"]
    verbs = ["reads", "writes", "finds", "likes", "builds"]
    objects = ["a book.", "the answer!", "small models.", "long letters.", "good tests?"]
    rows = [f"{subjects[i % 5]} {verbs[(i // 5) % 5]} {objects[(i // 25) % 5]}" for i in range(count)]
    return Dataset.from_dict({"text": rows})


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=_tiny.TINY, help="'tiny' or a Hugging Face id / local folder")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="dorafactors-trl-")

    base = _tiny.load_base(args.model)
    tokenizer = char_tokenizer() if args.model == _tiny.TINY else AutoTokenizer.from_pretrained(args.model)
    config = SFTConfig(
        output_dir=out,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=args.lr,
        max_length=args.seq,
        logging_steps=max(1, args.steps // 3),
        save_strategy="no",
        report_to="none",
        bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        seed=0,
    )
    lora = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=0.0,
        use_dora=True,
        target_modules=_tiny.TARGET_MODULES,
        task_type="CAUSAL_LM",
    )
    with dorafactors.patched():  # SFTTrainer calls get_peft_model in its constructor
        trainer = SFTTrainer(
            model=base,
            args=config,
            train_dataset=sentences(args.steps * args.batch),
            processing_class=tokenizer,
            peft_config=lora,
        )
    assert _tiny.all_dorafactors(trainer.model)
    result = trainer.train()
    trainer.save_model(os.path.join(out, "adapter"))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"SFT losses {' '.join(f'{x:.4f}' for x in losses)}; adapter saved to {out}/adapter")
    return {"train_loss": result.training_loss, "losses": losses, "model": trainer.model}


if __name__ == "__main__":
    main()
