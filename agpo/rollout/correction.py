"""The rollout engine's log-probs against the trainer's: mismatch figures and truncated
importance sampling (TIS).

An engine samples token ``y_t`` from its own distribution ``mu`` (its kernels, its dtype,
after temperature and top-p) and reports ``log mu(y_t)``; the trainer scores the same token
under the current policy, ``log pi_old(y_t)`` (the fused head, fp32 log-softmax of
``z / T`` over the whole vocabulary). The clipped surrogate assumes samples from
``pi_old``; TIS reweights each token's surrogate by

    token: w_t = min(exp(log pi_old(y_t) - log mu(y_t)), cap)
    seq:   w_t = min(exp(sum_s log pi_old(y_s) - log mu(y_s)), cap)   (one weight per row)

passed to ``agpo_loss`` as ``is_weight`` (detached; it multiplies the surrogate only).
With top-p < 1 the engine's log-probs are those of the renormalised nucleus, so
``mu(y) >= pi_old(y)`` token by token even with identical weights (docs/rollout.md).
"""

from __future__ import annotations

import torch

TIS_MODES = ("off", "token", "seq")
RATIO_BAND = (0.9, 1.1)
"""A token's ratio ``pi_old / mu`` outside this band counts as mismatched."""


def resolve_tis(tis: str | None, engine: str, score_temperature: str) -> str:
    """The TIS mode a run uses: ``tis`` as given, else token-level for the vLLM engine
    (``off`` for HF ``generate``, which samples from the trainer's own distribution). Raises
    ValueError for TIS on log-probs scored at temperature 1: those are of the untempered
    policy, not of the one the engine sampled from."""
    if tis is None:
        tis = "token" if engine == "vllm" and score_temperature != "one" else "off"
    if score_temperature == "one" and tis != "off":
        raise ValueError(f"--tis {tis} with --score-temperature one: the trainer's log-probs are then of the "
                         "untempered policy, not of the one the engine sampled from; use --score-temperature sample "
                         "or --tis off")
    return tis


def importance_weights(old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor, *,
                       mode: str, cap: float) -> torch.Tensor | None:
    """``[R, C]`` float32 TIS weights (0 where masked), or None for ``mode="off"``."""
    if mode not in TIS_MODES:
        raise ValueError(f"--tis: expected one of {', '.join(TIS_MODES)}, got {mode!r}")
    if mode == "off":
        return None
    if not cap > 0:
        raise ValueError(f"--tis-cap: must be > 0, got {cap}")
    if old_logp.shape != engine_logp.shape or old_logp.shape != mask.shape:
        raise ValueError(f"importance_weights: shapes differ: old {tuple(old_logp.shape)}, engine "
                         f"{tuple(engine_logp.shape)}, mask {tuple(mask.shape)}")
    m = mask.bool()
    log_r = torch.where(m, old_logp.double() - engine_logp.double(), 0.0)
    if mode == "seq":
        log_r = log_r.sum(1, keepdim=True).expand_as(log_r)
    w = torch.exp(log_r).clamp(max=float(cap))  # exp overflow gives inf, clamped to the cap
    return torch.where(m, w, 0.0).float()


def mismatch_sums(old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor,
                  is_weight: torch.Tensor | None, cap: float) -> dict[str, float]:
    """Sums over this rank's masked tokens (all-reduce them, then ``mismatch_metrics``)."""
    m = mask.bool()
    d = (old_logp.double() - engine_logp.double())[m]
    ratio = torch.exp(d)
    out = {"tokens": float(m.sum()), "abs_diff": float(d.abs().sum()),
           "outside": float(((ratio < RATIO_BAND[0]) | (ratio > RATIO_BAND[1])).sum())}
    if is_weight is not None:
        w = is_weight.double()[m]
        out.update({"tis_weight": float(w.sum()), "tis_capped": float((w >= cap * (1 - 1e-6)).sum())})
    return out


def mismatch_metrics(sums: dict[str, float]) -> dict[str, float]:
    """``rollout/logprob_abs_diff_mean``: mean |log pi_old - log mu| per token;
    ``rollout/ratio_outside_frac``: fraction of tokens whose ratio leaves [0.9, 1.1];
    with TIS, the mean weight and the fraction of tokens at the cap."""
    n = max(sums["tokens"], 1.0)
    out = {"rollout/logprob_abs_diff_mean": sums["abs_diff"] / n, "rollout/ratio_outside_frac": sums["outside"] / n}
    if "tis_weight" in sums:
        out.update({"rollout/tis_weight_mean": sums["tis_weight"] / n, "rollout/tis_capped_frac": sums["tis_capped"] / n})
    return out
