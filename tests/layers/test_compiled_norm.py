"""The norm under ``torch.compile``: the opaque ops ``dorafactors::cached_weight_norm`` (a fresh copy, where
autograd records) and ``dorafactors::refresh_weight_norm`` (no grad: the norm kept in the layer's store), with
the kernels and the never-stale norm cache at run time, ``fullgraph=True`` and no recompile.

CPU: the ``aot_eager`` backend (the op's body runs eagerly when the compiled graph runs, as under Inductor),
on the PyTorch path and on the Triton kernels (interpreter, ``PEFT_DORA_FUSED=1``). The same norm-count and
stale-value checks as the eager path's (``tests/norm/test_norm_cache.py``): one norm per optimizer step with
gradient accumulation 8, none per decode step, in-place edits, ``load_state_dict`` (copy and assign), fused
optimizers, merge/unmerge, ``.data`` writes with ``clear_norm_caches``. GPU (``gpu`` marker): Inductor, and
``mode="reduce-overhead"`` decoding without a re-recorded CUDA graph per token.
"""

from __future__ import annotations

import contextlib
import copy
import gc

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import dorafactors
from dorafactors.autograd import norm_op
from dorafactors.dispatch import config
from dorafactors.norm import engine
from dorafactors.norm.cache import NormCache, StaleNormCacheError
from tests._lifecycle import build_pair, dora_layers, one_thread, stepped_by_an_optimizer, sync_weights, trainable
from tests._models import TinyLM
from tests._peft import MERGE_FIXED
from tests._tolerances import StockFidelity, assert_dtype_close, assert_tensor_close

F32 = torch.float32
ON_GPU = torch.cuda.is_available()
OP = torch.ops.dorafactors.cached_weight_norm.default
STORE_OP = torch.ops.dorafactors.refresh_weight_norm.default


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    # without a GPU the compose kernels run on the interpreter, which cannot be recorded into a graph: they
    # stay opaque to AOTAutograd (tests/autograd/test_compose_compile.py); on a GPU, Inductor's defaults
    opaque = contextlib.nullcontext() if ON_GPU else torch._functorch.config.patch(decompose_custom_triton_ops=False)
    with one_thread(), opaque:
        yield
    torch._dynamo.reset()


def _norm_count(model: nn.Module) -> int:
    return sum(layer.norm_computations for layer in dora_layers(model))


class _Graphs:
    """An ``aot_eager`` backend that keeps the forward and backward ATen graphs it compiles; ``min_cut``:
    Inductor's partitioner (which may recompute forward ops in the backward) instead of the default."""

    def __init__(self, min_cut: bool = False) -> None:
        from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
        from torch._dynamo.backends.common import aot_autograd
        from torch._dynamo.testing import CompileCounterWithBackend

        self.forward: list[torch.fx.GraphModule] = []
        self.backward: list[torch.fx.GraphModule] = []

        def keep(into):
            def compiler(gm, example_inputs):
                into.append(gm)
                return make_boxed_func(gm.forward)

            return compiler

        extra = {"partition_fn": min_cut_rematerialization_partition} if min_cut else {}
        self.counter = CompileCounterWithBackend(
            aot_autograd(fw_compiler=keep(self.forward), bw_compiler=keep(self.backward), **extra)
        )

    def compile(self, model):
        return torch.compile(model, backend=self.counter, fullgraph=True)

    @property
    def frames(self) -> int:
        return self.counter.frame_count


def _norm_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is OP]


def _graph_input_or_view_of_one(node: torch.fx.Node) -> bool:
    """A placeholder, or a chain of view ops of one (Inductor folds views into the op's argument)."""
    while node.op == "call_function" and getattr(node.target, "is_view", False):
        node = node.args[0]
    return node.op == "placeholder"


# --------------------------------------------------------------------------------------------------- the op


def _factors(layout: str, gen: torch.Generator):
    """(W, A, B) parameters of ``layout`` with non-identity adapters (W frozen, A and B trainable)."""
    if layout == "linear":
        shapes = ((7, 12), (3, 12), (7, 3))
    elif layout == "transposed":  # a fan_in_fan_out Linear: W is [d_in, d_out]
        shapes = ((12, 7), (3, 12), (7, 3))
    else:  # a grouped Conv2d: out 6, in 4, groups 2, kernel 3x3, r 4
        shapes = ((6, 2, 3, 3), (4, 4, 3, 3), (6, 2, 1, 1))
    w, a, b = (torch.randn(s, generator=gen, dtype=torch.float64).float() for s in shapes)
    return nn.Parameter(w, requires_grad=False), nn.Parameter(a), nn.Parameter(0.5 * b)


@pytest.mark.parametrize("layout", norm_op.LAYOUTS)
def test_the_op_is_registered_cudagraph_unsafe_and_passes_opcheck(layout):
    assert torch.Tag.cudagraph_unsafe in OP.tags, "the host-side cache checks must not be captured in a CUDA graph"
    w, a, b = _factors(layout, torch.Generator().manual_seed(0))
    owner = torch.ones(w.shape[1] if layout == "transposed" else w.shape[0])
    with torch.no_grad():
        for cache in (False, True):
            for recording in (False, True):
                # schema (no mutation, no aliasing of the result), fake tensor and AOT dispatch of the op
                torch.library.opcheck(OP, (owner, w.detach(), a.detach(), b.detach(), 0.7, layout, cache, recording))


@pytest.mark.parametrize("layout", norm_op.LAYOUTS)
def test_the_store_op_is_registered_cudagraph_unsafe_and_passes_opcheck(layout):
    """The store op: cudagraph-unsafe, and it mutates exactly its declared ``store`` (opcheck), which then
    holds the bits of the norm the copying op serves."""
    assert torch.Tag.cudagraph_unsafe in STORE_OP.tags
    w, a, b = _factors(layout, torch.Generator().manual_seed(0))
    rows = w.shape[1] if layout == "transposed" else w.shape[0]
    owner = torch.ones(rows)
    with torch.no_grad():
        for cache in (False, True):
            store = norm_op.new_norm_store(rows, torch.float32, "cpu")
            args = (store, owner, w.detach(), a.detach(), b.detach(), 0.7, layout, cache)
            torch.library.opcheck(STORE_OP, args)
            STORE_OP(*args)
            want = OP(owner, w.detach(), a.detach(), b.detach(), 0.7, layout, cache, False)
            assert torch.equal(store.view(torch.float32), want)
        with pytest.raises(ValueError, match="norm_store_fits"):
            STORE_OP(torch.zeros(rows + 1, dtype=torch.int32), owner, w, a, b, 0.7, layout, True)


