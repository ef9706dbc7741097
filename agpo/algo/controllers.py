"""AGPO's controllers: per-group sampling temperature and clip range from group statistics.

Pure and model-free: rewards, answer texts, entropies and KL values in, float tensors out.
``ControllerConfig`` holds the paper's defaults; ``AGPOController`` holds the running
state (uncertainty baseline ``b``, step-KL EMA ``S``, policy-entropy reference ``H_ref``).

Order of calls in one training step with ``P`` prompts and groups of ``G``::

    ctl = AGPOController(ControllerConfig())
    tau = ctl.probe_step(probe_rewards, probe_texts)  # [P, G] rewards, P x G texts -> tau [P]
    # sample the train groups, prompt p at tau[p]; score them -> train_rewards [P, G]
    adv = ctl.advantages(train_rewards)               # [P, G]
    # old log-probs and per-group token-mean policy entropy H [P] (no grad)
    eps = ctl.clip_step(H)                            # -> eps [P] (eps_low = eps_high = eps)
    # update_epochs passes of the loss with eps[p] for prompt p's sequences
    ctl.update_step_kl(kl_per_group)                  # [P] token-mean(logp_old - logp_new)
    checkpoint["controller"] = ctl.state_dict()

With ``adaptive_clip`` and ``adaptive_temp`` both off (plain GRPO, ``needs_probe`` is
False) the probe may be skipped: sample at ``tau_base``; ``clip_step`` returns ``eps_base``.
Sequences of group p take ``eps[p]`` / ``tau[p]``: ``eps.repeat_interleave(G)`` gives the
per-sequence ``[P*G]`` form the loss takes.

Map to docs/algorithm.md (groups are processed in batch order where a state is carried):

- ``probe_statistics``     #group-statistics: ``sigma_p``, ``k_p``, ``E`` (``agpo.algo.stats``).
- ``uncertainty``          #temperature-controller: ``u = w_r*sigma_p + w_e*E + w_k*|k_p|``.
- ``centre_uncertainty``   #temperature-controller: cold start (``b <= floor``: ``c = 0, b = u``)
                           else ``c = (u - b)/(b + floor)``, ``b = a*u + (1-a)*b``.
- ``temperature``          #temperature-controller: ``clamp(tau_base*(1 + lambda_temp*c), tau_min, tau_max)``.
- ``AGPOController.advantages`` #advantages (``agpo.algo.stats.group_advantages``).
- ``entropy_ratio``        #adaptive-clip: ``h = clamp(H/(H_ref + floor), h_min, h_max)``; ``H_ref``
                           starts at the first H seen and is then an EMA with
                           ``h_ref_alpha``, updated after each group's clip.
- ``adaptive_clip``        #adaptive-clip: ``clamp(eps_base*h*(1 + delta*E)/denom, eps_min, eps_max)``,
                           ``denom = 1 + alpha_var*sigma_p + gamma_stepkl*S + zeta_skew*|k_p|``.
- ``step_kl``              #step-kl-drift: ``mean over groups of max(0, kl_g)``; ``S = a*kl + (1-a)*S``.

Choices the paper's formulas leave open: with a controller switched off its state (``b``,
``H_ref``) is still tracked, so logs stay meaningful and nothing jumps if it is switched
on; the first group's ratio is the literal ``H/(H + 1e-8)``; ``S`` starts at 0; the base
values must lie inside their clamps; entropies within ``NEGATIVE_ENTROPY_TOL`` below 0
(fp32 rounding) read as 0.

The running state is plain Python floats and ints; ``state_dict`` / ``load_state_dict``
restore it exactly, so a resumed run continues bit-for-bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import torch

from agpo.algo.stats import (
    DISPERSIONS,
    VOTE_KEYS,
    as_groups,
    dispersion,
    group_advantages,
    group_vote_entropy,
    skewness,
)

Extract = Callable[[str], str] | None
ENTROPY_TEMPERATURES = ("one", "score")
CLIP_INPUTS = ("all", "rewards")
NEGATIVE_ENTROPY_TOL = 1e-4
"""Entropies in [-tol, 0) are rounding (fp32 ``lse - sum p z``) and read as 0; below: error."""


@dataclass(kw_only=True)
class ControllerConfig:
    """Controller settings; defaults are the paper's released code (docs/algorithm.md#defaults)."""

    adaptive_clip: bool = True
    """Adapt eps per group (step 6); False: eps = eps_base."""
    adaptive_temp: bool = True
    """Adapt the train-group temperature per group (step 3); False: tau = tau_base."""
    eps_base: float = 0.2
    """Clip range before adaptation."""
    eps_min: float = 0.05
    """Lower clamp of the adaptive eps."""
    eps_max: float = 0.4
    """Upper clamp of the adaptive eps."""
    alpha_var: float = 1.0
    """Weight of the probe reward dispersion sigma_p in the clip denominator."""
    gamma_stepkl: float = 0.5
    """Weight of the step-KL EMA S in the clip denominator."""
    delta_probe_entropy: float = 0.1
    """Widening of eps per nat of probe vote entropy E."""
    zeta_skew: float = 0.0
    """Weight of |k_p| (probe reward skewness) in the clip denominator."""
    h_min: float = 0.5
    """Lower clamp of the policy-entropy ratio h = H / H_ref."""
    h_max: float = 1.5
    """Upper clamp of the policy-entropy ratio h."""
    h_ref_alpha: float = 0.01
    """EMA rate of the policy-entropy reference H_ref."""
    entropy_floor: float = 1e-8
    """Added to H_ref in the ratio h = H / (H_ref + entropy_floor)."""
    dispersion: str = "std"
    """Dispersion of rewards for sigma_p and the advantages: 'std', 'mad' or 'iqr'."""
    adv_floor: float = 1e-8
    """Smallest advantage denominator; dispersions at or below it fall back to std."""
    skew_sigma_min: float = 1e-6
    """Skewness is 0 for groups whose reward std is below this."""
    kappa_max: float = 10.0
    """Skewness is clamped to [-kappa_max, kappa_max]."""
    tau_base: float = 1.0
    """Probe temperature and centre of the adaptive temperature."""
    tau_min: float = 0.5
    """Lower clamp of the adaptive temperature."""
    tau_max: float = 1.5
    """Upper clamp of the adaptive temperature."""
    lambda_temp: float = 0.15
    """Gain of the temperature on the centred uncertainty c."""
    w_r: float = 1.0
    """Weight of the reward dispersion sigma_p in the uncertainty u."""
    w_e: float = 1.0
    """Weight of the vote entropy E in the uncertainty u."""
    w_k: float = 0.0
    """Weight of |k_p| in the uncertainty u."""
    ema_alpha: float = 0.1
    """EMA rate of the uncertainty baseline b and of the step-KL EMA S."""
    uncertainty_floor: float = 1e-8
    """Baseline cold-start threshold and the floor in c = (u - b) / (b + floor)."""
    baseline_min: float = 0.5
    """Lower bound of the uncertainty baseline b (in units of u): b = max(EMA, baseline_min),
    also after the cold start. 0 gives the paper's formulas (--recipe paper), under which
    unanimous (easy) groups shrink b by 10% each, so after an easy stretch the next
    uncertain group gets a huge c = (u - b) / b and tau pins at tau_max (docs/recipes.md:
    on an easy task 39% of the uncertain groups sat at tau_max; with 0.5, none)."""
    vote_keys: str = "normalized"
    """Answer keys of the vote entropy E: 'normalized' (equal answers in any spelling are one
    vote) or 'raw' (the paper's code: the lower-cased extracted string)."""
    entropy_temperature: str = "one"
    """Temperature of the policy entropy H in the clip's ratio H / H_ref: 'one' (the policy's
    own entropy, whatever temperature the group was sampled and scored at) or 'score' (the
    scoring temperature of the loss: with --score-temperature sample, a hot group's H is
    inflated by its temperature)."""
    clip_inputs: str = "all"
    """What the adaptive clip reads: 'all' (the paper's: reward dispersion and skew, vote
    entropy, policy-entropy ratio, step KL) or 'rewards' (the group's reward dispersion and
    skew alone, eps = eps_base / (1 + alpha_var sigma + zeta_skew |k|), same clamps: with 0/1
    rewards a function of the pass count k/G, the difficulty-schedule baseline)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("bool", bool):
                if not isinstance(value, bool):
                    raise ValueError(f"{f.name}: expected a bool, got {value!r}")
            elif f.name not in ("dispersion", "vote_keys", "entropy_temperature", "clip_inputs"):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ValueError(f"{f.name}: expected a finite number, got {value!r}")
        if self.dispersion not in DISPERSIONS:
            raise ValueError(f"dispersion: expected one of {DISPERSIONS}, got {self.dispersion!r}")
        if self.vote_keys not in VOTE_KEYS:
            raise ValueError(f"vote_keys: expected one of {tuple(VOTE_KEYS)}, got {self.vote_keys!r}")
        if self.clip_inputs not in CLIP_INPUTS:
            raise ValueError(f"clip_inputs: expected one of {CLIP_INPUTS}, got {self.clip_inputs!r}")
        if self.entropy_temperature not in ENTROPY_TEMPERATURES:
            raise ValueError(f"entropy_temperature: expected one of {ENTROPY_TEMPERATURES}, "
                             f"got {self.entropy_temperature!r}")
        for name in ("alpha_var", "gamma_stepkl", "delta_probe_entropy", "zeta_skew", "lambda_temp",
                     "w_r", "w_e", "w_k", "skew_sigma_min", "baseline_min"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("eps_min", "tau_min", "entropy_floor", "adv_floor", "uncertainty_floor", "kappa_max"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        for name in ("ema_alpha", "h_ref_alpha"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name}: must lie in (0, 1], got {getattr(self, name)}")
        _check_range("eps", self.eps_min, self.eps_base, self.eps_max)
        _check_range("tau", self.tau_min, self.tau_base, self.tau_max)
        if not 0 <= self.h_min <= self.h_max:
            raise ValueError(f"h_min: need 0 <= h_min <= h_max, got h_min={self.h_min}, h_max={self.h_max}")

    @property
    def needs_probe(self) -> bool:
        """Whether a step needs the probe group (either controller on)."""
        return self.adaptive_clip or self.adaptive_temp


def _check_range(prefix: str, lo: float, base: float, hi: float) -> None:
    if not lo <= base <= hi:
        raise ValueError(f"{prefix}_base: need {prefix}_min <= {prefix}_base <= {prefix}_max, "
                         f"got {lo}, {base}, {hi}")


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)


@dataclass(frozen=True)
class ProbeStats:
    """Per-group probe statistics of one step (docs/algorithm.md#group-statistics), as tuples of floats."""

    sigma: tuple[float, ...]
    """Reward dispersion sigma_p."""
    skew: tuple[float, ...]
    """Clamped adjusted skewness k_p."""
    entropy: tuple[float, ...]
    """Vote entropy E (nats)."""
    uncertainty: tuple[float, ...]
    """Raw uncertainty u."""
    centred: tuple[float, ...]
    """Centred uncertainty c."""
    tau: tuple[float, ...]
    """Train-group temperature."""


def probe_statistics(rewards, answers, cfg: ControllerConfig, extract: Extract | str = "config"):
    """docs/algorithm.md#group-statistics for ``P`` groups: ``(sigma [P], k [P], E [P])`` as float64 tensors.

    ``answers``: ``P`` lists of ``G`` texts, read with ``cfg.vote_keys``'s extraction
    (``extract``: another function, or None for already-extracted keys).
    """
    if extract == "config":
        extract = VOTE_KEYS[cfg.vote_keys]
    r = as_groups(rewards, "rewards")
    if r.dim() != 2:
        raise ValueError(f"rewards: expected a [P, G] tensor, got shape {tuple(r.shape)}")
    e = group_vote_entropy(answers, extract)
    if len(answers) != r.shape[0] or any(len(g) != r.shape[1] for g in answers):
        raise ValueError(f"answers: expected {r.shape[0]} groups of {r.shape[1]} texts to match rewards")
    sigma = dispersion(r, cfg.dispersion)
    if not bool(torch.isfinite(sigma).all()):
        raise ValueError("rewards: the dispersion overflows float64; rescale the rewards")
    k = skewness(r, cfg.skew_sigma_min, cfg.kappa_max)
    return sigma, k, e


def uncertainty(sigma: float, entropy: float, skew: float, cfg: ControllerConfig) -> float:
    """docs/algorithm.md#temperature-controller: ``u = w_r*sigma_p + w_e*E + w_k*|k_p|``."""
    return cfg.w_r * sigma + cfg.w_e * entropy + cfg.w_k * abs(skew)


def centre_uncertainty(u: float, baseline: float, cfg: ControllerConfig) -> tuple[float, float]:
    """docs/algorithm.md#temperature-controller: ``(c, new baseline)`` with the cold start at ``b <= floor``; the new
    baseline is kept at or above ``baseline_min``."""
    floor = cfg.uncertainty_floor
    if baseline <= floor:
        return 0.0, max(u, cfg.baseline_min)
    c = (u - baseline) / (baseline + floor)
    return c, max(cfg.ema_alpha * u + (1.0 - cfg.ema_alpha) * baseline, cfg.baseline_min)


def temperature(c: float, cfg: ControllerConfig) -> float:
    """docs/algorithm.md#temperature-controller: bidirectional temperature; ``tau_base`` when
    ``adaptive_temp`` is off."""
    if not cfg.adaptive_temp:
        return cfg.tau_base
    return _clamp(cfg.tau_base * (1.0 + cfg.lambda_temp * c), cfg.tau_min, cfg.tau_max)


def entropy_ratio(h: float, h_ref: float, cfg: ControllerConfig) -> float:
    """docs/algorithm.md#adaptive-clip: ``clamp(H / (H_ref + floor), h_min, h_max)``."""
    return _clamp(h / (h_ref + cfg.entropy_floor), cfg.h_min, cfg.h_max)


def adaptive_clip(sigma: float, skew: float, entropy: float, h: float, step_kl_ema: float,
                  cfg: ControllerConfig) -> float:
    """docs/algorithm.md#adaptive-clip: eps of one group from its probe stats, ``h`` and ``S``; ``eps_base`` if off."""
    if not cfg.adaptive_clip:
        return cfg.eps_base
    if cfg.clip_inputs == "rewards":  # the reward statistics alone: no entropy, ratio or drift
        return _clamp(cfg.eps_base / (1.0 + cfg.alpha_var * sigma + cfg.zeta_skew * abs(skew)), cfg.eps_min,
                      cfg.eps_max)
    denom = 1.0 + cfg.alpha_var * sigma + cfg.gamma_stepkl * step_kl_ema + cfg.zeta_skew * abs(skew)
    eps = cfg.eps_base * h * (1.0 + cfg.delta_probe_entropy * entropy) / denom
    return _clamp(eps, cfg.eps_min, cfg.eps_max)


def step_kl(kl_per_group) -> float:
    """docs/algorithm.md#step-kl-drift: mean over groups of ``max(0, kl_g)``."""
    kl = as_groups(kl_per_group, "kl_per_group")
    if kl.dim() != 1:
        raise ValueError(f"kl_per_group: expected a [P] tensor, got shape {tuple(kl.shape)}")
    return sum(max(0.0, v) for v in kl.tolist()) / kl.shape[0]


def _vector(values, name: str) -> list[float]:
    t = as_groups(values, name)
    if t.dim() != 1:
        raise ValueError(f"{name}: expected a [P] tensor, got shape {tuple(t.shape)}")
    return t.tolist()


_STATE_FLOATS = ("baseline", "step_kl_ema", "h_ref")
_STATE_INTS = ("h_count", "probe_steps", "clip_steps", "kl_steps")


class AGPOController:
    """Running AGPO controller state and the three per-step calls (see the module docstring)."""

    def __init__(self, config: ControllerConfig | None = None) -> None:
        self.config = config if config is not None else ControllerConfig()
        self.baseline = 0.0
        """Uncertainty baseline b (0: cold)."""
        self.step_kl_ema = 0.0
        """Step-KL EMA S."""
        self.h_ref = 0.0
        """Policy-entropy reference H_ref (meaningful once h_count > 0)."""
        self.h_count = 0
        """Number of group entropies H seen so far."""
        self.probe_steps = 0
        self.clip_steps = 0
        self.kl_steps = 0
        self.probe: ProbeStats | None = None
        """The latest probe's statistics (kept for the clip and for logging)."""
        self.probe_used = True
        """Whether ``clip_step`` already consumed ``probe``."""

    def probe_step(self, rewards, answers, *, extract: Extract | str = "config") -> torch.Tensor:
        """Probe statistics and temperatures (docs/algorithm.md#temperature-controller) for all
        groups of a step, in order; returns tau, float32 ``[P]``.

        ``rewards``: probe rewards ``[P, G]``; ``answers``: ``P`` lists of ``G`` response
        texts, read with the configured ``vote_keys`` (``extract=None``: already-extracted
        answer keys). Updates ``b`` group by group.
        """
        cfg = self.config
        sigma, k, e = probe_statistics(rewards, answers, cfg, extract)
        sigma, k, e = sigma.tolist(), k.tolist(), e.tolist()
        us, cs, taus = [], [], []
        baseline = self.baseline
        for p in range(len(sigma)):
            u = uncertainty(sigma[p], e[p], k[p], cfg)
            c, baseline = centre_uncertainty(u, baseline, cfg)
            us.append(u)
            cs.append(c)
            taus.append(temperature(c, cfg))
        self.baseline = baseline
        self.probe = ProbeStats(tuple(sigma), tuple(k), tuple(e), tuple(us), tuple(cs), tuple(taus))
        self.probe_used = False
        self.probe_steps += 1
        return torch.tensor(taus, dtype=torch.float32)

    def advantages(self, rewards) -> torch.Tensor:
        """Advantages (docs/algorithm.md#advantages) with the configured dispersion: train rewards
        ``[P, G]`` -> float32 ``[P, G]``."""
        return group_advantages(rewards, self.config.dispersion, self.config.adv_floor).to(torch.float32)

    def clip_step(self, policy_entropy, groups: list[int] | None = None) -> torch.Tensor:
        """The adaptive clip (docs/algorithm.md#adaptive-clip): per-group token-mean policy entropy
        ``H [P]`` -> eps, float32 ``[P]``.

        Each group's clip uses ``H_ref`` from before that group's update. Needs this step's
        ``probe_step`` first when ``adaptive_clip`` is on. ``groups``: which of the probe's
        groups the entropies are of, in order (None: all; a probe filter trains a subset).
        """
        cfg = self.config
        hs = _vector(policy_entropy, "policy_entropy")
        if any(h < -NEGATIVE_ENTROPY_TOL for h in hs):
            raise ValueError(f"policy_entropy: entropies must be >= 0, got min {min(hs)}")
        hs = [max(h, 0.0) for h in hs]
        probe = self.probe
        if cfg.adaptive_clip:
            if probe is None or self.probe_used:
                raise RuntimeError("clip_step: call probe_step for this step first (adaptive_clip is on)")
            groups = list(range(len(probe.sigma))) if groups is None else [int(g) for g in groups]
            if len(groups) != len(hs) or any(not 0 <= g < len(probe.sigma) for g in groups):
                raise ValueError(f"policy_entropy: {len(hs)} groups (of probe groups {groups}) but the probe "
                                 f"had {len(probe.sigma)}")
        eps = []
        for i, h in enumerate(hs):
            ref = self.h_ref if self.h_count > 0 else h
            if cfg.adaptive_clip:
                ratio = entropy_ratio(h, ref, cfg)
                p = groups[i]
                eps.append(adaptive_clip(probe.sigma[p], probe.skew[p], probe.entropy[p], ratio,
                                         self.step_kl_ema, cfg))
            else:
                eps.append(cfg.eps_base)
            self.h_ref = h if self.h_count == 0 else cfg.h_ref_alpha * h + (1.0 - cfg.h_ref_alpha) * ref
            self.h_count += 1
        self.probe_used = True
        self.clip_steps += 1
        return torch.tensor(eps, dtype=torch.float32)

    def update_step_kl(self, kl_per_group) -> float:
        """Step-KL drift (docs/algorithm.md#step-kl-drift) after the update: ``S = a*kl_step +
        (1-a)*S``; returns ``kl_step``."""
        kl = step_kl(kl_per_group)
        a = self.config.ema_alpha
        self.step_kl_ema = a * kl + (1.0 - a) * self.step_kl_ema
        self.kl_steps += 1
        return kl

    def metrics(self) -> dict[str, float]:
        """Controller state and the latest probe's means, for logging."""
        out = {"controller/baseline": self.baseline, "controller/step_kl_ema": self.step_kl_ema,
               "controller/h_ref": self.h_ref}
        if self.probe is not None:
            for name, values in asdict(self.probe).items():
                out[f"probe/{name}"] = sum(values) / max(len(values), 1)
        return out

    def state_dict(self) -> dict:
        """The running state as plain Python values (JSON- and torch.save-safe)."""
        state = {name: getattr(self, name) for name in _STATE_FLOATS + _STATE_INTS}
        state["probe"] = None if self.probe is None else {k: list(v) for k, v in asdict(self.probe).items()}
        state["probe_used"] = self.probe_used
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restores ``state_dict()`` output exactly; raises ValueError on a malformed state."""
        missing = [k for k in _STATE_FLOATS + _STATE_INTS + ("probe", "probe_used") if k not in state]
        if missing:
            raise ValueError(f"state: missing keys {missing}")
        for name in _STATE_FLOATS:
            value = state[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"state[{name!r}]: expected a finite float, got {value!r}")
        for name in _STATE_INTS:
            if isinstance(state[name], bool) or not isinstance(state[name], int) or state[name] < 0:
                raise ValueError(f"state[{name!r}]: expected an int >= 0, got {state[name]!r}")
        probe = state["probe"]
        if probe is not None:
            names = [f.name for f in fields(ProbeStats)]
            if not isinstance(probe, dict) or sorted(probe) != sorted(names):
                raise ValueError(f"state['probe']: expected None or a dict with keys {names}")
            probe = ProbeStats(**{n: tuple(float(v) for v in probe[n]) for n in names})
        for name in _STATE_FLOATS:
            setattr(self, name, float(state[name]))
        for name in _STATE_INTS:
            setattr(self, name, int(state[name]))
        self.probe = probe
        self.probe_used = bool(state["probe_used"])
