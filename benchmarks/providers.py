"""How each provider's model is built, in one process, from the same base weights and the same adapter.

Providers:

* ``lora``: stock PEFT, ``use_dora=False`` (the floor DoRA is measured against);
* ``stock``: stock PEFT, ``use_dora=True``, built while dorafactors is *not* patched (checked);
* ``dorafactors``: ``use_dora=True`` built inside ``dorafactors.patched()`` (checked: its DoRA layers are
  dorafactors classes);
* ``stock_cached``: the ``stock`` model with PEFT's opt-in ``ENABLE_DORA_CACHING`` on (decode only);
* ``dorafactors_cold``: the ``dorafactors`` model with its norm cache defeated on every call (the adapter
  weights' version counters are bumped, as an optimizer step would);
* ``lora_dropout_floor``: (``lora_dropout > 0`` training) the ``lora`` model plus, in every adapted layer, the
  work DoRA cannot avoid there: the base GEMM on the dropped-out input, added to the output, so its
  input-gradient GEMM runs in the backward too (:func:`dropout_floor_hooks`);
* ``<p>+compile``: ``torch.compile`` of provider ``p``'s model (compile time recorded separately).

Every model is a ``deepcopy`` of one base model; after ``get_peft_model`` the adapters are overwritten
from a generator seeded by the module name, so all providers see identical ``lora_A`` (PEFT's
kaiming-uniform range), ``lora_B ~ N(0, 0.01)`` (not at identity) and magnitude
``||W||_row * (1 + 0.05 * N(0, 1))``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import dorafactors

__all__ = [
    "BASE_PROVIDERS",
    "QUANT_SCHEMES",
    "ModelPool",
    "ModelSpec",
    "adapter_tensors",
    "bitsandbytes_missing",
    "build_peft",
    "bump_adapter_versions",
    "compiled",
    "dense_weight",
    "dropout_floor_hooks",
    "dynamo_stats",
    "impl_info",
    "llama_base",
    "llama_base_quantized",
    "norm_computations",
    "one_linear_base",
    "quantize_linears",
    "stepped_by_an_optimizer",
    "stock_caching",
    "trainable",
]

BASE_PROVIDERS = ("lora", "stock", "dorafactors")
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

dorafactors.unpatch()
from peft.tuners.lora import dora as _peft_dora  # noqa: E402  (imported after unpatch: stock classes)

STOCK_DORA_LINEAR = _peft_dora.DoraLinearLayer


# --------------------------------------------------------------------------------------------- base models


@dataclass(frozen=True)
class ModelSpec:
    """A Llama-shaped causal LM with random weights (no download)."""

    hidden: int = 4096
    intermediate: int = 14336
    heads: int = 32
    kv_heads: int = 8
    layers: int = 4
    vocab: int = 32000
    seq: int = 4096

    def as_params(self) -> dict[str, int]:
        return {
            "hidden": self.hidden,
            "intermediate": self.intermediate,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "layers": self.layers,
            "vocab": self.vocab,
            "seq": self.seq,
        }


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


_BASES: OrderedDict[Any, nn.Module] = OrderedDict()


def _cached_base(key: Any, make: Callable[[], nn.Module], keep: int = 2) -> nn.Module:
    if key in _BASES:
        _BASES.move_to_end(key)
        return _BASES[key]
    while len(_BASES) >= keep:
        _BASES.popitem(last=False)
    model = make()
    _BASES[key] = model
    return model


def clear_bases() -> None:
    _BASES.clear()


def llama_base(spec: ModelSpec, device: torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> nn.Module:
    """``LlamaForCausalLM`` built from a ``LlamaConfig`` on ``device`` in ``dtype`` (cached per spec)."""

    def make() -> nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            hidden_size=spec.hidden,
            intermediate_size=spec.intermediate,
            num_attention_heads=spec.heads,
            num_key_value_heads=spec.kv_heads,
            num_hidden_layers=spec.layers,
            vocab_size=spec.vocab,
            max_position_embeddings=max(spec.seq * 2, 1024),
            tie_word_embeddings=False,
        )
        config._attn_implementation = "sdpa"
        torch.manual_seed(seed)
        with _default_dtype(dtype), torch.device(device):
            model = LlamaForCausalLM(config)
        model.requires_grad_(False)
        return model

    return _cached_base(("llama", spec, str(device), dtype, seed), make)


#: Quantized base setups: what each scheme builds (recorded in the rows' params). The layers and their
#: arguments are the ones transformers' ``BitsAndBytesConfig`` makes for a ``from_pretrained`` load
#: (QLoRA's recipe for 4-bit): every ``nn.Linear`` but ``lm_head`` is replaced, embeddings and norms stay bf16.
QUANT_SCHEMES: dict[str, str] = {
    "nf4": "bitsandbytes Linear4bit: NF4, blocksize 64, double quant, bf16 compute, uint8 storage; lm_head bf16",
    "int8": "bitsandbytes Linear8bitLt: LLM.int8 (threshold 6.0, int8 weights); lm_head bf16",
}


def bitsandbytes_missing() -> str | None:
    """Why bitsandbytes cannot quantize a base model here, or None when it imports."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or a broken native library raising anything else
        return f"bitsandbytes is not importable ({type(exc).__name__}: {str(exc)[:120]}): pip install bitsandbytes"
    return None


