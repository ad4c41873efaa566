"""One norm op per compiled graph (``autograd/norm_batching.py``).

* the pass on hand-built graphs: merges the ``refresh_weight_norm`` calls into one ``refresh_weight_norms`` call
  with the arguments as lists, in order, where the first call was; leaves a call that cannot move (a computed
  or late argument) where it is; leaves the graph alone where moving a call earlier could change what it
  reads (an in-place write in between) or where there is nothing to merge;
* end to end under Inductor (CPU): a compiled patched model runs the merged op once per forward and no
  per-layer op, gives bitwise the output of the same compile without the pass, and follows adapter edits.
"""

from __future__ import annotations

import operator
import struct

import pytest
import torch
import torch.fx
from peft import LoraConfig, get_peft_model
from torch import nn

import dorafactors
from dorafactors.autograd import norm_batching, norm_op
from dorafactors.norm.cache import owned_norm_caches
from tests._models import TinyLM

REFRESH = torch.ops.dorafactors.refresh_weight_norm.default
MERGED = torch.ops.dorafactors.refresh_weight_norms.default


def _graph(layers: int, between=None, computed_weight: bool = False, late_attribute: bool = False) -> torch.fx.Graph:
    """``layers`` refresh calls on placeholders, each followed by a read of its store; ``between(graph, nodes)``
    adds nodes after the first call (``nodes``: the placeholders by name). Every placeholder carries a traced
    example value with a storage of its own, as Dynamo's graphs do; a static KV cache ``cache`` is one more."""
    graph = torch.fx.Graph()

    def placeholder(name: str) -> torch.fx.Node:
        node = graph.placeholder(name)
        node.meta["example_value"] = torch.zeros(4)
        return node

    x = placeholder("x")
    nodes = {"x": x, "cache": placeholder("cache")}
    inputs = [[placeholder(f"{n}{i}") for n in ("store", "owner", "w", "a", "b")] for i in range(layers)]
    nodes.update({node.name: node for row in inputs for node in row})
    outs = []
    for i in range(layers):
        store, owner, weight, a, b = inputs[i]
        if late_attribute and i == 1:
            weight = graph.get_attr("late_weight")
        if computed_weight and i == 1:
            weight = graph.call_function(torch.ops.aten.clone.default, (weight,))
        graph.call_function(REFRESH, (store, owner, weight, a, b, 0.5 + i, "linear", True))
        outs.append(graph.call_function(torch.ops.aten.add.Tensor, (x, store)))
        if i == 0 and between is not None:
            between(graph, nodes)
    graph.output(tuple(outs))
    return graph


def _opaque_user_function(tensor: torch.Tensor) -> None:
    """Stands for a user's ``allow_in_graph`` function: the graph cannot show what it writes."""
    tensor.mul_(2.0)


def _view_of(graph: torch.fx.Graph, base: torch.fx.Node) -> torch.fx.Node:
    """A traced view of ``base``: its example value shares the base's storage."""
    view = graph.call_method("view", (base, 2, 2))
    view.meta["example_value"] = base.meta["example_value"].view(2, 2)
    return view


def _targets(graph: torch.fx.Graph) -> list:
    return [n.target for n in graph.nodes if n.op == "call_function" and n.target in (REFRESH, MERGED)]


def test_calls_merge_into_one_in_order_where_the_first_was():
    graph = _graph(3)
    assert norm_batching.batch_refreshes(graph) == 3
    assert _targets(graph) == [MERGED]
    merged = next(n for n in graph.nodes if n.target is MERGED)
    stores, _, weights, lora_As, lora_Bs, plan = merged.args
    assert [s.name for s in stores] == ["store0", "store1", "store2"]
    assert [w.name for w in weights] == ["w0", "w1", "w2"]
    scalings, layouts, caches, token = norm_op.parse_merged_plan(plan)
    assert scalings == (0.5, 1.5, 2.5) and layouts == ("linear",) * 3 and caches == (True,) * 3
    assert token == norm_batching.layout_token([*weights, *lora_As, *lora_Bs]) != 0
    first_read = next(n for n in graph.nodes if n.target is torch.ops.aten.add.Tensor)
    order = list(graph.nodes)
    assert order.index(merged) < order.index(first_read)  # every store is refreshed before any is read
    graph.lint()


