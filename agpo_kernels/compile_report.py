"""Ahead-of-time build of every shipped Triton kernel configuration, without a GPU.

``python -m agpo_kernels.compile_report [--json]`` compiles each entry of
``triton_engine.config.SHIPPED`` (and the variants in ``VARIANTS``) for sm_80, sm_90, sm_100 and
sm_120 with ``triton.compile(ASTSource(...), target=GPUTarget(...))`` and reads the cubin
with the ``cuobjdump`` that ships in the triton wheel: registers, stack (spills), shared
memory, and whether the SASS uses wgmma (``HGMMA``, sm_90), tcgen05 (``UTC*MMA``, sm_100),
mma (``HMMA``) and asynchronous copies. The test suite checks the same report.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import re
import subprocess
import tempfile

import torch

try:  # Linux wheels only: without triton, --help still answers and the command says why it cannot run
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as e:  # pragma: no cover - triton is a dependency on Linux
    triton = None
    _TRITON_MISSING = e

from agpo_kernels.triton_engine.config import ARCHS, SHIPPED, VARIANTS, dot_precision

_PTR = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}
# Shared memory per block that each architecture allows (bytes).
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}
# Arguments the JIT specialises as 16-divisible in real launches at the 14B head: aligned
# allocations, hidden sizes and strides that are multiples of 16, the vocabulary (152064),
# token counts and the chunk bounds (chunks are multiples of 64 rows; only a last partial
# chunk may differ, and it compiles once more). So the report builds the kernel that runs
# (the row kernel's 128-bit loads and stores need V % 16 == 0); a variant can drop D's.
_DIVISIBLE = {"h_ptr", "w_ptr", "b_ptr", "y_ptr", "invt_ptr", "part_ptr", "lse_ptr", "mu_ptr",
              "glp_ptr", "gh_ptr", "dz_ptr", "x_ptr", "idx_ptr", "seq_ptr", "keep_ptr", "old_ptr", "ref_ptr",
              "isw_ptr", "adv_ptr", "elo_ptr", "ehi_ptr", "w_ptr", "wh_ptr", "out_ptr", "D", "stride_h", "stride_w",
              "stride_dz", "stride_x", "v_per_split", "V", "N", "M", "n_rows", "row0", "r_lo", "r_hi"}


def _signature(kind: str, dtype: torch.dtype) -> tuple[object, dict]:
    from agpo_kernels.triton_engine.bwd import _dlogits_kernel
    from agpo_kernels.triton_engine.fwd import _fwd_stats_kernel
    from agpo_kernels.triton_engine.rows import _loss_rows_kernel

    p = _PTR[dtype]
    if kind == "fwd":
        return _fwd_stats_kernel, dict(h_ptr=p, w_ptr=p, b_ptr=p, y_ptr="*i64", invt_ptr="*fp32",
                                       part_ptr="*fp32", inv_t="fp32", N="i32", V="i32", D="i32",
                                       stride_h="i32", stride_w="i32", n_split="i32", v_per_split="i32")
    if kind == "bwd":
        return _dlogits_kernel, dict(h_ptr=p, w_ptr=p, b_ptr=p, y_ptr="*i64", invt_ptr="*fp32", lse_ptr="*fp32",
                                     mu_ptr="*fp32", glp_ptr="*fp32", gh_ptr="*fp32", dz_ptr=p, inv_t="fp32",
                                     V="i32", D="i32", stride_h="i32", stride_w="i32", stride_dz="i32",
                                     r_lo="i32", r_hi="i32")
    f32 = "*fp32"
    return _loss_rows_kernel, dict(x_ptr=f32, dz_ptr=p, b_ptr=f32, idx_ptr="*i64", y_ptr="*i64", seq_ptr="*i64",
                                   keep_ptr=f32, old_ptr=f32, ref_ptr=f32, isw_ptr=f32, adv_ptr=f32, elo_ptr=f32,
                                   ehi_ptr=f32, w_ptr=f32, wh_ptr=f32, invt_ptr=f32, part_ptr=f32, out_ptr=f32, row0="i32",
                                   n_rows="i32", V="i32", v_off="i32", M="i32", stride_x="i32", stride_dz="i32",
                                   inv_t="fp32", beta="fp32", ent_coef="fp32", dual_c="fp32", kl_c="fp32")


def _constants(kind: str, dtype: torch.dtype, cfg: dict, flags: dict) -> dict:
    if kind == "rows":
        const = dict(HAS_BIAS=True, SEQ_TEMP=True, HAS_INDEX=True, HAS_KEEP=False, HAS_OLD=True, HAS_REF=True,
                     HAS_ISW=True, KL=3, KL_IN_LOSS=True, KL_RATIO=False, DUAL=True, KL_CLAMP=False, MERGED=False,
                     NEED_GRAD=True, RNE=False, **cfg)
    else:
        const = dict(HAS_BIAS=True, ROW_TEMP=True, EVEN_K=True, PRECISION=dot_precision(dtype), UPCAST=False,
                     NUM_STAGES=cfg["num_stages"], **{k: v for k, v in cfg.items() if k != "num_stages"})
        if kind == "bwd":
            const.update(RAW=False, RNE=False)
    const.update(flags)
    const.pop("num_warps", None)
    const.pop("num_stages", None)
    const.pop("TARGET_PROGRAMS", None)
    return const


def _bin(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_one(kind: str, dtype: torch.dtype, arch: int, cfg: dict, flags: dict | None = None) -> dict:
    """Compiles one configuration; returns a dict of resource figures from the cubin."""
    flags = dict(flags or {})
    d_aligned = flags.pop("D_ALIGNED", True)  # False: D not a multiple of 16 (no 16-byte alignment)
    fn, types = _signature(kind, dtype)
    num_warps, num_stages = cfg.get("num_warps", 4), cfg.get("num_stages", 3)
    const = _constants(kind, dtype, cfg, flags)
    names = list(fn.arg_names)
    sig = {n: types.get(n, "constexpr") for n in names}
    divisible = _DIVISIBLE - (set() if d_aligned else {"D", "stride_h", "stride_w"})
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n in divisible and n in types}
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
    ops = collections.Counter(re.findall(r"\b(HGMMA|HMMA|UTC[A-Z]*MMA|LDGSTS|UTMALDG|LDL|STL)\b", sass))
    wide = len(re.findall(r"\b(?:LDG|STG)\.E(?:\.[A-Z0-9_]+)*\.128\b", sass))  # 128-bit global accesses
    tile = "x".join(str(cfg[k]) for k in ("BLOCK_N", "BLOCK_V", "BLOCK_K") if k in cfg)
    return dict(kind=kind, dtype=str(dtype).replace("torch.", ""), arch=arch,
                variant=",".join(f"{k}={v}" for k, v in sorted(flags.items()))
                + ("" if d_aligned else ",D%16!=0") or "default",
                shared=int(k.metadata.shared), regs=regs, spill_bytes=stack,
                local_ops=ops["LDL"] + ops["STL"], wgmma=ops["HGMMA"], mma=ops["HMMA"],
                tcgen05=sum(v for o, v in ops.items() if o.startswith("UTC")),
                async_copies=ops["LDGSTS"] + ops["UTMALDG"], wide_global=wide, tile=tile, warps=num_warps, stages=num_stages)


def _job(args):
    return compile_one(*args)


def jobs(archs=ARCHS) -> list[tuple]:
    out = [(kind, dtype, arch, cfg, None) for arch, kind, dtype, cfg in SHIPPED if arch in archs]
    out += [(kind, dtype, arch, cfg, flags) for arch, kind, dtype, cfg, flags in VARIANTS if arch in archs]
    return out


def report_all(archs=ARCHS, workers: int | None = None) -> list[dict]:
    todo = jobs(archs)
    workers = workers or min(len(todo), os.cpu_count() or 1)
    if workers <= 1:
        return [_job(j) for j in todo]
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        return list(pool.map(_job, todo))


def build_parser():
    import argparse

    p = argparse.ArgumentParser(prog="python -m agpo_kernels.compile_report", description=(
        "Compile every shipped Triton kernel configuration for " + ", ".join(f"sm_{a}" for a in ARCHS) + " without a GPU and "
        "report registers, spills, shared memory and the MMA / async-copy instructions of the SASS."))
    p.add_argument("--json", action="store_true", help="print the rows as one JSON list instead of a table")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if triton is None:
        raise SystemExit(f"compile_report needs triton (Linux x86_64/aarch64 wheels: pip install triton): "
                         f"{_TRITON_MISSING}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter cannot compile kernels")
    rows = report_all()
    if args.json:
        print(json.dumps(rows))
        return
    cols = ["arch", "kind", "dtype", "variant", "tile", "warps", "stages", "regs", "spill_bytes", "shared",
            "wgmma", "tcgen05", "mma", "async_copies", "wide_global"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
