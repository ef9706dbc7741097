"""Input checks and layout handling shared by every implementation.

The public functions accept a padded layout (``[B, T, ...]`` with a mask) or a packed one
(``[N, ...]`` with flash-attn style ``cu_seqlens``). Both are reduced here to one flat,
per-token form: only the tokens that count are kept (masked tokens are never projected
onto the vocabulary), and per-sequence values (advantage, eps, temperature) are expanded
to per-token values through a sequence index. Every implementation then works on that
form, so the checks and the aggregation weights are written once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def fail(arg: str, msg: str) -> None:
    raise ValueError(f"{arg}: {msg}")


def check_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Checks the projection operands: dtypes, devices and the hidden size."""
    if not isinstance(hidden, torch.Tensor) or hidden.dtype not in FLOAT_DTYPES:
        fail("hidden", f"expected a float32/bfloat16/float16 tensor, got {getattr(hidden, 'dtype', type(hidden))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        fail("weight", f"expected a 2-D [V, D] tensor, got shape {tuple(getattr(weight, 'shape', ()))}")
    if weight.dtype != hidden.dtype:
        fail("weight", f"dtype {weight.dtype} differs from hidden's {hidden.dtype}; cast one of them")
    if hidden.shape[-1] != weight.shape[1]:
        fail("weight", f"hidden size {weight.shape[1]} differs from hidden's last dim {hidden.shape[-1]}")
    if weight.device != hidden.device:
        fail("weight", f"on {weight.device} but hidden is on {hidden.device}")
    if weight.shape[0] == 0:
        fail("weight", "vocabulary size is 0")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            fail("bias", f"expected shape [{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            fail("bias", f"expected {hidden.dtype} on {hidden.device}, got {bias.dtype} on {bias.device}")


def check_targets(targets: torch.Tensor, vocab: int) -> torch.Tensor:
    if not isinstance(targets, torch.Tensor) or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        fail("targets", f"expected an integer (int64) tensor, got {getattr(targets, 'dtype', type(targets))}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        fail("targets", f"token ids must lie in [0, {vocab}); got min {int(targets.min())}, "
                        f"max {int(targets.max())}")
    return targets.long()


def check_finite(name: str, t: torch.Tensor) -> None:
    if not torch.isfinite(t).all():
        fail(name, "contains NaN or inf; drop or repair those entries before the loss")


def temperature_rows(temperature, shape: torch.Size, device, name: str = "temperature") -> torch.Tensor | float:
    """A float, or a tensor broadcastable to ``shape``; returns a float or an fp32 tensor of ``shape``."""
    if isinstance(temperature, torch.Tensor):
        t = temperature.detach().to(device=device, dtype=torch.float32)
        try:
            t = torch.broadcast_to(t, shape)
        except RuntimeError:
            fail(name, f"shape {tuple(temperature.shape)} does not broadcast to {tuple(shape)}")
        if not torch.isfinite(t).all() or (t.numel() and bool((t <= 0).any())):
            fail(name, "must be finite and > 0")
        return t
    temperature = float(temperature)
    if not (temperature > 0 and temperature != float("inf")):
        fail(name, f"must be finite and > 0, got {temperature}")
    return temperature


@dataclass
class FlatLoss:
    """Per-token view of one ``agpo_loss`` call (only the tokens that count)."""

    hidden: torch.Tensor          # [N, D] selected rows (differentiable view/gather)
    targets: torch.Tensor         # [N] int64
    old_logp: torch.Tensor        # [N] fp32
    ref_logp: torch.Tensor | None # [N] fp32
    is_weight: torch.Tensor | None  # [N] fp32 importance weight of the surrogate (None: 1)
    adv: torch.Tensor             # [N] fp32 (per-sequence value expanded)
    eps_low: torch.Tensor         # [N] fp32
    eps_high: torch.Tensor        # [N] fp32
    temperature: torch.Tensor | float  # [N] fp32 or a float
    weight: torch.Tensor          # [N] fp32 aggregation weights
    index: torch.Tensor           # [N] position of each row in the caller's token layout
    out_shape: tuple              # caller's token layout shape ([B, T] or [N_total])


def _per_seq(name: str, value, num_seqs: int, device, positive: bool) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        t = value.detach().to(device=device, dtype=torch.float32).reshape(-1)
        if t.numel() == 1:
            t = t.expand(num_seqs)
        if t.numel() != num_seqs:
            fail(name, f"expected a float or a tensor of {num_seqs} per-sequence values, got shape "
                       f"{tuple(value.shape)}")
    else:
        t = torch.full((num_seqs,), float(value), dtype=torch.float32, device=device)
    check_finite(name, t)
    if positive and bool((t <= 0).any()):
        fail(name, "must be > 0")
    return t


def _per_token(name: str, t: torch.Tensor | None, shape: torch.Size, device) -> torch.Tensor | None:
    if t is None:
        return None
    if tuple(t.shape) != tuple(shape):
        fail(name, f"expected shape {tuple(shape)} (like targets), got {tuple(t.shape)}")
    return t.detach().to(device=device, dtype=torch.float32)


def flatten_loss_inputs(hidden, weight, targets, advantages, old_logp, *, mask, cu_seqlens,
                        eps_low, eps_high, temperature, ref_logp, beta, loss_agg,
                        kl_estimator="k3", dual_clip=None, max_len=None, is_weight=None) -> FlatLoss:
    """Checks every ``agpo_loss`` argument and returns the flat per-token form."""
    device = hidden.device
    if kl_estimator not in KL_ESTIMATORS:
        fail("kl_estimator", f"unknown {kl_estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")
    if dual_clip is not None and not float(dual_clip) > 1.0:
        fail("dual_clip", f"must be a float > 1 or None, got {dual_clip}")
    if not isinstance(targets, torch.Tensor):
        fail("targets", "expected a tensor")
    if cu_seqlens is None:  # padded layout
        if hidden.dim() != 3:
            fail("hidden", f"padded layout expects [B, T, D], got shape {tuple(hidden.shape)}; "
                           "pass cu_seqlens for the packed [N, D] layout")
        B, T = hidden.shape[:2]
        if tuple(targets.shape) != (B, T):
            fail("targets", f"expected shape {(B, T)}, got {tuple(targets.shape)}")
        num_seqs, tok_shape = B, (B, T)
        seq_of_tok = torch.arange(B, device=device).repeat_interleave(T)
        default_len = T
    else:
        if hidden.dim() != 2:
            fail("hidden", f"packed layout (cu_seqlens given) expects [N, D], got {tuple(hidden.shape)}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            fail("cu_seqlens", "expected an int32 tensor [S+1] of cumulative sequence lengths")
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        N = hidden.shape[0]
        lens = cu[1:] - cu[:-1]
        if int(cu[0]) != 0 or int(cu[-1]) != N or bool((lens < 0).any()):
            fail("cu_seqlens", f"must start at 0, be non-decreasing and end at N={N}")
        if tuple(targets.shape) != (N,):
            fail("targets", f"expected shape ({N},), got {tuple(targets.shape)}")
        num_seqs, tok_shape = lens.numel(), (N,)
        seq_of_tok = torch.arange(num_seqs, device=device).repeat_interleave(lens)
        default_len = int(lens.max()) if num_seqs else 0
    if hidden.numel() == 0 or num_seqs == 0:
        fail("hidden", "empty input: no tokens")
    targets = check_targets(targets, weight.shape[0])
    old = _per_token("old_logp", old_logp, tok_shape, device)
    ref = _per_token("ref_logp", ref_logp, tok_shape, device)
    isw = _per_token("is_weight", is_weight, tok_shape, device)
    if mask is None:
        keep = torch.ones(tok_shape, dtype=torch.bool, device=device)
    else:
        if tuple(mask.shape) != tuple(tok_shape):
            fail("mask", f"expected shape {tuple(tok_shape)} (like targets), got {tuple(mask.shape)}")
        keep = mask.to(device=device).bool()
    keep = keep.reshape(-1)
    adv = _per_seq("advantages", advantages, num_seqs, device, positive=False)
    e_lo = _per_seq("eps_low", eps_low, num_seqs, device, positive=True)
    e_hi = e_lo if eps_high is None else _per_seq("eps_high", eps_high, num_seqs, device, positive=True)
    temp = temperature
    if isinstance(temperature, torch.Tensor):
        temp = _per_seq("temperature", temperature, num_seqs, device, positive=True)
    else:
        temperature_rows(temperature, torch.Size([1]), device)
    if loss_agg not in LOSS_AGGS:
        fail("loss_agg", f"unknown {loss_agg!r}; choose one of {', '.join(LOSS_AGGS)}")
    if beta < 0:
        fail("beta", f"must be >= 0, got {beta}")
    if beta > 0 and ref is None:
        fail("ref_logp", "beta > 0 needs reference log-probs (or set beta=0)")

    index = keep.nonzero().squeeze(1)
    seq = seq_of_tok[index]
    old_flat = old.reshape(-1)[index]
    check_finite("old_logp", old_flat)
    ref_flat = None
    if ref is not None:
        ref_flat = ref.reshape(-1)[index]
        check_finite("ref_logp", ref_flat)
    isw_flat = None
    if isw is not None:
        isw_flat = isw.reshape(-1)[index]
        check_finite("is_weight", isw_flat)
        if bool((isw_flat < 0).any()):
            fail("is_weight", "importance weights must be >= 0")

    # Aggregation weights (SPEC section 2).
    seq_len = torch.bincount(seq, minlength=num_seqs).to(torch.float32)
    if loss_agg == "token-mean":
        w = torch.full_like(old_flat, 1.0 / max(index.numel(), 1))
    elif loss_agg == "seq-mean-token-mean":
        nonempty = max(int((seq_len > 0).sum()), 1)
        w = 1.0 / (seq_len[seq] * nonempty)
    else:
        L = float(default_len if max_len is None else max_len)
        if L <= 0:
            fail("max_len", f"must be > 0, got {L}")
        w = torch.full_like(old_flat, 1.0 / (L * num_seqs))

    flat_h = hidden.reshape(-1, hidden.shape[-1])
    sel_h = flat_h if index.numel() == flat_h.shape[0] else flat_h.index_select(0, index)
    return FlatLoss(
        hidden=sel_h, targets=targets.reshape(-1)[index], old_logp=old_flat, ref_logp=ref_flat, is_weight=isw_flat,
        adv=adv[seq], eps_low=e_lo[seq], eps_high=e_hi[seq],
        temperature=temp[seq] if isinstance(temp, torch.Tensor) else float(temp),
        weight=w, index=index, out_shape=tuple(tok_shape),
    )


def scatter_tokens(values: torch.Tensor, index: torch.Tensor, shape: tuple) -> torch.Tensor:
    """Puts per-row values back into the caller's token layout (0 where masked)."""
    out = torch.zeros(math.prod(shape), dtype=values.dtype, device=values.device)
    out[index] = values
    return out.reshape(shape)
