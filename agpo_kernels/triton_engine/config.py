"""Tile configurations of the Triton kernels, per GPU generation and dtype.

Shipped configurations are listed in ``SHIPPED`` so that the compile test can build every
one of them for sm_80, sm_90, sm_100 and sm_120 without a GPU (see
tests/test_triton_compile.py and docs/kernels.md for the reasoning behind each choice).
"""

from __future__ import annotations

import os

import torch
import triton.language as tl

from agpo_kernels.partials import ABSENT_LOGIT

NEG_BIG = tl.constexpr(ABSENT_LOGIT)  # "minus infinity" that keeps 0 * x finite

# (arch, kind) -> config for 16-bit inputs. 128x128 output tiles: on sm_90 two warpgroups
# of wgmma m64n128k16; BLOCK_K 64 keeps a 32 KB stage. The forward keeps 3 stages: its
# online-softmax epilogue needs the registers (4 stages spill 8 bytes at 255 registers).
# sm_100 (tcgen05, accumulators in tensor memory): the sm_90 forward tile spills there
# (104 bytes), 128x64x64 does not (225 registers). sm_120 (consumer Blackwell, mma.sync,
# 99 KB of shared memory per block): BLOCK_K 32 for the forward (64 spills 24 bytes),
# 3 backward stages (64 KB) rather than 4 (96 KB, at the limit).
_TILES_16 = {
    (80, "fwd"): dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=32, num_warps=8, num_stages=4),
    (80, "bwd"): dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=32, GROUP_N=8, num_warps=8, num_stages=4),
    (90, "fwd"): dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=3),
    (90, "bwd"): dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, GROUP_N=8, num_warps=8, num_stages=4),
    (100, "fwd"): dict(BLOCK_N=128, BLOCK_V=64, BLOCK_K=64, num_warps=8, num_stages=3),
    (100, "bwd"): dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, GROUP_N=8, num_warps=8, num_stages=4),
    (120, "fwd"): dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=32, num_warps=8, num_stages=4),
    (120, "bwd"): dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, GROUP_N=8, num_warps=8, num_stages=3),
}
# fp32 inputs use 3xTF32 dots (near-fp32 accuracy): three MMAs per product need more
# registers, so narrower tiles where 128x128 spills (sm_80, sm_90 and sm_100 forward,
# sm_120). The sm_90 forward spilled 48 bytes once built with V and N divisible by 16, as
# real launches at the 14B head are (206 registers, no spill at 128x64).
_TILES_32 = {
    (80, "fwd"): dict(BLOCK_N=128, BLOCK_V=64, BLOCK_K=32, num_warps=8, num_stages=3),
    (80, "bwd"): dict(BLOCK_N=128, BLOCK_V=64, BLOCK_K=32, GROUP_N=8, num_warps=8, num_stages=3),
    (90, "fwd"): dict(BLOCK_N=128, BLOCK_V=64, BLOCK_K=32, num_warps=8, num_stages=3),
    (90, "bwd"): dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=32, GROUP_N=8, num_warps=8, num_stages=3),
    (100, "fwd"): dict(BLOCK_N=128, BLOCK_V=64, BLOCK_K=32, num_warps=8, num_stages=3),
    (100, "bwd"): dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=32, GROUP_N=8, num_warps=8, num_stages=3),
    (120, "fwd"): dict(BLOCK_N=128, BLOCK_V=64, BLOCK_K=16, num_warps=8, num_stages=3),
    (120, "bwd"): dict(BLOCK_N=128, BLOCK_V=64, BLOCK_K=32, GROUP_N=8, num_warps=8, num_stages=3),
}
# Small tiles for the CPU interpreter (TRITON_INTERPRET=1): fast, and odd shapes still
# cross tile borders in tests.
_INTERPRET = {
    "fwd": dict(BLOCK_N=16, BLOCK_V=32, BLOCK_K=16, TARGET_PROGRAMS=8),
    "bwd": dict(BLOCK_N=16, BLOCK_V=32, BLOCK_K=16, GROUP_N=2),
    "rows": dict(BLOCK_R=16, BLOCK_V=32),
}
# The row kernel of the forward-gradient design streams fp32 logits (memory bound, no
# dot): one program per row, 4096 columns per step; the same on every architecture.
_ROWS = dict(BLOCK_R=1, BLOCK_V=4096, num_warps=8)

ARCHS = (80, 90, 100, 120)
SHIPPED = ([(arch, kind, dtype, (_TILES_32 if dtype == torch.float32 else _TILES_16)[(arch, kind)])
            for arch in ARCHS for kind in ("fwd", "bwd") for dtype in (torch.bfloat16, torch.float32)]
           + [(arch, "rows", dtype, _ROWS) for arch in ARCHS for dtype in (torch.bfloat16, torch.float32)])
# Common variants of the shipped builds: no bias, one scalar temperature, D not a multiple
# of BLOCK_K (masked K loads; D still a multiple of 16, as in every common model); D not
# even a multiple of 16 (correct, but without 16-byte alignment no cp.async pipelining);
# the row kernel's leanest flag set.
VARIANTS = ([(arch, kind, torch.bfloat16, _TILES_16[(arch, kind)], dict(HAS_BIAS=False, ROW_TEMP=False, EVEN_K=False))
             for arch in ARCHS for kind in ("fwd", "bwd")]
            + [(90, kind, torch.bfloat16, _TILES_16[(90, kind)], dict(EVEN_K=False, D_ALIGNED=False))
               for kind in ("fwd", "bwd")]
            + [(90, "rows", torch.bfloat16, _ROWS, dict(HAS_BIAS=False, SEQ_TEMP=False, HAS_INDEX=False,
                                                         HAS_OLD=False, HAS_REF=False, HAS_ISW=False, DUAL=False,
                                                         HAS_KEEP=True))])


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _arch(device: torch.device) -> int:
    major, _ = torch.cuda.get_device_capability(device)
    return {8: 80, 9: 90, 10: 100, 11: 100}.get(major, 120 if major >= 12 else 80)


def _config(kind: str, dtype: torch.dtype, device: torch.device) -> dict:
    if interpreting() or device.type != "cuda":
        return dict(_INTERPRET[kind])
    table = _TILES_32 if dtype == torch.float32 else _TILES_16
    return dict(table[(_arch(device), kind)])


def rows_config(device: torch.device) -> dict:
    if interpreting() or device.type != "cuda":
        return dict(_INTERPRET["rows"])
    return dict(_ROWS)


def fwd_config(dtype: torch.dtype, device: torch.device) -> dict:
    return _config("fwd", dtype, device)


def bwd_config(dtype: torch.dtype, device: torch.device) -> dict:
    return _config("bwd", dtype, device)


def round_bf16_stores(dtype: torch.dtype) -> bool:
    """Under the interpreter bf16 stores truncate; the kernels then round first."""
    return interpreting() and dtype == torch.bfloat16


def upcast_dot(dtype: torch.dtype) -> bool:
    """The CPU interpreter mis-computes ``tl.dot`` on bf16 operands (seen with triton
    3.9); there the kernels upcast tiles to fp32 first. Compiled kernels never do."""
    return interpreting() and dtype == torch.bfloat16
