"""Direct launches of kept compiled kernels (``dorafactors/kernels/launch.py``).

CPU: the specialization key against Triton's own per-argument specialization (two calls share a key only
if Triton would run one compiled kernel for both), the fast path's bookkeeping with a stand-in for
``JITFunction.run`` and its ``CompiledKernel``, and the plain path under the interpreter. GPU (``gpu``):
every routed kernel's results on the fast path bitwise equal to the plain ``kernel[grid]`` path, across
an aligned then a misaligned operand of one shape and int arguments flipping between 1 and more, and no
``JITFunction.run`` call once a key is kept.
"""

from __future__ import annotations

import pytest
import torch
import triton.language as tl
from triton import knobs
from triton.runtime.jit import JITFunction

from dorafactors.kernels import launch

try:  # Triton >= 3.5 specializes arguments in C++; the oracle of the partition test
    from triton._C.libtriton import native_specialize_impl as native_specialize
except ImportError:  # pragma: no cover - older Triton
    native_specialize = None


def _probe(x_ptr, y_ptr, n, scale, flag, BLOCK: tl.constexpr, EVEN: tl.constexpr = False):
    """A kernel signature for the key tests (never compiled or launched)."""
    pass


#: A compiled-kernel ``JITFunction`` even under ``TRITON_INTERPRET=1`` (built without the decorator).
PROBE = JITFunction(_probe)


def _key(*args, **kwargs) -> tuple:
    return launch.specialization_key(PROBE, *args, **kwargs)


def _triton_spec(value) -> str:
    """Triton's specialization of a non-constexpr argument, as its cache key spells it."""
    from triton.backends.compiler import BaseBackend

    return str(native_specialize(BaseBackend, value, False, True, True))


