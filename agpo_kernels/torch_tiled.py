"""Tiled pure-PyTorch fused LM head (impl="torch"): runs anywhere, CPU included.

Same math as the Triton kernels (SPEC section 2), organised for bounded memory:

* forward: rows in chunks, vocabulary in blocks; one streaming pass keeps, per row, the
  running max ``m``, ``s = sum exp(z - m)``, ``a = sum exp(z - m) (z - m)`` and the target
  logit. Then ``lse = m + log s``, ``mu = sum_j p_j z_j = m + a / s``,
  ``H = log s - a / s`` (stable for |z| ~ 1e4: nothing large is subtracted) and
  ``logp = z_y - lse``. Only ``lse`` and ``mu`` (two floats per row) are saved.
* backward: vocabulary blocks outside, row chunks inside; each logit tile is recomputed
  and turned into ``dz = g_lp (1[j=y] - p) - g_H p (z - mu)``, scaled by ``1/T``, and
  accumulated into ``dh`` (fp32, ``[N, D]``) and the block's ``dW`` (fp32, written once
  in the weight dtype): deterministic, and no fp32 ``[V, D]`` scratch.

All tile arithmetic is fp32 whatever the input dtype. The tile size comes from
``memory_budget`` (bytes), so peak extra memory is bounded by the tile, not by N x V.
"""

from __future__ import annotations

import torch

DEFAULT_MEMORY_BUDGET = 256 * 2**20
_TILE_TEMPS = 4  # fp32 [rows, block_v] temporaries alive at once (z, exp, products)


def pick_tiles(n_rows: int, vocab: int, dim: int, memory_budget: int) -> tuple[int, int]:
    """Returns ``(rows_per_chunk, vocab_block)`` whose working set fits ``memory_budget``."""
    block_v = min(vocab, 8192)
    while block_v > 256 and block_v * dim * 8 > memory_budget // 2:  # W block + its dW, fp32
        block_v //= 2
    left = max(memory_budget - block_v * dim * 8, 0)
    rows = left // (block_v * 4 * _TILE_TEMPS + dim * 8)
    return int(max(1, min(n_rows, rows))), int(block_v)


def _scale(z: torch.Tensor, inv_t) -> torch.Tensor:
    return z.mul_(inv_t.unsqueeze(1)) if isinstance(inv_t, torch.Tensor) else z.mul_(inv_t)


def _logit_tile(h32, w32, b32, inv_t):
    z = h32 @ w32.t()
    if b32 is not None:
        z += b32
    return _scale(z, inv_t)


class _TiledLinearStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, memory_budget):
        N, D = hidden.shape
        V = weight.shape[0]
        rows, block_v = pick_tiles(N, V, D, memory_budget)
        inv_t = 1.0 / temperature
        dev = hidden.device
        lse = torch.empty(N, dtype=torch.float32, device=dev)
        mu = torch.empty_like(lse)
        logp = torch.empty_like(lse)
        ent = torch.empty_like(lse)
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            h32 = hidden[r0:r1].float()
            y = targets[r0:r1]
            it = inv_t[r0:r1] if isinstance(inv_t, torch.Tensor) else inv_t
            m = torch.full((r1 - r0,), float("-inf"), device=dev)
            s = torch.zeros(r1 - r0, device=dev)
            a = torch.zeros_like(s)
            zy = torch.zeros_like(s)
            for v0 in range(0, V, block_v):
                v1 = min(V, v0 + block_v)
                z = _logit_tile(h32, weight[v0:v1].float(),
                                None if bias is None else bias[v0:v1].float(), it)
                hit = (y >= v0) & (y < v1)
                zy = torch.where(hit, z.gather(1, (y - v0).clamp(0, v1 - v0 - 1).unsqueeze(1)).squeeze(1), zy)
                m_new = torch.maximum(m, z.max(dim=1).values)
                alpha = torch.exp(m - m_new)
                shift = torch.where(s > 0, m - m_new, torch.zeros_like(m))
                z -= m_new.unsqueeze(1)
                e = torch.exp(z)
                a = alpha * (a + shift * s) + (e * z).sum(1)
                s = alpha * s + e.sum(1)
                m = m_new
            log_s = torch.log(s)
            lse[r0:r1] = m + log_s
            mu[r0:r1] = m + a / s
            ent[r0:r1] = log_s - a / s
            logp[r0:r1] = zy - lse[r0:r1]
        ctx.save_for_backward(hidden, weight, bias, targets, lse, mu,
                              temperature if isinstance(temperature, torch.Tensor) else None)
        ctx.temperature = temperature
        ctx.memory_budget = memory_budget
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, bias, targets, lse, mu, t_tensor = ctx.saved_tensors
        temperature = t_tensor if t_tensor is not None else ctx.temperature
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        N, D = hidden.shape
        V = weight.shape[0]
        rows, block_v = pick_tiles(N, V, D, ctx.memory_budget)
        inv_t = 1.0 / temperature
        g_lp = torch.zeros_like(lse) if g_logp is None else g_logp.float()
        g_h = torch.zeros_like(lse) if g_ent is None else g_ent.float()
        dh = torch.zeros(N, D, dtype=torch.float32, device=hidden.device) if need_h else None
        dw = torch.empty_like(weight) if need_w else None
        db = torch.empty_like(bias) if need_b else None
        for v0 in range(0, V, block_v):
            v1 = min(V, v0 + block_v)
            w32 = weight[v0:v1].float()
            b32 = None if bias is None else bias[v0:v1].float()
            dw_blk = torch.zeros_like(w32) if need_w else None
            db_blk = torch.zeros(v1 - v0, device=hidden.device) if need_b else None
            for r0 in range(0, N, rows):
                r1 = min(N, r0 + rows)
                h32 = hidden[r0:r1].float()
                it = inv_t[r0:r1] if isinstance(inv_t, torch.Tensor) else inv_t
                z = _logit_tile(h32, w32, b32, it)
                p = torch.exp(z - lse[r0:r1].unsqueeze(1))
                z -= mu[r0:r1].unsqueeze(1)
                dz = z.mul_(g_h[r0:r1].unsqueeze(1)).add_(g_lp[r0:r1].unsqueeze(1)).mul_(p).neg_()
                y = targets[r0:r1]
                hit = ((y >= v0) & (y < v1)).nonzero().squeeze(1)
                dz[hit, y[hit] - v0] += g_lp[r0:r1][hit]
                dz = _scale(dz, it)
                if need_h:
                    dh[r0:r1] += dz @ w32
                if need_w:
                    dw_blk += dz.t() @ h32
                if need_b:
                    db_blk += dz.sum(0)
            if need_w:
                dw[v0:v1] = dw_blk
            if need_b:
                db[v0:v1] = db_blk
        return (dh.to(hidden.dtype) if need_h else None, dw, db, None, None, None)


def linear_stats_torch(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       targets: torch.Tensor, temperature,
                       memory_budget: int = DEFAULT_MEMORY_BUDGET) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row fp32 ``(logp, entropy)`` of ``softmax((hidden @ weight.T + bias) / T)``.

    ``hidden [N, D]``, ``targets [N]`` int64, ``temperature`` a float or fp32 ``[N]``.
    Differentiable with respect to hidden, weight and bias.
    """
    return _TiledLinearStats.apply(hidden, weight, bias, targets, temperature, int(memory_budget))