def quantize_linears(model: nn.Module, scheme: str, device: torch.device, skip: Sequence[str] = ("lm_head",)) -> None:
    """Replace every plain ``nn.Linear`` of ``model`` (but the ``skip`` names) by its bitsandbytes layer of
    ``scheme`` (:data:`QUANT_SCHEMES`) holding the same weights, quantized on ``device``, in place.

    This is what a ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))`` load builds, for a
    model that exists only in memory. Sets ``is_loaded_in_4bit`` / ``is_loaded_in_8bit`` as that load does
    (PEFT picks its bitsandbytes LoRA layers from the flag).
    """
    import bitsandbytes as bnb

    if scheme not in QUANT_SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; choose from {sorted(QUANT_SCHEMES)}")
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and name.rsplit(".", 1)[-1] not in skip
    ]
    for name, module in targets:
        weight = module.weight.data
        has_bias = module.bias is not None
        if scheme == "nf4":
            new = bnb.nn.Linear4bit(
                module.in_features,
                module.out_features,
                bias=has_bias,
                compute_dtype=torch.bfloat16,
                compress_statistics=True,  # double quant (bnb_4bit_use_double_quant=True)
                quant_type="nf4",
                quant_storage=torch.uint8,
                device="meta",
            )
            new.weight = bnb.nn.Params4bit(
                weight,
                requires_grad=False,
                compress_statistics=True,
                quant_type="nf4",
                quant_storage=torch.uint8,
                module=new,
            )
            if device.type == "cpu":
                # bnb's CPU no-grad forward repacks the weight in place for AVX512-BF16, after which a
                # training forward and the DoRA norm (dequantize) of the same layer read it wrongly
                new.support_avx512bf16_for_cpu = False
        else:
            new = bnb.nn.Linear8bitLt(
                module.in_features, module.out_features, bias=has_bias, has_fp16_weights=False, threshold=6.0
            )
            # Int8Params quantizes when it moves off the CPU (a checkpoint load's path): start there
            new.weight = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, has_fp16_weights=False)
        if has_bias:
            new.bias = nn.Parameter(module.bias.data.clone(), requires_grad=False)
        new.to(device)  # quantizes
        new.requires_grad_(False)
        model.set_submodule(name, new)
    setattr(model, "is_loaded_in_4bit" if scheme == "nf4" else "is_loaded_in_8bit", True)


def llama_base_quantized(spec: ModelSpec, device: torch.device, scheme: str, seed: int = 0) -> nn.Module:
    """:func:`llama_base` (bf16) with its Linear layers quantized by :func:`quantize_linears` (cached per spec)."""
    dense = llama_base(spec, device, torch.bfloat16, seed)

    def make() -> nn.Module:
        model = copy.deepcopy(dense)
        quantize_linears(model, scheme, device)
        return model

    return _cached_base(("llama", spec, str(device), scheme, seed), make)


def dense_weight(base_layer: nn.Module) -> torch.Tensor:
    """The base layer's weight as a float ``[d_out, d_in]`` tensor: the parameter itself, or PEFT's
    dequantization of a quantized one (what both DoRA implementations compute their norms from)."""
    weight = base_layer.weight
    if type(weight) is nn.Parameter:
        return weight
    from peft.utils.integrations import dequantize_module_weight

    return dequantize_module_weight(base_layer)