@pytest.mark.parametrize(
    "between",
    [
        lambda g, n: g.call_method("mul_", (n["w1"], 2.0)),
        lambda g, n: g.call_function(torch.ops.aten.add_.Tensor, (n["a1"], n["a1"])),
        lambda g, n: g.call_function(torch.add, (n["x"], n["x"]), {"out": n["b1"]}),
        lambda g, n: g.call_function(torch.nn.functional.relu, (n["owner1"],), {"inplace": True}),
        lambda g, n: g.call_function(operator.setitem, (n["store1"], 0, 1.0)),
        lambda g, n: g.call_method("index_copy_", (_view_of(g, n["w1"]), 0, n["x"], n["x"])),
        lambda g, n: g.call_method("mul_", (g.call_method("view", (n["w1"], 2, 2)), 2.0)),  # no traced value
        lambda g, n: g.call_module("sub", (n["x"],)),
        lambda g, n: g.call_function(_opaque_user_function, (n["w1"],)),
    ],
    ids=[
        "method_",
        "mutating-op",
        "out=",
        "inplace=True",
        "setitem",
        "into-a-view",
        "untraced",
        "submodule",
        "user-function",
    ],
)
def test_a_write_into_what_the_calls_read_keeps_them(between):
    """A later layer's argument written in place between the calls (directly, through a view, or possibly: a
    value the pass cannot trace, a submodule it cannot see) would be read before the write if merged."""
    graph = _graph(2, between=between)
    assert norm_batching.batch_refreshes(graph) == 0
    assert _targets(graph) == [REFRESH, REFRESH]


@pytest.mark.parametrize(
    "between",
    [
        lambda g, n: g.call_method("index_copy_", (n["cache"], 0, n["x"], n["x"])),
        lambda g, n: g.call_function(torch.ops.aten.add_.Tensor, (n["x"], n["x"])),
        lambda g, n: g.call_method("mul_", (_view_of(g, n["cache"]), 2.0)),
    ],
    ids=["kv-cache-index_copy_", "mutating-op", "into-a-view"],
)
def test_a_write_into_other_memory_does_not_keep_them(between):
    """A static KV cache written between the layers (``StaticCache.update``) is memory no call reads."""
    graph = _graph(2, between=between)
    assert norm_batching.batch_refreshes(graph) == 2
    assert _targets(graph) == [MERGED]
    graph.lint()


@pytest.mark.parametrize("kind", ["computed", "late"])
def test_a_call_that_cannot_move_stays_and_the_others_merge_around_it(kind):
    """A call whose weight is computed in the graph (as an Embedding's transposed adapter views are) or read
    after the first call stays where it is, one call for its layer; the others merge where the first was."""
    graph = _graph(3, computed_weight=kind == "computed", late_attribute=kind == "late")
    assert norm_batching.batch_refreshes(graph) == 2
    assert _targets(graph) == [MERGED, REFRESH]
    merged = next(n for n in graph.nodes if n.target is MERGED)
    kept = next(n for n in graph.nodes if n.target is REFRESH)
    assert [s.name for s in merged.args[0]] == ["store0", "store2"]
    assert norm_op.parse_merged_plan(merged.args[5]).scalings == (0.5, 2.5)
    assert kept.args[0].name == "store1" and kept.args[2].op == ("call_function" if kind == "computed" else "get_attr")
    graph.lint()


@pytest.mark.parametrize(
    ("transposes", "dims", "merges"),
    [(2, 2, True), (4, 2, True), (1, 2, False), (2, 1, False)],
    ids=["T.T", "T.T.T.T", "T", "T.T-of-1-D"],
)
def test_a_transpose_of_a_transpose_of_a_graph_input_is_that_input(transposes, dims, merges):
    """An Embedding's adapters reach its op as ``p.T.T`` (PEFT's ``.T`` view, transposed back by the layer):
    for a 2-D ``p`` that is ``p`` itself, which the merged call takes instead; an odd count, or another
    rank, is a computed tensor and its call stays."""
    graph = _graph(2)
    refreshes = [n for n in graph.nodes if n.target is REFRESH]
    a1 = refreshes[1].args[3]
    a1.meta["example_value"] = torch.zeros((4, 3) if dims == 2 else (4,))
    with graph.inserting_before(refreshes[0]):
        arg = a1
        for _ in range(transposes):
            arg = graph.call_function(getattr, (arg, "T"))
    refreshes[1].args = (*refreshes[1].args[:3], arg, *refreshes[1].args[4:])
    assert norm_batching.batch_refreshes(graph) == (2 if merges else 0)
    if merges:
        merged = next(n for n in graph.nodes if n.target is MERGED)
        assert merged.args[3][1] is a1, "the merged call takes the parameter itself"
    graph.lint()


def test_a_single_mergeable_call_keeps_the_graph():
    graph = _graph(1)
    assert norm_batching.batch_refreshes(graph) == 0
    assert _targets(graph) == [REFRESH]
    graph = _graph(2, computed_weight=True)  # one call could move, the other cannot: nothing to merge
    assert norm_batching.batch_refreshes(graph) == 0
    assert _targets(graph) == [REFRESH] * 2
    graph = _graph(2, late_attribute=True)  # an attribute read after the first call
    assert norm_batching.batch_refreshes(graph) == 0
    assert _targets(graph) == [REFRESH] * 2