@pytest.mark.parametrize("layout", norm_op.LAYOUTS)
def test_the_op_serves_the_engines_norm_as_a_fresh_tensor(layout, path):
    """A miss computes exactly what the eager path computes; a hit returns the same values in new memory, so
    a caller (Inductor reusing an extern kernel's output buffer) can never write into the cache."""
    w, a, b = _factors(layout, torch.Generator().manual_seed(1))
    owner = nn.Parameter(torch.ones(1))
    with torch.no_grad():
        first = OP(owner, w, a, b, 0.7, layout, True, False)
        second = OP(owner, w, a, b, 0.7, layout, True, False)
        expected = engine.weight_norm_with_cached_sumsq(
            *norm_op.norm_factors(layout, w, a, b),
            0.7,
            base_tensors=(w,),
            base_trainable=False,
            sumsq_cache=NormCache(),
        )
        dense = torch.linalg.vector_norm(
            (lambda w2, a2, b2: w2.double() + 0.7 * b2.double() @ a2.double())(*norm_op.norm_factors(layout, w, a, b)),
            dim=1,
        )
        third = OP(owner, w, a, b, 0.7, layout, True, False)
    assert torch.equal(first, expected) and torch.equal(second, expected) and torch.equal(third, expected)
    assert_dtype_close(first, dense, F32, name="op norm vs fp64 dense norm")
    assert len({t.untyped_storage().data_ptr() for t in (first, second, third)}) == 3, "results share memory"
    caches = dorafactors.norm.cache.owned_norm_caches(owner, create=False)
    assert (caches.norm.misses, caches.norm.hits) == (1, 2)
    for result in (first, second, third):
        result.fill_(0.0)  # a caller writing into the results it got
    with torch.no_grad():
        assert torch.equal(OP(owner, w, a, b, 0.7, layout, True, False), expected)
        b.mul_(1.5)  # a visible write: the next call recomputes
        recomputed = OP(owner, w, a, b, 0.7, layout, True, False)
    assert caches.norm.misses == 2 and not torch.equal(recomputed, expected)


def test_the_op_caches_nothing_when_told_not_to_or_switched_off(monkeypatch):
    w, a, b = _factors("linear", torch.Generator().manual_seed(2))
    owner = nn.Parameter(torch.ones(1))
    with torch.no_grad():
        for _ in range(3):
            OP(owner, w, a, b, 0.7, "linear", False, False)
        monkeypatch.setenv("PEFT_DORA_NORM_CACHE", "0")
        config.invalidate_cache()
        for _ in range(2):
            OP(owner, w, a, b, 0.7, "linear", True, False)
    caches = dorafactors.norm.cache.owned_norm_caches(owner, create=False)
    assert caches.norm.misses == 5 and caches.norm.hits == 0 and len(caches.norm) == 0


def test_a_recording_call_through_tensors_no_optimizer_steps_caches_nothing():
    """``recording`` (a compiled forward that records autograd) through trainable ``A`` / ``B`` that no optimizer
    has stepped: a hand-written update may follow the backward unseen by the version counters, so each such
    call computes the norm and ends what the no-grad calls cached; once an optimizer has stepped them, the
    optimizer's steps are what the cache is keyed by, and recording calls are served again, while that optimizer
    lives."""
    w, a, b = _factors("linear", torch.Generator().manual_seed(3))
    owner = nn.Parameter(torch.ones(1))
    with torch.no_grad():
        before = OP(owner, w, a, b, 0.7, "linear", True, False)  # a no-grad call caches
        for _ in range(2):
            OP(owner, w, a, b, 0.7, "linear", True, True)
        b.data.mul_(1.5)  # what a hand-written update writes: no version bump
        after = OP(owner, w, a, b, 0.7, "linear", True, False)
    caches = dorafactors.norm.cache.owned_norm_caches(owner, create=False)
    assert (caches.norm.misses, caches.norm.hits) == (4, 0)
    dense = torch.linalg.vector_norm(w.double() + 0.7 * b.double() @ a.double(), dim=1)
    assert_dtype_close(after, dense, F32, name="norm after the hand-written update vs fp64")
    assert not torch.equal(after, before)
    optimizer = torch.optim.SGD([a, b, owner], lr=0.0)
    optimizer.step()  # a live optimizer now steps them (writes nothing)
    with torch.no_grad():
        for _ in range(3):
            OP(owner, w, a, b, 0.7, "linear", True, True)
    assert (caches.norm.misses, caches.norm.hits) == (5, 2)
    del optimizer  # freed: nothing counts their writes any more, a hand-written update may follow
    gc.collect()
    with torch.no_grad():
        OP(owner, w, a, b, 0.7, "linear", True, True)
    assert (caches.norm.misses, caches.norm.hits) == (6, 2)


MERGED_OP = torch.ops.dorafactors.refresh_weight_norms.default