def weight_format(base_layer: nn.Module) -> str:
    """``bfloat16`` / ``float32`` for a plain weight, ``nf4 (bfloat16 compute)`` / ``int8`` for bitsandbytes."""
    weight = base_layer.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None and getattr(weight, "quant_type", None):
        compute = str(getattr(base_layer, "compute_dtype", None)).replace("torch.", "")
        return f"{weight.quant_type} ({compute} compute)"
    if type(weight).__name__ == "Int8Params":
        return "int8"
    return str(weight.dtype).replace("torch.", "")


class OneLinear(nn.Module):
    """A single bias-free Linear (``proj``) in a module PEFT can target."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def one_linear_base(
    d_in: int, d_out: int, device: torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> nn.Module:
    def make() -> nn.Module:
        torch.manual_seed(seed)
        with _default_dtype(dtype), torch.device(device):
            model = OneLinear(d_in, d_out)
        model.requires_grad_(False)
        return model

    return _cached_base(("linear", d_in, d_out, str(device), dtype, seed), make)


# --------------------------------------------------------------------------------------------- PEFT models


def _lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            yield name, module


def adapter_tensors(model: nn.Module) -> list[torch.Tensor]:
    """``lora_A`` / ``lora_B`` weights: the tensors an optimizer step writes and the norm depends on."""
    out: list[torch.Tensor] = []
    for _, module in _lora_layers(model):
        out.append(module.lora_A["default"].weight)
        out.append(module.lora_B["default"].weight)
    return out


def trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def bump_adapter_versions(tensors: Sequence[torch.Tensor]) -> None:
    """Mark the adapter weights as written (version counter +1, no kernel), like an optimizer step does.

    Applied to every provider alike; only dorafactors' norm cache reacts (it must recompute the norm). The
    training workloads first call :func:`stepped_by_an_optimizer` on their parameters.
    """
    for t in tensors:
        torch.autograd.graph.increment_version(t)


#: The optimizer :func:`stepped_by_an_optimizer` steps: it lives for the process, as a run's optimizer lives for
#: the run, and holds no parameter between its steps (no state: zero momentum)
_RUN_OPTIMIZER: torch.optim.SGD | None = None


def stepped_by_an_optimizer(params: Sequence[torch.Tensor]) -> None:
    """Make ``params`` what they are in a real training run after its first step: parameters of a live
    ``torch.optim.Optimizer`` that has stepped (one ``step()`` of a zero-learning-rate SGD without gradients:
    nothing is written). dorafactors' norm cache bypasses itself in training forwards through trainable
    tensors no live optimizer steps (a hand-written update could follow unseen); a timed training call of a
    run that an optimizer drives must not take that path. The optimizer outlives the call without keeping the
    parameters (or their model) alive."""
    global _RUN_OPTIMIZER
    if _RUN_OPTIMIZER is None:
        _RUN_OPTIMIZER = torch.optim.SGD([torch.zeros(1)], lr=0.0)
    group = _RUN_OPTIMIZER.param_groups[0]
    group["params"] = list(params)
    try:
        _RUN_OPTIMIZER.step()
    finally:
        group["params"] = []


@torch.no_grad()
def init_adapters(model: nn.Module, seed: int) -> None:
    """Write identical, non-identity adapter weights into any provider's model (see module docstring)."""
    for name, module in _lora_layers(model):
        a = module.lora_A["default"].weight
        b = module.lora_B["default"].weight
        gen = torch.Generator(device=a.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        bound = 1.0 / math.sqrt(a.shape[1])
        a.copy_(torch.empty(a.shape, device=a.device, dtype=torch.float32).uniform_(-bound, bound, generator=gen))
        b.copy_(torch.empty(b.shape, device=b.device, dtype=torch.float32).normal_(0.0, 0.01, generator=gen))
        magnitudes = getattr(module, "lora_magnitude_vector", None)
        if magnitudes is not None and "default" in magnitudes:
            mag = magnitudes["default"].weight
            weight = dense_weight(module.get_base_layer())
            rows = torch.cat([chunk.float().norm(dim=1) for chunk in weight.split(4096, dim=0)])
            noise = torch.empty(mag.shape, device=mag.device, dtype=torch.float32).normal_(generator=gen)
            mag.copy_((rows * (1.0 + 0.05 * noise)).view(mag.shape))
    clear = getattr(dorafactors, "clear_norm_caches", None)
    if clear is not None:
        clear(model)


def _dora_classes(model: nn.Module) -> set[type]:
    classes = set()
    for _, module in _lora_layers(model):
        magnitudes = getattr(module, "lora_magnitude_vector", None)
        if magnitudes is not None and "default" in magnitudes:
            classes.add(type(magnitudes["default"]))
    return classes


def build_peft(
    base: nn.Module,
    provider: str,
    *,
    r: int,
    alpha: float,
    targets: Sequence[str],
    autocast_adapter_dtype: bool,
    seed: int,
    dropout: float = 0.0,
) -> nn.Module:
    """A PEFT model of ``provider`` (``lora``/``stock``/``dorafactors``) over a deepcopy of ``base``."""
    from peft import LoraConfig, get_peft_model

    if provider not in BASE_PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}")
    device = next(base.parameters()).device
    model = copy.deepcopy(base)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(targets),
        lora_dropout=dropout,
        use_dora=provider != "lora",
        bias="none",
    )
    with torch.device(device):
        if provider == "dorafactors":
            with dorafactors.patched():
                peft_model = get_peft_model(model, config, autocast_adapter_dtype=autocast_adapter_dtype)
        else:
            if dorafactors.is_patched():
                raise RuntimeError("dorafactors is patched while building a stock PEFT model")
            peft_model = get_peft_model(model, config, autocast_adapter_dtype=autocast_adapter_dtype)
    classes = _dora_classes(peft_model)
    if provider == "lora" and classes:
        raise RuntimeError(f"the LoRA model has DoRA layers {classes}")
    if provider == "stock" and classes != {STOCK_DORA_LINEAR}:
        raise RuntimeError(f"the stock model's DoRA layers are {classes}, expected PEFT's {STOCK_DORA_LINEAR}")
    if provider == "dorafactors" and (not classes or any(not c.__module__.startswith("dorafactors.") for c in classes)):
        raise RuntimeError(f"the dorafactors model's DoRA layers are {classes}: patch() did not take effect")
    init_adapters(peft_model, seed)
    return peft_model


