"""Row passes of the tiled PyTorch path over a chunk's fp32 logits ``x [c, V]``.

* ``prepare_``: bias and ``1/T`` applied in place: ``x`` becomes ``z`` (a column masked
  by a ``-inf`` bias becomes ``ABSENT_LOGIT``: probability exactly 0, finite products).
* ``stats_``: per-row partial statistics (see ``partials.py``); ``x`` becomes ``z - m``
  and the second buffer ``e`` holds ``exp(z - m)``.
* ``grad_``: ``dL/dlogits = (g_lp (1[j = y] - p_j) - g_H p_j (z_j - mu)) / T`` in place.

Two ``[c, V]`` fp32 buffers at most; every operation is in place or a row reduction. The
row dot product ``sum_j e_j (z_j - m)`` runs as a batched matrix product, which needs no
third buffer.
"""

from __future__ import annotations

import torch

from agpo_kernels.partials import ABSENT_LOGIT


def prepare_(x: torch.Tensor, bias32: torch.Tensor | None, inv_t) -> torch.Tensor:
    if bias32 is not None:
        x += bias32
    if isinstance(inv_t, torch.Tensor):
        x *= inv_t.unsqueeze(1)
    elif inv_t != 1.0:
        x *= inv_t
    if bias32 is not None:  # a -inf bias masks its column: absent, not NaN (partials.ABSENT_LOGIT)
        x.clamp_(min=ABSENT_LOGIT)
    return x


def _target_hits(y_local: torch.Tensor, V: int):
    hit = (y_local >= 0) & (y_local < V)
    return hit, y_local.clamp(0, V - 1).unsqueeze(1)


def stats_(x: torch.Tensor, e: torch.Tensor, y_local: torch.Tensor) -> torch.Tensor:
    """``x`` holds ``z``; returns ``[4, 1, c]`` partials ``(m, s, a, zy)`` of these columns.
    Afterwards ``x = z - m`` and ``e = exp(z - m)``."""
    hit, col = _target_hits(y_local, x.shape[1])
    zy = torch.where(hit, x.gather(1, col).squeeze(1), torch.zeros_like(y_local, dtype=x.dtype))
    m = x.amax(dim=1)
    x -= m.unsqueeze(1)
    torch.exp(x, out=e)
    s = e.sum(1)
    a = torch.bmm(e.unsqueeze(1), x.unsqueeze(2)).view(-1)
    return torch.stack([m, s, a, zy]).unsqueeze(1)


def grad_(x: torch.Tensor, e: torch.Tensor, shift: torch.Tensor | None, lse, mu, g_lp, g_h,
          y_local: torch.Tensor, inv_t) -> torch.Tensor:
    """``x`` holds ``z - shift`` (shift None: 0); returns ``dL/dlogits`` in ``x``, using
    ``e`` as scratch for ``p``."""
    sh = 0.0 if shift is None else shift
    p = torch.sub(x, (lse - sh).unsqueeze(1), out=e).exp_()
    x -= (mu - sh).unsqueeze(1)
    x *= g_h.unsqueeze(1)
    x += g_lp.unsqueeze(1)
    x *= p
    x.neg_()
    hit, col = _target_hits(y_local, x.shape[1])
    x.scatter_add_(1, col, torch.where(hit, g_lp, torch.zeros_like(g_lp)).unsqueeze(1))
    return prepare_(x, None, inv_t)
