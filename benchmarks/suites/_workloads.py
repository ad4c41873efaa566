"""Workloads shared by the model, decode, layer and ranks suites: what one timed call does, per provider.

Honesty rules built in:

* every training call (``train_fwd_bwd`` and the layer's ``fwd_bwd``) first marks the adapter weights as
  written (version bump, no kernel; :func:`providers.bump_adapter_versions`), for every provider alike, so
  dorafactors recomputes its norm on every call as it would after an optimizer step (and the parameters are
  first made those of an optimizer that has stepped: :func:`providers.stepped_by_an_optimizer`). Steps that
  run a real optimizer (``train_step``, ``accum_step``) need neither: AdamW writes the weights. Within one
  gradient-accumulation cycle the weights do not change, and dorafactors may reuse its norm there;
* inference and decode calls do *not* bump: serving with frozen weights is where a norm cache is legitimate;
  ``dorafactors_cold`` shows the same model with the cache defeated;
* each case starts from the same adapter weights (:func:`providers.init_adapters`), and each row records
  how many norms dorafactors computed per call (``df_norm_computations_per_call``; compiled rows too);
* compiled rows record the compile time (``compile_s``: the first call), the graphs that call compiled,
  graph breaks, and ``recompiles_after_warmup`` (graphs compiled after the first call: zero expected);
  compiled training rows first check their gradients against the eager model's (``compiled_grad_rel_err``;
  a row whose compiled graph computes something else fails instead of timing it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import providers as P
from ..harness import (
    HOST_CALLS,
    LOOP_CALLS,
    Settings,
    bench,
    bench_in_turn,
    device_us,
    host_us,
    loop_us,
    peak_extra_mib,
)

__all__ = ["HOST_TIMED", "MODEL_HOST_TIMED", "Workload", "decode_in_turn", "measure"]

#: Workloads whose rows also record the host time to enqueue one call (``harness.host_us``), on CUDA the
#: device time of one call (``harness.device_us``), and the time per call of calls made back to back
#: (``harness.loop_us``): the layer and decode suites, where a call is short enough that the host can bound it.
HOST_TIMED = ("layer_infer", "layer_fwd_bwd", "decode")
#: Workloads whose rows record ``host_us`` and ``loop_us`` (over :data:`MODEL_LOOP_CALLS` calls) but not
#: ``device_us``: the model suite's training call. Its device time is tens of milliseconds, but its host time
#: is a large part of it (every DoRA module's launches and Python), and a slow host can make it host-bound.
#: ``device_us`` does not apply: its hold would have to keep more launches queued than CUDA's launch queue takes.
MODEL_HOST_TIMED = ("train_fwd_bwd",)
MODEL_LOOP_CALLS = 10


@dataclass(frozen=True)
class Workload:
    """What one timed call does.

    kind: ``infer`` (eval, no_grad forward), ``train_fwd_bwd`` (train mode, forward + backward of the loss),
    ``train_step`` (zero_grad + forward + backward + AdamW step), ``accum_step`` (``accum`` micro-batches
    of forward + backward, then one AdamW step), ``decode`` (eval, no_grad forward of ``new_tokens`` with a
    KV cache of ``context`` tokens, cropped back after each call).
    """

    kind: str
    amp: bool = False
    grad_ckpt: bool = False
    dropout: float = 0.0
    accum: int = 1
    new_tokens: int = 0
    context: int = 0
    heavy: bool = False

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {"workload": self.kind}
        if self.amp:
            out["autocast"] = "bf16"
        if self.grad_ckpt:
            out["gradient_checkpointing"] = "non-reentrant"
        if self.kind != "infer" and self.kind != "decode":
            out["lora_dropout"] = self.dropout
        if self.kind == "accum_step":
            out["grad_accum"] = self.accum
        if self.kind in ("train_step", "accum_step"):
            out["optimizer"] = "AdamW(lr=1e-5, foreach)"
        if self.kind == "decode":
            out["new_tokens"] = self.new_tokens
            out["kv_cache_context"] = self.context
        return out


@contextlib.contextmanager
def _model_state(model: nn.Module, workload: Workload, seed: int) -> Iterator[None]:
    """Same starting adapter weights, dropout / checkpointing / mode for the workload; undone afterwards."""
    P.init_adapters(model, seed)
    P.clear_stock_caches(model)  # PEFT's ENABLE_DORA_CACHING entries of an earlier case are stale now
    hf = model.get_base_model() if hasattr(model, "get_base_model") else None
    if workload.dropout > 0:
        P.set_lora_dropout(model, workload.dropout)
    if workload.grad_ckpt and hf is not None:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train(workload.kind not in ("infer", "decode"))
    try:
        yield
    finally:
        if workload.dropout > 0:
            P.set_lora_dropout(model, 0.0)
        if workload.grad_ckpt and hf is not None:
            hf.gradient_checkpointing_disable()
        for p in P.trainable(model):
            p.grad = None
        model.eval()


def _autocast(enabled: bool, device: torch.device):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _decode_fn(
    model: Callable[..., Any],
    base_model: nn.Module,
    inputs: dict[str, torch.Tensor],
    workload: Workload,
    static: bool = False,
):
    """A decode step with a KV cache cropped back after each call; plain forward if the cache API fails.

    ``static``: a ``StaticCache`` of ``context + new`` positions instead (:func:`_static_decode_fn`), for
    CUDA-graph replays (``--compile-mode reduce-overhead``), which a ``DynamicCache`` cannot serve.
    """
    if static:
        return _static_decode_fn(model, base_model, inputs)
    context, new = inputs["context_ids"], inputs["new_ids"]
    with torch.no_grad():
        cache = base_model(input_ids=context, use_cache=True).past_key_values

    def step() -> None:
        with torch.no_grad():
            model(input_ids=new, past_key_values=cache, use_cache=True)
        cache.crop(-new.shape[1])

    try:
        step()
        if cache.get_seq_length() != context.shape[1]:
            raise RuntimeError(f"cache length {cache.get_seq_length()} after crop, expected {context.shape[1]}")
        return step, "kv_cache"
    except Exception as exc:  # transformers without crop(-n): time the new tokens without a cache
        reason = f"plain forward of the new tokens (KV cache unusable: {type(exc).__name__})"

        def plain() -> None:
            with torch.no_grad():
                model(input_ids=new, use_cache=False)

        return plain, reason


def _static_decode_fn(model: Callable[..., Any], base_model: nn.Module, inputs: dict[str, torch.Tensor]):
    """The decode step on a ``StaticCache``: the context fills positions ``0..ctx-1`` once, and every call
    writes the same new tokens into positions ``ctx..ctx+n-1``, so every call sees the same context, as the
    cropped ``DynamicCache`` gives, with tensors that never move or change shape.

    The positions go in as ``position_ids`` and ``cache_position`` (older transformers index the static cache
    by the latter); newer releases keep a per-layer ``cumulative_length`` instead, which the step sets back to
    ``ctx`` after each call. One eager call twice in a row checks that the step repeats itself exactly. A
    captured CUDA graph (``mode="reduce-overhead"``) overwrites the previous replay's outputs: the step keeps
    none.
    """
    from transformers import StaticCache

    context, new = inputs["context_ids"], inputs["new_ids"]
    ctx, n = context.shape[1], new.shape[1]
    device = context.device
    cache = StaticCache(config=base_model.config, max_cache_len=ctx + n)
    prompt = torch.arange(ctx, device=device)
    positions = torch.arange(ctx, ctx + n, device=device)

    def rewind() -> None:
        for layer in getattr(cache, "layers", ()):
            length = getattr(layer, "cumulative_length", None)
            if isinstance(length, torch.Tensor):
                length.fill_(ctx)
            elif isinstance(length, int):
                layer.cumulative_length = ctx

    def call(runner: Callable[..., Any]) -> Any:
        return runner(
            input_ids=new, past_key_values=cache, use_cache=True, position_ids=positions[None], cache_position=positions
        )

    with torch.no_grad():
        base_model(
            input_ids=context, past_key_values=cache, use_cache=True, position_ids=prompt[None], cache_position=prompt
        )
        first = call(base_model).logits.clone()
        rewind()
        again = call(base_model).logits
        rewind()
    if not torch.equal(first, again):
        raise RuntimeError("the StaticCache decode step does not repeat itself with this transformers release")

    def step() -> None:
        with torch.no_grad():
            call(model)
        rewind()

    return step, "static_cache"


def measure(
    settings: Settings,
    models: dict[str, Any],
    provider: str,
    workload: Workload,
    inputs: dict[str, torch.Tensor],
    compiled_runners: dict[str, dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Time ``workload`` on ``provider``'s model: ``(metrics, impl)`` for one row.

    ``compiled_runners`` (compiled providers then timed in turn, ``decode._compiled_rows_in_turn``): the
    provider is compiled beside the others (``P.compiled_alongside``, no Dynamo reset) and its compiled model
    kept there as ``{"runner": ...}`` for :func:`decode_in_turn`."""
    compile_it = provider.endswith("+compile")
    base_provider = provider.removesuffix("+compile")
    cold = base_provider == "dorafactors_cold"
    cached = base_provider == "stock_cached"
    model = P.get_model(models, P.model_of(provider))
    device = settings.device
    impl: dict[str, Any] = {}
    floor = base_provider == "lora_dropout_floor"
    if floor and not workload.dropout > 0:
        raise ValueError("the lora_dropout_floor provider times training with lora_dropout > 0 only")
    with (
        _model_state(model, workload, settings.seed),
        P.stock_caching(cached),
        P.dropout_floor_hooks(model) if floor else contextlib.nullcontext(),
    ):
        runner: Callable[..., Any] = model
        if compile_it:
            if compiled_runners is None:
                runner, info = P.compiled(model, settings.compile_backend, settings.compile_mode)
            else:
                runner, info = P.compiled_alongside(model, provider, settings.compile_backend, settings.compile_mode)
                compiled_runners[provider] = {"runner": runner}
            impl.update(info)
        adapters = P.adapter_tensors(model)
        params = P.trainable(model)
        ids = inputs.get("ids")
        grad_to_none: list[torch.Tensor] | None = None
        reps = settings.heavy_reps if workload.heavy else settings.reps
        tokens = 0
        rows_per_forward: int | None = None  # tokens of one forward, where it differs from ``tokens``

        if workload.kind == "infer":
            tokens = ids.numel()

            def fn() -> None:
                if cold:
                    P.bump_adapter_versions(adapters)
                with torch.no_grad(), _autocast(workload.amp, device):
                    runner(**_call_args(ids, model))

        elif workload.kind == "train_fwd_bwd":
            tokens = ids.numel()
            grad_to_none = params
            P.stepped_by_an_optimizer(params)

            def fn() -> None:
                P.bump_adapter_versions(adapters)
                with _autocast(workload.amp, device):
                    loss = _loss(runner, ids, model)
                loss.backward()

        elif workload.kind == "train_step":
            tokens = ids.numel()
            optimizer = torch.optim.AdamW(params, lr=1e-5)

            def fn() -> None:
                optimizer.zero_grad(set_to_none=True)
                with _autocast(workload.amp, device):
                    loss = _loss(runner, ids, model)
                loss.backward()
                optimizer.step()

        elif workload.kind == "accum_step":
            batches = inputs["batches"]
            tokens = sum(b.numel() for b in batches)
            rows_per_forward = batches[0].numel()
            optimizer = torch.optim.AdamW(params, lr=1e-5)

            def fn() -> None:
                for batch in batches:
                    with _autocast(workload.amp, device):
                        loss = _loss(runner, batch, model) / len(batches)
                    loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        elif workload.kind == "decode":
            tokens = inputs["new_ids"].numel()
            # CUDA-graph replays need tensors that stay put: a StaticCache instead of the cropped DynamicCache
            static = compile_it and settings.compile_mode == "reduce-overhead"
            with _autocast(workload.amp, device):
                step, mode = _decode_fn(runner, model, inputs, workload, static=static)
            impl["decode_mode"] = mode

            def fn() -> None:
                with _autocast(workload.amp, device):
                    step()

        elif workload.kind == "layer_infer":
            x = inputs["x"]
            tokens = x.shape[0]

            def fn() -> None:
                if cold:
                    P.bump_adapter_versions(adapters)
                with torch.no_grad():
                    runner(x)

        elif workload.kind == "layer_fwd_bwd":
            x, grad_out = inputs["x_grad"], inputs["grad_out"]
            tokens = x.shape[0]
            grad_to_none = [*params, x]
            P.stepped_by_an_optimizer(params)

            def fn() -> None:
                P.bump_adapter_versions(adapters)
                runner(x).backward(grad_out)

        else:
            raise ValueError(f"unknown workload {workload.kind!r}")

        # Norm computations per call, counted over every call after the first (the first one fills the
        # caches: init_adapters() just rewrote the weights).
        counter = {"calls": 0, "norms_after_first": None}

        def counted() -> None:
            fn()
            counter["calls"] += 1
            if counter["calls"] == 1:
                counter["norms_after_first"] = P.norm_computations(model)

        metrics: dict[str, Any] = {}
        if compile_it:
            # The first call compiles (or, for a wrapper reused from an earlier case, may add this case's
            # graphs); every graph compiled after it is a recompile: zero expected, recorded per row.
            before = P.dynamo_stats()
            metrics["compile_s"] = round(P.timed_first_call(counted, device), 3)
            warm = P.dynamo_stats()
            if workload.kind in ("train_fwd_bwd", "train_step", "accum_step"):
                batch = ids if ids is not None else inputs["batches"][0]
                norms = P.norm_computations(model)
                impl["compiled_grad_rel_err"] = _compiled_grad_error(model, runner, batch, params, workload, device)
                if norms is not None and counter["norms_after_first"] is not None:  # not the timed calls' norms
                    counter["norms_after_first"] += P.norm_computations(model) - norms
                P.bump_adapter_versions(adapters)  # the next call starts as after an optimizer step, not warm
        metrics.update(bench(counted, settings, reps=reps, grad_to_none=grad_to_none))
        if workload.kind in HOST_TIMED + MODEL_HOST_TIMED and not compile_it:
            long_call = workload.kind in MODEL_HOST_TIMED
            metrics.update(
                host_us(counted, settings, calls=3 if settings.quick else HOST_CALLS, grad_to_none=grad_to_none)
            )
            if not long_call:
                metrics.update(device_us(counted, settings, grad_to_none=grad_to_none))
            loop_calls = 3 if settings.quick else MODEL_LOOP_CALLS if long_call else LOOP_CALLS
            metrics.update(loop_us(counted, settings, calls=loop_calls, grad_to_none=grad_to_none))
        metrics["peak_extra_mib"] = peak_extra_mib(counted, settings, grad_to_none=grad_to_none)
        if compile_it and before and warm:
            end = P.dynamo_stats()
            impl["graphs_compiled"] = warm["graphs"] - before["graphs"]
            impl["recompiles_after_warmup"] = end["graphs"] - warm["graphs"]
            impl["graph_breaks"] = end["graph_breaks"] - before["graph_breaks"]
        norms_end = P.norm_computations(model)
        if metrics.get("ms"):
            metrics["tokens_per_s"] = tokens / (metrics["ms"] / 1e3)
        impl.update(P.impl_info(model, provider, rows=rows_per_forward or tokens or None))
        first = counter["norms_after_first"]
        # compiled graphs count their norms too (the norm op counts at run time)
        if first is not None and norms_end is not None and counter["calls"] > 1:
            impl["df_norm_computations_per_call"] = round((norms_end - first) / (counter["calls"] - 1), 3)
    return metrics, impl


