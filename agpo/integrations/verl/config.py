"""The ``agpo:`` block of a verl config: the controllers and the probe of the AGPO trainer.

    agpo:
      probe_size: 4          # probe samples per prompt (null: rollout.n)
      probe_reuse: false     # train on the probe rows too (agpo.train --probe-reuse)
      extract: default       # answer keys of the vote entropy: the controller's vote_keys
      controller:            # any ControllerConfig field (agpo.algo.controllers), e.g.
        tau_base: 1.0
        entropy_temperature: one

``AGPOVerlConfig.from_config(config)`` reads it from a verl (OmegaConf) config; a missing
block gives the paper's defaults. The train group size is verl's own
``actor_rollout_ref.rollout.n``; the probe is sampled at ``controller.tau_base``.
``entropy_temperature`` and the controller's other settings keep their agpo names
and defaults, so a run here and a run of ``agpo.train`` with the same settings drive the
controllers the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from agpo.algo.controllers import ControllerConfig

EXTRACT_MODES = ("default", "raw", "normalized")
"""``extract``: the controller's ``vote_keys`` ("default"), or one of the two key functions by name."""


@dataclass(kw_only=True)
class AGPOVerlConfig:
    """AGPO's settings on verl (verl's own config keeps the rest)."""

    controller: ControllerConfig = field(default_factory=ControllerConfig)
    """The two controllers (docs/algorithm.md); ``tau_base`` is the probe's temperature and
    replaces ``rollout.temperature`` for training samples."""
    probe_size: int | None = None
    """Probe samples per prompt; None: the train group size ``rollout.n``."""
    probe_reuse: bool = False
    """Train on the probe rows too: each prompt's probe rows join its train group, with one
    advantage baseline over both and the prompt's eps (``agpo.train --probe-reuse``)."""
    extract: str = "default"
    """Answer keys of the vote entropy: "default" (``controller.vote_keys``), "raw" or "normalized"."""

    def __post_init__(self) -> None:
        if not isinstance(self.controller, ControllerConfig):
            raise TypeError(f"agpo.controller: expected a ControllerConfig, got {type(self.controller).__name__}")
        if self.probe_size is not None and (isinstance(self.probe_size, bool) or not isinstance(self.probe_size, int)
                                            or self.probe_size < 2):
            raise ValueError(f"agpo.probe_size: expected an int >= 2 or null, got {self.probe_size!r} (a reward "
                             "spread needs two samples)")
        if not isinstance(self.probe_reuse, bool):
            raise ValueError(f"agpo.probe_reuse: expected a bool, got {self.probe_reuse!r}")
        if self.probe_reuse and not self.controller.needs_probe:
            raise ValueError("agpo.probe_reuse: both controllers are off, so there is no probe to reuse; set "
                             "probe_reuse=false")
        if self.extract not in EXTRACT_MODES:
            raise ValueError(f"agpo.extract: expected one of {EXTRACT_MODES}, got {self.extract!r}")

    def group_sizes(self, rollout_n: int) -> tuple[int, int]:
        """``(train G, probe k)`` samples per prompt for verl's ``rollout.n``."""
        if isinstance(rollout_n, bool) or not isinstance(rollout_n, int) or rollout_n < 2:
            raise ValueError(f"actor_rollout_ref.rollout.n: {rollout_n!r}; AGPO's group statistics need >= 2 "
                             "samples per prompt")
        return rollout_n, self.probe_size or rollout_n

    @property
    def vote_extract(self):
        """The ``extract`` argument of ``probe_step`` (the string "config": the controller's own)."""
        if self.extract == "default":
            return "config"
        from agpo.algo.stats import VOTE_KEYS

        return VOTE_KEYS[self.extract]

    @classmethod
    def from_config(cls, config) -> AGPOVerlConfig:
        """The ``agpo:`` block of a verl config (absent: the defaults); unknown keys are refused."""
        block = config.get("agpo", None) if hasattr(config, "get") else getattr(config, "agpo", None)
        if block is None:
            return cls()
        block = _plain(block)
        if not isinstance(block, dict):
            raise ValueError(f"agpo: expected a mapping, got {type(block).__name__}")
        known = {f.name for f in fields(cls)}
        extra = sorted(set(block) - known)
        if extra:
            raise ValueError(f"agpo: unknown keys {extra}; expected {sorted(known)}")
        ctl = block.pop("controller", None) or {}
        names = {f.name for f in fields(ControllerConfig)}
        bad = sorted(set(ctl) - names)
        if bad:
            raise ValueError(f"agpo.controller: unknown keys {bad}; see agpo.algo.controllers.ControllerConfig")
        return cls(controller=ControllerConfig(**ctl), **block)


def _plain(block):
    """An OmegaConf node as plain Python containers (anything else unchanged)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - verl always brings omegaconf
        return dict(block) if isinstance(block, dict) else block
    if isinstance(block, (DictConfig, ListConfig)):
        return OmegaConf.to_container(block, resolve=True)
    return dict(block) if isinstance(block, dict) else block