def impl_info(model: nn.Module, provider: str, rows: int | None = None) -> dict[str, Any]:
    """What actually ran: DoRA layer class, adapter/magnitude dtypes, dorafactors' dispatch decisions.

    ``rows``: tokens per call of the case (the training compose's size heuristic depends on it).
    """
    info: dict[str, Any] = {"provider_base": provider.split("+")[0].replace("_cached", "").replace("_cold", "")}
    layers = list(_lora_layers(model))
    if not layers:
        return info
    _, module = layers[0]
    info["adapter_dtype"] = str(module.lora_A["default"].weight.dtype).replace("torch.", "")
    info["base_dtype"] = weight_format(module.get_base_layer())
    info["lora_modules"] = len(layers)
    magnitudes = getattr(module, "lora_magnitude_vector", None)
    if magnitudes is not None and "default" in magnitudes:
        layer = magnitudes["default"]
        cls = type(layer)
        info["dora_class"] = f"{cls.__module__}.{cls.__qualname__}"
        info["magnitude_dtype"] = str(layer.weight.dtype).replace("torch.", "")
        if cls.__module__.startswith("dorafactors."):
            info.update(_dorafactors_paths(module, rows))
    return info


def _dorafactors_paths(module: nn.Module, rows: int | None = None) -> dict[str, Any]:
    """Which implementation dorafactors' dispatch picks for this layer (public engine / fused predicates),
    for an activation of ``rows`` tokens (8 when unknown)."""
    out: dict[str, Any] = {}
    base = module.get_base_layer()
    try:
        weight = dense_weight(base)
    except Exception as exc:
        return {"df_norm_path": f"unknown ({type(exc).__name__})"}
    # the composition runs on the base layer's output: its weight's dtype, or a quantized layer's compute dtype
    act_dtype = weight.dtype if type(base.weight) is nn.Parameter else getattr(base, "compute_dtype", torch.bfloat16)
    try:
        from dorafactors.norm import engine

        out["df_norm_path"] = engine.norm_path(weight, module.lora_A["default"].weight, module.lora_B["default"].weight)
    except Exception as exc:
        out["df_norm_path"] = f"unknown ({type(exc).__name__})"
    try:
        from dorafactors.dispatch import rules

        d_out = weight.shape[0]
        act = torch.empty(1, d_out, device=weight.device, dtype=act_dtype or torch.bfloat16)
        scale = torch.empty(d_out, device=weight.device, dtype=torch.float32)
        kernel_ok = rules.fused_compose_ok(act, act, scale)[0]
        out["df_compose_fused_infer"] = kernel_ok
        # the training rule is a size heuristic on (rows, cols): ask it about the case's rows, not the probe's
        out["df_compose_fused_train"] = kernel_ok and rules.fused_backward_ok(rows or 8, d_out, True)[0]
        out["df_compose_probe_rows"] = rows or 8
        # no-grad calls of <= INFERENCE_FOLD_MAX_ROWS rows take the folded composition instead of the kernel
        out["df_infer_fold"] = rules.inference_fold_ok(rows or 8)[0]
    except Exception as exc:
        out["df_compose_fused_infer"] = f"unknown ({type(exc).__name__})"
    return out


