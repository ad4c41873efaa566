"""One norm op per compiled graph: an Inductor graph pass that merges the layers' ``refresh_weight_norm`` calls.

In a compiled forward without autograd every DoRA layer calls ``dorafactors::refresh_weight_norm`` (``norm_op.py``):
an opaque op whose host side checks the layer's norm cache and rewrites its norm store when the norm changed.
Each call costs a dispatch on the host, once per layer and forward, which is what separates compiled decode
from compiled LoRA. This pass replaces all of a graph's calls with one ``dorafactors::refresh_weight_norms`` call
that takes the same arguments as lists and runs the same body per layer, in the same order; the layers read
their stores afterwards exactly as before.

The merged call sits where the first merged call was, so the later layers' refreshes run earlier than they
would have. That is the same computation when nothing in between writes a tensor they read, so the pass
merges the calls that

* have the op's eight positional arguments (the schema the layers call it with),
* take only graph inputs as tensors (placeholders or attributes: a layer's parameters and its store; an
  Embedding's adapters reach its op as a transpose of PEFT's transposed view, which is the parameter
  itself, and are passed as that), all defined before the first of them;

a call that does not (a tensor computed in the graph) stays where it is, one call for its layer. And it merges only when no node between the first and the last merged
call may write in place into the memory of a tensor they read or write (a mutating op, an in-place method
or function, ``out=``, ``inplace=True``, item assignment), judged by the storages of the traced example
values, so a write into a view counts as a write into its base. A static KV cache written between the
layers (``index_copy_``) is other memory and does not block the merge; a submodule call or a function from
outside PyTorch whose body the pass cannot see, or a tensor without a traced value, does.

Otherwise the graph is left as it is: correct, one call per layer. The pass runs on Inductor's pre-grad graph
(``torch._inductor.config.pre_grad_custom_pass``), which the norm ops install while the first graph with one
is traced (:func:`install`). A pass the user had set there runs after this one. PyTorch before
:data:`MIN_TORCH` keeps the calls per layer. This module imports Inductor's pass interface: it is imported
when a graph with a norm op is traced, not with the package.

The merged call takes the layers' tensors as five lists and their plain arguments as one string
(``norm_op.merged_plan``), which also holds a layout token (:func:`layout_token`): where the graph's guards fix
the dtypes, shapes and strides of the weights and adapters it passes, the op's memo of an unchanged call
compares only their identities, storages, addresses and versions (``norm_op._refresh_weight_norms_impl``).
"""

from __future__ import annotations

import hashlib
import inspect
import operator
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.fx
from packaging.version import Version
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.multiprocessing.reductions import StorageWeakRef

from . import norm_op  # (also registers the dorafactors ops this pass reads and writes)

__all__ = ["MIN_TORCH", "BatchNormRefreshes", "batch_refreshes", "install", "layout_token"]

#: The oldest PyTorch the merged op was tested on (its list-of-mutable-tensors schema under functionalization).
MIN_TORCH = (2, 11)
_ARITY = 8  # refresh_weight_norm(store, owner, weight, lora_A, lora_B, scaling, layout, cache)


def _torch_version() -> tuple[int, ...]:
    """``(major, minor)`` of the installed PyTorch (parsed as ``patching.py`` parses PEFT's version)."""
    return Version(torch.__version__).release[:2]


def _is_refresh(node: torch.fx.Node) -> bool:
    if node.op != "call_function":
        return False
    op = torch.ops.dorafactors.refresh_weight_norm
    return node.target is op or node.target is op.default


#: Modules whose plain functions write in place only by the trailing-underscore convention (``torch.relu_``).
_KNOWN_MODULES = frozenset({"torch", "operator", "_operator", "builtins", "math"})


