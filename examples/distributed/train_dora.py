"""Train a small Llama-shaped DoRA model (random init, no downloads) for a few steps; log losses and memory.

One script, several ways to run it (same model, seed, data and optimizer maths in each):

    python  train_dora.py --mode single --out single.json                      # 1 GPU
    torchrun --nproc_per_node=2 train_dora.py --mode fsdp2 --out fsdp2.json    # fully_shard per decoder layer
    torchrun --nproc_per_node=2 train_dora.py --mode fsdp2_adapters ...        # + lora_A / lora_B sharded alone
    torchrun --nproc_per_node=2 train_dora.py --mode fsdp1 ...                 # FSDP1 + PEFT's wrap policy
    torchrun --nproc_per_node=2 train_dora.py --mode zero3 ...                 # DeepSpeed ZeRO-3, bf16

Precision, identical in every mode: bf16 weights for compute, fp32 master copies of the trainable
(adapter) parameters, AdamW in fp32, gradients reduced in fp32. Single GPU keeps explicit fp32 masters; FSDP
uses MixedPrecision(param_dtype=bf16, reduce_dtype=fp32) over fp32 shards; DeepSpeed uses its bf16 mode
(fp32 master partitions) with ``communication_data_type: fp32``. The trainable parameters start on the bf16
grid so that every mode's fp32 masters start equal.

Data: ``--distinct`` fixed batches of ``--batch`` sequences (arithmetic progressions of token ids modulo the
vocabulary), cycled over the steps and split evenly over ranks: memorizable, so the loss moves far beyond
bf16 noise in 20 steps. The loss logged is the mean over the whole batch (averaged over ranks).

Output (rank 0): a JSON with per-step losses, per-rank peak memory (allocated and reserved, GiB), step times,
versions, the GPU name, and which dorafactors gather path ran.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", required=True, choices=["single", "fsdp1", "fsdp2", "fsdp2_adapters", "zero3"])
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences per step)")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--distinct", type=int, default=2, help="distinct batches, cycled")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    return p.parse_args()


# ----------------------------------------------------------------------------------------- model and data
def build_model(args):
    """fp32 model on CPU, deterministic: random base, DoRA r=args.rank with random lora_B and perturbed magnitude."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import dorafactors

    torch.manual_seed(args.seed)
    cfg = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
        max_position_embeddings=args.seq,
        attn_implementation="sdpa",
        tie_word_embeddings=False,
    )
    base = LlamaForCausalLM(cfg)
    lcfg = LoraConfig(
        r=args.rank,
        lora_alpha=args.rank,
        lora_dropout=0.0,
        use_dora=True,
        init_lora_weights=False,  # random lora_B: DoRA is not the identity at step 0
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    with dorafactors.patched():
        model = get_peft_model(base, lcfg)
    gen = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.1)  # keep the random delta moderate: loss starts near a sane value
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            if p.requires_grad:
                p.copy_(p.to(torch.bfloat16).float())  # masters start on the bf16 grid in every mode
    return model


def make_batches(args) -> list[torch.Tensor]:
    """``--distinct`` fixed batches, cycled over the steps (memorizable: the loss moves far beyond bf16 noise)."""
    gen = torch.Generator().manual_seed(args.seed + 2)
    pool = []
    for _ in range(args.distinct):
        start = torch.randint(0, args.vocab, (args.batch, 1), generator=gen)
        stride = torch.randint(1, 8, (args.batch, 1), generator=gen)
        pos = torch.arange(args.seq).unsqueeze(0)
        pool.append((start + stride * pos) % args.vocab)
    return [pool[i % args.distinct] for i in range(args.steps)]


# ----------------------------------------------------------------------------------------- diagnostics
class GatherStats:
    """Which dorafactors gather path ran (wraps the norm-cache gate every DoRA forward calls)."""

    def __init__(self) -> None:
        self.calls = 0
        self.backends: dict[str, int] = {}
        self.gathered = 0
        self.in_flight = 0
        self.dtensor_full = 0

    def install(self) -> None:
        import dorafactors.distributed as pkg
        from dorafactors.distributed import fsdp as fsdp_mod
        from dorafactors.distributed import gather as gather_mod

        stats, orig_allowed, orig_full = self, pkg.norm_cache_allowed, gather_mod.GatherInfo.full

        def allowed(info, inputs):
            stats.calls += 1
            key = info.backend or "none"
            stats.backends[key] = stats.backends.get(key, 0) + 1
            stats.gathered += len(info.gathered)
            stats.in_flight += sum("in flight" in g for g in info.gathered)
            return orig_allowed(info, inputs)

        def full(self, x):
            target = x.weight if isinstance(x, torch.nn.Module) else x
            stats.dtensor_full += fsdp_mod.is_dtensor(target)
            return orig_full(self, x)

        pkg.norm_cache_allowed = allowed
        gather_mod.GatherInfo.full = full

    def as_dict(self) -> dict:
        return dict(vars(self))