def norm_computations(model: nn.Module) -> int | None:
    """Sum of dorafactors' per-layer norm computations (cache misses); None for other providers."""
    total = None
    for _, module in _lora_layers(model):
        magnitudes = getattr(module, "lora_magnitude_vector", None)
        if magnitudes is None or "default" not in magnitudes:
            continue
        count = getattr(magnitudes["default"], "norm_computations", None)
        if isinstance(count, int):
            total = (total or 0) + count
    return total


@contextlib.contextmanager
def stock_caching(enabled: bool) -> Iterator[None]:
    """PEFT's opt-in ``peft.tuners.lora.dora.ENABLE_DORA_CACHING`` (read by stock on every call)."""
    if not enabled:
        yield
        return
    previous = _peft_dora.ENABLE_DORA_CACHING
    _peft_dora.ENABLE_DORA_CACHING = True
    try:
        yield
    finally:
        _peft_dora.ENABLE_DORA_CACHING = previous


def clear_stock_caches(model: nn.Module) -> None:
    """Empty PEFT's per-layer ``_dora_cache`` (filled only under ``ENABLE_DORA_CACHING``)."""
    for _, module in _lora_layers(model):
        magnitudes = getattr(module, "lora_magnitude_vector", None)
        if magnitudes is not None and "default" in magnitudes:
            clear = getattr(magnitudes["default"], "_cache_clear", None)
            if clear is not None:
                clear()


class _KeepOutput(nn.Module):
    """Runs ``inner`` and keeps its last output (the dropped-out input of one LoRA layer)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.last: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last = self.inner(x)
        return self.last


@contextlib.contextmanager
def dropout_floor_hooks(model: nn.Module) -> Iterator[None]:
    """Turn a LoRA model with ``lora_dropout > 0`` into the floor of DoRA's dropout path (``lora_dropout_floor``).

    With dropout, DoRA's output needs ``W @ dropout(x)`` besides LoRA's ``W @ x`` (PEFT's variant recomputes
    it), and its backward needs that GEMM's input gradient. Here every adapted ``nn.Linear`` adds
    ``W @ dropout(x)`` (one bf16 GEMM on the dropped-out input, cast to ``W``'s dtype where PEFT's fp32 adapters
    made it fp32) to LoRA's output: LoRA plus exactly those two GEMMs and one add, and none of DoRA's
    elementwise work. The values are not DoRA's; only the time is compared. Undone on exit.
    """
    handles = []
    swapped: list[tuple[nn.Module, nn.Module]] = []
    for _, module in _lora_layers(model):
        base_layer = module.get_base_layer()
        if type(base_layer) is not nn.Linear:
            continue
        keeper = _KeepOutput(module.lora_dropout["default"])
        swapped.append((module, keeper.inner))
        module.lora_dropout["default"] = keeper

        def add_base_on_dropped(_mod, _args, output, keeper=keeper, weight=base_layer.weight):
            dropped, keeper.last = keeper.last, None
            return output + F.linear(dropped.to(weight.dtype), weight).to(output.dtype)

        handles.append(module.register_forward_hook(add_base_on_dropped))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module, inner in swapped:
            module.lora_dropout["default"] = inner


def set_lora_dropout(model: nn.Module, p: float) -> None:
    """Swap every adapter's dropout module the way PEFT builds it (``nn.Dropout(p)`` if p > 0 else Identity)."""
    for _, module in _lora_layers(model):
        module.lora_dropout["default"] = nn.Dropout(p=p) if p > 0 else nn.Identity()


