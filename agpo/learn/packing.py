"""Padding-free micro-batches: whole sequences packed into one row, sized by real tokens.

A rollout batch (``SequenceBatch``) holds left-padded prompts ``[R, P]`` and right-padded
completions ``[R, C]``; run as is, every row costs ``P + C`` positions whatever its real
length, and RL completions vary wildly in length. ``PackedBatch`` lays the chosen rows'
real tokens end to end in one row of ``L = sum(p_i + c_i)`` positions, with
``position_ids`` restarting at 0 for each sequence and no attention mask: transformers
reads the restarts as sequence boundaries (block-diagonal causal attention with SDPA or
eager attention; varlen kernels with flash-attn), so each sequence attends to itself only
and sees the positions it would see alone. The hidden states that predict completion
tokens are gathered to ``[N, D]`` and go to the fused head in its packed layout
(``cu_seqlens`` over completion tokens); no ``[B, T, D]`` tensor is formed.

``micro_batches`` splits a batch's rows into micro-batches of at most ``max_tokens``
real tokens (packed) or padded positions (padded), balanced so that they do similar
work: longest-processing-time assignment of rows to the fewest bins that fit.
"""

from __future__ import annotations

import torch

from agpo.learn.batches import PackedBatch, SequenceBatch


def pack(batch: SequenceBatch) -> PackedBatch:
    """All rows of ``batch`` (usually one micro-batch's ``batch.select(idx)``) packed."""
    plen = batch.prompt_mask.sum(1).tolist()
    clen = batch.completion_mask.sum(1).tolist()
    P = batch.prompt_ids.shape[1]
    ids, pos, predict = [], [], []
    offset = 0
    for r, (p, c) in enumerate(zip(plen, clen)):
        if c == 0:  # nothing to predict: the row counts as a sequence but costs no tokens
            continue
        row = torch.cat([batch.prompt_ids[r, P - p:], batch.completion_ids[r, :c]])
        ids.append(row)
        pos.append(torch.arange(p + c))
        predict.append(torch.arange(offset + p - 1, offset + p - 1 + c))
        offset += p + c
    if ids:
        input_ids, position_ids, predict = torch.cat(ids), torch.cat(pos), torch.cat(predict)
    else:
        input_ids = position_ids = predict = torch.zeros(0, dtype=torch.long)
    token_mask = batch.completion_mask.bool()
    cu = torch.zeros(len(clen) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(clen, dtype=torch.int32).cumsum(0)
    return PackedBatch(input_ids=input_ids.unsqueeze(0), position_ids=position_ids.unsqueeze(0), predict=predict,
                       targets=batch.completion_ids[token_mask], cu_seqlens=cu, temperature=batch.temperature,
                       token_mask=token_mask)


def _balanced(sizes: list[int], capacity: int) -> list[list[int]]:
    """Items (indices into ``sizes``) in the fewest bins of at most ``capacity`` that
    longest-processing-time assignment finds (an item above ``capacity`` alone in a bin),
    each bin's items in ascending index order."""
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    big = [i for i in order if sizes[i] > capacity]
    rest = [i for i in order if sizes[i] <= capacity]
    total = sum(sizes[i] for i in rest)
    k = max(1, -(-total // capacity)) if rest else 0
    while rest:
        bins, loads = [[] for _ in range(k)], [0] * k
        for i in rest:
            b = min(range(k), key=lambda j: (loads[j], j))
            bins[b].append(i)
            loads[b] += sizes[i]
        if max(loads) <= capacity:
            break
        k += 1
    else:
        bins = []
    return [sorted(b) for b in bins if b] + [[i] for i in big]


def micro_batches(batch: SequenceBatch, max_tokens: int, *, packed: bool = True) -> list[torch.Tensor]:
    """Row-index groups of ``batch`` for micro-batching.

    ``packed``: each group's real tokens (prompt + completion) sum to at most ``max_tokens``
    (a longer row gets a group of its own), and the groups are balanced. Padded: each
    group's padded size ``rows x (widest prompt + widest completion)`` stays within
    ``max_tokens``; rows are sorted by length so that padding stays small."""
    plen = batch.prompt_mask.sum(1)
    clen = batch.completion_mask.sum(1)
    if packed:
        return [torch.tensor(g) for g in _balanced((plen + clen).tolist(), max_tokens)]
    order = torch.argsort(plen + clen, descending=True, stable=True).tolist()
    groups, cur, wp, wc = [], [], 0, 0
    for i in order:
        np_, nc = max(wp, int(plen[i])), max(wc, int(clen[i]))
        if cur and (len(cur) + 1) * (np_ + nc) > max_tokens:
            groups.append(torch.tensor(cur))
            cur, np_, nc = [], int(plen[i]), int(clen[i])
        cur.append(i)
        wp, wc = np_, nc
    if cur:
        groups.append(torch.tensor(cur))
    return groups


def processed_tokens(batch: SequenceBatch, groups: list[torch.Tensor], *, packed: bool) -> tuple[int, int]:
    """``(real, processed)`` token counts of one pass over ``groups``: real prompt +
    completion tokens, and the positions the decoder runs (real ones when packed; the
    padded ``rows x width`` of each trimmed micro-batch otherwise)."""
    plen, clen = batch.prompt_mask.sum(1), batch.completion_mask.sum(1)
    real = int((plen + clen).sum())
    if packed:  # rows with an empty completion are not run at all
        return real, int(((plen + clen) * (clen > 0)).sum())
    return real, sum(batch.select(g).padded_tokens() for g in groups)
