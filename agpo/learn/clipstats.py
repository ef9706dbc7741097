"""What the trust region did during one update: clip shares per epoch, and the counterfactual
of a fixed clip range computed in the same pass.

Old log-probs are scored with the weights the update starts from, so the first epoch's
ratio is 1 (to rounding) and nothing is clipped there: only the epochs after it can clip.
``ClipTally`` counts, per epoch and over the tokens that count:

- the tokens the row's own eps clipped (the gradient cut by the trust region);
- the tokens a fixed ``eps_base`` would have clipped at the same ratios;
- the tokens on which the two decisions differ: the direct measure of how much the
  adaptive clip changed the update (0 when eps is fixed).

``summary()`` reports the shares over the epochs that can clip (epoch 1 alone for a
one-epoch update), and the first epoch's share on its own. The decisions are the ones
``agpo_kernels.surrogate.clipped_surrogate`` defines, so they agree with the loss.
"""

from __future__ import annotations

import torch

from agpo_kernels.surrogate import clipped_surrogate


def clip_counts(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, eps_low: torch.Tensor,
                eps_high: torch.Tensor, mask: torch.Tensor, *, base_low: float, base_high: float,
                dual_clip: float | None = None) -> tuple[float, ...]:
    """``(tokens, clipped, clipped_at_base, differing, ratio_sum)`` over the tokens where
    ``mask`` is set; every argument is per token (one layout: ``[B, C]`` or packed ``[N]``)."""
    on = mask.bool()
    logp, old_logp = logp.float(), old_logp.float()
    _, ratio, clipped = clipped_surrogate(logp, old_logp, adv, eps_low, eps_high, dual_clip)
    clipped = clipped & on
    base = clipped_surrogate(logp, old_logp, adv, torch.full_like(eps_low, base_low),
                             torch.full_like(eps_high, base_high), dual_clip)[2] & on
    return (float(on.sum()), float(clipped.sum()), float(base.sum()), float((clipped ^ base).sum()),
            float(ratio[on].sum()))


class ClipTally:
    """Per-epoch sums of ``clip_counts`` and of the ratio, over micro-batches (and ranks)."""

    KEYS = ("tokens", "clipped", "base", "differ", "ratio")

    def __init__(self, epochs: int):
        self.epochs = epochs
        self.sums = [dict.fromkeys(self.KEYS, 0.0) for _ in range(epochs)]

    def add(self, epoch: int, counts: tuple[float, ...]) -> None:
        s = self.sums[epoch]
        for k, v in zip(self.KEYS, counts, strict=True):
            s[k] += v

    def drop(self, epoch: int) -> None:
        """Forget an epoch whose optimiser step was not applied (a non-finite loss)."""
        self.sums[epoch] = dict.fromkeys(self.KEYS, 0.0)

    def flat(self) -> dict[str, float]:
        """The sums as one flat dict (to all-reduce over ranks) ..."""
        return {f"clip{e}_{k}": v for e, s in enumerate(self.sums) for k, v in s.items()}

    def load_flat(self, flat: dict[str, float]) -> None:
        """... and back."""
        for e, s in enumerate(self.sums):
            for k in s:
                s[k] = flat[f"clip{e}_{k}"]

    def summary(self) -> dict[str, float]:
        """``loss/clip_frac``, ``loss/clip_frac_base``, ``loss/clip_changed`` and
        ``loss/ratio_mean`` over the epochs that can clip; ``loss/clip_frac_first`` of epoch 1."""
        later = self.sums[1:] or self.sums
        tot = lambda k, part: sum(s[k] for s in part)
        n = max(tot("tokens", later), 1.0)
        first = self.sums[0]
        return {"loss/clip_frac": tot("clipped", later) / n, "loss/clip_frac_base": tot("base", later) / n,
                "loss/clip_changed": tot("differ", later) / n, "loss/ratio_mean": tot("ratio", later) / n,
                "loss/clip_frac_first": first["clipped"] / max(first["tokens"], 1.0)}
