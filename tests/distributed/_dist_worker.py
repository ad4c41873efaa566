"""Worker for the multi-process CPU tests (gloo): a tiny Llama with dorafactors DoRA, a few SGD steps.

Run by ``torchrun --nproc_per_node=2 tests/distributed/_dist_worker.py --backend NAME --out FILE`` (one process
group per launch, several backends in a row). ``reference()`` runs the same training in one process without a
process group; the test compares both. Every rank sees a disjoint half of each batch, so the averaged
gradients equal the single-process gradient of the batch mean.

Recorded per run: the loss of every step (averaged over ranks), the full trainable parameters after the first
step and after the last (with SGD, ``(p0 - p1) / lr`` is the first step's gradient, so parameters compare
gradients), and counters showing which gather path ran.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("PEFT_DORA_FUSED", "0")  # the distributed logic is kernel-independent; keep CPU fast

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STEPS = 3
LR = 0.5
BATCH = 4
SEQ = 12
VOCAB = 64


def build_model(seed: int = 0, before_peft=None):
    """Tiny Llama-shaped causal LM with DoRA on every linear, B and the magnitude perturbed (never identity).

    ``before_peft(base)`` runs between building the base model and the PEFT wrap (ZeRO-3: partition it, as
    ``from_pretrained`` under ``zero.Init`` would, so the magnitude init must gather the base weights).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import dorafactors

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    base = LlamaForCausalLM(cfg)
    if before_peft is not None:
        before_peft(base)
    lcfg = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        use_dora=True,
        init_lora_weights=False,  # random lora_B: never test at identity init
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    with dorafactors.patched():
        model = get_peft_model(base, lcfg)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=gen))
    return model


def batches(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 2)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen) for _ in range(STEPS)]


def clean(name: str) -> str:
    for junk in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(junk, "")
    return name


def trainable(model) -> dict[str, torch.Tensor]:
    return {clean(n): p for n, p in model.named_parameters() if p.requires_grad}


