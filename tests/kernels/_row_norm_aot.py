"""Compile the norm kernel for sm_90 without a GPU and report what the compiler made of it.

Triton ships ``ptxas``, so ``triton.compile`` can build a cubin for a target it cannot run. The interpreter
tests never compile the kernel; this does, and reports (as JSON on stdout) per variant: shared memory, the
registers and stack (spills) of the cubin, how many global->shared async copies the pipeliner emitted and
how many ``wgmma`` dots there are. Run as a script with ``TRITON_INTERPRET`` unset (the test does so in a
subprocess).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from dorafactors.kernels import row_norm

_RUNTIME_INTS = ("n_m", "NR", "S", "NT", "S_G", "KT", "probe_w")


def _cfg(d_out: int, d_in: int, rank: int, a_is_fp32: bool) -> row_norm.NormKernelConfig:
    """The configuration the heuristic picks on a 132-SM H100 for this shape."""
    return row_norm.pick_config(d_out, d_in, rank, a_is_fp32, 132, False)


#: The GEMM norm path's launch (U and G from GEMMs) at 8192x8192 r=384.
_GEMM_PATH = dict(
    wdt="bf16",
    adt="bf16",
    bdt="bf16",
    cold=False,
    from_gemm=True,
    cfg=row_norm.pick_gemm_config(8192, 8192, 384, 132, False),
    unit_strides=("stride_wk", "stride_ak", "stride_br", "stride_ur"),
)

VARIANTS = {
    "bf16_warm": dict(wdt="bf16", adt="bf16", bdt="bf16", cold=False, cfg=_cfg(4096, 4096, 384, False)),
    "bf16_cold": dict(wdt="bf16", adt="bf16", bdt="bf16", cold=True, cfg=_cfg(4096, 4096, 384, False)),
    "bf16_w_fp32_adapters": dict(wdt="bf16", adt="fp32", bdt="fp32", cold=False, cfg=_cfg(4096, 4096, 384, True)),
    "fp16_w_fp32_adapters": dict(wdt="fp16", adt="fp32", bdt="fp32", cold=True, cfg=_cfg(4096, 4096, 384, True)),
    "fp16_cold": dict(wdt="fp16", adt="fp16", bdt="fp16", cold=True, cfg=_cfg(4096, 4096, 384, False)),
    "bf16_transposed_w": dict(
        wdt="bf16",
        adt="bf16",
        bdt="bf16",
        cold=True,
        cfg=_cfg(4096, 4096, 384, False),
        unit_strides=("stride_wm", "stride_ak"),
    ),
    "bf16_r16_cold": dict(wdt="bf16", adt="bf16", bdt="bf16", cold=True, cfg=_cfg(4096, 4096, 16, False)),
    "fp32_adapters_r64_cold": dict(wdt="bf16", adt="fp32", bdt="fp32", cold=True, cfg=_cfg(4096, 4096, 64, True)),
    "fp32_adapters_r16": dict(wdt="bf16", adt="fp32", bdt="fp32", cold=False, cfg=_cfg(4096, 4096, 16, True)),
    # the GEMM path (U and G from GEMMs): only the B G'' dots, no d_in loop to pipeline
    "bf16_from_gemm": _GEMM_PATH,
    "fp16_from_gemm": {**_GEMM_PATH, "wdt": "fp16", "adt": "fp16", "bdt": "fp16"},
}
# the non-finite row repair in the kernel (PROBE), on the variants the engine runs in training
VARIANTS.update(
    {
        f"{name}_probe": {**VARIANTS[name], "probe": True}
        for name in ("bf16_warm", "bf16_cold", "bf16_w_fp32_adapters", "bf16_from_gemm")
    }
)


def compile_variant(
    wdt: str,
    adt: str,
    bdt: str,
    cold: bool,
    cfg: row_norm.NormKernelConfig | None = None,
    from_gemm: bool = False,
    probe: bool = False,
    unit_strides: tuple[str, ...] = ("stride_wk", "stride_ak", "stride_br"),
    capability: int = 90,
):
    """``triton.compile`` one specialization the way a launch with 16-byte aligned operands would."""
    cfg = cfg or row_norm.NormKernelConfig()
    fn = row_norm._weight_norm_sq_kernel
    ptr_types = dict(
        w_ptr="*" + wdt,
        a_ptr="*" + adt,
        b_ptr="*" + bdt,
        g_ptr="*fp32",
        cnt_ptr="*i32",
    )
    a_mode = 0 if adt == wdt else (1 if wdt == "bf16" else 2)
    constexprs = dict(
        BM=cfg.block_m,
        BN=cfg.block_n,
        BK=cfg.block_k,
        BKG=min(cfg.block_n, cfg.bg_chunk),
        BG_STAGES=cfg.bg_stages,
        FROM_GEMM=from_gemm,
        COLD=cold,
        SQRT=True,
        A_MODE=a_mode,
        A_GRAM_MODE=int(adt == "fp32"),
        B_MODE={"bf16": 0, "fp16": 1}.get(bdt, 2),
        EVEN_K=True,
        EVEN_MN=True,
        UPCAST=False,
        PROBE=probe,
    )
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in unit_strides:
            signature[name] = "constexpr"
            constexprs[name] = 1
        elif name.endswith("_ptr"):
            signature[name] = ptr_types.get(name, "*fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "scaling":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name not in _RUNTIME_INTS:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(
        src,
        target=GPUTarget("cuda", capability, 128),
        options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
    )


def resource_usage(cubin: bytes) -> dict[str, int]:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", text)
    assert found, text
    return {"registers": int(found.group(1)), "stack": int(found.group(2))}


def report(names: list[str]) -> dict[str, dict[str, int]]:
    out = {}
    for name in names:
        kernel = compile_variant(**VARIANTS[name])
        ttgir = kernel.asm["ttgir"]
        out[name] = {
            "shared": int(kernel.metadata.shared),
            "async_copies": ttgir.count("ttg.async_copy_global_to_local"),
            "wgmma": ttgir.count("ttng.warp_group_dot "),
            **resource_usage(kernel.asm["cubin"]),
        }
    return out


if __name__ == "__main__":
    print(json.dumps(report(sys.argv[1:] or list(VARIANTS))))
