"""Model suite: the Llama-shaped model of anchors.md with DoRA on q,k,v,o,gate,up,down.

Model: ``LlamaForCausalLM`` from a ``LlamaConfig`` (hidden 4096, MLP 14336, 32 heads / 8 KV heads, 4 layers,
vocab 32000), random bf16 weights, SDPA attention, batch 1 x seq 4096, r=384, lora_alpha=2r.

Dtype setups:

* ``bf16``: all bf16 (``autocast_adapter_dtype=False``: adapters and magnitude in bf16);
* ``peft-default``: PEFT's default (bf16 base, ``autocast_adapter_dtype=True``: fp32 adapters, magnitude);
* ``peft-default+amp``: the same models run under ``torch.autocast(bf16)`` (what HF Trainer's ``bf16=True``
  does);
* ``qdora-nf4`` (QLoRA / QDoRA): every Linear of the base but ``lm_head`` a bitsandbytes ``Linear4bit``
  (NF4, double quant, bf16 compute: what ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)`` loads, built from the same bf16
  weights by :func:`providers.quantize_linears`), adapters as PEFT makes them by default (fp32);
  ``qdora-int8`` the same with ``Linear8bitLt`` (LLM.int8). No ``prepare_model_for_kbit_training``: it
  upcasts the norms, embeddings and ``lm_head`` to fp32 and turns on gradient checkpointing, which would
  time a different model than the other setups; the DoRA layers it wraps are the same. The rows are
  ``skipped`` (with the reason) where bitsandbytes does not import.

Cases (run order): inference prefill (``no_grad``, full logits; dorafactors reuses the norm of the frozen
weights, ``dorafactors_cold`` is the same model with that cache defeated on every call), training forward+backward (loss on all
tokens), one training step with gradient accumulation 8 (8 micro-batches fwd+bwd, then AdamW), gradient
checkpointing, ``lora_dropout=0.05`` (with ``lora_dropout_floor``: LoRA plus the base GEMM on the dropped-out
input and its input gradient, the work DoRA adds there at the least); then, optional, ``torch.compile`` of LoRA, stock and dorafactors
(:data:`COMPILED_PLAN`: prefill, training fwd+bwd, the accumulation step, both dtype setups), with the
compile time, graph breaks and recompiles after the warm-up call in each row.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import providers as P
from ..harness import HOST_CALLS, OVERHEAD_CALLS, Case, Settings, provider_rows
from ._workloads import MODEL_HOST_TIMED, MODEL_LOOP_CALLS, Workload, measure

SETUPS: dict[str, dict[str, Any]] = {
    "bf16": {"adapters_fp32": False, "amp": False, "adapter_dtype": "bf16"},
    "peft-default": {"adapters_fp32": True, "amp": False, "adapter_dtype": "fp32"},
    "peft-default+amp": {"adapters_fp32": True, "amp": True, "adapter_dtype": "fp32 (bf16 autocast)"},
    "qdora-nf4": {"adapters_fp32": True, "amp": False, "adapter_dtype": "fp32", "quant": "nf4"},
    "qdora-int8": {"adapters_fp32": True, "amp": False, "adapter_dtype": "fp32", "quant": "int8"},
}

#: Priors for the time estimates only (ms per call on an H100 at default sizes; LoRA and stock from
#: anchors.md, dorafactors assumed half-way). Never reported as results.
_PRIOR_MS = {
    ("bf16", "infer"): (22.0, 39.1),
    ("bf16", "train"): (52.7, 78.8),
    ("peft-default", "infer"): (47.0, 104.0),
    ("peft-default", "train"): (121.4, 194.5),
    ("peft-default+amp", "infer"): (30.0, 60.0),
    ("peft-default+amp", "train"): (70.0, 110.0),
    # a quantized base adds a dequantization of every weight to each forward and backward GEMM (and to
    # DoRA's norm): the PEFT-default times plus that
    ("qdora-nf4", "infer"): (60.0, 130.0),
    ("qdora-nf4", "train"): (150.0, 240.0),
    ("qdora-int8", "infer"): (80.0, 150.0),
    ("qdora-int8", "train"): (190.0, 280.0),
}
BUILD_S = 3.0  # one provider's PEFT model (deepcopy + get_peft_model + adapter init), prior
BASE_S = 4.0  # the random-weight base model, prior
QUANTIZE_S = 5.0  # a copy of it with its Linear layers quantized (int8 goes through the CPU), prior
COMPILE_S = 75.0  # compiling the 4-layer model for inference, prior
COMPILE_TRAIN_S = 150.0  # compiling its training graph (forward + backward), prior

COMPILED = ("lora+compile", "stock+compile", "dorafactors+compile")
#: The compiled cases, in run order: (name, setup, workload, time factor, prior kind, compile prior s, in --quick).
#: The accumulation step compiles the same training graph as the fwd+bwd case: Inductor's caches serve it.
COMPILED_PLAN: list[tuple[str, str, Workload, float, str, float, bool]] = [
    ("bf16/infer_prefill", "bf16", Workload("infer"), 1.0, "infer", COMPILE_S, True),
    ("bf16/train_fwd_bwd", "bf16", Workload("train_fwd_bwd"), 1.0, "train", COMPILE_TRAIN_S, False),
    ("bf16/train_step_accum8", "bf16", Workload("accum_step", accum=8, heavy=True), 8.0, "train", COMPILE_S, True),
    ("peft-default/infer_prefill", "peft-default", Workload("infer"), 1.0, "infer", COMPILE_S, False),
    ("peft-default/train_fwd_bwd", "peft-default", Workload("train_fwd_bwd"), 1.0, "train", COMPILE_TRAIN_S, False),
    (
        "peft-default/train_step_accum8",
        "peft-default",
        Workload("accum_step", accum=8, heavy=True),
        8.0,
        "train",
        COMPILE_S,
        False,
    ),
]


def spec(settings: Settings) -> P.ModelSpec:
    if settings.quick:
        return P.ModelSpec(hidden=64, intermediate=160, heads=4, kv_heads=2, layers=2, vocab=128, seq=32)
    return P.ModelSpec()


def rank(settings: Settings) -> int:
    return 8 if settings.quick else 384


def model_set(settings: Settings, setup: str, r: int, providers=P.BASE_PROVIDERS) -> dict[str, Any]:
    """The lora/stock/dorafactors models of one dtype setup and rank (pooled: reused by later cases)."""
    s = spec(settings)
    fp32 = SETUPS[setup]["adapters_fp32"]
    quant = SETUPS[setup].get("quant")
    if quant:
        base = P.llama_base_quantized(s, settings.device, quant, settings.seed)
    else:
        base = P.llama_base(s, settings.device, torch.bfloat16, settings.seed)

    def build(provider: str):
        return P.build_peft(
            base,
            provider,
            r=r,
            alpha=2 * r,
            targets=P.LLAMA_TARGETS,
            autocast_adapter_dtype=fp32,
            seed=settings.seed,
        )

    return P.POOL.get(("llama", s, r, fp32, quant, settings.seed), build, providers)


def token_ids(settings: Settings, count: int, seq: int, salt: int = 0) -> list[torch.Tensor]:
    vocab = spec(settings).vocab
    gen = torch.Generator(device=settings.device).manual_seed(settings.seed * 7919 + salt)
    return [torch.randint(0, vocab, (1, seq), generator=gen, device=settings.device) for _ in range(count)]


def model_params(settings: Settings, setup: str, r: int, workload: Workload) -> dict[str, Any]:
    quant = SETUPS[setup].get("quant")
    return {
        "model": "llama-shaped (random init)",
        **spec(settings).as_params(),
        "batch": 1,
        "r": r,
        "lora_alpha": 2 * r,
        "targets": ",".join(t.removesuffix("_proj") for t in P.LLAMA_TARGETS),
        "setup": setup,
        "base_dtype": f"{quant} (bf16 compute)" if quant else "bf16",
        **({"quantization": P.QUANT_SCHEMES[quant]} if quant else {}),
        "adapter_dtype": SETUPS[setup]["adapter_dtype"],
        **workload.params(),
    }


def estimate(
    settings: Settings,
    setup: str,
    kind: str,
    providers,
    *,
    factor: float = 1.0,
    reps: int | None = None,
    compile_s: float = COMPILE_S,
) -> float:
    lora, stock = _PRIOR_MS[(setup, kind)]
    per = {"lora": lora, "stock": stock, "dorafactors": (lora + stock) / 2}
    n = (reps or settings.reps) + OVERHEAD_CALLS
    total = 0.0
    for p in providers:
        name = p.removesuffix("+compile").replace("_cold", "").replace("_cached", "")
        total += per.get(name, stock) * factor * n / 1e3
        if p.endswith("+compile"):
            total += compile_s
    return total


def cases(settings: Settings) -> list[Case]:
    r = rank(settings)
    seq = spec(settings).seq
    accum = 8
    train = Workload("train_fwd_bwd")
    plan: list[tuple[str, str, Workload, float, str]] = [
        # (name, setup, workload, time factor vs one fwd+bwd / inference call, prior kind)
        ("bf16/infer_prefill", "bf16", Workload("infer"), 1.0, "infer"),
        ("bf16/train_fwd_bwd", "bf16", train, 1.0, "train"),
        ("bf16/train_step_accum8", "bf16", Workload("accum_step", accum=accum, heavy=True), accum, "train"),
        ("peft-default/infer_prefill", "peft-default", Workload("infer"), 1.0, "infer"),
        ("peft-default/train_fwd_bwd", "peft-default", train, 1.0, "train"),
        ("bf16/train_fwd_bwd_gradckpt", "bf16", Workload("train_fwd_bwd", grad_ckpt=True), 1.35, "train"),
        ("bf16/train_fwd_bwd_dropout0.05", "bf16", Workload("train_fwd_bwd", dropout=0.05), 1.15, "train"),
        (
            "peft-default/train_step_accum8",
            "peft-default",
            Workload("accum_step", accum=accum, heavy=True),
            accum,
            "train",
        ),
        (
            "peft-default/train_fwd_bwd_dropout0.05",
            "peft-default",
            Workload("train_fwd_bwd", dropout=0.05),
            1.15,
            "train",
        ),
        ("peft-default+amp/infer_prefill", "peft-default+amp", Workload("infer", amp=True), 1.0, "infer"),
        ("peft-default+amp/train_fwd_bwd", "peft-default+amp", Workload("train_fwd_bwd", amp=True), 1.0, "train"),
        ("qdora-nf4/train_fwd_bwd", "qdora-nf4", train, 1.0, "train"),
        ("qdora-nf4/infer_prefill", "qdora-nf4", Workload("infer"), 1.0, "infer"),
        ("qdora-int8/train_fwd_bwd", "qdora-int8", train, 1.0, "train"),
        ("qdora-int8/infer_prefill", "qdora-int8", Workload("infer"), 1.0, "infer"),
    ]
    out: list[Case] = []
    built: set[tuple[bool, str | None]] = set()
    for priority, (name, setup, workload, factor, kind) in enumerate(plan):
        fp32 = SETUPS[setup]["adapters_fp32"]
        quant = SETUPS[setup].get("quant")
        reps = settings.heavy_reps if workload.heavy else settings.reps
        providers = P.BASE_PROVIDERS
        if workload.kind == "infer":
            providers = (*P.BASE_PROVIDERS, "dorafactors_cold")
        elif workload.dropout > 0:
            providers = (*P.BASE_PROVIDERS, "lora_dropout_floor")  # what DoRA cannot avoid with dropout
        if workload.kind in MODEL_HOST_TIMED:  # host_us and loop_us calls, two untimed before each
            reps += HOST_CALLS + MODEL_LOOP_CALLS + 4
        est = estimate(settings, setup, kind, providers, factor=factor, reps=reps)
        if (fp32, quant) not in built:
            est += BASE_S * (not built) + QUANTIZE_S * bool(quant) + BUILD_S * len(P.BASE_PROVIDERS)
            built.add((fp32, quant))
        out.append(
            Case(
                suite="model",
                name=name,
                params=model_params(settings, setup, r, workload),
                providers=providers,
                run=_runner(setup, r, seq, workload, providers),
                est_s=est,
                priority=priority,
            )
        )
    for priority, (name, setup, workload, factor, kind, compile_s, quick) in enumerate(COMPILED_PLAN, len(plan)):
        reps = settings.heavy_reps if workload.heavy else settings.reps
        out.append(
            Case(
                suite="model",
                name=settings.compiled_case_name(name),
                params=model_params(settings, setup, r, workload),
                providers=COMPILED,
                run=_runner(setup, r, seq, workload, COMPILED),
                est_s=estimate(settings, setup, kind, COMPILED, factor=factor, reps=reps, compile_s=compile_s),
                optional=True,
                priority=priority,
                skip_quick="" if quick else "the --quick run compiles bf16 prefill and accumulation only (CPU time)",
            )
        )
    return out


def unavailable(setup: str, settings: Settings) -> str | None:
    """Why ``setup`` cannot run here (a quantized base without bitsandbytes, ...), or None."""
    quant = SETUPS[setup].get("quant")
    if not quant:
        return None
    missing = P.bitsandbytes_missing()
    if missing:
        return missing
    if quant == "int8" and settings.device.type != "cuda":
        # peft.utils.integrations.dequantize_module_weight moves a CPU Int8Params "back" to the CPU, which
        # rebuilds it without its scales (SCB): the DoRA norm and the next forward then fail
        return "8-bit base on the CPU: PEFT's 8-bit dequantization drops the int8 scales there (GPU only)"
    return None


def _runner(setup: str, r: int, seq: int, workload: Workload, providers):
    def run(settings: Settings) -> list[dict[str, Any]]:
        missing = unavailable(setup, settings)
        if missing:
            return [{"provider": p, "status": "skipped", "reason": missing} for p in providers]
        models = model_set(settings, setup, r, P.models_needed(providers))
        count = workload.accum if workload.kind == "accum_step" else 1
        batches = token_ids(settings, count, seq)
        inputs = {"ids": batches[0], "batches": batches}
        return provider_rows(providers, lambda p: measure(settings, models, p, workload, inputs), settings.device)

    return run