def _loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def reference(seed: int = 0) -> dict:
    """Single process, no process group: the ground truth the distributed runs must reproduce."""
    model = build_model(seed)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses, snaps = [], []
    for ids in batches(seed):
        loss = _loss(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        snaps.append({n: p.detach().clone() for n, p in trainable(model).items()})
    return {"losses": losses, "first": snaps[0], "last": snaps[-1]}


# ----------------------------------------------------------------------------------------- counters
class Counters:
    """Counts which gather path ran (patched into dorafactors.distributed for the run)."""

    def __init__(self) -> None:
        self.full_tensor = 0
        self.summoned = 0
        self.zero3_gathered = 0
        self.zero3_in_flight = 0
        self.backends: set[str] = set()
        self.cache_refused = 0

    def reset(self) -> None:
        self.__init__()

    def install(self) -> None:
        from dorafactors.distributed import fsdp as fsdp_mod
        from dorafactors.distributed import gather as gather_mod

        counters = self
        orig_full = gather_mod.GatherInfo.full
        orig_allowed = gather_mod.norm_cache_allowed
        orig_summon = fsdp_mod.enter_fsdp1_summon

        def full(self, x):
            target = x.weight if isinstance(x, torch.nn.Module) else x
            if fsdp_mod.is_dtensor(target):
                counters.full_tensor += 1
            return orig_full(self, x)

        def allowed(info, inputs):
            ok, reason = orig_allowed(info, inputs)
            if info.backend:
                counters.backends.update(info.backend.split("+"))
            if "deepspeed" in (info.backend or ""):
                counters.zero3_gathered += len(info.gathered)
                counters.zero3_in_flight += sum("in flight" in g for g in info.gathered)
            counters.cache_refused += not ok
            return ok, reason

        def summon(stack, base_layer, factors):
            out = orig_summon(stack, base_layer, factors)
            counters.summoned += len(out)
            return out

        gather_mod.GatherInfo.full = full
        gather_mod.norm_cache_allowed = allowed
        fsdp_mod.enter_fsdp1_summon = summon
        # the layers call distributed.norm_cache_allowed through the package namespace
        import dorafactors.distributed as pkg

        pkg.norm_cache_allowed = allowed

    def as_dict(self) -> dict:
        return {
            "full_tensor": self.full_tensor,
            "summoned": self.summoned,
            "zero3_gathered": self.zero3_gathered,
            "zero3_in_flight": self.zero3_in_flight,
            "backends": sorted(self.backends),
            "cache_refused": self.cache_refused,
        }


# ----------------------------------------------------------------------------------------- backends
def _shard_batch(ids: torch.Tensor) -> torch.Tensor:
    rank, world = dist.get_rank(), dist.get_world_size()
    per = ids.shape[0] // world
    return ids[rank * per : (rank + 1) * per]


def _mean_over_ranks(x: torch.Tensor) -> float:
    x = x.detach().clone()
    dist.all_reduce(x)
    return x.item() / dist.get_world_size()


def _train(model, params_fn, step_fn, seed: int) -> dict:
    losses, snaps = [], []
    for ids in batches(seed):
        loss = step_fn(_shard_batch(ids))
        losses.append(_mean_over_ranks(loss))
        snaps.append(params_fn())
    return {"losses": losses, "first": snaps[0], "last": snaps[-1]}


def run_fsdp2(mode: str, seed: int) -> dict:
    from peft.tuners.lora.layer import LoraLayer

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard

    model = build_model(seed)
    if mode == "adapters":
        # PEFT's wrap policy applied with fully_shard: every childless module with a trainable weight
        # (lora_A / lora_B Linear, the DoRA magnitude module) gets its own FSDP2 group, so at norm time the
        # factors are DTensor shards.
        for module in model.modules():
            w = getattr(module, "weight", None)
            if len(list(module.children())) == 0 and isinstance(w, torch.nn.Parameter) and w.requires_grad:
                fully_shard(module)
    if mode == "base":
        # base layers sharded on their own too: the norm must full_tensor() the frozen base weight
        for module in model.modules():
            if isinstance(module, LoraLayer):
                fully_shard(module.base_layer)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)

    def step(ids):
        loss = _loss(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    def params():
        with torch.no_grad():
            return {
                n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                for n, p in trainable(model).items()
            }

    return _train(model, params, step, seed)


def run_fsdp1(use_orig_params: bool, seed: int) -> dict:
    import functools

    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = build_model(seed)
    policy = fsdp_auto_wrap_policy(model)
    model = FSDP(
        model,
        auto_wrap_policy=policy,
        use_orig_params=use_orig_params,
        device_id=torch.device("cpu"),
        sync_module_states=False,
    )
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    names = None

    def step(ids):
        loss = _loss(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    def params():
        nonlocal names
        cfg = FullStateDictConfig(offload_to_cpu=False, rank0_only=False)
        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, cfg):
            sd = model.state_dict()
        return {clean(k): v.detach().clone() for k, v in sd.items() if "lora_" in k}

    del functools
    return _train(model, params, step, seed)


def run_zero3(seed: int) -> dict:
    import deepspeed

    cfg = {
        "train_micro_batch_size_per_gpu": BATCH // dist.get_world_size(),
        "gradient_accumulation_steps": 1,
        "zero_optimization": {
            "stage": 3,
            "stage3_param_persistence_threshold": 0,  # partition everything, even tiny lora weights
            "stage3_prefetch_bucket_size": 10**6,  # prefetch, so params can be in flight at norm time
            "stage3_max_live_parameters": 0,
            "stage3_max_reuse_distance": 0,
        },
        "zero_allow_untested_optimizer": True,
        "wall_clock_breakdown": False,
    }

    def partition(base):
        deepspeed.zero.Init(module=base, config_dict_or_path=cfg)
        w = base.model.layers[0].self_attn.q_proj.weight
        assert w.numel() == 0 and hasattr(w, "ds_id"), "base model must be partitioned before the PEFT wrap"

    model = build_model(seed, before_peft=partition)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    names = [n for n, p in model.named_parameters() if p.requires_grad]

    def step(ids):
        loss = _loss(engine, ids)
        engine.backward(loss)
        engine.step()
        return loss

    def params():
        ps = [p for _, p in model.named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(ps):
            return {clean(n): p.detach().clone() for n, p in zip(names, ps)}

    out = _train(engine, params, step, seed)
    out["shadow_gather_max_diff"] = _check_partition_gather(model)
    return out


def _check_partition_gather(model) -> float:
    """The private all-gather used for in-flight parameters rebuilds exactly what GatheredParameters gives."""
    import deepspeed

    from dorafactors.distributed import deepspeed as dsm

    worst = 0.0
    for p in model.parameters():
        if dsm._status(p) != "NOT_AVAILABLE":
            continue
        mine = dsm._gather_partitions(p).clone()
        with deepspeed.zero.GatheredParameters([p]):
            worst = max(worst, (mine - p.data).abs().max().item())
    return worst


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", action="append", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    if "zero3" in args.backend:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    results = {}
    counters = Counters()
    counters.install()
    from dorafactors.distributed import gather as gather_mod

    for backend in args.backend:
        gc.collect()  # drop the previous run's modules (and their FSDP2 states) before detection restarts
        gather_mod._reset_for_tests()
        counters.reset()
        try:
            if backend.startswith("fsdp2"):
                res = run_fsdp2(backend.split(":", 1)[1] if ":" in backend else "layers", args.seed)
            elif backend == "fsdp1":
                res = run_fsdp1(False, args.seed)
            elif backend == "fsdp1-orig":
                res = run_fsdp1(True, args.seed)
            elif backend == "zero3":
                res = run_zero3(args.seed)
            else:
                raise ValueError(backend)
            res = {
                "losses": res["losses"],
                "first": {k: v.tolist() for k, v in res["first"].items()},
                "last": {k: v.tolist() for k, v in res["last"].items()},
                "counters": counters.as_dict(),
                "shadow_gather_max_diff": res.get("shadow_gather_max_diff"),
            }
        except Exception as exc:  # report, let the test decide (skip vs fail)
            import traceback

            res = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        results[backend] = res
        dist.barrier()
    if rank == 0:
        Path(args.out).write_text(json.dumps(results))
    dist.barrier()
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
