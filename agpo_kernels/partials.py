"""Per-row log-sum-exp statistics over parts of the vocabulary, and how parts are merged.

A part (a Triton vocabulary split, or one rank's shard of a vocabulary-parallel head)
yields, per row, ``m`` (max logit), ``s = sum exp(z - m)``, ``a = sum exp(z - m)(z - m)``
and ``zy`` (the target logit if the target falls in the part, else 0). Parts merge
exactly: ``lse = M + log S``, ``H = log S - A / S`` with everything relative to the
overall max, so nothing large is subtracted (|z| ~ 1e4 stays accurate).

Vocabulary parallelism (``process_group``): rank ``r`` of ``tp`` holds rows
``[r V_local, (r + 1) V_local)`` of the head; its parts are all-gathered and merged, after
which every rank has the statistics of the full vocabulary.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from agpo_kernels.inputs import fail

# The scaled logit of an absent column: a vocabulary entry masked by a ``-inf`` bias, or a
# column past the end of a tile. Every engine raises its scaled logits to at least this, so
# exp(z - m) is exactly 0 there while 0 * (z - m) stays 0, never 0 * -inf.
ABSENT_LOGIT = -1.0e30


def merge_partials(part: torch.Tensor):
    """``part [4, K, N]`` -> ``(lse, entropy, zy)``, each ``[N]`` fp32."""
    m, s, a, zy = part.unbind(0)
    top = m.max(dim=0).values
    d = m - top
    scale = torch.exp(d)
    s_tot = (s * scale).sum(0)
    # scale * d before * s: a part with only absent columns has d ~ -1e30 and scale 0
    a_tot = (scale * a + (scale * d) * s).sum(0)
    log_s = torch.log(s_tot)
    return top + log_s, log_s - a_tot / s_tot, zy.sum(0)


def shard(process_group, vocab_local: int) -> tuple[int, int]:
    """``(vocab offset of this rank, full vocabulary size)``."""
    if process_group is None:
        return 0, vocab_local
    if not dist.is_available() or not dist.is_initialized():
        fail("process_group", "given, but torch.distributed is not initialised")
    rank, world = dist.get_rank(process_group), dist.get_world_size(process_group)
    return rank * vocab_local, world * vocab_local


def gather_partials(part: torch.Tensor, process_group) -> torch.Tensor:
    """``[4, K, N]`` of this rank -> ``[4, K * tp, N]`` of all ranks (identity without a group)."""
    if process_group is None:
        return part
    world = dist.get_world_size(process_group)
    bufs = [torch.empty_like(part) for _ in range(world)]
    dist.all_gather(bufs, part.contiguous(), group=process_group)
    return torch.cat(bufs, dim=1)
