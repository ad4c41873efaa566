"""Launch ``@triton.jit`` kernels with little host time: the compiled kernel of a known specialization is
launched directly, without Triton's per-call binding.

``kernel[grid](*args, **kwargs)`` (``JITFunction.run``) binds the arguments, specializes each one, builds a
string cache key, reads knobs and builds launch metadata on every call: several times the cost of the
compiled kernel's C launcher. :func:`launch` takes the same arguments. The first call of a
*specialization key* goes through ``kernel[grid]`` and keeps the ``CompiledKernel`` it returns; later calls
with the same key hand the arguments straight to that kernel's launcher on the current stream.

The key covers everything Triton specializes a compiled kernel on, per argument in signature order:

* tensors: dtype and whether ``data_ptr()`` is 16-byte aligned;
* ints: ``== 1`` (folded into the kernel as a constant), ``% 16 == 0``, and the int32 / int64 / uint64
  range the argument is typed with;
* floats, bools and ``None`` by kind (Triton does not specialize on their values);
* constexprs by value and type, the launch options (``num_warps``, ``num_stages``, ...) by value;

plus the current device and the knobs ``JITFunction.run`` folds into its options (``TRITON_DEBUG``, the
instrumentation mode). Every launch builds the key, so it is one tuple expression of a function generated
once per call shape and argument types (:func:`_keyer_for`), equal to what the per-argument loop
(:meth:`_KernelLauncher.key_by_loop`) builds. The key may be finer than Triton's (two of ours can share one
compiled kernel, e.g. for a ``do_not_specialize`` parameter), never coarser: a kept kernel only ever runs on
arguments Triton would have compiled it for. Any other argument type, a callable grid, launch hooks
(profilers), pre-run hooks, a changed global of the kernel, ``torch.compile`` tracing, Triton's CPU
interpreter or a Triton without the attributes relied on: the call goes through ``kernel[grid]`` as usual.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch

from ._triton_utils import is_interpreted, raw_stream

try:  # Triton >= 3.4: launch hooks and option knobs live here; older Triton takes the plain path
    from triton import knobs
except ImportError:  # pragma: no cover - the CI's Triton has it
    knobs = None

__all__ = ["clear", "fast_launches", "launch", "specialization_key"]

_MISSING = object()

#: Launch options ``JITFunction.run`` takes from Triton's knobs: ``(knob group, attribute)``; absent ones
#: (older or newer Triton) read as None.
_OPTION_KNOBS = (
    ("runtime", "debug"),
    ("compilation", "instrumentation_mode"),
    ("compilation", "fpsan_homomorphic_casts"),
)

#: The current CUDA device (what Triton compiles and launches for).
_current_device = torch.cuda.current_device
#: The raw current stream of a device index (what Triton's driver launches on).
_current_stream = raw_stream


class _Unsupported(Exception):
    """An argument the key does not cover: launch through ``kernel[grid]``."""


_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
_U64_MAX = 2**64 - 1


def _int_code(v: int) -> str:
    """The specialization class of a non-constexpr int: Triton types it by range and folds ``1`` away."""
    if v == 1:
        return "one"
    aligned = v & 15 == 0  # two's complement on negatives, as Triton's C++ does
    if _I32_MIN <= v <= _I32_MAX:
        return "i32:16" if aligned else "i32"
    if _I64_MIN <= v <= _I64_MAX:
        return "i64:16" if aligned else "i64"
    if 0 <= v <= _U64_MAX:
        return "u64:16" if aligned else "u64"
    raise _Unsupported  # Triton raises OverflowError: let it


class _CallShape:
    """How one call shape (number of positional arguments, keyword names in order) maps onto the kernel's
    signature: the parameters filled from keywords or defaults, the keywords that are launch options, and
    the key functions made for it so far (:func:`_keyer_for`, by the arguments' types)."""

    __slots__ = ("constexpr", "keyers", "options", "tail")

    def __init__(self, params: list, n_positional: int, keywords: tuple[str, ...]) -> None:
        if n_positional > len(params) or any(p.name in keywords for p in params[:n_positional]):
            raise _Unsupported  # too many arguments, or one given twice: Triton reports it
        names = {p.name for p in params}
        #: per parameter, in signature order: True for a constexpr
        self.constexpr = tuple(bool(p.is_constexpr) for p in params)
        #: ``(name, default or _MISSING)`` of every parameter after the positional ones
        self.tail = tuple((p.name, p.default if p.has_default else _MISSING) for p in params[n_positional:])
        #: keywords that are not parameters: launch options (num_warps, num_stages, ...)
        self.options = tuple(k for k in keywords if k not in names)
        #: the arguments' types, in signature order -> the key function for them (None: the loop's)
        self.keyers: dict[tuple[type, ...], Any] = {}


class _KernelLauncher:
    """One ``@triton.jit`` kernel's kept compiled kernels, by specialization key."""

    __slots__ = ("compiled", "kernel", "params", "shapes", "supported")

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel  # also keeps id(kernel) from being reused while registered
        self.params = list(getattr(kernel, "params", None) or [])
        self.supported = _supports_direct_launch(kernel)
        self.shapes: dict[tuple, _CallShape] = {}
        self.compiled: dict[tuple, tuple] = {}

    def bind(self, args: tuple, kwargs: dict) -> tuple[_CallShape, tuple]:
        """``(call shape, every argument in signature order)``, defaults filled in."""
        shape_key = (len(args), *kwargs)
        shape = self.shapes.get(shape_key)
        if shape is None:
            shape = self.shapes[shape_key] = _CallShape(self.params, len(args), tuple(kwargs))
        if not shape.tail:
            return shape, args
        tail = []
        for name, default in shape.tail:
            value = kwargs.get(name, default)
            if value is _MISSING:
                raise _Unsupported  # a missing argument: Triton reports it
            tail.append(value)
        return shape, (*args, *tail)

    def key(self, shape: _CallShape, full: tuple, kwargs: dict, device: int) -> tuple:
        """The specialization key of a bound call (see the module docstring): :meth:`key_by_loop`'s tuple,
        built by a function made once per call shape and argument types (:func:`_keyer_for`)."""
        types = tuple(map(type, full))
        keyers = shape.keyers
        keyer = keyers.get(types, _MISSING)
        if keyer is _MISSING:
            keyer = keyers[types] = _keyer_for(shape, types)
        if keyer is None:
            return self.key_by_loop(shape, full, kwargs, device)
        return keyer(full, kwargs, shape, device, getattr(self.kernel, "debug", None), knobs)

    def key_by_loop(self, shape: _CallShape, full: tuple, kwargs: dict, device: int) -> tuple:
        """The specialization key, one argument at a time (any argument types; raises :class:`_Unsupported`
        for one the key does not cover)."""
        key: list = [shape, device, getattr(self.kernel, "debug", None)]
        for group, name in _OPTION_KNOBS:
            key.append(getattr(getattr(knobs, group, None), name, None))
        append = key.append
        for value, is_constexpr in zip(full, shape.constexpr):
            if is_constexpr:
                append(value)
                append(type(value))  # True == 1 == 1.0, but Triton compiles them apart
            elif isinstance(value, torch.Tensor):
                append(value.dtype)
                append(value.data_ptr() & 15 == 0)
            elif value is None:
                append(None)
            else:
                kind = type(value)
                if kind is int:
                    if value != 1 and _I32_MIN <= value <= _I32_MAX:  # the common case, inline
                        append("i32:16" if value & 15 == 0 else "i32")
                    else:
                        append(_int_code(value))
                elif kind is float:
                    append("fp32")
                elif kind is bool:
                    append("u1")
                else:
                    raise _Unsupported
        for name in shape.options:
            value = kwargs[name]
            append(value)
            append(type(value))
        return tuple(key)


def _keyer_for(shape: _CallShape, types: tuple[type, ...]) -> Any:
    """A function that returns :meth:`_KernelLauncher.key_by_loop`'s tuple for arguments of exactly these
    ``types`` (in signature order), as one tuple expression: no per-argument branch, call or ``append``;
    None for types the loop would refuse (it then raises, and the call takes ``kernel[grid]``).

    Called as ``keyer(full, kwargs, shape, device, debug, knobs)``. Per argument, from its type: a constexpr
    gives its value and type; a tensor its dtype and whether ``data_ptr()`` is 16-byte aligned; ``None``,
    a float or a bool a fixed code; an int the loop's inline range test (``_int_code`` beyond it)."""
    if len(types) != len(shape.constexpr):
        return None
    names = {"_int_code": _int_code}
    parts = ["shape", "device", "debug"]
    parts += [f"getattr(getattr(knobs, {group!r}, None), {name!r}, None)" for group, name in _OPTION_KNOBS]
    for i, (kind, is_constexpr) in enumerate(zip(types, shape.constexpr)):
        a = f"a{i}"
        if is_constexpr:
            names[f"T{i}"] = kind
            parts += [a, f"T{i}"]
        elif issubclass(kind, torch.Tensor):
            parts += [f"{a}.dtype", f"{a}.data_ptr() & 15 == 0"]
        elif kind is type(None):
            parts.append("None")
        elif kind is int:
            parts.append(
                f'(("i32:16" if {a} & 15 == 0 else "i32") if {a} != 1 and {_I32_MIN} <= {a} <= {_I32_MAX} '
                f"else _int_code({a}))"
            )
        elif kind is float:
            parts.append('"fp32"')
        elif kind is bool:
            parts.append('"u1"')
        else:
            return None
    for name in shape.options:
        parts += [f"kwargs[{name!r}]", f"type(kwargs[{name!r}])"]
    unpack = "".join(f"a{i}, " for i in range(len(types)))
    source = (
        "def keyer(full, kwargs, shape, device, debug, knobs):\n"
        f"    ({unpack}) = full\n"
        f"    return ({', '.join(parts)},)\n"
    )
    exec(compile(source, f"<dorafactors launch key of {len(types)} arguments>", "exec"), names)
    return names["keyer"]


def _supports_direct_launch(kernel: Any) -> bool:
    """True for a compiled (not interpreted) ``JITFunction`` with the attributes the fast path reads."""
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:  # pragma: no cover - every supported Triton has it
        return False
    if knobs is None or not isinstance(kernel, JITFunction) or is_interpreted(kernel):
        return False
    params = getattr(kernel, "params", None)
    if not params:
        return False
    return all(hasattr(p, attr) for p in params for attr in ("name", "is_constexpr", "default", "has_default"))


def _keepable(compiled: Any) -> bool:
    """True for a ``CompiledKernel`` whose launcher can be called directly (not a pending async compile)."""
    return (
        compiled is not None
        and not hasattr(compiled, "result")
        and getattr(compiled, "function", None) is not None
        and hasattr(compiled, "packed_metadata")
        and callable(getattr(compiled, "run", None))
    )


def _hook_set(hook: Any) -> bool:
    """A launch hook is set: a callable (older Triton) or a hook chain with entries (newer Triton)."""
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return bool(calls) if isinstance(calls, list) else True


def _globals_unchanged(kernel: Any) -> bool:
    """The globals the kernel was compiled with still hold their values (Triton raises otherwise)."""
    for (name, _), (value, scope) in getattr(kernel, "used_global_vals", {}).items():
        if scope.get(name, _MISSING) != value:
            return False
    return True


_launchers: dict[int, _KernelLauncher] = {}
_lock = threading.Lock()
_enabled = True


def _launcher(kernel: Any) -> _KernelLauncher:
    launcher = _launchers.get(id(kernel))
    if launcher is None:
        with _lock:
            launcher = _launchers.get(id(kernel))
            if launcher is None:
                launcher = _launchers[id(kernel)] = _KernelLauncher(kernel)
    return launcher


def _plain_path_required(kernel: Any) -> bool:
    """Launch hooks (profilers), a pipeline-inspection hook, pre-run hooks, or torch.compile tracing."""
    runtime = knobs.runtime
    return (
        _hook_set(getattr(runtime, "launch_enter_hook", None))
        or _hook_set(getattr(runtime, "launch_exit_hook", None))
        or getattr(runtime, "add_stages_inspection_hook", None) is not None
        or bool(getattr(kernel, "pre_run_hooks", None))
        or torch.compiler.is_compiling()
    )


def launch(kernel: Any, grid: tuple[int, ...], /, *args: Any, **kwargs: Any) -> None:
    """``kernel[grid](*args, **kwargs)``, launched directly when this specialization was compiled before.

    ``grid``: a tuple of one to three ints (a callable grid takes the plain path). Keyword arguments are
    the kernel's parameters and Triton's launch options, as for ``kernel[grid]``.
    """
    launcher = _launcher(kernel)
    if not (_enabled and launcher.supported) or _plain_path_required(kernel) or callable(grid):
        kernel[grid](*args, **kwargs)
        return
    try:
        shape, full = launcher.bind(args, kwargs)
        device = _current_device()
        key = launcher.key(shape, full, kwargs, device)
    except Exception:  # anything the key cannot cover is for Triton to handle or report
        kernel[grid](*args, **kwargs)
        return
    entry = launcher.compiled.get(key)
    if entry is None or not _globals_unchanged(kernel):
        compiled = kernel[grid](*args, **kwargs)
        if _keepable(compiled):
            # the CompiledKernel itself is kept too: its module (and so the function handle) lives with it
            launcher.compiled[key] = (compiled.run, compiled.function, compiled.packed_metadata, compiled)
        return
    run, function, packed_metadata, _ = entry
    n = len(grid)
    run(
        grid[0],
        grid[1] if n > 1 else 1,
        grid[2] if n > 2 else 1,
        _current_stream(device),
        function,
        packed_metadata,
        None,  # launch metadata: only launch hooks read it, and none is set
        None,
        None,
        *full,
    )


def specialization_key(kernel: Any, /, *args: Any, device: int = 0, **kwargs: Any) -> tuple:
    """The key :func:`launch` files ``kernel[grid](*args, **kwargs)`` under (for tests); raises
    ``ValueError`` for a call the key does not cover."""
    launcher = _launcher(kernel)
    try:
        shape, full = launcher.bind(args, kwargs)
        return launcher.key(shape, full, kwargs, device)
    except _Unsupported:
        raise ValueError("this call takes kernel[grid] (its arguments are not covered by the key)") from None


def clear() -> None:
    """Forget every kept compiled kernel (the next call of each key goes through ``kernel[grid]`` again)."""
    with _lock:
        _launchers.clear()


@contextlib.contextmanager
def fast_launches(enabled: bool) -> Iterator[None]:
    """Turn direct launches on or off inside the block (benchmarks and tests compare the two paths)."""
    global _enabled
    saved = _enabled
    _enabled = enabled
    try:
        yield
    finally:
        _enabled = saved
