"""Decode suite: eval, ``no_grad``, a few new tokens at a time.

* model: the model suite's Llama-shaped model, 1 / 8 / 16 new tokens on top of a KV cache of 512 prompt
  tokens (``DynamicCache``, cropped back with ``crop(-n)`` after every call, so every call sees the same
  context); if the installed transformers cannot crop, the row says so (``impl.decode_mode``) and the
  new tokens are run as a plain forward without a cache.
* layer: one 8192x8192 Linear (bf16 adapters, as anchors.md), 1 and 16 tokens; one 4096x4096 Linear, 1 token.

The eager cases (model and layer) measure their providers in ``--rounds`` interleaved rounds and keep each
provider's median round (``harness.provider_rows``): an eager decode call is host-bound, and the host's speed
drifts between cases and within one, so single back-to-back timings per provider say little. So is a compiled
model decode call in Inductor's default mode: those cases compile LoRA and dorafactors once each, keep them
side by side and time them in turn, ``--reps`` times ``--rounds`` timed calls each, a few per turn after an
untimed one (:func:`compiled_in_turn`; the hosts were seen jumping between two speeds for seconds, which
interleaved rounds of separate measurements do not even out); compiled stock is then measured alone.

Every row also records the host time to enqueue one call (``host_us``, ``harness.host_us``): a decode call is
short enough that the host, not the GPU, can bound it.

Providers: lora, stock, stock with PEFT's opt-in ``ENABLE_DORA_CACHING`` (``stock_cached``), dorafactors
(its norm cache is on by default and legitimately reused: the weights are frozen while decoding).
Optional: the model cases compiled (``lora+compile``, ``stock+compile``, ``dorafactors+compile``;
:data:`COMPILED_ORDER`), one compile per provider and case, ``--compile-mode`` selects e.g.
``reduce-overhead`` (CUDA graphs; those decode on a ``StaticCache``, ``_workloads._static_decode_fn``).
"""

from __future__ import annotations

from typing import Any

from .. import providers as P
from ..harness import OVERHEAD_CALLS, Case, Settings, provider_rows
from . import layer as L
from . import model as M
from ._workloads import Workload, decode_in_turn, measure

PROVIDERS = ("lora", "stock", "stock_cached", "dorafactors")

#: The compiled model cases (setup, new tokens), in run order, and whether the --quick run has them.
COMPILED_ORDER: list[tuple[str, int, bool]] = [
    ("bf16", 8, False),
    ("bf16", 1, True),
    ("peft-default", 8, False),
    ("peft-default", 1, False),
]
COMPILE_S = 60.0  # compiling the 4-layer model for one decode shape, prior
#: Timing of the compiled cases in turn (:func:`_compiled_rows_in_turn`): per turn and provider, untimed calls
#: first (the first call after another compiled model's pays for the switch, which one model never does),
#: then timed ones.
IN_TURN_WARM, IN_TURN_TIMED = 1, 4

#: Priors (ms per call, H100, 8 new tokens; anchors.md) for the estimates only.
_PRIOR_MODEL_MS = {"peft-default": (11.8, 52.0), "bf16": (8.0, 30.0)}
_PRIOR_LAYER_MS = (0.08, 1.0)


def _context(settings: Settings) -> int:
    return 8 if settings.quick else 512


def cases(settings: Settings) -> list[Case]:
    r = M.rank(settings)
    ctx = _context(settings)
    out: list[Case] = []
    order: list[tuple[str, Any]] = [
        ("model", ("peft-default", 8)),
        ("model", ("bf16", 8)),
        ("layer", (False, 1)),
        ("layer", (True, 1)),
        ("model", ("peft-default", 1)),
        ("model", ("peft-default", 16)),
        ("model", ("bf16", 1)),
        ("model", ("bf16", 16)),
        ("layer", (False, 16)),
    ]
    built: set[str] = set()
    for priority, (what, arg) in enumerate(order):
        if what == "model":
            setup, tokens = arg
            workload = Workload("decode", new_tokens=tokens, context=ctx)
            lora, stock = _PRIOR_MODEL_MS[setup]
            est = (lora + 2 * stock + (lora + stock) / 2) * (settings.reps + OVERHEAD_CALLS) / 1e3 * settings.rounds
            if setup not in built:
                est += M.BUILD_S * 3 + M.BASE_S * (not built)
                built.add(setup)
            params = M.model_params(settings, setup, r, workload)
            out.append(
                Case(
                    suite="decode",
                    name=f"model/{setup}/tokens={tokens}",
                    params=params,
                    providers=PROVIDERS,
                    run=_model_runner(setup, r, tokens, ctx, workload, PROVIDERS),
                    est_s=est,
                    priority=priority,
                )
            )
        else:
            small, tokens = arg
            d = L.decode_shape(settings, small)
            workload = Workload("layer_infer")
            lora, stock = _PRIOR_LAYER_MS
            est = 4 * stock * (L.MICRO_CALLS) / 1e3 * settings.rounds + L.BUILD_S
            out.append(
                Case(
                    suite="decode",
                    name=f"layer/{d}x{d}/tokens={tokens}",
                    params={**L.layer_params(settings, d, d, tokens, L.rank(settings)), "workload": "decode (eval)"},
                    providers=PROVIDERS,
                    run=L.runner(d, d, tokens, L.rank(settings), workload, PROVIDERS),
                    est_s=est,
                    priority=priority,
                )
            )
    for priority, (setup, tokens, quick) in enumerate(COMPILED_ORDER, len(order)):
        workload = Workload("decode", new_tokens=tokens, context=ctx)
        lora, stock = _PRIOR_MODEL_MS[setup]
        in_turn = compiled_in_turn(settings, M.COMPILED) * (IN_TURN_WARM + IN_TURN_TIMED) / IN_TURN_TIMED
        calls = settings.reps + OVERHEAD_CALLS + in_turn
        est = (lora + stock + (lora + stock) / 2) * calls / 1e3 + COMPILE_S * len(M.COMPILED)
        out.append(
            Case(
                suite="decode",
                name=settings.compiled_case_name(f"model/{setup}/tokens={tokens}"),
                params=M.model_params(settings, setup, r, workload),
                providers=M.COMPILED,
                run=_model_runner(setup, r, tokens, ctx, workload, M.COMPILED),
                est_s=est,
                optional=True,
                priority=priority,
                skip_quick="" if quick else "the --quick run compiles one decode case only (CPU compile time)",
            )
        )
    return out