@pytest.mark.parametrize("layout_token", [0, 12345], ids=["no-token", "layout-token"])
def test_the_merged_op_skips_its_layers_only_while_nothing_they_read_changed(monkeypatch, layout_token):
    """``refresh_weight_norms`` on three layers (one per layout): after a call that leaves every store holding
    its cached norm, a repeat returns early (the layers' hits counted, nothing computed, nothing written);
    every change a layer's own check would see makes the next call check each layer again, and the stores
    then hold the current norms: in-place writes of ``A``, ``B`` and ``W``, an optimizer step (a write no
    version counter sees, as fused optimizers make), a replaced parameter or store, ``clear_norm_caches``
    after a ``.data`` write, another scaling, and ``verify`` mode. Alike with a layout token (the calls of one
    compiled graph, whose guards fix the tensors' layouts: the memo then compares what they do not), and a
    layout change at the same address and version is seen by a call with another token (another graph)."""
    gen = torch.Generator().manual_seed(11)
    layers = []
    for layout in norm_op.LAYOUTS:
        w, a, b = _factors(layout, gen)
        rows = w.shape[1] if layout == "transposed" else w.shape[0]
        layers.append([norm_op.new_norm_store(rows, F32, "cpu"), nn.Parameter(torch.ones(rows)), w, a, b])
    scalings = [0.7, 1.3, 0.4]

    def call(scales=None, token=layout_token):
        columns = [list(column) for column in zip(*layers)]
        plan = norm_op.merged_plan(scales or scalings, list(norm_op.LAYOUTS), [True] * len(layers), token)
        MERGED_OP(*columns, plan)

    def caches(i):
        return dorafactors.norm.cache.owned_norm_caches(layers[i][1], create=False)

    def counts():
        return [(caches(i).norm.misses, caches(i).norm.hits) for i in range(len(layers))]

    def assert_stores_current(what, scales=None):
        for (store, _, w, a, b), layout, scale in zip(layers, norm_op.LAYOUTS, scales or scalings):
            w2, a2, b2 = norm_op.norm_factors(layout, w, a, b)
            want = engine.weight_norm(w2, a2, b2, scale)
            assert_dtype_close(store.view(F32), want, F32, name=f"{what}: store of the {layout} layer")

    with torch.no_grad():
        call()
        assert caches(0).merged is not None, "a call that left every store current leaves its memo"
        assert_stores_current("first call")
        before = counts()
        written = [caches(i).served for i in range(len(layers))]
        for _ in range(3):
            call()
        assert counts() == [(misses, hits + 3) for misses, hits in before], "repeats: hits, no computation"
        assert [caches(i).served for i in range(len(layers))] == written, "a repeat wrote a store"

        def changed(what, edit, scales=None, recomputes=True):
            before = [(caches(i), caches(i).norm.misses) for i in range(len(layers))]  # kept alive: no id reuse
            edit()
            call(scales)
            assert_stores_current(what, scales)
            recomputed = False
            for i in range(len(layers)):
                seen = [misses for cache, misses in before if cache is caches(i)]
                recomputed |= caches(i).norm.misses > (seen[0] if seen else 0)
            assert recomputed == recomputes, f"{what}: recomputed {recomputed}"
            assert caches(0).merged is not None, f"{what}: the memo was not renewed"
            hits = sum(h for _, h in counts())
            call(scales)  # and the renewed memo serves the repeat
            assert sum(h for _, h in counts()) == hits + len(layers)

        changed("lora_A written", lambda: layers[1][3].mul_(1.5))
        changed("lora_B written", lambda: layers[2][4].add_(0.25))
        changed("base weight written", lambda: layers[0][2].mul_(0.5))
        step = torch.optim.SGD([layers[1][3]], lr=0.1)  # no gradient: its step writes nothing itself

        def blind_step():
            version = layers[1][3]._version
            layers[1][3].data.mul_(2.0)  # a write no version counter sees (as a fused optimizer's), then a step
            step.step()
            assert layers[1][3]._version == version, "the write must be one no version counter sees"

        changed("optimizer step", blind_step)
        changed("parameter replaced", lambda: layers[2].__setitem__(4, nn.Parameter(layers[2][4].detach() * 3)))
        new_owner = nn.Parameter(torch.ones(len(layers[1][1])))  # a new magnitude: the layer's caches start empty
        changed("magnitude replaced", lambda: layers[1].__setitem__(1, new_owner))
        new_store = norm_op.new_norm_store(len(layers[0][0]), F32, "cpu")  # zeros: it must be written
        changed("store replaced", lambda: layers[0].__setitem__(0, new_store), recomputes=False)

        def data_write_and_clear():
            layers[2][2].data.mul_(1.25)
            caches(2).clear()  # what clear_norm_caches does for the layer

        changed("clear after a .data write", data_write_and_clear)

        def data_write_and_entry_dropped():
            layers[1][3].data.mul_(1.25)  # lora_A: behind the norm entry only (W is behind the sum of squares too)
            caches(1).norm.clear()  # the entry alone dropped, as another op of the layer may replace it

        changed("norm entry dropped after a .data write", data_write_and_entry_dropped)
        changed("scaling", lambda: None, scales=[0.7, 1.3, 0.9])
        if layout_token:
            assert caches(0).merged.layout_token == layout_token
            weight = layers[0][2]  # the linear layer's W read column-major: address, shape and version kept
            version, address, shape = weight._version, weight.data_ptr(), weight.shape
            weight.data = weight.data.as_strided(shape, (1, shape[0]))
            assert (weight._version, weight.data_ptr(), weight.shape) == (version, address, shape)
            call([0.7, 1.3, 0.9], token=layout_token + 1)  # the graph recompiled for the new strides
            assert_stores_current("other strides at the same address, another graph", [0.7, 1.3, 0.9])
        monkeypatch.setenv("PEFT_DORA_NORM_CACHE", "verify")
        config.invalidate_cache()
        for store, *_ in layers:
            store.zero_()  # a write into the stores from outside: verify compares them with the cached norms
        with pytest.raises(StaleNormCacheError, match="store"):
            call([0.7, 1.3, 0.9])


# --------------------------------------------------------------------------------------------- compiled models


@pytest.mark.parametrize("partitioner", ["default", "min_cut"])
def test_compiled_model_calls_the_op_once_per_layer_in_one_graph(path, partitioner):
    """``fullgraph=True``: one forward graph with one norm op per DoRA layer (Embedding, Linear, Conv1D,
    Conv1d), every argument a graph input (so Inductor can run it ahead of a captured CUDA graph), none in
    the backward graph (also with Inductor's partitioner); outputs and gradients equal stock PEFT's."""
    stock, ours = build_pair()
    ids = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(3))
    graphs = _Graphs(min_cut=partitioner == "min_cut")
    compiled = graphs.compile(ours)
    out = compiled(ids)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    grads = torch.autograd.grad((out * probe).sum(), list(trainable(ours).values()))
    sync_weights(ours, stock)
    out_s = stock(ids)
    grads_s = torch.autograd.grad((out_s * probe).sum(), list(trainable(stock).values()))
    assert_dtype_close(out.detach(), out_s.detach(), F32, name="compiled output")
    for name, got, want in zip(trainable(ours), grads, grads_s):
        assert_dtype_close(got, want, F32, name=f"compiled grad {name}")
    (forward,) = graphs.forward
    nodes = _norm_nodes(forward)
    assert len(nodes) == len(dora_layers(ours)) == 4
    for node in nodes:
        tensors = [arg for arg in node.args if isinstance(arg, torch.fx.Node)]
        assert len(tensors) == 4 and all(map(_graph_input_or_view_of_one, tensors)), node.format_node()
    assert not _norm_nodes(graphs.backward[0])
    assert graphs.frames == 1


