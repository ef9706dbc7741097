"""``agpo_loss`` / ``AGPOLoss``: the fused AGPO policy loss from hidden states.

LM-head projection, token log-prob, entropy, KL to a reference and the clipped surrogate
with per-sequence adaptive eps and temperature, without ``[tokens x vocab]`` logits
(docs/algorithm.md#the-policy-loss). Padded (``[B, T, D]`` + mask) and packed (``[N, D]`` + ``cu_seqlens``)
layouts; masked tokens are never projected (``validate=True``).
"""

from __future__ import annotations

import torch
from torch import nn

from agpo_kernels.chunks import default_memory_budget
from agpo_kernels.dispatch import engine, resolve_impl
from agpo_kernels.epilogue import LossOptions
from agpo_kernels.fused_loss import fused_agpo_loss
from agpo_kernels.inputs import check_bias_values, check_compute_dtype, check_head, fail, loss_rows, scalar
from agpo_kernels.partials import shard
from agpo_kernels.precision import no_autocast, resolve_compute_dtype
from agpo_kernels.recompute import linear_stats_recompute
from agpo_kernels.reference import linear_stats_reference
from agpo_kernels.surrogate import agpo_objective

BACKWARDS = ("forward", "recompute")


def agpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, advantages,
              old_logp: torch.Tensor | None = None, *, mask: torch.Tensor | None = None,
              cu_seqlens: torch.Tensor | None = None, eps_low=0.2, eps_high=None, temperature=1.0,
              ref_logp: torch.Tensor | None = None, beta: float = 0.0, kl_estimator: str = "k3",
              entropy_coef: float = 0.0, dual_clip: float | None = None, loss_agg: str = "token-mean",
              bias: torch.Tensor | None = None, impl: str = "auto", max_len: int | None = None,
              memory_budget: int | None = None, kl_ratio_weight: bool = False,
              is_weight: torch.Tensor | None = None, backward: str = "forward",
              compute_dtype: torch.dtype | None = None, validate: bool = True, process_group=None,
              kl_clamp: float | None = None, count_empty_seqs: bool | None = None,
              entropy_agg: str | None = None):
    """AGPO / GRPO clipped policy loss computed from hidden states.

    Args:
        hidden: ``[B, T, D]`` (padded) or ``[N, D]`` with ``cu_seqlens`` (packed); a strided
            view (e.g. the completion slice of a prompt+completion forward) is fine.
        weight: ``[V, D]`` LM-head weight (or this rank's ``[V / tp, D]`` shard, see
            ``process_group``); ``bias``: optional ``[V]``, ``-inf`` on a masked vocabulary
            entry (absent from the softmax and the entropy, zero gradient).
        targets: token ids ``[B, T]`` or ``[N]``: the sampled response tokens.
        advantages: per-sequence ``[B]`` / ``[S]`` (a float broadcasts).
        old_logp: ``[B, T]`` / ``[N]`` log-probs of the behaviour policy (at the same
            temperature). None: on-policy (one update per rollout): the ratio is 1 and
            ``old_logp`` is the detached current log-prob, no scoring pass needed.
        ref_logp: likewise for the reference policy (needed if beta > 0).
        is_weight: ``[B, T]`` / ``[N]`` per-token importance weights (detached; None = 1)
            multiplying the clipped surrogate only, ``l = -is_weight * surr + beta * kl -
            entropy_coef * H``: truncated importance sampling of an off-policy rollout
            engine (e.g. vLLM's log-probs differing from the trainer's).
        mask: ``[B, T]`` / ``[N]``; 0 drops a token (prompt, padding).
        cu_seqlens: int32 ``[S+1]`` sequence boundaries of the packed layout.
        eps_low, eps_high: clip range, a float or a per-sequence tensor (eps_high None:
            equal to eps_low).
        temperature: a float or a per-sequence tensor; logits are divided by it.
        beta, kl_estimator: weight and estimator ("k1", "k2", "k3") of the reference KL;
            ``kl_ratio_weight=True`` multiplies each token's KL by its importance ratio,
            gradient through the ratio included (off-policy bias correction, as TRL's
            ``use_bias_correction_kl``); ``kl_clamp=c`` clamps each token's KL to
            ``[-c, c]`` with no gradient where it binds (verl's and OpenRLHF's k3 use
            ``c = 10``; None, the default: unbounded).
        entropy_coef: weight of the entropy bonus, aggregated like the loss (verl) unless
            ``entropy_agg`` names another mode (TRL and OpenRLHF: "token-mean");
            dual_clip: c > 1 caps the loss of negative-advantage tokens at ``-c A`` (None: off).
        loss_agg: "token-mean", "seq-mean-token-mean" or "seq-mean-token-sum-norm"
            (Dr. GRPO, normalised by ``max_len``: default the padded length, or the
            longest packed sequence).
        count_empty_seqs: whether a sequence with no unmasked token counts in the
            sequence divisor of the two ``seq-mean`` modes. None (default): each mode's
            convention, False for ``seq-mean-token-mean`` (an empty sequence has no mean:
            verl's ``agg_loss``, OpenRLHF) and True for ``seq-mean-token-sum-norm`` (its
            divisor ``max_len * sequences`` is a constant by design: TRL's ``dr_grpo``).
        impl: "auto" (Triton on a CUDA device where it works, else torch), "torch",
            "triton" or "reference" (naive eager).
        backward: "forward" (default: gradients formed during the forward call, 6NDV; the
            backward only scales them, and runs once per call) or "recompute" (O(N) saved
            statistics, logits recomputed in the backward, 8NDV).
        memory_budget: bytes of scratch for the row chunks (default: 256 MiB on CPU; on
            CUDA room for max(1024, N/16) rows, ``chunks.default_memory_budget``); extra
            memory is this plus O(N) per-token values, beyond the inputs and returned gradients.
        compute_dtype: dtype of the GEMMs (default: the autocast dtype when autocast is on,
            else hidden's). A bf16 hidden with an fp32 weight runs bf16 GEMMs (one bf16
            copy of the weight for the call); gradients come back in each input's dtype.
        validate: check values (id ranges, NaN, signs) and drop masked tokens before the
            projection, at the cost of device-to-host syncs. False: no host sync at all
            (CUDA graphs, ``torch.compile``); masked positions are then projected with
            weight 0 (their hidden states must be finite) and inputs are trusted.
        process_group: vocabulary-parallel head: each rank passes its ``W[V/tp, D]`` shard
            (rank r holds rows ``[r V/tp, (r+1) V/tp)``) and the same hidden states and
            targets; per-row statistics are all-gathered, ``dh`` is all-reduced, ``dW`` is
            the rank's shard. Results equal the unsharded head.

    Returns:
        ``(loss, metrics)``: a scalar loss (differentiable with respect to hidden, weight
        and bias) and a dict with detached per-token ``logp`` and ``entropy`` (shaped like
        targets, 0 where masked) and scalars ``clip_frac``, ``ratio_mean``, ``kl_mean``,
        ``entropy_mean`` (means over unmasked tokens).
    """
    check_head(hidden, weight, bias)
    check_compute_dtype(compute_dtype)
    if backward not in BACKWARDS:
        fail("backward", f"unknown {backward!r}; choose 'forward' or 'recompute'")
    v_off, vocab = shard(process_group, weight.shape[0])
    rows = loss_rows(hidden, vocab, targets, advantages, old_logp, mask=mask, cu_seqlens=cu_seqlens,
                     eps_low=eps_low, eps_high=eps_high, temperature=temperature, ref_logp=ref_logp,
                     is_weight=is_weight, beta=beta, loss_agg=loss_agg, kl_estimator=kl_estimator,
                     dual_clip=dual_clip, max_len=max_len, validate=validate,
                     count_empty_seqs=count_empty_seqs, entropy_agg=entropy_agg)
    if kl_clamp is not None and not scalar("kl_clamp", kl_clamp) > 0:
        fail("kl_clamp", f"must be a float > 0 or None, got {kl_clamp}")
    if validate:
        projected = rows.targets if rows.index is None else rows.targets[rows.index]
        check_bias_values(bias, projected, rows.index, rows.out_shape, v_off, process_group)
    opts = LossOptions(beta=float(beta), kl_estimator=kl_estimator, entropy_coef=scalar("entropy_coef", entropy_coef),
                       dual_clip=None if dual_clip is None else float(dual_clip),
                       kl_ratio_weight=bool(kl_ratio_weight),
                       kl_clamp=None if kl_clamp is None else float(kl_clamp))
    impl = resolve_impl(impl, hidden.device)
    cd = resolve_compute_dtype(hidden, compute_dtype)
    if memory_budget is None:
        budget = default_memory_budget(hidden.device, rows.n_rows, weight.shape[0], weight.shape[1])
    else:
        budget = int(memory_budget)
    if budget <= 0:
        fail("memory_budget", f"must be > 0 bytes, got {memory_budget}")
    if impl == "reference" and process_group is not None:
        fail("process_group", "impl='reference' does not shard the vocabulary; use 'torch' or 'triton'")
    with no_autocast(hidden.device):
        if impl != "reference" and backward == "forward":
            loss, sums, out = fused_agpo_loss(hidden, weight, bias, rows, opts, engine=engine(impl),
                                              compute_dtype=cd, memory_budget=budget, process_group=process_group)
            return loss, _metrics(sums, out, rows)
        return _autograd_loss(rows, weight, bias, opts, impl, cd, budget, process_group)


