"""Ahead-of-time build of every shipped Triton kernel configuration, without a GPU.

``python -m agpo_kernels.compile_report`` compiles each kernel in ``triton_config.SHIPPED``
for sm_80 and sm_90 with ``triton.compile(ASTSource(...), target=GPUTarget(...))`` and
reads the cubin with the ``cuobjdump`` that ships in the triton wheel: registers, stack
(spills), shared memory, and whether the SASS uses wgmma (``HGMMA``) or mma (``HMMA``)
and asynchronous copies. The test suite checks the same report.
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .triton_bwd import _dlogits_kernel
from .triton_config import SHIPPED, dot_precision

_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
# Shared memory per block that each architecture allows (bytes).
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
# Arguments the JIT specialises as 16-divisible in real launches (aligned allocations,
# hidden sizes and strides that are multiples of 16).
_DIVISIBLE = {"h_ptr", "w_ptr", "b_ptr", "y_ptr", "invt_ptr", "part_ptr", "lse_ptr", "mu_ptr",
              "glp_ptr", "gh_ptr", "dz_ptr", "D", "stride_h", "stride_w", "stride_dz", "v_per_split"}


def _signature(kind: str, dtype: torch.dtype) -> tuple[object, dict]:
    from .triton_fwd import _fwd_stats_kernel

    p = _PTR[dtype]
    if kind == "fwd":
        fn = _fwd_stats_kernel
        types = dict(h_ptr=p, w_ptr=p, b_ptr=p, y_ptr="*i64", invt_ptr="*fp32", part_ptr="*fp32",
                     inv_t="fp32", N="i32", V="i32", D="i32", stride_h="i32", stride_w="i32",
                     n_split="i32", v_per_split="i32")
    else:
        fn = _dlogits_kernel
        types = dict(h_ptr=p, w_ptr=p, b_ptr=p, y_ptr="*i64", invt_ptr="*fp32", lse_ptr="*fp32",
                     mu_ptr="*fp32", glp_ptr="*fp32", gh_ptr="*fp32", dz_ptr=p, inv_t="fp32",
                     N="i32", D="i32", stride_h="i32", stride_w="i32", stride_dz="i32",
                     v_lo="i32", v_hi="i32")
    return fn, types


def _bin(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_one(kind: str, dtype: torch.dtype, arch: int, cfg: dict, *, has_bias=True, row_temp=True):
    """Compiles one configuration; returns a dict of resource figures from the cubin."""
    fn, types = _signature(kind, dtype)
    cfg = dict(cfg)
    num_warps, num_stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    cfg.pop("TARGET_PROGRAMS", None)
    const = dict(HAS_BIAS=has_bias, ROW_TEMP=row_temp, EVEN_K=True,
                 PRECISION=dot_precision(dtype), UPCAST=False, NUM_STAGES=num_stages, **cfg)
    names = list(fn.arg_names)
    sig = {n: types.get(n, "constexpr") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n in _DIVISIBLE}
    k = triton.compile(ASTSource(fn, sig, const, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        usage = subprocess.run([_bin("cuobjdump"), "-res-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_bin("cuobjdump"), "-sass", f.name], capture_output=True,
                              text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    ops = collections.Counter(re.findall(r"\b(HGMMA|HMMA|LDGSTS|UTMALDG|LDL|STL)\b", sass))
    return dict(kind=kind, dtype=str(dtype).replace("torch.", ""), arch=arch,
                shared=int(k.metadata.shared), regs=regs, spill_bytes=stack,
                local_ops=ops["LDL"] + ops["STL"], wgmma=ops["HGMMA"], mma=ops["HMMA"],
                async_copies=ops["LDGSTS"] + ops["UTMALDG"],
                tile="x".join(str(cfg[k]) for k in ("BLOCK_N", "BLOCK_V", "BLOCK_K")),
                warps=num_warps, stages=num_stages)


def report_all() -> list[dict]:
    return [compile_one(kind, dtype, arch, cfg) for arch, kind, dtype, cfg in SHIPPED]


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter cannot compile kernels")
    rows = report_all()
    if "--json" in sys.argv:
        print(json.dumps(rows))
        return
    cols = ["arch", "kind", "dtype", "tile", "warps", "stages", "regs", "spill_bytes", "shared",
            "wgmma", "mma", "async_copies"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