def _written_arguments(node: torch.fx.Node) -> list[Any] | None:
    """The arguments ``node`` may write in place: ``[]`` for none, None when unknown (a submodule call, a
    function from outside PyTorch and the standard operators)."""
    if node.op in ("placeholder", "get_attr", "output"):
        return []
    if node.op == "call_module":
        return None
    written = [node.kwargs["out"]] if "out" in node.kwargs else []
    if node.kwargs.get("inplace") is True and node.args:
        written.append(node.args[0])
    target = node.target
    if node.op == "call_method":
        if isinstance(target, str) and target.endswith("_") and not target.endswith("__"):
            written.append(node.args[0])
        return written
    if target is operator.setitem:
        return [*written, node.args[0]]
    schema = getattr(target, "_schema", None)
    if schema is None and isinstance(target, torch._ops.OpOverloadPacket):
        schema = target.default._schema
    if schema is not None:
        for i, argument in enumerate(schema.arguments):
            if argument.alias_info is not None and argument.alias_info.is_write:
                if argument.kwarg_only or i >= len(node.args):
                    written.append(node.kwargs.get(argument.name))
                else:
                    written.append(node.args[i])
        return written
    module = getattr(target, "__module__", None) or ""
    if module.split(".")[0] not in _KNOWN_MODULES:
        return None  # a callable of the user's (``allow_in_graph``): its writes cannot be seen
    name = getattr(target, "__name__", "")
    if name.endswith("_") and not name.endswith("__") and node.args:
        written.append(node.args[0])
    return written


def _storages(value: Any) -> set[StorageWeakRef] | None:
    """The storages of a node's traced example value(s) (Dynamo's ``example_value`` or Inductor's ``val``
    fake tensors, which share a storage exactly where the real tensors do); None when unknown."""
    if isinstance(value, (list, tuple)):
        found: set[StorageWeakRef] = set()
        for item in value:
            part = _storages(item)
            if part is None:
                return None
            found |= part
        return found
    if value is None or isinstance(value, (bool, int, float, str)):
        return set()
    if not isinstance(value, torch.fx.Node):
        return None
    example = value.meta.get("example_value", value.meta.get("val"))
    if not isinstance(example, torch.Tensor):
        return None
    try:
        return {StorageWeakRef(example.untyped_storage())}
    except Exception:  # a tensor subclass without a storage: unknown
        return None


def _may_write_into(node: torch.fx.Node, read: set[StorageWeakRef]) -> bool:
    """Could ``node`` write into one of the storages ``read``? Unknown means yes."""
    written = _written_arguments(node)
    if written is None:
        return True
    for argument in written:
        storages = _storages(argument)
        if storages is None or storages & read:
            return True
    return False


def _graph_input(arg: Any) -> torch.fx.Node | None:
    """The graph input (placeholder or attribute) ``arg`` is, or is a transpose of a transpose of: Dynamo traces
    an Embedding's adapters as PEFT's ``.T`` view transposed back by the layer (``getattr(getattr(p, "T"),
    "T")``), which for a 2-D ``p`` is ``p`` itself (same memory, shape and strides); else None."""
    transposes = 0
    while isinstance(arg, torch.fx.Node) and arg.op == "call_function" and arg.target is getattr:
        if len(arg.args) != 2 or arg.args[1] != "T" or arg.kwargs:
            return None
        transposes += 1
        arg = arg.args[0]
    if not isinstance(arg, torch.fx.Node) or arg.op not in ("placeholder", "get_attr"):
        return None
    if transposes:
        example = arg.meta.get("example_value", arg.meta.get("val"))
        if transposes % 2 or not isinstance(example, torch.Tensor) or example.dim() != 2:
            return None
    return arg


def _mergeable_inputs(node: torch.fx.Node) -> list[torch.fx.Node] | None:
    """The graph inputs behind the five tensor arguments of a ``refresh_weight_norm`` call that has the layers'
    eight positional arguments, its tensors graph inputs (placeholders or attributes, or :func:`_graph_input`
    transposes of them) and its other arguments plain values (a float scaling, a known layout, a bool); None
    for any other call."""
    if node.kwargs or len(node.args) != _ARITY:
        return None
    scaling, layout, cache = node.args[5:]
    if type(scaling) not in (float, int) or layout not in norm_op.LAYOUTS or type(cache) is not bool:
        return None  # (what the merged call's plan string holds: norm_op.merged_plan)
    inputs = [_graph_input(arg) for arg in node.args[:5]]
    return None if None in inputs else inputs  # type: ignore[return-value]