def _metrics(sums, out, rows):
    n = rows.n_tokens.clamp(min=1.0)
    return {"logp": out[1].view(rows.out_shape), "entropy": out[2].view(rows.out_shape),
            "clip_frac": sums[3] / n, "ratio_mean": sums[4] / n, "kl_mean": sums[5] / n, "entropy_mean": sums[2] / n}


def _autograd_loss(rows, weight, bias, opts, impl, cd, budget, process_group):
    """Reference and recompute designs: per-row (logp, H) by a differentiable map, then the
    O(N) objective by autograd (``surrogate.py``)."""
    h = rows.hidden.reshape(-1, rows.hidden.shape[-1])
    if rows.index is not None:
        h = h.index_select(0, rows.index)
    h, w = h.to(cd), weight.to(cd)
    b = None if bias is None else bias.to(cd)
    per_row = rows.per_row()
    temp = 1.0 / per_row["inv_t"]
    if impl == "reference":
        logp, ent = linear_stats_reference(h, w, b, per_row["targets"], temp)
    else:
        logp, ent = linear_stats_recompute(h, w, b, per_row["targets"], temp, engine=engine(impl),
                                           memory_budget=budget, process_group=process_group)
    loss, metrics = agpo_objective(logp, ent, per_row, opts, rows.n_tokens)
    logp, ent = logp.detach(), ent.detach()
    if per_row["keep"] is not None:
        kept = per_row["keep"] != 0
        logp, ent = torch.where(kept, logp, 0.0), torch.where(kept, ent, 0.0)
    for name, v in (("logp", logp), ("entropy", ent)):
        full = v.new_zeros(rows.targets.numel())
        metrics[name] = (full.index_put((rows.index,), v) if rows.index is not None else v).view(rows.out_shape)
    return loss, metrics