def decode_in_turn(
    settings: Settings,
    models: dict[str, Any],
    providers: list[str],
    workload: Workload,
    inputs: dict[str, torch.Tensor],
    compiled_runners: dict[str, dict[str, Any]],
    reps: int,
    *,
    warm_per_turn: int,
    per_turn: int,
) -> tuple[dict[str, dict[str, Any]], int]:
    """Decode calls of the compiled ``providers`` (kept in ``compiled_runners`` by :func:`measure`), timed in turn
    (``harness.bench_in_turn``: ``reps`` timed calls each, ``per_turn`` per turn after ``warm_per_turn`` untimed
    ones): ``(summary per provider, graphs compiled meanwhile, 0 expected)``. Each provider's model is in its
    decode state and has its own KV cache, as in :func:`measure`."""
    device = settings.device
    before = P.dynamo_stats()  # (each step's first call below runs its graphs too)
    with contextlib.ExitStack() as stack:
        steps: dict[str, Callable[[], None]] = {}
        for provider in providers:
            model = P.get_model(models, P.model_of(provider))
            stack.enter_context(_model_state(model, workload, settings.seed))
            with _autocast(workload.amp, device):
                step, _ = _decode_fn(compiled_runners[provider]["runner"], model, inputs, workload)

            def call(step: Callable[[], None] = step) -> None:
                with _autocast(workload.amp, device):
                    step()

            steps[provider] = call
        timed = bench_in_turn(steps, settings, reps=reps, warm_per_turn=warm_per_turn, per_turn=per_turn)
        after = P.dynamo_stats()
    compiled = after["graphs"] - before["graphs"] if before and after else 0
    return timed, compiled