def test_compiled_norm_runs_the_kernels_at_run_time(path, monkeypatch):
    """The op's body picks the norm's implementation at run time, exactly as eager mode: the tensor-core
    kernel for a half-precision base weight on the kernel path, the PyTorch reference otherwise."""
    from dorafactors.kernels import row_norm

    calls = []
    real = row_norm.triton_weight_norm_sq
    monkeypatch.setattr(row_norm, "triton_weight_norm_sq", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, ours = build_pair(targets=["lin"])
    ours.to(torch.bfloat16)
    lin = ours.base_model.model.lin
    eager_path = engine.norm_path(lin.base_layer.weight, lin.lora_A.default.weight, lin.lora_B.default.weight)
    kernel = int(eager_path in ("triton", "gemm"))
    if path == "kernels" and config.triton_interpreter_active():
        assert kernel, eager_path  # CPU CI: the interpreted kernel is the eager choice, so the test bites
    ids = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(3))
    compiled = _Graphs().compile(ours)
    with torch.no_grad():
        out = compiled(ids)
        assert len(calls) == kernel
        compiled(ids)  # a hit: no launch
        assert len(calls) == kernel
        lin.lora_B.default.weight.mul_(1.1)
        compiled(ids)
        assert len(calls) == 2 * kernel
        ours.base_model.model.lin.lora_B.default.weight.div_(1.1)
        eager = ours(ids)
    assert_dtype_close(out, eager, torch.bfloat16, name="compiled vs eager bf16 output")


def _tiny_lm(blocks: int = 2):
    torch.manual_seed(0)
    with dorafactors.patched():
        model = get_peft_model(
            TinyLM(blocks=blocks),
            LoraConfig(r=4, target_modules=["q", "up", "down"], use_dora=True, init_lora_weights=False),
        )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.2 * torch.rand_like(p))
    return model


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("fused_optimizer", [False, True], ids=["foreach", "fused"])
def test_compiled_one_norm_per_optimizer_step_with_accumulation(checkpointing, fused_optimizer):
    model = _tiny_lm()
    model.base_model.model.checkpointing = checkpointing
    layers = len(dora_layers(model))
    opt = torch.optim.AdamW(list(trainable(model).values()), lr=1e-2, fused=fused_optimizer)
    graphs = _Graphs()
    compiled = graphs.compile(model)
    model.train()
    for step in range(4):
        before = _norm_count(model)
        for micro in range(8):
            ids = torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(step * 8 + micro))
            (compiled(ids).logsumexp(-1).mean() / 8).backward()
        if step == 0:  # no optimizer has stepped the adapters yet: every recording forward computes the norm
            assert _norm_count(model) - before == 8 * layers * (2 if checkpointing else 1)
        else:
            assert _norm_count(model) - before == layers, f"step {step}: one norm per DoRA layer per optimizer step"
        opt.step()
        opt.zero_grad()
    assert graphs.frames == 1, "no recompile across micro-batches and optimizer steps"


def test_compiled_reference_forwards_with_the_adapters_disabled():
    """A compiled DPO-style step (TRL's reference model when it is the policy with its adapters off): the
    training forward, a ``no_grad`` forward under ``disable_adapter()``, an AdamW step. Two graphs after the
    first step (one per mode) and none later; the reference forward computes no norm, the training forward
    one per DoRA layer per optimizer step; the reference output is the eager base model's."""
    model = _tiny_lm()
    layers = len(dora_layers(model))
    opt = torch.optim.AdamW(list(trainable(model).values()), lr=1e-2)
    graphs = _Graphs()
    compiled = graphs.compile(model)
    model.train()
    for step in range(4):
        ids = torch.randint(0, 32, (2, 7), generator=torch.Generator().manual_seed(50 + step))
        before = _norm_count(model)
        policy = compiled(ids)
        assert _norm_count(model) - before == layers, f"step {step}: one norm per layer in the training forward"
        with torch.no_grad(), model.disable_adapter():
            reference = compiled(ids)
            eager_reference = model(ids)
        assert _norm_count(model) - before == layers, f"step {step}: the reference forward computed a norm"
        torch.testing.assert_close(reference, eager_reference)
        (policy - reference).square().mean().backward()
        opt.step()
        opt.zero_grad()
        if step == 0:
            frames = graphs.frames
    assert frames == 2 and graphs.frames == frames, f"recompiled after the first step: {frames} -> {graphs.frames}"


def test_compiled_no_norm_per_decode_step_after_the_first():
    model = _tiny_lm().eval()
    graphs = _Graphs()
    compiled = graphs.compile(model)
    token = torch.randint(0, 32, (1, 1))
    with torch.no_grad():
        compiled(token)
        first = _norm_count(model)
        for _ in range(16):
            token = compiled(token)[:, -1:].argmax(-1)
    assert first == len(dora_layers(model)) and _norm_count(model) == first
    assert graphs.frames == 1


def test_regional_compilation_shares_one_graph_across_blocks_and_caches_each_layer():
    """One block compiled and reused for every block (as regional compilation does): the norm op holds no
    per-layer constant, so the blocks share one graph, and each layer still has its own cached norm."""
    model = _tiny_lm(blocks=4).eval()
    graphs = _Graphs()
    compiled_block = graphs.compile(TinyLM.block)
    lm = model.base_model.model
    h = torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for _ in range(3):
            x = h
            for block in lm.blocks:
                x = compiled_block(block, x)
    assert graphs.frames == 1, "a per-layer constant in the graph would recompile for every block"
    assert _norm_count(model) == 3 * len(lm.blocks), "one norm per DoRA layer, then cache hits"


# --------------------------------------------------------------------------------------------- never stale

_EDITS = ("lora_A", "lora_B", "magnitude", "base_layer")


def _named(model, key):
    return [(n, p) for n, p in model.named_parameters() if key in n or key.replace("lora_", "lora_embedding_") in n]


def _edit(stock, ours, key: str, step: int) -> None:
    factor = 1.0 + 0.05 * (step % 5 + 1)
    with torch.no_grad():
        for model in (stock, ours):
            for _, p in _named(model, key):
                p.mul_(factor)