def batch_refreshes(graph: torch.fx.Graph) -> int:
    """Merge ``graph``'s ``refresh_weight_norm`` calls into one ``refresh_weight_norms`` call where it is safe
    (module docstring). Returns how many calls were merged (0: the graph is unchanged).

    A call that cannot move (an argument computed in the graph, as an Embedding's transposed adapter view, or
    defined after the first mergeable call) stays where it is, and the others merge around it."""
    nodes = list(graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    # each mergeable call's tensors as the graph inputs they are
    inputs = {node: found for node in nodes if _is_refresh(node) and (found := _mergeable_inputs(node)) is not None}
    if not inputs:
        return 0
    first = position[next(iter(inputs))]
    # an input defined after the first call: that call cannot move up to it
    calls = [node for node, found in inputs.items() if all(position[arg] < first for arg in found)]
    if len(calls) < 2:
        return 0
    read = _storages([arg for node in calls for arg in inputs[node]])
    if read is None:
        return 0  # the calls' tensors have no traced values: no way to tell what a write in between reaches
    moving = set(calls)
    between = nodes[first + 1 : position[calls[-1]]]
    if any(node not in moving and _may_write_into(node, read) for node in between):
        return 0
    columns = tuple(list(column) for column in zip(*((*inputs[node], *node.args[5:]) for node in calls)))
    token = layout_token([*columns[2], *columns[3], *columns[4]])
    plan = norm_op.merged_plan(columns[5], columns[6], columns[7], token)
    with graph.inserting_before(calls[0]):
        graph.call_function(torch.ops.dorafactors.refresh_weight_norms.default, (*columns[:5], plan))
    for node in calls:
        graph.erase_node(node)
    return len(calls)


def layout_token(tensors: list[torch.fx.Node]) -> int:
    """The layout token of the merged call's plan (``norm_op.merged_plan``): a nonzero hash of the dtype,
    device, shape and strides of each of ``tensors`` (the layers' weights, ``lora_A`` s and ``lora_B`` s) where
    every one is a placeholder with static sizes and strides in its traced value, so that Dynamo's guards on
    the graph's inputs fix them for every call of the graph; 0 otherwise (an attribute, a symbolic size or
    stride, no traced value). The same layouts give the same token in every graph and process."""
    layouts = []
    for node in tensors:
        example = node.meta.get("example_value", node.meta.get("val")) if node.op == "placeholder" else None
        if not isinstance(example, torch.Tensor):
            return 0
        shape, strides = tuple(example.shape), tuple(example.stride())
        if not all(type(size) is int for size in (*shape, *strides)):
            return 0
        layouts.append((str(example.dtype), str(example.device), shape, strides))
    digest = hashlib.blake2b(repr(layouts).encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") >> 2) or 1  # nonzero


def _source_hash() -> str:
    return hashlib.sha256(inspect.getsource(sys.modules[__name__]).encode()).hexdigest()[:16]


class BatchNormRefreshes(CustomGraphPass):
    """The pass as Inductor takes it; ``then``: the pre-grad pass that was set before (run after this one)."""

    def __init__(self, then: Any = None) -> None:
        self.then = then

    def __call__(self, graph: torch.fx.Graph) -> None:
        batch_refreshes(graph)
        for other in _passes(self.then):
            other(graph)

    def uuid(self) -> Any:
        others = [getattr(p, "uuid", lambda: None)() for p in _passes(self.then)]
        if any(u is None for u in others):
            return None  # a pass without an id: Inductor then does not cache (as without this pass)
        return ("dorafactors-batch-norm-refreshes", _source_hash(), *others)


def _passes(value: Any) -> tuple[Callable[[torch.fx.Graph], None], ...]:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return (value,)


_installed: list[Any] = []  # the pass object this process installed (at most one)


def install() -> bool:
    """Set the pass as Inductor's pre-grad custom pass (chaining one that is already set), once per process; a
    no-op before :data:`MIN_TORCH` or when Inductor was never imported (nothing compiles with it then). Returns
    whether the pass is in place."""
    config = sys.modules.get("torch._inductor.config")
    if config is None or _torch_version() < MIN_TORCH or not hasattr(config, "pre_grad_custom_pass"):
        return False
    current = config.pre_grad_custom_pass
    if _installed and (current is _installed[0] or _installed[0] in _passes(current)):
        return True
    pass_ = BatchNormRefreshes(then=current)
    config.pre_grad_custom_pass = pass_
    _installed[:] = [pass_]
    return True
