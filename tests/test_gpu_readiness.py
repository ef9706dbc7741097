"""What only a GPU run would otherwise show, checked where a CPU can: the padding bytes a
16-bit ``dz`` leaves in its fp32 buffer, bf16 gradients over many row chunks for a fixed
list of seeds, the chunk budget a GPU gets by default, and which GEMM errors switch to the
slow fallback (only a missing overload; a real fault surfaces)."""

import pytest
import torch
from conftest import DEVICE
from test_fused_loss import leaves, make_problem, run_loss

from agpo_kernels.chunks import (DEFAULT_MEMORY_BUDGET, GPU_MIN_ROWS, default_memory_budget, gpu_memory_budget,
                                 rows_per_chunk, zero_row_tails_)
from agpo_kernels.precision import is_missing_overload

# Seeds 14 and 38 gave NaN dh in bf16 with 6 chunks before the row tails were zeroed.
SEEDS = (14, 38, 0, 1, 2, 3)


def test_zero_row_tails_clears_the_bytes_a_gemm_may_read_past_each_row():
    V, c = 257, 5
    # an fp32 buffer whose every 16-bit half reads as a bf16 NaN
    x = torch.full((c, V), 0x7FC17FC1, dtype=torch.int32).view(torch.float32)
    dz = x.view(torch.bfloat16)[:, :V]
    g = torch.Generator().manual_seed(0)
    vals = torch.randn(c, V, generator=g).bfloat16()
    dz.copy_(vals)
    zero_row_tails_(dz)
    assert torch.equal(dz, vals)
    wide = x.view(torch.bfloat16)
    tail = (-V) % 64
    assert (wide[:, V:V + tail] == 0).all() and torch.isnan(wide[:, V + tail:].float()).all()
    # a GEMM that reads up to 64 columns past K sees zeros, not NaN
    padded = torch.as_strided(dz, (c, V + tail), (dz.stride(0), 1))
    w = torch.cat([torch.randn(V, 8, generator=g), torch.zeros(tail, 8)]).bfloat16()
    assert torch.isfinite(padded @ w).all()
    # nothing to do for a contiguous dz or a multiple of 64 columns
    for t in (vals.clone(), torch.full((3, 2 * 128), 7.0).bfloat16()[:, :128]):
        before = t.as_strided((t.numel() if t.is_contiguous() else 3 * 256,), (1,)).clone()
        zero_row_tails_(t)
        assert torch.equal(t.as_strided(before.shape, (1,)), before)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_bf16_gradients_finite_over_many_chunks_for_fixed_seeds(impl):
    """The problem and 6-chunk budget of test_low_precision_no_worse_than_eager, over a fixed
    list of seeds: every gradient finite and the unmasked positions' dh non-zero."""
    for seed in SEEDS:
        p = make_problem(dtype=torch.bfloat16, B=4, T=16, D=64, V=257, seed=seed)
        rows = int(p["mask"].sum())
        budget = -(-rows // 6) * (8 * 257 + 4 * 64)
        ins = leaves(p)
        loss, *_ = run_loss(p, impl, dict(beta=0.05, ent_coef=0.01), ins, budget=budget)
        dh, dw, db = torch.autograd.grad(loss, ins)
        assert torch.isfinite(loss), seed
        for name, g in (("dh", dh), ("dW", dw), ("db", db)):
            assert torch.isfinite(g).all(), (seed, name)
        assert (dh[p["mask"]].abs().sum(-1) > 0).all(), seed


def test_gpu_chunks_hold_at_least_1024_rows_and_grow_with_n():
    V, D, gpu = 152064, 5120, 80 * 2**30
    row = 4 * V + 4 * D
    assert default_memory_budget(torch.device("cpu"), 8192, V, D) == DEFAULT_MEMORY_BUDGET
    for n, rows in ((8192, 1024), (16384, 1024), (65536, 4096)):
        budget = gpu_memory_budget(n, V, D, gpu)
        assert budget == rows * row
        # the forward-gradient design's own row size (fp32 logits + bf16 hidden and dh)
        assert rows_per_chunk(n, 4 * V + 2 * D * 2, budget) == rows
    assert gpu_memory_budget(100, V, D, gpu) == DEFAULT_MEMORY_BUDGET  # small calls: the floor
    assert gpu_memory_budget(10**7, V, D, gpu) == gpu // 16  # capped by the device
    assert rows_per_chunk(8192, row, gpu_memory_budget(8192, V, D, gpu)) >= GPU_MIN_ROWS


@pytest.mark.skipif(DEVICE != "cuda", reason="reads the device's memory")
def test_default_budget_on_this_gpu():
    props = torch.cuda.get_device_properties(torch.device(DEVICE))
    assert default_memory_budget(torch.device(DEVICE), 8192, 152064, 5120) == \
        gpu_memory_budget(8192, 152064, 5120, props.total_memory)


def test_only_a_missing_overload_switches_to_the_fallback():
    missing = [TypeError("mm() got an unexpected keyword argument 'out_dtype'"),
               RuntimeError("Could not run 'aten::mm.dtype_out' with arguments from the 'CUDA' backend"),
               RuntimeError("out_dtype is only supported for bf16/fp16 inputs")]
    real = [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
            RuntimeError("CUDA error: an illegal memory access was encountered"),
            RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling cublasGemmEx"),
            RuntimeError("CUDA error: device-side assert triggered")]
    assert all(is_missing_overload(e) for e in missing)
    assert not any(is_missing_overload(e) for e in real)