class AGPOLoss(nn.Module):
    """Holds the loss options; ``forward`` takes the per-batch tensors.

    Per-call ``eps_low``, ``eps_high`` and ``temperature`` (e.g. the adaptive
    controllers' per-group tensors) and any other option override the module's defaults.
    """

    def __init__(self, *, eps_low=0.2, eps_high=None, beta: float = 0.0, kl_estimator: str = "k3",
                 entropy_coef: float = 0.0, dual_clip: float | None = None,
                 loss_agg: str = "token-mean", temperature=1.0, impl: str = "auto",
                 max_len: int | None = None, memory_budget: int | None = None,
                 kl_ratio_weight: bool = False, backward: str = "forward",
                 compute_dtype: torch.dtype | None = None, validate: bool = True, process_group=None,
                 kl_clamp: float | None = None, count_empty_seqs: bool | None = None,
                 entropy_agg: str | None = None):
        super().__init__()
        self.options = dict(eps_low=eps_low, eps_high=eps_high, beta=beta, kl_estimator=kl_estimator,
                            entropy_coef=entropy_coef, dual_clip=dual_clip, loss_agg=loss_agg,
                            temperature=temperature, impl=impl, max_len=max_len,
                            memory_budget=memory_budget, kl_ratio_weight=kl_ratio_weight, backward=backward,
                            compute_dtype=compute_dtype, validate=validate, process_group=process_group,
                            kl_clamp=kl_clamp, count_empty_seqs=count_empty_seqs, entropy_agg=entropy_agg)

    def forward(self, hidden, weight, targets, advantages, old_logp=None, *, mask=None, cu_seqlens=None,
                ref_logp=None, bias=None, is_weight=None, **overrides):
        unknown = set(overrides) - set(self.options)
        if unknown:
            raise TypeError(f"AGPOLoss.forward got unknown options {sorted(unknown)}")
        opts = {**self.options, **overrides}
        return agpo_loss(hidden, weight, targets, advantages, old_logp, mask=mask, cu_seqlens=cu_seqlens,
                         ref_logp=ref_logp, bias=bias, is_weight=is_weight, **opts)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.options.items()
                         if not isinstance(v, torch.Tensor) and k != "process_group")
