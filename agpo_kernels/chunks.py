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

from agpo_kernels.precision import addmm_acc

DEFAULT_MEMORY_BUDGET = 256 * 2**20


def rows_per_chunk(n_rows: int, bytes_per_row: int, memory_budget: int, align: int = 64) -> int:
    """Rows whose scratch fits ``memory_budget`` (at least one; a multiple of ``align``
    when that many fit, which keeps the GEMM tiles whole)."""
    c = int(memory_budget) // max(int(bytes_per_row), 1)
    if c >= align:
        c = c // align * align
    return max(1, min(int(n_rows), c))


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
        self.dw = torch.zeros_like(weight) if need_w else None
        self.db = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        self.bias_dtype = None if bias is None else bias.dtype

    @property
    def any(self) -> bool:
        return self.dh is not None or self.dw is not None or self.db is not None

    def add_chunk(self, dz: torch.Tensor, h_c: torch.Tensor, r0: int, r1: int) -> None:
        """``dz [c, V]`` (compute dtype, any row stride) of rows ``[r0, r1)``, ``h_c`` their hidden."""
        if self.dh is not None:
            if self.rows.index is None and self.rows.flat is not None and self.dh.dtype == dz.dtype:
                torch.mm(dz, self.w_cd, out=self.dh.view(-1, self.rows.D)[r0:r1])  # straight into dh
            else:
                self.rows.put(self.dh, r0, r1, torch.mm(dz, self.w_cd))
        if self.dw is not None:
            addmm_acc(self.dw, dz.t(), h_c)
        if self.db is not None:
            self.db += dz.sum(0, dtype=torch.float32)

    def finish(self, process_group=None):
        """``(dh, dW, db)``; under a vocabulary-parallel group each rank's ``dh`` covers its
        shard only, so it is summed over the group here."""
        if self.dh is not None and process_group is not None:
            dist.all_reduce(self.dh, group=process_group)
        db = None if self.db is None else self.db.to(self.bias_dtype)
        return self.dh, self.dw, db