#: Largest relative L2 difference allowed between a compiled model's gradients and the eager model's (the
#: same weights and batch). Fusion reorders bf16 sums: compiled plain LoRA's gradients of the bf16 model
#: suite differ from eager ones by several percent (stock PEFT's and dorafactors' alike); a dropped or
#: wrong gradient differs by order one.
COMPILED_GRAD_TOLERANCE = 0.3


def _compiled_grad_error(
    model: nn.Module,
    runner: Callable[..., Any],
    ids: torch.Tensor,
    params: list[torch.Tensor],
    workload: Workload,
    device: torch.device,
) -> float:
    """Relative L2 difference of the compiled model's parameter gradients to the eager ones, worst parameter;
    raises when it exceeds :data:`COMPILED_GRAD_TOLERANCE` (a compiled row must time the real computation:
    a graph that drops a gradient skips its GEMMs and looks fast). Runs after the compiling first call."""
    grads = []
    for fn in (model, runner):
        for p in params:
            p.grad = None
        with _autocast(workload.amp, device):
            loss = _loss(fn, ids, model)
        loss.backward()
        grads.append([None if p.grad is None else p.grad.detach().float().clone() for p in params])
    for p in params:
        p.grad = None
    worst = 0.0
    for eager, compiled in zip(*grads):
        if eager is None and compiled is None:
            continue
        if eager is None or compiled is None:
            worst = float("inf")
            break
        worst = max(worst, float((compiled - eager).norm() / eager.norm().clamp_min(1e-30)))
    if not worst <= COMPILED_GRAD_TOLERANCE:
        raise RuntimeError(
            f"compiled gradients differ from eager ones: relative L2 difference {worst:.3g} > "
            f"{COMPILED_GRAD_TOLERANCE} (the compiled graph does not compute what eager does)"
        )
    return round(worst, 6)


def _call_args(ids: torch.Tensor, model: nn.Module) -> dict[str, Any]:
    return {"input_ids": ids, "use_cache": False}


def _loss(runner: Callable[..., Any], ids: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Causal-LM loss on all tokens (labels = inputs; transformers shifts them)."""
    return runner(input_ids=ids, labels=ids, use_cache=False).loss