def compiled(model: nn.Module, backend: str, mode: str | None = None) -> tuple[Callable[..., Any], dict[str, Any]]:
    """``torch.compile(model, backend=backend, mode=mode, dynamic=False)`` after a Dynamo reset; returns (fn, info).

    The reset makes every compiled row start clean: the providers' models share code objects (PEFT's and
    transformers' ``forward`` functions), and a frame Dynamo gave up on for one provider (stock PEFT's graph
    breaks) would otherwise run eagerly for the next one too. Dynamo's per-frame cache is raised so that
    no case falls back to eager mode silently; recompiles are counted per row instead (:func:`dynamo_stats`).
    Inductor's on-disk caches still serve a graph compiled by an earlier case (the accumulation step's
    training graph), so only tracing is paid again.
    """
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    info: dict[str, Any] = {"compile_backend": backend, "compile_mode": mode or "default"}
    if backend == "inductor":
        import torch._inductor.config as inductor_config

        info["inductor_graph_partition"] = bool(getattr(inductor_config, "graph_partition", False))
    return torch.compile(model, backend=backend, mode=mode, dynamic=False), info


def compiled_alongside(
    model: nn.Module, tag: str, backend: str, mode: str | None = None
) -> tuple[Callable[..., Any], dict[str, Any]]:
    """Like :func:`compiled`, but without a Dynamo reset, so that several providers' compiled models stay warm
    in one process and can be timed in interleaved rounds (``benchmarks/profile_compiled.py --rounds``).

    Dynamo keeps its compiled graphs per code object, and the providers' models share theirs (PEFT's and
    transformers' ``forward``): the model is called from a function of its own code object (named after
    ``tag``), so that each provider's graph is an entry of its own and no call checks another provider's
    guards first. Meant for models that compile without graph breaks (LoRA, dorafactors): a model that breaks
    the graph (stock PEFT) also compiles the frames it breaks in, whose code the other models share, so compile
    it after them (a frame Dynamo gives up on runs eagerly for every model that shares its code)."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    name = "call_" + "".join(c if c.isalnum() else "_" for c in tag)
    namespace: dict[str, Any] = {"model": model}
    exec(f"def {name}(*args, **kwargs):\n    return model(*args, **kwargs)\n", namespace)
    info: dict[str, Any] = {"compile_backend": backend, "compile_mode": mode or "default"}
    return torch.compile(namespace[name], backend=backend, mode=mode, dynamic=False), info


def dynamo_stats() -> dict[str, int]:
    """Process-wide Dynamo counters: graphs compiled (``unique_graphs``) and graph breaks, for per-row deltas."""
    try:
        from torch._dynamo.utils import counters

        return {
            "graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values())),
        }
    except Exception:
        return {}


def timed_first_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of one call (for a compiled model: compilation + one run)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------- model pool


class ModelPool:
    """Keeps the last ``slots`` provider sets (dict provider -> model or the exception its build raised).

    Cases that share a configuration (same base, rank, dtype setup) reuse one set instead of rebuilding.
    """

    def __init__(self, slots: int = 2) -> None:
        self.slots = slots
        self._sets: OrderedDict[Any, dict[str, Any]] = OrderedDict()

    def get(self, key: Any, build: Callable[[str], nn.Module], providers: Sequence[str]) -> dict[str, Any]:
        if key in self._sets:
            self._sets.move_to_end(key)
            models = self._sets[key]
        else:
            while len(self._sets) >= self.slots:
                self._sets.popitem(last=False)
                from .harness import free_memory

                free_memory()
            models = {}
            self._sets[key] = models
        for provider in providers:
            if provider not in models:
                try:
                    models[provider] = build(provider)
                except Exception as exc:  # recorded per provider by the cases that use it
                    models[provider] = exc
        return models

    def clear(self) -> None:
        self._sets.clear()


POOL = ModelPool(slots=2)


def model_of(provider: str) -> str:
    """The built model a provider runs on: ``stock_cached`` -> stock, ``dorafactors_cold+compile`` -> dorafactors."""
    name = provider.removesuffix("+compile")
    return {"dorafactors_cold": "dorafactors", "stock_cached": "stock", "lora_dropout_floor": "lora"}.get(name, name)


def models_needed(providers: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(model_of(p) for p in providers))


def get_model(models: dict[str, Any], provider: str) -> nn.Module:
    """The built model of ``provider`` (re-raises the exception its build raised)."""
    model = models[provider]
    if isinstance(model, BaseException):
        raise model
    return model
