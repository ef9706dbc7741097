"""The public functions' arguments: checks, and the layouts reduced to one per-position form.

Checks: every error names the argument. Checks on shapes, dtypes and devices read only
tensor metadata and always run; checks on values (id ranges, finiteness, signs) read tensor
contents, which on a GPU means a device-to-host synchronisation each, and run only with
``validate=True`` (the default).

Layouts: ``agpo_loss`` accepts a padded layout (``[B, T, ...]`` with a mask) or a packed one
(``[N, ...]`` with flash-attn style ``cu_seqlens``). Positions ``p`` in ``[0, M)`` are the
caller's token layout flattened; the rows that are projected onto the vocabulary are the
positions listed in ``index`` (all of them when ``index`` is None). Per-token values stay
``[M]`` and per-sequence values stay ``[S]``: kernels read them through ``index`` and the
sequence id of each position, so nothing is gathered or expanded per token up front.

With ``validate=True`` masked positions are dropped before the projection (``index`` from
``nonzero``, a host sync) and values are checked. With ``validate=False`` the call makes no
host synchronisation: every position is projected and a masked one only gets weight 0
(``keep``).

Imports nothing of the package: every other module may use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fail(arg: str, msg: str) -> None:
    raise ValueError(f"{arg}: {msg}")


def check_device(name: str, t, device: torch.device) -> None:
    """Tensors must live where ``hidden`` lives: nothing is moved between devices silently."""
    if isinstance(t, torch.Tensor) and t.device != device:
        fail(name, f"on {t.device} but hidden is on {device}; move it to {device} first")


def check_head(hidden, weight, bias) -> None:
    """The projection operands: float dtypes (they may differ: mixed precision), one device,
    matching hidden sizes."""
    if not isinstance(hidden, torch.Tensor) or hidden.dtype not in FLOAT_DTYPES:
        fail("hidden", f"expected a float32/bfloat16/float16 tensor, got {getattr(hidden, 'dtype', type(hidden))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        fail("weight", f"expected a 2-D [V, D] tensor, got shape {tuple(getattr(weight, 'shape', ()))}")
    if weight.dtype not in FLOAT_DTYPES:
        fail("weight", f"expected a float32/bfloat16/float16 tensor, got {weight.dtype}")
    if hidden.shape[-1] != weight.shape[1]:
        fail("weight", f"hidden size {weight.shape[1]} differs from hidden's last dim {hidden.shape[-1]}")
    check_device("weight", weight, hidden.device)
    if weight.shape[0] == 0:
        fail("weight", "vocabulary size is 0")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            fail("bias", f"expected shape [{weight.shape[0]}], got {tuple(getattr(bias, 'shape', ()))}")
        if bias.dtype not in FLOAT_DTYPES:
            fail("bias", f"expected a float tensor, got {bias.dtype}")
        check_device("bias", bias, hidden.device)


def check_compute_dtype(compute_dtype) -> None:
    if compute_dtype is not None and compute_dtype not in FLOAT_DTYPES:
        fail("compute_dtype", f"expected torch.float32, torch.bfloat16, torch.float16 or None, got {compute_dtype}")


def check_int_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        fail(name, f"expected an integer (int64) tensor, got {getattr(t, 'dtype', type(t))}")


def check_id_range(name: str, ids: torch.Tensor, vocab: int) -> None:
    """Value check (syncs): every id in ``[0, vocab)``."""
    if ids.numel():
        lo, hi = torch.aminmax(ids)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= vocab:
            fail(name, f"token ids must lie in [0, {vocab}); got min {lo}, max {hi}")


def check_finite(name: str, t: torch.Tensor, *, nonneg: bool = False, positive: bool = False) -> None:
    """Value check (syncs): finite, and optionally >= 0 or > 0."""
    if t.numel() == 0:
        return
    if not bool(torch.isfinite(t).all()):
        fail(name, "contains NaN or inf; drop or repair those entries before the loss")
    if positive and bool((t <= 0).any()):
        fail(name, "must be > 0")
    if nonneg and bool((t < 0).any()):
        fail(name, "must be >= 0")


def check_bias_values(bias: torch.Tensor | None, targets: torch.Tensor, positions: torch.Tensor | None,
                      shape: tuple, v_off: int, process_group=None) -> None:
    """Value check (syncs): ``bias`` may be ``-inf`` (a masked vocabulary entry: absent from
    the softmax), never NaN or ``+inf``; no target may be a masked entry (its log-prob is
    -inf: such a token cannot have been sampled). ``targets [N]`` are the projected rows'
    full-vocabulary ids, ``positions [N]`` their flat positions in the caller's ``shape``
    (None: row i is position i); ``v_off``: this rank's first id of a vocabulary-parallel
    head, whose ranks agree on the verdict."""
    if bias is None:
        return
    b = bias.detach()
    local = targets - v_off
    bad = (local >= 0) & (local < b.numel())
    bad &= torch.isneginf(b[local.clamp(0, b.numel() - 1)])
    counts = torch.stack([(torch.isnan(b) | (b == math.inf)).sum(), bad.sum()])
    if process_group is not None:  # every rank reaches the same verdict (no rank left waiting)
        import torch.distributed as dist
        dist.all_reduce(counts, group=process_group)
    if int(counts[0]):
        fail("bias", "contains NaN or +inf; only -inf is allowed (it masks a vocabulary entry)")
    n_bad = counts[1]
    if int(n_bad) == 0:
        return
    if not bool(bad.any()):
        fail("targets", f"{int(n_bad)} target id(s) are masked by a -inf bias on another rank's vocabulary "
                        "shard; mask those positions or unmask the ids")
    i = int(bad.nonzero()[0, 0])
    pos = i if positions is None else int(positions[i])
    where = tuple(int(k) for k in torch.unravel_index(torch.tensor(pos), shape)) if len(shape) > 1 else pos
    fail("targets", f"position {where} has target id {int(targets[i])}, which the bias masks (-inf): "
                    f"{int(n_bad)} such position(s); mask them out or unmask the id")


def scalar(name: str, value, *, nonneg: bool = False) -> float:
    """``value`` as a finite float (``>= 0`` with ``nonneg``), or a ValueError naming ``name``."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        fail(name, f"expected a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or (nonneg and value < 0):
        fail(name, f"must be finite{' and >= 0' if nonneg else ''}, got {value}")
    return value