def _buffer(dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(64, dtype=dtype)


def _values() -> list:
    buf = _buffer()
    half = _buffer(torch.float16)
    ints = [0, 1, 2, 3, 16, 17, 32, -1, -16, -17]
    ints += [2**31 - 16, 2**31 - 1, 2**31, 2**31 + 1, -(2**31), -(2**31) - 1, -(2**31) - 16]
    ints += [2**63 - 16, 2**63 - 1, 2**63, 2**63 + 1, 2**64 - 16]
    tensors = [buf, buf[1:], buf[2:], buf[4:], buf[8:], half, half[1:], half[8:], _buffer(torch.bfloat16)]
    return tensors + ints + [1.0, 2.5, -0.0, True, False, None]


@pytest.mark.skipif(native_specialize is None, reason="this Triton has no native_specialize_impl")
def test_key_partitions_arguments_exactly_as_triton_specializes_them():
    """For every pair of values of a non-constexpr argument: one key iff one Triton specialization (one
    compiled kernel). "Only if" is the safety property; "if" keeps the fast path from missing needlessly."""
    values = _values()
    keys = [_key(_buffer(), None, v, 2.0, True, BLOCK=64) for v in values]
    specs = [_triton_spec(v) for v in values]
    for i, a in enumerate(values):
        for j, b in enumerate(values):
            same_key, same_spec = keys[i] == keys[j], specs[i] == specs[j]
            assert same_key == same_spec, (repr(a)[:40], repr(b)[:40], specs[i], specs[j])


def test_key_separates_what_triton_compiles_apart():
    x = _buffer()
    base = _key(x, None, 5, 2.0, True, BLOCK=64)
    assert _key(_buffer(), None, 7, 3.0, False, BLOCK=64) == base  # other data, same specialization
    assert _key(x[4:], None, 5, 2.0, True, BLOCK=64) == base  # 16-byte aligned offset view
    assert _key(x[1:], None, 5, 2.0, True, BLOCK=64) != base  # 4-byte offset: not aligned
    assert _key(x.half(), None, 5, 2.0, True, BLOCK=64) != base  # dtype
    assert _key(x, x, 5, 2.0, True, BLOCK=64) != base  # None vs a tensor
    assert _key(x, None, 1, 2.0, True, BLOCK=64) != _key(x, None, 2, 2.0, True, BLOCK=64)  # == 1 folds
    assert _key(x, None, 16, 2.0, True, BLOCK=64) != _key(x, None, 17, 2.0, True, BLOCK=64)  # % 16
    assert _key(x, None, 2**31 - 16, 2.0, True, BLOCK=64) != _key(x, None, 2**31, 2.0, True, BLOCK=64)  # i32/i64
    assert _key(x, None, 5, 1, True, BLOCK=64) != _key(x, None, 5, 1.0, True, BLOCK=64)  # int 1 vs float


def test_key_covers_constexprs_options_device_and_knobs(monkeypatch):
    x = _buffer()
    base = _key(x, None, 5, 2.0, True, BLOCK=64, num_warps=4)
    assert _key(x, None, 5, 2.0, True, BLOCK=128, num_warps=4) != base
    assert _key(x, None, 5, 2.0, True, 64, num_warps=4) != base  # positional constexprs too
    assert _key(x, None, 5, 2.0, True, 64, num_warps=4) != _key(x, None, 5, 2.0, True, 32, num_warps=4)
    assert _key(x, None, 5, 2.0, True, BLOCK=64, num_warps=8) != base
    assert _key(x, None, 5, 2.0, True, BLOCK=64, num_warps=4, device=1) != base
    # a constexpr of another type that compares equal compiles apart (True == 1 in Python)
    assert _key(x, None, 5, 2.0, True, BLOCK=64, EVEN=True) != _key(x, None, 5, 2.0, True, BLOCK=64, EVEN=1)
    monkeypatch.setattr(knobs.runtime, "debug", not knobs.runtime.debug)
    assert _key(x, None, 5, 2.0, True, BLOCK=64, num_warps=4) != base


@pytest.mark.parametrize("odd", ["text", 2**64, object(), torch.tensor(3).numpy()])
def test_key_refuses_arguments_it_does_not_cover(odd):
    with pytest.raises(ValueError, match="not covered"):
        _key(_buffer(), None, odd, 2.0, True, BLOCK=64)


def test_generated_key_is_the_loops_key_for_every_argument_type_at_every_position():
    """The key function made per call shape and argument types (``launch._keyer_for``) returns exactly the
    per-argument loop's tuple: every value of ``_values()`` at each non-constexpr position, constexprs of
    several types, options, and keyword / positional / default-filled calls; a type the loop refuses makes
    no key function, and the call still raises."""
    launcher = launch._launcher(PROBE)
    values = _values()
    calls = []
    for position in range(5):
        for value in values:
            args = [_buffer(), None, 5, 2.0, True]
            args[position] = value
            calls.append((tuple(args), {"BLOCK": 64}))
    for block in (64, 64.0, True, "text"):
        calls.append(((_buffer(), None, 5, 2.0, True), {"BLOCK": block, "EVEN": 1, "num_warps": 4}))
    calls.append(((_buffer(), None, 5, 2.0, True, 32, False), {"num_warps": 8, "num_stages": 2}))
    for args, kwargs in calls:
        shape, full = launcher.bind(args, kwargs)
        for device in (0, 1):
            assert launcher.key(shape, full, kwargs, device) == launcher.key_by_loop(shape, full, kwargs, device)
            assert launch._keyer_for(shape, tuple(map(type, full))) is not None
    odd_args = (_buffer(), None, "text", 2.0, True)
    shape, full = launcher.bind(odd_args, {"BLOCK": 64})
    assert launch._keyer_for(shape, tuple(map(type, full))) is None
    with pytest.raises(ValueError, match="not covered"):
        _key(*odd_args, BLOCK=64)


# ------------------------------------------------------------------------------- the fast path, stand-ins


class _StandInCompiled:
    """What the fast path reads of a ``CompiledKernel``: its launcher, function handle and metadata."""

    def __init__(self) -> None:
        self.function = 0xF00
        self.packed_metadata = ("metadata",)
        self.launches: list[tuple] = []

    def run(self, *args) -> None:
        self.launches.append(args)


@pytest.fixture
def stand_in(monkeypatch):
    """``JITFunction.run`` records its calls and returns a fresh stand-in compiled kernel each time."""
    calls: list[_StandInCompiled] = []

    def run(self, *args, grid, warmup, **kwargs):
        compiled = _StandInCompiled()
        calls.append(compiled)
        return compiled

    monkeypatch.setattr(JITFunction, "run", run)
    monkeypatch.setattr(launch, "_current_device", lambda: 0)
    monkeypatch.setattr(launch, "_current_stream", lambda device: 77)
    monkeypatch.setattr(launch, "_launchers", {})
    return calls


def _call(x, n=5, grid=(3,), **kwargs):
    launch.launch(PROBE, grid, x, None, n, 2.0, True, BLOCK=64, num_warps=4, **kwargs)


def test_second_call_of_a_key_launches_the_kept_kernel_directly(stand_in):
    _call(_buffer())
    assert len(stand_in) == 1
    x = _buffer()
    _call(x, n=7, grid=(3, 2))  # same key: other data, n in the same class
    assert len(stand_in) == 1
    # every argument in signature order (the default EVEN filled in), no launch metadata or hooks
    assert stand_in[0].launches == [
        (3, 2, 1, 77, 0xF00, ("metadata",), None, None, None, x, None, 7, 2.0, True, 64, False)
    ]


def test_a_new_specialization_goes_through_triton(stand_in):
    x = _buffer()
    _call(x)
    _call(x[1:])  # misaligned after aligned, same shape class: Triton compiles another kernel
    _call(x, n=1)  # an int flipping to 1
    _call(x, n=16)  # n=5 was "i32, not a multiple of 16": this is another class
    assert len(stand_in) == 4
    _call(x[1:])
    _call(x, n=1)
    assert len(stand_in) == 4
    assert [len(c.launches) for c in stand_in] == [0, 1, 1, 0]


def test_plain_path_under_hooks_tracing_and_switches(stand_in, monkeypatch):
    x = _buffer()
    _call(x)
    kept = stand_in[0]

    def plain_calls(**kwargs) -> int:
        before = len(stand_in)
        _call(x, **kwargs)
        return len(stand_in) - before

    with launch.fast_launches(False):
        assert plain_calls() == 1
    with monkeypatch.context() as m:
        m.setattr(knobs.runtime, "launch_enter_hook", lambda metadata: None)  # a profiler's hook
        assert plain_calls() == 1
    with monkeypatch.context() as m:
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        assert plain_calls() == 1
    with monkeypatch.context() as m:
        m.setattr(PROBE, "pre_run_hooks", [lambda *a, **k: None])
        assert plain_calls() == 1
    before = len(stand_in)
    launch.launch(PROBE, lambda meta: (3,), x, None, 5, 2.0, True, BLOCK=64, num_warps=4)  # callable grid
    assert len(stand_in) == before + 1
    n_direct = len(kept.launches)
    assert plain_calls() == 0 and len(kept.launches) == n_direct + 1  # and back on the fast path


def test_changed_global_of_the_kernel_takes_the_plain_path(stand_in, monkeypatch):
    scope = {"G": 1}
    monkeypatch.setattr(PROBE, "used_global_vals", {("G", id(scope)): (1, scope)})
    x = _buffer()
    _call(x)
    _call(x)
    assert len(stand_in) == 1
    scope["G"] = 2  # Triton raises on this; the fast path must let it
    _call(x)
    assert len(stand_in) == 2


def test_pending_async_compile_is_not_kept(stand_in, monkeypatch):
    def run(self, *args, grid, warmup, **kwargs):
        future = _StandInCompiled()
        future.result = lambda: None
        stand_in.append(future)
        return future

    monkeypatch.setattr(JITFunction, "run", run)
    _call(_buffer())
    _call(_buffer())
    assert len(stand_in) == 2 and all(not c.launches for c in stand_in)


def test_hook_detection_for_plain_callables_and_hook_chains():
    assert not launch._hook_set(None)
    assert launch._hook_set(lambda metadata: None)
    chain_cls = getattr(knobs, "HookChain", None)
    if chain_cls is not None:  # newer Triton: a chain, empty unless a profiler added itself
        chain = chain_cls()
        assert not launch._hook_set(chain)
        chain.add(lambda metadata: None)
        assert launch._hook_set(chain)


# ------------------------------------------------------------------------------------ the interpreter


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs where there is no GPU")
def test_interpreter_launches_take_the_plain_path(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    from dorafactors.kernels import compose as kc
    from dorafactors.kernels.compose_kernel import _sum_partials_kernel

    assert not launch._launcher(_sum_partials_kernel).supported
    runs = []
    real_run = InterpretedFunction.run

    def counting_run(self, *args, **kwargs):
        runs.append(self)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", counting_run)
    part = torch.randint(-8, 9, (3, 70)).float()
    for _ in range(2):
        out = kc._sum_partials(part, torch.float32, False)
        assert torch.equal(out, part.sum(0))
    assert runs == [_sum_partials_kernel, _sum_partials_kernel]


# ------------------------------------------------------------------------------------------------ GPU


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` (same shape, contiguous) whose data pointer is one element off 16-byte alignment."""
    buf = torch.empty(t.numel() + 16, dtype=t.dtype, device=t.device)
    view = buf[1 : 1 + t.numel()].view(t.shape)
    view.copy_(t)
    assert view.data_ptr() % 16 != 0
    return view


def _as_tuple(result) -> tuple:
    return result if isinstance(result, tuple) else (result,)


def _assert_fast_equals_plain(fn, cases: list[tuple], monkeypatch) -> None:
    """``fn(*case)`` for every case: plain path, then twice on the fast path (the first pass keeps each key's
    kernel, the second launches them directly with no ``JITFunction.run`` call); all bitwise equal."""
    runs = []
    real_run = JITFunction.run

    def counting_run(self, *args, **kwargs):
        runs.append(self)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(JITFunction, "run", counting_run)
    with launch.fast_launches(False):
        plain = [_as_tuple(fn(*case)) for case in cases]  # also settles the autotuned configs
    assert runs, "no Triton kernel ran"
    launch.clear()
    first = [_as_tuple(fn(*case)) for case in cases]
    runs.clear()
    second = [_as_tuple(fn(*case)) for case in cases]
    torch.cuda.synchronize()
    assert runs == [], f"kept keys still called JITFunction.run: {[getattr(k, '__name__', k) for k in runs]}"
    for i, (p, a, b) in enumerate(zip(plain, first, second)):
        for j, (x, y, z) in enumerate(zip(p, a, b)):
            if x is None:
                assert y is None and z is None
                continue
            assert torch.equal(x, y) and torch.equal(x, z), f"case {i}, output {j}: fast path differs from plain"


def _rand(*shape, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed + sum(shape))
    return torch.randn(*shape, device="cuda", generator=g).to(dtype)


@pytest.mark.gpu
def test_gpu_compose_forward_fast_path_matches_plain(monkeypatch):
    from dorafactors.kernels import compose as kc

    K = 384
    g = (torch.rand(K, device="cuda") + 0.5).float()
    lora, base = _rand(64, K), _rand(64, K, seed=1)
    cases = [
        (lora, base),
        (_misaligned(lora), base),  # same shapes, misaligned after aligned
        (lora[:1], base[:1]),  # R == 1
        (lora[:3], base[:3]),
        (_misaligned(lora[:1]), _misaligned(base[:1])),
    ]

    def forward(lora, base):
        out, inner = kc.compose_forward_unchecked(lora, base, g, 2.0, -1, torch.bfloat16, True)
        inplace = _misaligned(lora) if lora.data_ptr() % 16 else lora.clone()
        kc.compose_forward_(inplace, base, g, 2.0)
        return out, inner, inplace

    _assert_fast_equals_plain(forward, cases, monkeypatch)


@pytest.mark.gpu
def test_gpu_compose_backward_fast_path_matches_plain(monkeypatch):
    from dorafactors.kernels import compose as kc

    K = 384
    g = (torch.rand(K, device="cuda") + 0.5).float()
    d_out, inner = _rand(256, K), _rand(256, K, seed=1)
    d4, inner4 = _rand(2, 6, 5, 7), _rand(2, 6, 5, 7, seed=1)  # channels in dim 1: the rows kernel + sum
    g6 = (torch.rand(6, device="cuda") + 0.5).float()
    cases = [
        (d_out, inner, g, -1),
        (_misaligned(d_out), inner, g, -1),
        (d_out[:1], inner[:1], g, -1),
        (d_out[:5], _misaligned(inner[:5]), g, -1),
        (d4, inner4, g6, 1),
        (_misaligned(d4), inner4, g6, 1),
    ]

    def backward(d_out, inner, g, channel_dim):
        return kc.compose_backward(
            d_out, g, inner, 2.0, channel_dim=channel_dim, lora_dtype=torch.bfloat16, base_dtype=torch.bfloat16
        )

    _assert_fast_equals_plain(backward, cases, monkeypatch)


@pytest.mark.gpu
def test_gpu_compose_backward_lora_b_fast_path_matches_plain(monkeypatch):
    from dorafactors.kernels import compose as kc

    K, r = 384, 16
    g = (torch.rand(K, device="cuda") + 0.5).float()
    weight_b = _rand(K, r, seed=2)

    def operands(T, seed, misalign=False):
        d_out, base, h = _rand(T, K, seed=seed), _rand(T, K, seed=seed + 1), _rand(T, r, seed=seed + 2)
        if misalign:
            d_out, h = _misaligned(d_out), _misaligned(h)
        m = d_out.float().t() @ h.float()
        return d_out, base, m, h

    cases = [operands(128, 0), operands(128, 0, misalign=True), operands(1, 3), operands(7, 4)]

    def backward(d_out, base, m, h):
        return kc.compose_backward_lora_b(
            d_out, g, base, m, weight_b, h, 2.0, base_dtype=torch.bfloat16, need_base=True, need_b=True,
            scaled_b_dtype=torch.bfloat16, need_g=True,
        )  # fmt: skip

    _assert_fast_equals_plain(backward, cases, monkeypatch)


@pytest.mark.gpu
def test_gpu_norm_launches_fast_path_match_plain(monkeypatch):
    from dorafactors.kernels.row_norm import gemm_weight_norm_sq, triton_row_sumsq, triton_weight_norm_sq

    W, A, B = _rand(512, 384) * 0.02, _rand(16, 384) * 0.05, _rand(512, 16) * 0.01
    A32 = A.float()
    cases = [
        (W, A, B, A32),
        (_misaligned(W), _misaligned(A), B, A32),
        (W[:1], A, B[:1], A32),  # d_out == 1
        (W[:, :1], A[:, :1], B, A32[:, :1]),  # d_in == 1
        (W.t().contiguous().t(), A, B, A32),  # W transposed in memory: its column stride flips away from 1
    ]

    def norms(W, A, B, A32):
        sumsq = triton_row_sumsq(W)
        return (
            sumsq,
            triton_weight_norm_sq(W, A, B, 2.0),
            triton_weight_norm_sq(W, A32, B, 2.0, cached_sumsq=sumsq, eps=1e-6),
            gemm_weight_norm_sq(W, A, B, 2.0, cached_sumsq=sumsq),
        )

    _assert_fast_equals_plain(norms, cases, monkeypatch)


@pytest.mark.gpu
def test_gpu_split_fast_path_matches_plain(monkeypatch):
    from dorafactors.dispatch import config
    from dorafactors.kernels.split_matmul import split_bf16x3

    monkeypatch.setenv("PEFT_DORA_FUSED", "1")
    config.invalidate_cache()

    x = torch.randn(96, 200, device="cuda")
    cases = [(x,), (_misaligned(x),), (x[:1],), (x[:, :1].contiguous(),)]
    _assert_fast_equals_plain(split_bf16x3, cases, monkeypatch)