def _check(stock, ours, compiled, ids, what: str) -> None:
    """The compiled model (current mode) == stock PEFT holding the same weights; in train mode the gradients too."""
    sync_weights(ours, stock)
    if not ours.training:
        with torch.no_grad():
            assert_dtype_close(compiled(ids), stock(ids), F32, name=f"{what}: compiled eval output")
        return
    probe = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(7))
    out = compiled(ids)
    grads = torch.autograd.grad((out * probe).sum(), list(trainable(ours).values()))
    out_s = stock(ids)
    grads_s = torch.autograd.grad((out_s * probe).sum(), list(trainable(stock).values()))
    assert_dtype_close(out.detach(), out_s.detach(), F32, name=f"{what}: compiled train output")
    for name, got, want in zip(trainable(ours), grads, grads_s):  # (elements that cancel: tensor-wise)
        assert_tensor_close(got, want, F32, name=f"{what}: compiled grad {name}")


def _merged(stock, ours):
    @contextlib.contextmanager
    def scope():
        for model in (stock, ours):
            model.base_model.merge_adapter()
        try:
            yield
        finally:
            for model in (stock, ours):
                model.base_model.unmerge_adapter()

    return scope()


@pytest.mark.parametrize("fused_optimizer", [False, True], ids=["foreach", "fused"])
def test_compiled_model_never_serves_a_stale_norm(path, fused_optimizer):
    """Every write that can change a norm, each followed by compiled calls in train and eval mode against
    stock PEFT holding the same weights, with no recompile after the warm-up of each mode."""
    stock, ours = build_pair()
    ids = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(5))
    graphs = _Graphs()
    compiled = graphs.compile(ours)
    opt_s = torch.optim.AdamW(list(trainable(stock).values()), lr=0.05, fused=fused_optimizer)
    opt_o = torch.optim.AdamW(list(trainable(ours).values()), lr=0.05, fused=fused_optimizer)
    modes = [True, False]

    def both_modes(what):
        for training in modes:
            ours.train(training)
            stock.train(training)
            _check(stock, ours, compiled, ids, what)

    both_modes("warm-up")
    if MERGE_FIXED:
        ours.eval()
        stock.eval()
        with _merged(stock, ours):
            _check(stock, ours, compiled, ids, "merged warm-up")
    frames = graphs.frames
    ops = ["step", *_EDITS, "load_state_dict", "load_state_dict_assign", "step", "data_edit_with_clear"]
    if MERGE_FIXED:
        ops.insert(3, "merge_unmerge")
    for i, op in enumerate(ops):
        if op == "step":
            ours.train()
            stock.train()
            for model in (stock, ours):
                (model(ids) ** 2).mean().backward()
            opt_s.step()
            opt_o.step()
            opt_s.zero_grad()
            opt_o.zero_grad()
        elif op in _EDITS:
            _edit(stock, ours, op, i)
        elif op.startswith("load_state_dict"):
            gen = torch.Generator().manual_seed(i)
            state = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in stock.state_dict().items()}
            for model in (stock, ours):
                model.load_state_dict({k: v.clone() for k, v in state.items()}, assign=op.endswith("assign"))
            opt_s = torch.optim.AdamW(list(trainable(stock).values()), lr=0.05, fused=fused_optimizer)
            opt_o = torch.optim.AdamW(list(trainable(ours).values()), lr=0.05, fused=fused_optimizer)
        elif op == "merge_unmerge":
            ours.eval()
            stock.eval()
            with _merged(stock, ours):
                _check(stock, ours, compiled, ids, "merged")
        elif op == "data_edit_with_clear":  # invisible to version counters: the documented remedy
            with torch.no_grad():
                for model in (stock, ours):
                    model.base_model.model.lin.base_layer.weight.data.mul_(1.05)
            dorafactors.clear_norm_caches(ours)
        both_modes(op)
    assert graphs.frames == frames, f"recompiled after the warm-up: {frames} -> {graphs.frames} frames"


@pytest.mark.parametrize("writer", ["hand-written", "fused-frozen"])
def test_compiled_model_follows_writes_without_a_version_bump(writer):
    """Compiled training: a loop that updates the parameters itself through ``.data`` (no optimizer), and a
    fused optimizer that keeps stepping adapters frozen mid-training (their zero gradients kept); each step
    followed by compiled calls in train and eval mode against stock PEFT holding the same weights."""
    stock, ours = build_pair()
    ids = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(6))
    compiled = _Graphs().compile(ours)
    optimizers = {m: torch.optim.AdamW(list(trainable(m).values()), lr=0.05, fused=True) for m in (stock, ours)}
    for step in range(4):
        for model in (stock, ours):
            model.train()
            if writer == "fused-frozen" and step == 2:
                for name, p in model.named_parameters():
                    if "lora_A" in name or "lora_B" in name or "lora_embedding" in name:
                        p.requires_grad_(False)
        for model, runner in ((stock, stock), (ours, compiled)):
            if writer == "fused-frozen":
                optimizers[model].zero_grad(set_to_none=False)
            (runner(ids) ** 2).mean().backward()
            if writer == "fused-frozen":
                optimizers[model].step()
                continue
            for p in trainable(model).values():
                p.data.add_(p.grad, alpha=-0.05)
                p.grad = None
        for training in (True, False):
            ours.train(training)
            stock.train(training)
            _check(stock, ours, compiled, ids, f"{writer} step {step}")


def test_verify_mode_catches_a_blind_write_inside_a_compiled_graph(monkeypatch):
    """``PEFT_DORA_NORM_CACHE=verify`` recomputes every cached norm in the op, compiled graphs included."""
    monkeypatch.setenv("PEFT_DORA_NORM_CACHE", "verify")
    config.invalidate_cache()
    stock, ours = build_pair(targets=["lin"])
    ours.eval()
    compiled = _Graphs().compile(ours)
    ids = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        compiled(ids)
        compiled(ids)  # a verified hit
        ours.base_model.model.lin.base_layer.weight.data.mul_(1.5)  # a write no stamp can see
        with pytest.raises(StaleNormCacheError, match="clear_norm_caches"):
            compiled(ids)
        dorafactors.clear_norm_caches(ours)
        out = compiled(ids)
    sync_weights(ours, stock)
    with torch.no_grad():
        assert_dtype_close(out, stock(ids), F32, name="compiled output after clear_norm_caches")