def scalar_positive(name: str, value) -> float:
    value = scalar(name, value)
    if not value > 0:
        fail(name, f"must be finite and > 0, got {value}")
    return value


def refuse_double_backward(op: str) -> None:
    """Called first in our backward passes: their gradients are not themselves differentiable."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{op}: double backward (create_graph=True, higher-order gradients) is not "
                           "supported by the fused LM head; use impl='reference' for that")


# -- layouts --------------------------------------------------------------------------------

KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


@dataclass
class LossRows:
    """Per-position view of one ``agpo_loss`` call (see the module docstring)."""

    hidden: torch.Tensor              # caller's [B, T, D] or [N, D] (possibly a strided view)
    index: torch.Tensor | None        # [N] int64 positions that are projected (None: all M)
    n_rows: int                       # N
    targets: torch.Tensor             # [M] int64
    seq: torch.Tensor                 # [M] int64 sequence of each position
    keep: torch.Tensor | None         # [M] fp32 1/0 weight mask (validate=False with a mask)
    old: torch.Tensor | None          # [M] fp32 behaviour log-probs (None: on-policy)
    ref: torch.Tensor | None          # [M] fp32 reference log-probs
    isw: torch.Tensor | None          # [M] fp32 importance weights of the surrogate (None: 1)
    adv: torch.Tensor                 # [S] fp32
    eps_low: torch.Tensor             # [S] fp32
    eps_high: torch.Tensor            # [S] fp32
    inv_t: torch.Tensor | float       # [S] fp32 or a float: 1 / temperature
    wseq: torch.Tensor                # [S] fp32 aggregation weight of each token of a sequence
    wseq_ent: torch.Tensor            # [S] fp32 the same for the entropy bonus (wseq unless entropy_agg)
    n_tokens: torch.Tensor            # [] fp32 number of tokens that count
    out_shape: tuple                  # caller's token layout ([B, T] or [N])

    def row_positions(self, r0: int, r1: int) -> torch.Tensor:
        """Positions of projected rows ``[r0, r1)``."""
        if self.index is not None:
            return self.index[r0:r1]
        return torch.arange(r0, r1, device=self.targets.device)

    def per_row(self):
        """Everything gathered per projected row (for the O(N) reference objective)."""
        idx = self.index if self.index is not None else slice(None)
        take = (lambda t: None if t is None else t[idx])
        s = self.seq[idx]
        return dict(targets=self.targets[idx], old=take(self.old), ref=take(self.ref), isw=take(self.isw),
                    keep=take(self.keep), adv=self.adv[s], eps_low=self.eps_low[s], eps_high=self.eps_high[s],
                    weight=self.wseq[s], weight_ent=self.wseq_ent[s],
                    inv_t=self.inv_t[s] if isinstance(self.inv_t, torch.Tensor) else self.inv_t)


def _per_seq(name, value, num_seqs, device, validate, positive=False) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        check_device(name, value, device)
        t = value.detach().to(torch.float32).reshape(-1)
        if t.numel() == 1:
            t = t.expand(num_seqs)
        if t.numel() != num_seqs:
            fail(name, f"expected a float or a tensor of {num_seqs} per-sequence values, got shape "
                       f"{tuple(value.shape)}")
        t = t.contiguous()
    else:
        value = scalar_positive(name, value) if positive else scalar(name, value)
        t = torch.full((num_seqs,), value, dtype=torch.float32, device=device)
    if validate:
        check_finite(name, t, positive=positive)
    return t


def _per_token(name, t, shape, device) -> torch.Tensor | None:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape):
        fail(name, f"expected shape {tuple(shape)} (like targets), got {tuple(getattr(t, 'shape', ()))}")
    check_device(name, t, device)
    # contiguous: the Triton row kernel reads per-token values with unit stride, and reshape
    # of a strided view (old_logp = stats[:, 0]) is still strided
    return t.detach().to(torch.float32).reshape(-1).contiguous()


def _layout(hidden, targets, cu_seqlens, validate):
    """Returns ``(num_seqs, token_shape, seq [M], lens [S], full_len)``: positions per sequence,
    and the padded length or the longest packed sequence (Dr. GRPO's default normaliser)."""
    device = hidden.device
    check_int_tensor("targets", targets)
    check_device("targets", targets, device)
    if cu_seqlens is None:
        if hidden.dim() != 3:
            fail("hidden", f"padded layout expects [B, T, D], got shape {tuple(hidden.shape)}; "
                           "pass cu_seqlens for the packed [N, D] layout")
        B, T = hidden.shape[:2]
        if tuple(targets.shape) != (B, T):
            fail("targets", f"expected shape {(B, T)}, got {tuple(targets.shape)}")
        seq = torch.arange(B, device=device).repeat_interleave(T)
        return B, (B, T), seq, torch.full((B,), float(T), device=device), float(T)
    if hidden.dim() != 2:
        fail("hidden", f"packed layout (cu_seqlens given) expects [N, D], got {tuple(hidden.shape)}")
    if (not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2
            or cu_seqlens.dtype not in (torch.int32, torch.int64)):
        fail("cu_seqlens", "expected an int32 or int64 tensor [S+1] of cumulative sequence lengths")
    check_device("cu_seqlens", cu_seqlens, device)
    N = hidden.shape[0]
    cu = cu_seqlens.to(torch.long)
    lens = cu[1:] - cu[:-1]
    if validate and (int(cu[0]) != 0 or int(cu[-1]) != N or bool((lens < 0).any())):
        fail("cu_seqlens", f"must start at 0, be non-decreasing and end at N={N}")
    if tuple(targets.shape) != (N,):
        fail("targets", f"expected shape ({N},), got {tuple(targets.shape)}")
    seq = torch.searchsorted(cu[1:], torch.arange(N, device=device), right=True).clamp_(max=lens.numel() - 1)
    lens = lens.to(torch.float32)
    return lens.numel(), (N,), seq, lens, lens.max()


def agg_weights(mode: str, lens: torch.Tensor, n_tok: torch.Tensor, max_len, count_empty_seqs) -> torch.Tensor:
    """``[S]`` weight of each counted token of each sequence under aggregation ``mode``
    (docs/algorithm.md#loss-aggregation), from the counted tokens per sequence ``lens``,
    their total ``n_tok`` and the Dr. GRPO length ``max_len``; no host sync. Sequences with
    no counted token are in the sequence divisor if ``count_empty_seqs`` (None: only under
    ``seq-mean-token-sum-norm``, whose divisor is a constant by design)."""
    S = lens.numel()
    if mode == "token-mean":
        return (1.0 / n_tok.clamp(min=1.0)).expand(S).contiguous()
    if count_empty_seqs is None:
        count_empty_seqs = mode == "seq-mean-token-sum-norm"
    n_seqs = float(S) if count_empty_seqs else (lens > 0).sum().clamp(min=1)
    if mode == "seq-mean-token-mean":
        return 1.0 / (lens.clamp(min=1.0) * n_seqs)
    return torch.ones(S, device=lens.device) / (max_len * n_seqs)


def loss_rows(hidden, vocab, targets, advantages, old_logp, *, mask, cu_seqlens, eps_low, eps_high,
              temperature, ref_logp, is_weight, beta, loss_agg, kl_estimator, dual_clip, max_len,
              validate, count_empty_seqs: bool | None = None, entropy_agg: str | None = None) -> LossRows:
    """Checks every ``agpo_loss`` argument and returns the per-position form."""
    device = hidden.device
    if kl_estimator not in KL_ESTIMATORS:
        fail("kl_estimator", f"unknown {kl_estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")
    if dual_clip is not None and not scalar("dual_clip", dual_clip) > 1.0:
        fail("dual_clip", f"must be a float > 1 or None, got {dual_clip}")
    if loss_agg not in LOSS_AGGS:
        fail("loss_agg", f"unknown {loss_agg!r}; choose one of {', '.join(LOSS_AGGS)}")
    if entropy_agg is not None and entropy_agg not in LOSS_AGGS:
        fail("entropy_agg", f"unknown {entropy_agg!r}; choose None (as loss_agg) or one of {', '.join(LOSS_AGGS)}")
    beta = scalar("beta", beta, nonneg=True)
    if beta > 0 and ref_logp is None:
        fail("ref_logp", "beta > 0 needs reference log-probs (or set beta=0)")
    if max_len is not None and not max_len > 0:
        fail("max_len", f"must be > 0, got {max_len}")
    if count_empty_seqs not in (None, True, False):
        fail("count_empty_seqs", f"expected None (the mode's convention), True or False, got {count_empty_seqs!r}")
    num_seqs, tok_shape, seq, lens, full_len = _layout(hidden, targets, cu_seqlens, validate)
    M = math.prod(tok_shape)
    if M == 0 or num_seqs == 0:
        fail("hidden", "empty input: no tokens")
    old = _per_token("old_logp", old_logp, tok_shape, device)
    ref = _per_token("ref_logp", ref_logp, tok_shape, device)
    isw = _per_token("is_weight", is_weight, tok_shape, device)
    keep = None
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(tok_shape):
            fail("mask", f"expected shape {tuple(tok_shape)} (like targets), got {tuple(getattr(mask, 'shape', ()))}")
        check_device("mask", mask, device)
        keep = mask.reshape(-1) != 0
    adv = _per_seq("advantages", advantages, num_seqs, device, validate)
    e_lo = _per_seq("eps_low", eps_low, num_seqs, device, validate, positive=True)
    e_hi = e_lo if eps_high is None else _per_seq("eps_high", eps_high, num_seqs, device, validate, positive=True)
    if isinstance(temperature, torch.Tensor):
        inv_t = 1.0 / _per_seq("temperature", temperature, num_seqs, device, validate, positive=True)
    else:
        inv_t = 1.0 / scalar_positive("temperature", temperature)
    flat_y = targets.reshape(-1).contiguous()  # unit stride, as the row kernel reads it

    index = None
    if validate:
        if keep is not None:
            index = keep.nonzero().squeeze(1)
            if index.numel() == M:
                index = None
        sel = (lambda t: t) if index is None else (lambda t: t[index])
        check_id_range("targets", sel(flat_y), vocab)
        for name, t, nonneg in (("old_logp", old, False), ("ref_logp", ref, False), ("is_weight", isw, True)):
            if t is not None:
                check_finite(name, sel(t), nonneg=nonneg)
        keepf = None if keep is None else keep.to(torch.float32)
        keep = None
    else:
        keepf = None if keep is None else keep.to(torch.float32)
        keep = keepf
        flat_y = flat_y.clamp(0, vocab - 1)  # memory-safe lookups; masked ids may be anything

    # Aggregation weights (docs/algorithm.md#loss-aggregation) per sequence, without host syncs.
    if keepf is not None:
        lens = torch.zeros(num_seqs, device=device).index_add_(0, seq, keepf)
    n_tok = lens.sum()
    L = float(max_len) if max_len is not None else full_len
    wseq = agg_weights(loss_agg, lens, n_tok, L, count_empty_seqs)
    wseq_ent = wseq if entropy_agg in (None, loss_agg) else agg_weights(entropy_agg, lens, n_tok, L, count_empty_seqs)
    n_rows = M if index is None else index.numel()
    return LossRows(hidden=hidden, index=index, n_rows=n_rows, targets=flat_y.long(), seq=seq, keep=keep,
                    old=old, ref=ref, isw=isw, adv=adv, eps_low=e_lo, eps_high=e_hi, inv_t=inv_t, wseq=wseq,
                    wseq_ent=wseq_ent, n_tokens=n_tok, out_shape=tuple(tok_shape))


@dataclass
class LogprobRows:
    """Rows of one ``linear_logprobs`` call that are projected."""

    hidden: torch.Tensor              # [N, D] (a view when nothing is dropped)
    targets: torch.Tensor             # [N] int64
    temperature: torch.Tensor | float # [N] fp32 or a float
    index: torch.Tensor | None        # [N] positions kept (None: all)
    keep: torch.Tensor | None         # [M] bool positions that count when every one is projected
    out_shape: tuple


def logprob_rows(hidden, targets, *, mask, ignore_index, temperature, vocab, validate) -> LogprobRows:
    """Checks ``linear_logprobs`` inputs; drops ignored/masked positions (validate=True) or
    keeps them all with a ``keep`` mask (validate=False: no host sync)."""
    device = hidden.device
    check_int_tensor("targets", targets)
    check_device("targets", targets, device)
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        fail("targets", f"expected shape {tuple(hidden.shape[:-1])} (hidden without its last dim), "
                        f"got {tuple(targets.shape)}")
    if targets.numel() == 0:
        fail("hidden", "empty input: no tokens")
    shape = tuple(targets.shape)
    if isinstance(temperature, torch.Tensor):
        check_device("temperature", temperature, device)
        try:
            temp = torch.broadcast_to(temperature.detach().to(torch.float32), shape).reshape(-1)
        except RuntimeError:
            fail("temperature", f"shape {tuple(temperature.shape)} does not broadcast to {shape}")
    else:
        temp = scalar_positive("temperature", temperature)
    y = targets.reshape(-1)
    keep = None if ignore_index is None else y != ignore_index
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != shape:
            fail("mask", f"expected shape {shape} (like targets), got {tuple(getattr(mask, 'shape', ()))}")
        check_device("mask", mask, device)
        m = mask.reshape(-1) != 0
        keep = m if keep is None else keep & m
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    index = None
    if validate:
        if keep is not None:
            index = keep.nonzero().squeeze(1)
            keep = None
            if index.numel() == y.numel():
                index = None
        if index is not None:
            flat_h, y = flat_h.index_select(0, index), y[index]
            if isinstance(temp, torch.Tensor):
                temp = temp[index]
        check_id_range("targets", y, vocab)
        if isinstance(temp, torch.Tensor):
            check_finite("temperature", temp, positive=True)
    else:
        y = y.clamp(0, vocab - 1)
    if isinstance(temp, torch.Tensor):
        temp = temp.contiguous()
    return LogprobRows(hidden=flat_h, targets=y.contiguous(), temperature=temp, index=index, keep=keep,
                       out_shape=shape)


def scatter_rows(values: torch.Tensor, index: torch.Tensor | None, keep: torch.Tensor | None,
                 shape: tuple) -> torch.Tensor:
    """Puts per-row values back into the caller's layout: 0 where dropped or not kept."""
    if index is not None:
        out = values.new_zeros(math.prod(shape))
        out = out.index_put((index,), values)
        return out.reshape(shape)
    if keep is not None:
        values = torch.where(keep, values, values.new_zeros(()))
    return values.reshape(shape)