# ----------------------------------------------------------------------------------------- runners
def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _step_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def run_single(args, device):
    model = build_model(args)
    masters = [p.detach().clone() for p in _trainable(model)]  # fp32 masters
    model.to(device=device, dtype=torch.bfloat16)
    work = _trainable(model)
    masters = [m.to(device).requires_grad_(True) for m in masters]
    opt = torch.optim.AdamW(masters, lr=args.lr, weight_decay=0.0)

    def step(ids):
        loss = _step_loss(model, ids)
        loss.backward()
        with torch.no_grad():
            for m, p in zip(masters, work):
                m.grad = p.grad.float()
                p.grad = None
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for m, p in zip(masters, work):
                p.copy_(m)
        return loss.detach().float()

    return step


def _mp_policy():
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def run_fsdp2(args, device, adapters: bool):
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard

    model = build_model(args).to(device)
    mp = _mp_policy()
    if adapters:  # PEFT's wrap policy, with fully_shard: every childless module with a trainable weight
        for module in model.modules():
            w = getattr(module, "weight", None)
            if not list(module.children()) and isinstance(w, torch.nn.Parameter) and w.requires_grad:
                fully_shard(module, mp_policy=mp)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    opt = torch.optim.AdamW(_trainable(model), lr=args.lr, weight_decay=0.0)

    def step(ids):
        loss = _step_loss(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach().float()

    return step


def run_fsdp1(args, device):
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import MixedPrecision

    model = build_model(args)
    model = FSDP(
        model,
        auto_wrap_policy=fsdp_auto_wrap_policy(model),
        mixed_precision=MixedPrecision(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=True
        ),
        device_id=device,
        use_orig_params=False,
    )
    opt = torch.optim.AdamW(_trainable(model), lr=args.lr, weight_decay=0.0)

    def step(ids):
        loss = _step_loss(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach().float()

    return step


def run_zero3(args, device):
    import deepspeed

    world = torch.distributed.get_world_size()
    config = {
        "train_micro_batch_size_per_gpu": args.batch // world,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "communication_data_type": "fp32",
        "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True},
        "zero_allow_untested_optimizer": True,  # a plain torch AdamW: no compiled DeepSpeed ops needed
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    model = build_model(args)
    opt = torch.optim.AdamW(_trainable(model), lr=args.lr, weight_decay=0.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)

    def step(ids):
        loss = _step_loss(engine, ids)
        engine.backward(loss)
        engine.step()
        return loss.detach().float()

    return step


# ----------------------------------------------------------------------------------------- main
def _versions() -> dict:
    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("transformers", "peft", "deepspeed", "triton", "dorafactors"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = None
    return out


def main() -> None:
    args = parse_args()
    distributed = args.mode != "single"
    cuda = args.device == "cuda"
    if distributed:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            torch.cuda.set_device(local_rank)
        if args.mode == "zero3":
            import deepspeed

            deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        else:
            torch.distributed.init_process_group("nccl" if cuda else "gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    else:
        rank, world = 0, 1
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must divide over {world} ranks")

    stats = GatherStats()
    stats.install()
    t0 = time.perf_counter()
    runner = {
        "single": lambda: run_single(args, device),
        "fsdp1": lambda: run_fsdp1(args, device),
        "fsdp2": lambda: run_fsdp2(args, device, adapters=False),
        "fsdp2_adapters": lambda: run_fsdp2(args, device, adapters=True),
        "zero3": lambda: run_zero3(args, device),
    }[args.mode]
    step = runner()
    setup_s = time.perf_counter() - t0

    per = args.batch // world
    losses, times = [], []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for i, ids in enumerate(make_batches(args)):
        ids = ids[rank * per : (rank + 1) * per].to(device)
        t = time.perf_counter()
        loss = step(ids)
        if distributed:
            torch.distributed.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
        times.append(time.perf_counter() - t)
        if rank == 0:
            print(
                json.dumps({"mode": args.mode, "step": i, "loss": losses[-1], "step_s": round(times[-1], 4)}),
                flush=True,
            )

    gib = 1024**3
    mem = (
        [torch.cuda.max_memory_allocated(device) / gib, torch.cuda.max_memory_reserved(device) / gib]
        if cuda
        else [0.0, 0.0]
    )
    if distributed:
        gathered: list = [None] * world
        torch.distributed.all_gather_object(gathered, {"rank": rank, "mem": mem, "stats": stats.as_dict()})
    else:
        gathered = [{"rank": 0, "mem": mem, "stats": stats.as_dict()}]
    if rank == 0:
        record = {
            "mode": args.mode,
            "world_size": world,
            "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "config": {k: v for k, v in vars(args).items() if k != "out"},
            "losses": losses,
            "step_s": times,
            "setup_s": setup_s,
            "peak_mem_allocated_gib_per_rank": [g["mem"][0] for g in gathered],
            "peak_mem_reserved_gib_per_rank": [g["mem"][1] for g in gathered],
            "dorafactors_gather": [g["stats"] for g in gathered],
            "versions": _versions(),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=1))
        print(f"wrote {args.out}", flush=True)
    if distributed:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