def _model_runner(setup: str, r: int, tokens: int, ctx: int, workload: Workload, providers: tuple[str, ...]):
    def run(settings: Settings) -> list[dict[str, Any]]:
        models = M.model_set(settings, setup, r, P.models_needed(providers))
        context = M.token_ids(settings, 1, ctx, salt=11)[0]
        new = M.token_ids(settings, 1, tokens, salt=12)[0]
        inputs = {"context_ids": context, "new_ids": new}
        if compiled_in_turn(settings, providers):
            return _compiled_rows_in_turn(settings, models, workload, inputs, providers)
        return provider_rows(
            providers,
            lambda p: measure(settings, models, p, workload, inputs),
            settings.device,
            rounds=L.rounds(settings, providers),
        )

    return run


def compiled_in_turn(settings: Settings, providers) -> int:
    """Calls per provider of a compiled model decode case's timing in turn (:func:`_compiled_rows_in_turn`):
    ``settings.reps * settings.rounds`` in Inductor's default mode, whose decode calls are host-bound like the
    eager ones; 0 (timed by ``measure`` alone, one compile per provider) under ``--compile-mode`` (CUDA graphs
    and autotuning modes) and for eager providers (they take ``layer.rounds``)."""
    if not any(p.endswith("+compile") for p in providers) or settings.compile_mode is not None:
        return 0
    return settings.reps * max(1, settings.rounds)


def _compiled_rows_in_turn(settings: Settings, models, workload: Workload, inputs, providers) -> list[dict[str, Any]]:
    """Compiled LoRA and compiled dorafactors, each compiled once and kept warm beside the other
    (``P.compiled_alongside``), then timed in turn (``_workloads.decode_in_turn``: :func:`compiled_in_turn`
    timed calls each, in turns of ``IN_TURN_WARM`` untimed and ``IN_TURN_TIMED`` timed calls per provider);
    then compiled stock, measured alone (``measure``: ``do_bench``).

    Why in turn: a compiled decode call is host-bound, and the GPU machines' hosts were seen jumping between
    two speeds for seconds at a time, so that even the medians of interleaved rounds of separate measurements
    put one provider at its slow speed and another at its fast one. Why the untimed call: the compiled models
    share Dynamo's cache entries for the code they share, and the first call after a switch evaluates the
    other model's guards before its own, with cold CPU caches (on the CPU that first call costs dorafactors
    much more over LoRA than the calls after it); a user's one compiled model never pays it. Why stock after,
    alone: called between their calls (a graph-breaking model, several times slower), it slowed the calls of
    dorafactors more than LoRA's on an H100 (``benchmarks/compiled_decode_floor.py --with-stock``), and a user
    never runs both; the target compares dorafactors with LoRA, and stock trails both by far.

    The pair's rows keep their ``measure`` row (compile time, memory, graphs and breaks of the compiling
    call, its own timing as ``ms_alone``) with the timing in turn as ``ms`` (``timer`` says so); graphs
    compiled during the timing in turn (0 expected) count as their recompiles."""
    import torch._dynamo

    torch._dynamo.reset()  # this case's graphs only, as P.compiled's reset gives a case measured once
    runners: dict[str, dict[str, Any]] = {}
    in_turn = [p for p in providers if not p.startswith("stock")]

    def measured(names: list[str]) -> dict[str, dict[str, Any]]:
        rows = provider_rows(
            names,
            lambda p: measure(settings, models, p, workload, inputs, compiled_runners=runners),
            settings.device,
        )
        return {row["provider"]: row for row in rows}

    by_provider = measured(in_turn)
    timed_ok = [p for p in in_turn if by_provider[p]["status"] == "ok" and p in runners]
    if timed_ok:
        timed, compiled = decode_in_turn(
            settings,
            models,
            timed_ok,
            workload,
            inputs,
            runners,
            compiled_in_turn(settings, providers),
            warm_per_turn=IN_TURN_WARM,
            per_turn=IN_TURN_TIMED,
        )
        tokens = inputs["new_ids"].numel()
        for provider in timed_ok:
            metrics = by_provider[provider]["metrics"]
            metrics["ms_alone"] = metrics.get("ms")
            metrics.update(timed[provider])
            metrics["tokens_per_s"] = tokens / (metrics["ms"] / 1e3)
            impl = by_provider[provider]["impl"]
            impl["recompiles_after_warmup"] = impl.get("recompiles_after_warmup", 0) + compiled
    by_provider.update(measured([p for p in providers if p not in in_turn]))
    return [by_provider[p] for p in providers]