def test_a_deep_copy_of_a_compiled_model_has_its_own_norm_caches():
    """The op's caches belong to the magnitude parameter: a copy's layers start empty and count their own."""
    model = _tiny_lm().eval()
    copied = copy.deepcopy(model)
    graphs = _Graphs()
    token = torch.randint(0, 32, (1, 1))
    with torch.no_grad():
        graphs.compile(model)(token)
        with torch.no_grad():
            copied.base_model.model.blocks[0]["q"].lora_B.default.weight.mul_(2.0)
        out = graphs.compile(copied)(token)
        want = copied(token)  # eager: its own norms, computed from the copy's weights
    assert _norm_count(model) == len(dora_layers(model))
    assert _norm_count(copied) == 2 * len(dora_layers(copied))  # compiled miss + eager miss, per layer
    assert_dtype_close(out, want, F32, name="compiled copy vs eager copy")


# --------------------------------------------------------------------------------------------------- GPU


def _gpu_pair(dtype=torch.float32):
    """Stock and dorafactors TinyLM-style models on the GPU with the same non-identity weights."""
    torch.manual_seed(0)
    base = TinyLM(width=64, blocks=2)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q", "up", "down"], use_dora=True, init_lora_weights=False)
    stock = get_peft_model(copy.deepcopy(base), cfg).to("cuda", dtype)
    with dorafactors.patched():
        ours = get_peft_model(copy.deepcopy(base), cfg).to("cuda", dtype)
    with torch.no_grad():
        for name, p in stock.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.2 * torch.rand_like(p))
    ours.load_state_dict(stock.state_dict())
    return stock, ours


@pytest.mark.gpu
def test_gpu_inductor_graph_calls_the_op_and_caches():
    from torch._inductor.utils import run_and_get_code

    from dorafactors.autograd import norm_batching

    stock, ours = _gpu_pair()
    stepped_by_an_optimizer(ours)  # the training below is served from the cache from its first step
    ours.eval()
    stock.eval()
    ids = torch.randint(0, 32, (2, 9), device="cuda")
    compiled = torch.compile(ours, fullgraph=True)
    with torch.no_grad():
        out, code = run_and_get_code(compiled, ids)
        # no grad: the norm lives in each layer's store, which the op refreshes in place (no copy); one op for
        # the graph's layers where Inductor's pre-grad pass merges them (autograd/norm_batching.py)
        merged = norm_batching._torch_version() >= norm_batching.MIN_TORCH
        op = "refresh_weight_norms" if merged else "refresh_weight_norm"
        assert "\n".join(code).count(f"torch.ops.dorafactors.{op}.default(") == (
            1 if merged else len(dora_layers(ours))
        )
        assert "cached_weight_norm" not in "\n".join(code)
        first = _norm_count(ours)
        for _ in range(3):
            out = compiled(ids)
    assert first == len(dora_layers(ours)) and _norm_count(ours) == first
    with torch.no_grad():
        assert_dtype_close(out, stock(ids), F32, name="inductor eval output")
    # a training step with accumulation: one norm per layer per optimizer step, no recompile
    ours.train()
    stock.train()
    opt = torch.optim.AdamW(list(trainable(ours).values()), lr=1e-2, fused=True)
    for step in range(3):
        before = _norm_count(ours)
        for _ in range(4):
            (compiled(ids).float().logsumexp(-1).mean() / 4).backward()
        # step 0 still uses the norm of the evaluation above (nothing changed since); then one per step
        assert _norm_count(ours) - before == (0 if step == 0 else len(dora_layers(ours))), f"step {step}"
        opt.step()
        opt.zero_grad()
    sync_weights(ours, stock)
    ours.eval()
    stock.eval()
    with torch.no_grad():
        assert_dtype_close(compiled(ids), stock(ids), F32, name="inductor eval output after steps")


class _Recordings:
    """Counts CUDA graph recordings of Inductor's cudagraph trees (``CUDAGraphTreeManager.record_function``)."""

    def __init__(self, monkeypatch) -> None:
        from torch._inductor import cudagraph_trees

        self.count = 0
        real = cudagraph_trees.CUDAGraphTreeManager.record_function

        def counted(manager, *args, **kwargs):
            self.count += 1
            return real(manager, *args, **kwargs)

        monkeypatch.setattr(cudagraph_trees.CUDAGraphTreeManager, "record_function", counted)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_reduce_overhead_decode_stays_correct_without_re_recording(dtype, monkeypatch):
    """``mode="reduce-overhead"``: the norm op runs outside the captured CUDA graphs (graph partitioning), so
    decoding replays the same graphs token after token, and adapter edits and optimizer steps are seen."""
    from torch._dynamo.utils import counters

    counters.clear()
    recordings = _Recordings(monkeypatch)
    stock, ours = _gpu_pair(dtype)
    ours.eval()
    stock.eval()
    compiled = torch.compile(ours, mode="reduce-overhead", fullgraph=True)
    tokens = torch.randint(0, 32, (1, 4), device="cuda")
    fidelity = StockFidelity("decode logits")

    def decode(steps: int, what: str) -> None:
        nonlocal tokens
        for step in range(steps):
            with torch.no_grad():
                got = compiled(tokens).clone()  # cudagraph outputs are overwritten by the next replay
                want = stock(tokens)
            if dtype == torch.float32:
                assert_dtype_close(got, want, F32, name=f"{what}: decode logits")
            else:  # half precision: at least as close to an fp64 truth as stock PEFT
                with torch.no_grad():
                    truth = copy.deepcopy(stock).double()(tokens)
                fidelity.add(f"{what} step {step}", got, want, truth, dtype)
            tokens = torch.cat([tokens[:, 1:], got[:, -1:].argmax(-1)], dim=1)

    with torch._inductor.config.patch(graph_partition=True):
        decode(3, "warm-up")  # warm-up run, recording, first replay
        recorded, frames, norms = recordings.count, counters["stats"]["unique_graphs"], _norm_count(ours)
        assert recorded >= 1, f"no CUDA graph was recorded (skips: {dict(counters['inductor'])})"
        decode(8, "steady")
        assert _norm_count(ours) == norms, "a decode step computed a norm"
        with torch.no_grad():
            ours.base_model.model.blocks[0]["q"].lora_B.default.weight.mul_(1.3)  # an adapter edit
            stock.base_model.model.blocks[0]["q"].lora_B.default.weight.mul_(1.3)
        decode(2, "after an edit")
        assert _norm_count(ours) == norms + 1, "the edited layer's norm is recomputed once"
        ours.train()
        opt = torch.optim.AdamW(list(trainable(ours).values()), lr=1e-2, fused=True)
        ours(tokens).float().logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()
        ours.eval()
        sync_weights(ours, stock)
        decode(3, "after an optimizer step")
        assert recordings.count == recorded, f"re-recorded CUDA graphs: {recorded} -> {recordings.count}"
        assert counters["stats"]["unique_graphs"] == frames, "recompiled while decoding"
    fidelity.assert_geomean()