@pytest.mark.parametrize(
    "argument", [(5, torch.tensor(0.5)), (6, "sideways"), (7, 1)], ids=["tensor-scaling", "unknown-layout", "int-cache"]
)
def test_a_call_whose_plain_arguments_a_plan_cannot_hold_stays(argument):
    """The merged call's plan string holds a float scaling, a known layout and a bool per layer; a call with
    anything else (not what the layers pass) keeps its own op, and the others merge."""
    graph = _graph(3)
    refreshes = [n for n in graph.nodes if n.target is REFRESH]
    position, value = argument
    args = list(refreshes[1].args)
    args[position] = value
    refreshes[1].args = tuple(args)
    assert norm_batching.batch_refreshes(graph) == 2
    assert _targets(graph) == [MERGED, REFRESH]


def test_a_plan_string_carries_every_plain_argument_exactly():
    """``merged_plan`` / ``parse_merged_plan``: scalings bitwise (any float, also ints), layouts, cache flags
    and the layout token round-trip; a malformed or foreign plan, a count mismatch or an unknown layout raise
    a ``ValueError`` that names the op, never a misread."""
    scalings = [1 / 3, 2, 1e-300, 7.5e300, -0.0, float("inf")]
    layouts = ["linear", "transposed", "conv", "linear", "conv", "transposed"]
    caches = [True, False, True, True, False, True]
    plan = norm_op.merged_plan(scalings, layouts, caches, 12345)
    parsed = norm_op.parse_merged_plan(plan)
    assert [struct.pack("<d", v) for v in parsed.scalings] == [struct.pack("<d", float(v)) for v in scalings]
    assert parsed.layouts == tuple(layouts) and parsed.caches == tuple(caches) and parsed.layout_token == 12345
    assert norm_op.parse_merged_plan(norm_op.merged_plan([], [], [])) == ((), (), (), 0)
    for bad in (
        "",
        "plan1|0",
        "plan0|0|1.0,linear,1",
        "plan1|x|1.0,linear,1",
        "plan1|0|1.0,linear",
        "plan1|0|a,linear,1",
        "plan1|0|1.0,sideways,1",
        "plan1|0|1.0,linear,2",
    ):
        with pytest.raises(ValueError, match="refresh_weight_norms: malformed plan"):
            norm_op.parse_merged_plan(bad)
    with pytest.raises(ValueError, match="2 scalings, 1 layouts"):
        norm_op.merged_plan([1.0, 2.0], ["linear"], [True, True])
    with pytest.raises(ValueError, match="unknown norm layout"):
        norm_op.merged_plan([1.0], ["sideways"], [True])


def test_the_merged_op_refuses_tensor_lists_that_do_not_match_its_plan():
    """One layer's tensors too few for the plan: a ``ValueError`` naming the counts, nothing written."""
    store = norm_op.new_norm_store(4, torch.float32, "cpu")
    owner, w = nn.Parameter(torch.ones(4)), nn.Parameter(torch.randn(4, 8))
    a, b = nn.Parameter(torch.randn(2, 8)), nn.Parameter(torch.randn(4, 2))
    plan = norm_op.merged_plan([1.0, 1.0], ["linear", "linear"], [True, True])
    with torch.no_grad(), pytest.raises(ValueError, match=r"1 stores, 1 owners.*plan of 2 layers"):
        MERGED([store], [owner], [w], [a], [b], plan)
    assert not store.any()


def _example_placeholders(*examples) -> list[torch.fx.Node]:
    graph = torch.fx.Graph()
    nodes = []
    for i, example in enumerate(examples):
        node = graph.placeholder(f"t{i}")
        node.meta["example_value"] = example
        nodes.append(node)
    return nodes


