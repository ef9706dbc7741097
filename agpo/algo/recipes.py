"""Recipes: named sets of defaults. ``--recipe paper`` is AGPO as the authors ran it.

A recipe changes defaults only: a value given in ``--config`` or on the command line
wins over it, and the run's ``config.yaml`` records the recipe's name with every value
it resolved to. ``default`` is the project's own choice (see README and docs/recipes.md
for why each differs).

``paper`` follows the authors' released code (github.com/wandugu/paper_agpo, commit
11e5596: ``src/llamafactory/train/agpo/trainer.py`` = UT, ``hparams/finetuning_args.py``
= FA, ``hparams/generating_args.py`` = GA, ``examples/train_lora/*agpo*.yaml`` = EX):

- 4 update epochs (FA ``agpo_update_epochs``); groups of 8 (FA); the controller
  constants are the project's defaults already (FA, and UT's ``config.yaml``);
- reference KL with beta 0.03 (FA ``agpo_beta_ref_kl``) and the k1 estimator
  ``logp - logp_ref`` (UT ``_compute_ref_kl``);
- a per-sequence token mean, then the mean over sequences (UT
  ``_agpo_loss_from_rollout``: ``(surrogate * mask).sum(-1) / count``, ``.mean()``, and
  ``loss / len(rollouts)``): ``seq-mean-token-mean``; one symmetric clip (eps for both
  sides, UT), as the project;
- old, new and reference log-probs and the policy entropy scored at temperature 1 (UT
  ``_sequence_logprobs`` never divides the logits), whatever temperature sampled the row;
- vote entropy on raw lower-cased answer strings (UT ``_extract_vote_key``);
- learning rate 1e-5 with a cosine schedule to 0 after 10% linear warm-up, AdamW
  betas (0.9, 0.999), no weight decay, gradient clipping at 1.0 (EX, and the transformers
  Trainer defaults their examples run with);
- nucleus sampling with top_p 0.9 and no top-k (EX ``top_p: 0.9``, ``top_k: 0``;
  GA's own defaults, 0.7 and 50, are overridden by every example);
- the probe group computes the controllers' statistics and trains nothing (UT), where the
  project's default trains on it too (``--probe-reuse``);
- under LoRA their reference model is absent, so their KL term is identically zero
  (UT: ``_compute_ref_kl`` returns 0 when ``ref_model`` is None, which every example's
  ``finetuning_type: lora`` gives): the recipe sets beta 0 with LoRA unless a beta is given.

``paper-example`` is ``paper`` with what every example configuration the authors ship
(EX, the four ``qwen3_0_6b_*_agpo_wandb.yaml``) sets instead of the dataclass defaults:
groups of 2 (``agpo_group_size: 2``), one update epoch (``agpo_update_epochs: 1``), the
temperature clamped to [0.6, 1.3] (``agpo_tau_min`` / ``agpo_tau_max``), one prompt per
step (``per_device_train_batch_size: 1``, no accumulation) and LoRA dropout 0.05 (their
LoRA is rank 16, alpha 32: pass ``--lora-rank 16 --lora-alpha 32``). With one epoch the
importance ratio is 1 (old log-probs come from the same weights), so the adaptive clip
cannot change the update there: that recipe reproduces their examples, not the method.

Both follow the authors' code as it stands (UT above, rewritten on 28 May 2026); the code
of the paper's submission before that rewrite kept the ratio at 1 in every epoch.

Where their code has no counterpart (the probe's own top-p, micro-batching, the scoring
implementation) the project's behaviour is kept; docs/recipes.md lists the remaining
differences (float64 advantages, the entropy-reference cold start, distributed state).
"""

from __future__ import annotations

from agpo.errors import ConfigError

RECIPES: dict[str, dict[str, dict]] = {
    "default": {},
    "paper": {
        "optim": {"update_epochs": 4, "lr": 1e-5, "adam_beta1": 0.9, "adam_beta2": 0.999, "weight_decay": 0.0,
                  "schedule": "cosine", "warmup_ratio": 0.1, "min_lr_ratio": 0.0, "grad_clip": 1.0},
        "loss": {"beta": 0.03, "kl_estimator": "k1", "loss_agg": "seq-mean-token-mean", "eps_high_offset": 0.0,
                 "score_temperature": "one", "entropy_coef": 0.0, "dual_clip": None},
        "rollout": {"group_size": 8, "top_p": 0.9, "probe_reuse": False},
        "controller": {"vote_keys": "raw", "uncertainty_floor": 1e-8, "baseline_min": 0.0},
    },
}
"""Recipe name -> section -> field -> default value."""
RECIPES["paper-example"] = {
    section: {**values, **{"rollout": {"group_size": 2, "prompts_per_step": 1},
                           "optim": {"update_epochs": 1},
                           "controller": {"tau_min": 0.6, "tau_max": 1.3}}.get(section, {})}
    for section, values in RECIPES["paper"].items()}
RECIPES["paper-example"]["model"] = {"lora_dropout": 0.05}

PAPER_LORA = {"loss": {"beta": 0.0}}
"""What ``paper`` changes further under LoRA (``--lora-rank`` > 0): no reference KL."""


def apply_recipe(d: dict) -> dict:
    """Fill the recipe's defaults into a nested config mapping ``d`` (``{section: {field:
    value}}``) wherever ``d`` does not set the field itself; returns ``d``."""
    name = (d.get("run") or {}).get("recipe", "default")
    if name not in RECIPES:
        raise ConfigError(f"--recipe: expected one of {', '.join(RECIPES)}, got {name!r}")
    layers = [RECIPES[name]]
    if name.startswith("paper") and (d.get("model") or {}).get("lora_rank", 0):
        layers.insert(0, PAPER_LORA)
    for layer in layers:
        for section, values in layer.items():
            target = d.setdefault(section, {})
            for key, value in values.items():
                target.setdefault(key, value)
    return d