@pytest.mark.gpu
def test_gpu_reduce_overhead_runs_the_norm_ops_ahead_of_one_captured_graph(monkeypatch):
    """Every argument of the norm op is a graph input, so Inductor's partitioner moves the ops (tagged
    ``cudagraph_unsafe``) in front of the rest of the graph: one eager partition of norm ops, then one
    captured CUDA graph per forward (not one per DoRA layer)."""
    recordings = _Recordings(monkeypatch)
    _, ours = _gpu_pair(torch.bfloat16)
    ours.eval()
    compiled = torch.compile(ours, mode="reduce-overhead", fullgraph=True)
    tokens = torch.randint(0, 32, (1, 4), device="cuda")
    with torch._inductor.config.patch(graph_partition=True), torch.no_grad():
        for _ in range(4):
            compiled(tokens)
    assert recordings.count == 1, f"{recordings.count} CUDA graphs recorded for one forward graph"


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non-strict"])
def test_torch_export_traces_the_reference_norm_not_the_op(strict):
    """An exported program must run without dorafactors' Python (AOTInductor and other runtimes): under
    ``torch.export`` the norm is traced as ATen ops, and the program follows later weight edits."""
    stock, ours = build_pair(targets=["lin", "gpt", "conv"])
    ours.eval()
    ids = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(9))
    program = torch.export.export(ours, (ids,), strict=strict)
    targets = {str(n.target) for gm in program.graph_module.modules() for n in gm.graph.nodes}
    assert not any("dorafactors" in t for t in targets), sorted(t for t in targets if "dorafactors" in t)
    with torch.no_grad():
        ours.base_model.model.lin.lora_B.default.weight.mul_(1.5)
    sync_weights(ours, stock)
    with torch.no_grad():
        assert_dtype_close(program.module()(ids), stock(ids), F32, name="exported program after an edit")


# ------------------------------------------------------------------------------------ the no-grad norm store