def test_the_layout_token_names_the_static_layouts_the_guards_fix():
    """The merged call's ``layout_token``: nonzero and the same for the same dtypes, devices, shapes and strides
    (in any graph), another where one differs; 0 where a layout is not fixed by the graph's guards: an
    attribute instead of an input, a symbolic size, a missing traced value."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    w, a = torch.zeros(6, 4), torch.zeros(2, 4)
    token = norm_batching.layout_token(_example_placeholders(w, a))
    assert token != 0 and token == norm_batching.layout_token(_example_placeholders(w.clone(), a.clone()))
    for other in (w.t().contiguous().t(), w.double(), torch.zeros(4, 6), torch.zeros(6, 4, device="meta")):
        assert norm_batching.layout_token(_example_placeholders(other, a)) not in (0, token), (
            other.stride(),
            other.dtype,
        )
    attribute = torch.fx.Graph().get_attr("weight")
    attribute.meta["example_value"] = w
    assert norm_batching.layout_token([_example_placeholders(a)[0], attribute]) == 0
    fake = FakeTensorMode(shape_env=ShapeEnv())
    dynamic = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC])
    symbolic = fake.from_tensor(w, symbolic_context=dynamic)
    assert norm_batching.layout_token(_example_placeholders(symbolic, a)) == 0
    assert norm_batching.layout_token(_example_placeholders(None, a)) == 0


def test_a_pass_set_before_runs_after_this_one():
    seen = []

    class Theirs:
        def __call__(self, graph):
            seen.append(_targets(graph))

        def uuid(self):
            return "theirs"

    ours = norm_batching.BatchNormRefreshes(then=Theirs())
    ours(_graph(2))
    assert seen == [[MERGED]]
    assert ours.uuid()[-1] == "theirs"
    assert norm_batching.BatchNormRefreshes(then=lambda graph: None).uuid() is None  # theirs has no id


def _op_calls(fn) -> dict[str, int]:
    """Dispatches of the two norm ops during ``fn()`` (from the profiler's operator events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts = {e.key: e.count for e in prof.key_averages()}
    return {
        "layer": counts.get("dorafactors::refresh_weight_norm", 0),
        "merged": counts.get("dorafactors::refresh_weight_norms", 0),
    }


@pytest.mark.skipif(norm_batching._torch_version() < norm_batching.MIN_TORCH, reason="PyTorch before MIN_TORCH")
@pytest.mark.parametrize("embedding", [False, True], ids=["linear-layers", "with-an-embedding"])
def test_a_compiled_model_runs_one_norm_op_per_forward_and_follows_edits(monkeypatch, embedding):
    """Six DoRA Linear layers: one merged op per forward. With a DoRA Embedding too (its op takes the transpose
    of PEFT's transposed views of its adapters, which the pass passes as the parameters), seven merge."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(pre_grad_custom_pass=None):  # restored afterwards, the pass included
        _compiled_model_check(monkeypatch, inductor_config, embedding)


def _compiled_model_check(monkeypatch, inductor_config, embedding: bool) -> None:
    torch.manual_seed(0)
    targets = ["q", "up", "down", *(["emb"] if embedding else [])]
    with dorafactors.patched():
        model = get_peft_model(
            TinyLM(width=32, blocks=2).to(torch.bfloat16),
            LoraConfig(r=4, target_modules=targets, use_dora=True, init_lora_weights=False),
        )
    model.eval()
    x = torch.randint(0, 32, (1, 8))
    outputs, compiled = {}, None
    with torch.no_grad():
        for merged in (False, True):
            torch._dynamo.reset()
            with monkeypatch.context() as scoped:
                if not merged:
                    scoped.setattr(norm_batching, "install", lambda: False)
                compiled = torch.compile(model, backend="inductor", fullgraph=True)
                compiled(x)
            calls = _op_calls(lambda fn=compiled, key=merged: outputs.__setitem__(key, fn(x)))
            want = {"layer": 0, "merged": 1} if merged else {"layer": 6 + int(embedding), "merged": 0}
            assert calls == want, (merged, calls)
        assert isinstance(inductor_config.pre_grad_custom_pass, norm_batching.BatchNormRefreshes)
        assert torch.equal(outputs[True], outputs[False])
        model.base_model.model.blocks[0]["q"].lora_B["default"].weight.mul_(1.5)
        edited, eager = compiled(x), model(x)
        assert not torch.equal(edited, outputs[True])  # the edit is seen: the norm and the output follow it
        torch.testing.assert_close(edited.float(), eager.float(), atol=0.05, rtol=0.05)
        if embedding:  # and an edit of the Embedding's adapter, which its merged call reads as the parameter
            model.base_model.model.emb.lora_embedding_B["default"].mul_(1.5)
            again, eager = compiled(x), model(x)
            assert not torch.equal(again, edited)
            torch.testing.assert_close(again.float(), eager.float(), atol=0.05, rtol=0.05)
        # the graph's guards fix its weights' layouts (the memo compares what they do not: its layout token);
        # a weight read with other strides at the same address and version recompiles into another graph,
        # whose token makes the memo compare every stamp in full
        memos = [
            caches.merged
            for name, magnitude in model.named_parameters()
            if "lora_magnitude_vector" in name
            and (caches := owned_norm_caches(magnitude, create=False)) is not None
            and caches.merged is not None
        ]
        assert len(memos) == 1 and memos[0].layout_token != 0
        weight = model.base_model.model.blocks[1]["up"].base_layer.weight
        version, address, shape = weight._version, weight.data_ptr(), weight.shape
        weight.data = weight.data.as_strided(shape, (1, shape[0]))
        assert (weight._version, weight.data_ptr(), weight.shape) == (version, address, shape)
        moved, eager = compiled(x), model(x)
        assert not torch.equal(moved, outputs[True])
        torch.testing.assert_close(moved.float(), eager.float(), atol=0.05, rtol=0.05)
