"""Row chunks: how many rows one pass holds, where their hidden states come from, and the
two gradient GEMMs every chunk ends with.

Both designs walk the projected rows in chunks of ``C`` rows over the *whole* vocabulary:
a chunk's logit gradient ``dz [C, V]`` lives in a buffer sized by ``memory_budget``, then

    dh[chunk] = dz @ W          one GEMM over all of V, written once (no accumulator)
    dW       += dz^T @ h[chunk]  cuBLAS addmm, beta = 1, into the returned gradient
    db       += column sums of dz (fp32 [V])

so nothing of size ``N x D`` or ``V x D`` exists besides the inputs and the gradients that
are returned, and every byte is touched a number of times linear in N.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from agpo_kernels.precision import addmm_acc, mm_into

DEFAULT_MEMORY_BUDGET = 256 * 2**20
GPU_MIN_ROWS = 1024  # rows per chunk on a GPU at least: fewer starve the dh GEMM and repeat dW's traffic


def default_memory_budget(device: torch.device, n_rows: int, vocab: int, dim: int) -> int:
    """The chunk scratch budget when the caller gives none.

    CPU: ``DEFAULT_MEMORY_BUDGET`` (256 MiB). CUDA: room for ``max(1024, n_rows / 16)`` rows
    of fp32 logits (and their 16-bit hidden and dh), never less than 256 MiB nor more than
    1/16 of the device's memory. Each chunk re-reads W twice and reads and writes dW once, so
    few large chunks keep those passes (3 x 1.5 GB each at the 14B head) off the critical
    path, and a chunk of 1024+ rows gives the ``dz W`` GEMM enough output tiles for 132 SMs.
    At the 14B head (V = 152064, D = 5120) that is 1024 rows = 594 MiB up to N = 16384, then
    N / 16 rows (2.3 GiB at N = 65536): 2-3% of what eager PyTorch holds for the same call.
    """
    if device.type != "cuda":
        return DEFAULT_MEMORY_BUDGET
    return gpu_memory_budget(n_rows, vocab, dim, torch.cuda.get_device_properties(device).total_memory)


def gpu_memory_budget(n_rows: int, vocab: int, dim: int, device_bytes: int) -> int:
    """``default_memory_budget`` on a device of ``device_bytes``."""
    rows = max(GPU_MIN_ROWS, -(-int(n_rows) // 16))
    rows = min(int(n_rows), -(-rows // 64) * 64)
    want = rows * (4 * int(vocab) + 4 * int(dim))
    return int(max(DEFAULT_MEMORY_BUDGET, min(want, int(device_bytes) // 16)))


def rows_per_chunk(n_rows: int, bytes_per_row: int, memory_budget: int, align: int = 64) -> int:
    """Rows whose scratch fits ``memory_budget`` (at least one; a multiple of ``align``
    when that many fit, which keeps the GEMM tiles whole)."""
    c = int(memory_budget) // max(int(bytes_per_row), 1)
    if c >= align:
        c = c // align * align
    return max(1, min(int(n_rows), c))


TAIL_ALIGN = 64


def zero_row_tails_(dz: torch.Tensor) -> None:
    """Zeroes the bytes just past each row of a padded ``dz [c, V]`` view, up to the next
    multiple of ``TAIL_ALIGN`` columns (within the row stride).

    A 16-bit ``dz`` written over fp32 logits has row stride ``2V``; its columns ``[V, 2V)``
    still hold halves of fp32 logits, which read as bf16 can be NaN or Inf. A GEMM may read
    past ``K = V`` in its operand and multiply what it finds by the zero padding of the other
    (oneDNN's bf16 kernels on CPU do for odd K, up to the next multiple of 32), and NaN * 0
    is NaN: ``dh`` came out non-finite for V = 257. Zeros there make any such read harmless.
    Nothing to do when V is a multiple of 64 (Qwen2.5's 152064, SmolLM2's 49152) or ``dz``
    is contiguous (the recompute design's buffer).
    """
    c, V = dz.shape
    pad = min(dz.stride(0) - V, (-V) % TAIL_ALIGN)
    if pad <= 0 or dz.stride(1) != 1 or c == 0:
        return
    torch.as_strided(dz, (c, pad), (dz.stride(0), 1), dz.storage_offset() + V).zero_()


class HiddenRows:
    """Rows of the caller's hidden states by position, as ``[c, D]`` blocks.

    ``hidden`` is ``[..., D]`` (a strided slice such as ``h[:, P-1:P+C-1]`` is fine: rows are
    gathered per chunk, never copied as a whole); ``index`` lists the positions that are
    projected (None: all, in order).
    """

    def __init__(self, hidden: torch.Tensor, index: torch.Tensor | None):
        self.hidden, self.index = hidden, index
        self.D = hidden.shape[-1]
        try:
            self.flat = hidden.view(-1, self.D)
        except RuntimeError:  # not viewable as [M, D]: gather through (b, t)
            self.flat = None

    def _positions(self, r0: int, r1: int) -> torch.Tensor:
        if self.index is not None:
            return self.index[r0:r1]
        return torch.arange(r0, r1, device=self.hidden.device)

    def get(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        if self.flat is not None and self.index is None:
            h = self.flat[r0:r1]
        elif self.flat is not None:
            h = self.flat.index_select(0, self.index[r0:r1])
        else:
            pos = self._positions(r0, r1)
            T = self.hidden.shape[1]
            h = self.hidden[pos // T, pos % T]
        return h if h.dtype == dtype else h.to(dtype)

    def new_grad(self) -> torch.Tensor:
        """The hidden gradient, shaped like hidden (rows never written stay 0)."""
        alloc = torch.empty if (self.index is None and self.flat is not None) else torch.zeros
        return alloc(self.hidden.shape, dtype=self.hidden.dtype, device=self.hidden.device)

    def put(self, grad: torch.Tensor, r0: int, r1: int, values: torch.Tensor) -> None:
        gflat = grad.view(-1, self.D)
        if self.index is None and self.flat is not None:
            gflat[r0:r1] = values
        else:
            gflat.index_copy_(0, self._positions(r0, r1), values.to(grad.dtype))


class HeadGrads:
    """Accumulates ``dh``, ``dW``, ``db`` chunk by chunk (only those that are needed)."""

    def __init__(self, rows: HiddenRows, weight, bias, w_cd, *, need_h: bool, need_w: bool, need_b: bool):
        self.rows, self.w_cd = rows, w_cd
        self.dh = rows.new_grad() if need_h else None
        # dW is written by the first chunk's GEMM (beta = 0), not zeroed and then accumulated:
        # at the 14B head that saves a 1.5 GB memset and a read of it
        self.dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else None
        self._dw_written = False
        self.db = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        self.bias_dtype = None if bias is None else bias.dtype

    @property
    def any(self) -> bool:
        return self.dh is not None or self.dw is not None or self.db is not None

    def add_chunk(self, dz: torch.Tensor, h_c: torch.Tensor, r0: int, r1: int) -> None:
        """``dz [c, V]`` (compute dtype, any row stride) of rows ``[r0, r1)``, ``h_c`` their hidden."""
        zero_row_tails_(dz)
        if self.dh is not None:
            if self.rows.index is None and self.rows.flat is not None and self.dh.dtype == dz.dtype:
                torch.mm(dz, self.w_cd, out=self.dh.view(-1, self.rows.D)[r0:r1])  # straight into dh
            else:
                self.rows.put(self.dh, r0, r1, torch.mm(dz, self.w_cd))
        if self.dw is not None:
            if self._dw_written:
                addmm_acc(self.dw, dz.t(), h_c)
            else:
                mm_into(self.dw, dz.t(), h_c)
                self._dw_written = True
        if self.db is not None:
            self.db += dz.sum(0, dtype=torch.float32)

    def finish(self, process_group=None):
        """``(dh, dW, db)``; under a vocabulary-parallel group each rank's ``dh`` covers its
        shard only, so it is summed over the group here."""
        if self.dw is not None and not self._dw_written:  # no row was projected
            self.dw.zero_()
        if self.dh is not None and process_group is not None:
            dist.all_reduce(self.dh, group=process_group)
        db = None if self.db is None else self.db.to(self.bias_dtype)
        return self.dh, self.dw, db