def _store_calls(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The graph's calls of the store op (functionalized: ``auto_functionalized`` nodes naming it)."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and STORE_OP in (n.target, *n.args[:1])]


def _stores(model: nn.Module) -> list[torch.Tensor]:
    return [layer.__dict__[norm_op.NORM_STORE] for layer in dora_layers(model)]


def _eager_norms(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's forward norm as the eager path computes it (read from its cache after an eager call)."""
    with torch.no_grad():
        model(ids)
    return [next(iter(layer._df_norm_cache._entries.values()))[2] for layer in dora_layers(model)]


def test_compiled_no_grad_forward_reads_the_norm_from_the_layers_store():
    """No autograd to record: every layer's graph calls ``refresh_weight_norm`` on its store (a graph input)
    and reads the norm there, never ``cached_weight_norm``'s copy; the store holds the eager norm's bits, and
    the compiled output equals the eager one. With grad mode on, the graph keeps the copying op."""
    model = _tiny_lm().eval()
    graphs = _Graphs()
    compiled = graphs.compile(model)
    ids = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = compiled(ids)
    layers = dora_layers(model)
    forward = graphs.forward[-1]
    assert len(_store_calls(forward)) == len(layers) and not _norm_nodes(forward)
    for store, norm in zip(_stores(model), _eager_norms(model, ids)):
        assert store.dtype == torch.int32 and torch.equal(store.view(torch.float32), norm)
    with torch.no_grad():
        assert_dtype_close(out, model(ids), F32, name="compiled no-grad output")
    model.train()
    compiled(ids).sum().backward()
    training = graphs.forward[-1]
    assert not _store_calls(training) and len(_norm_nodes(training)) == len(layers)


def test_inductor_calls_the_store_op_in_place_without_a_copy():
    """Under Inductor the store op (one for the graph's layers) runs on the store itself (Inductor re-inplaces
    the functionalized mutation of a graph input) and nothing copies the norm: no ``cached_weight_norm``, no
    ``copy_``; after the first call a hit writes nothing (what each layer's caches record as written stays the
    same record)."""
    from torch._inductor.utils import run_and_get_code

    model = _tiny_lm(blocks=1).eval()
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    ids = torch.randint(0, 32, (1, 4), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out, code = run_and_get_code(compiled, ids)
        written = [layer._compiled_norm_caches().served for layer in dora_layers(model)]
        again = compiled(ids)
        eager = model(ids)
    from dorafactors.autograd import norm_batching

    source = "\n".join(code)
    # one call for the graph's layers where the pass merges them (autograd/norm_batching.py), else one per
    # layer; either way working on the stores themselves
    merged = norm_batching._torch_version() >= norm_batching.MIN_TORCH
    assert source.count("torch.ops.dorafactors.refresh_weight_norms.default(") == (1 if merged else 0)
    assert source.count("torch.ops.dorafactors.refresh_weight_norm.default(") == (
        0 if merged else len(dora_layers(model))
    )
    assert "cached_weight_norm" not in source and "copy_" not in source
    assert all(written), "the first call left a store unrecorded"
    assert [layer._compiled_norm_caches().served for layer in dora_layers(model)] == written, "a hit wrote"
    assert_dtype_close(out, eager, F32, name="inductor output")
    assert torch.equal(out, again)


def test_inductor_merged_norm_op_follows_every_write_between_decode_calls():
    """Under Inductor (one merged norm op per graph where the pass merges, else one per layer), no-grad calls
    repeated while nothing changes are served without a norm computation; after each write the next compiled
    call equals the eager model's: in-place writes of ``lora_A``, ``lora_B`` and a base weight, an optimizer
    step of a fused AdamW (no version bump), ``clear_norm_caches`` after a ``.data`` write, and a repeat."""
    model = _tiny_lm(blocks=2).eval()
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    ids = torch.randint(0, 32, (1, 4), generator=torch.Generator().manual_seed(9))
    params = dict(model.named_parameters())
    lora_a = [p for n, p in params.items() if "lora_A" in n]
    lora_b = [p for n, p in params.items() if "lora_B" in n]
    base = [p for n, p in params.items() if "base_layer.weight" in n]
    optimizer = torch.optim.AdamW([*lora_a, *lora_b], lr=0.05, fused=True)

    def fused_step():
        for p in (*lora_a, *lora_b):
            p.grad = torch.full_like(p, 0.5)
        optimizer.step()

    def data_write_and_clear():
        base[1].data.mul_(1.1)
        dorafactors.clear_norm_caches(model)

    writes = [
        ("lora_A", lambda: lora_a[0].mul_(1.5)),
        ("lora_B", lambda: lora_b[-1].add_(0.1)),
        ("base weight", lambda: base[0].mul_(0.75)),
        ("fused AdamW step", fused_step),
        ("clear after a .data write", data_write_and_clear),
        ("nothing", lambda: None),
    ]
    with torch.no_grad():
        compiled(ids)
        norms = _norm_count(model)
        for _ in range(3):
            assert torch.equal(compiled(ids), compiled(ids))
        assert _norm_count(model) == norms, "a repeat without a write computed a norm"
        for what, write in writes:
            write()
            got, again = compiled(ids), compiled(ids)
            assert_dtype_close(got, model(ids), F32, name=f"compiled after a write of {what}")
            assert torch.equal(got, again), f"{what}: the repeat differs"


#: PyTorch older than 2.12 serves a stale compiled graph after ``Module.to`` casts parameters in place (the
#: same ``Parameter`` objects, a new dtype): Dynamo's dict-tag guard fast path skips their tensor guards
#: (pytorch/pytorch#163064, fixed by #177525; seen with torch 2.11 on any model, LoRA alike). Tests that cast
#: a compiled model reset Dynamo there, so the cast model is traced again as newer releases do on their own.
DYNAMO_MISSES_IN_PLACE_CASTS = torch.__version__ < (2, 12)


def _after_in_place_cast() -> None:
    if DYNAMO_MISSES_IN_PLACE_CASTS:
        torch._dynamo.reset()


def test_the_store_is_rewritten_after_a_move_a_replacement_or_clear_norm_caches():
    """The op skips its write only into the very store object (same memory) it last wrote that very cached
    norm into: a replaced store and one written from outside followed by ``clear_norm_caches`` (the remedy
    for writes no stamp sees, as for ``.data`` writes) are written again; a model-wide dtype cast leaves the
    integer store and its bits alone, and a norm that no longer fits it (fp64) is served by the copying op.
    Inductor: the op works on the store itself (``aot_eager`` would hand it a functionalized copy, always
    written)."""
    model = _tiny_lm(blocks=1).eval()
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    ids = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = compiled(ids)  # the same graph on the same norm bits: bitwise the same output
        assert_dtype_close(want, model(ids), F32, name="compiled no-grad output")
        for layer in dora_layers(model):
            layer.__dict__[norm_op.NORM_STORE] = torch.full_like(layer.__dict__[norm_op.NORM_STORE], 7)
        assert torch.equal(compiled(ids), want), "a replaced store was served"
        for store in _stores(model):
            store.zero_()
        dorafactors.clear_norm_caches(model)
        assert torch.equal(compiled(ids), want), "a zeroed store was served after clear_norm_caches"
    model.to(torch.bfloat16)
    _after_in_place_cast()
    assert all(store.dtype == torch.int32 for store in _stores(model))
    with torch.no_grad():
        assert_dtype_close(compiled(ids), model(ids), torch.bfloat16, name="compiled after a bf16 cast")
    model.to(torch.float64)  # an fp64 norm does not fit an int32 store: the copying op serves it
    _after_in_place_cast()
    with torch.no_grad():
        assert_dtype_close(compiled(ids), model(ids), torch.float64, name="compiled after an fp64 cast")


def test_the_store_under_inference_mode_and_in_a_deep_copy():
    """Inductor: a compiled forward under ``inference_mode`` writes the store (a normal tensor, never an
    inference tensor) and matches ``no_grad``; a deep copy gets its own store, which its compiled forward
    fills from the copy's weights without touching the original's."""
    model = _tiny_lm(blocks=1).eval()
    ids = torch.randint(0, 32, (1, 4), generator=torch.Generator().manual_seed(8))
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    with torch.no_grad():
        want = compiled(ids)
    with torch.inference_mode():
        got = compiled(ids)
    assert torch.equal(got, want)
    assert not any(store.is_inference() for store in _stores(model))
    original = [store.clone() for store in _stores(model)]
    copied = copy.deepcopy(model)
    assert all(a is not b for a, b in zip(_stores(copied), _stores(model)))
    with torch.no_grad():
        copied.base_model.model.blocks[0]["q"].lora_B.default.weight.mul_(2.0)
        out = torch.compile(copied, backend="inductor", fullgraph=True)(ids)
        eager = copied(ids)
    assert_dtype_close(out, eager, F32, name="compiled deep copy vs its eager forward")
    assert all(torch.equal(a, b) for a, b in zip(_stores(model), original)), "the copy wrote the original's store"


def test_verify_mode_compares_the_store_with_the_cached_norm(monkeypatch):
    """``PEFT_DORA_NORM_CACHE=verify``: a store written from outside is caught on the next compiled call
    (Inductor: the op works on the store itself, where ``aot_eager`` hands it a functionalized copy)."""
    monkeypatch.setenv("PEFT_DORA_NORM_CACHE", "verify")
    config.invalidate_cache()
    model = _tiny_lm(blocks=1).eval()
    compiled = torch.compile(model, backend="inductor", fullgraph=True)  # the op receives the store itself
    ids = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        compiled(ids)
        _stores(model)[0].zero_()
        with pytest.raises(StaleNormCacheError, match="store"):
            compiled(ids)


def test_patching_gives_converted_layers_a_store_and_unpatching_takes_it_away():
    """``patch(model)`` on an existing stock model adds each converted layer's store; leaving the scope takes
    it away again, so the stock layer is left as it was (and neither touches the state dict)."""
    torch.manual_seed(0)
    model = get_peft_model(
        TinyLM(blocks=1), LoraConfig(r=4, target_modules=["q"], use_dora=True, init_lora_weights=False)
    )
    keys = list(model.state_dict())
    with dorafactors.patched(model):
        layers = dora_layers(model)
        assert layers and all(norm_op.NORM_STORE in layer.__dict__ for layer in layers)
        assert list(model.state_dict()) == keys and not list(layers[0].buffers())
    assert all(norm_op.NORM_STORE not in layer.__dict__ for layer in layers)
