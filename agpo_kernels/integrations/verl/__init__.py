"""agpo as a verl plugin (``verl[verl-core]==0.9.1`` exactly: the integration leans on verl's
registries and engine internals, which move between releases).

verl imports every entry point of group ``verl.plugins`` in every process on ``import
verl``; agpo's (``pyproject.toml``) is this package, which registers, and does nothing else:

- ``losses``: the policy loss ``"agpo"`` (``actor.policy_loss.loss_mode=agpo``): the clipped
  surrogate of ``agpo_kernels.surrogate`` under verl's signature, with a per-row clip range
  when the whole-loss replacement ``agpo_ppo_loss`` (installed with the actor worker's
  ``set_loss_fn``) hands it the batch's ``agpo_eps``; verl's entropy bonus, KL, importance
  weights and global-batch normalisation stay verl's own;
- ``advantages``: the estimator ``"agpo"`` (``algorithm.adv_estimator=agpo``): agpo's group
  advantages per uid (``agpo.algo.stats.group_advantages``);
- ``agent_loop``: the agent loop ``"agpo_single_turn"``: each sample's request at its row's
  ``agpo_temperature`` (the per-prompt temperature of the AGPO trainer);
- ``engine``: verl's FSDP language-model engine for CUDA, registered under its
  ``("cuda", "nvidia")`` key, unchanged unless asked: with ``model.use_fused_kernels=True``
  and ``fused_kernel_options.impl_backend=agpo`` the log-probs and entropy come from agpo's
  fused head at each row's temperature, without the logits.

Loading the plugin resolves verl's platform (verl's loss and engine modules ask for it on
import): a platform plugin of verl's (another accelerator vendor) must load before agpo's.

verl swallows a plugin's import error at debug level, so whatever depends on the plugin
calls ``check()`` first: it stops with one line naming the cause (another verl version, the
plugin not loaded, or its import error). Imports ``agpo.algo`` alone of the training package.
"""

from __future__ import annotations

VERL_PIN = "0.9.1"
"""The verl release this integration is written and tested against."""

_IMPORT_ERROR: BaseException | None = None
try:
    from agpo_kernels.integrations.verl import advantages, agent_loop, engine, losses  # noqa: F401  (registers)
except ImportError as exc:  # verl missing or changed: check() reports it, import verl goes on
    _IMPORT_ERROR = exc


def check() -> None:
    """Raises ``RuntimeError`` with one line naming the fix unless verl is the pinned release
    and agpo's loss and estimator are in its registries."""
    try:
        import verl
    except ImportError as exc:
        raise RuntimeError(f"verl is not installed ({exc}); pip install 'verl[verl-core]=={VERL_PIN}' in an "
                           "environment of its own (bash scripts/verl_env.sh)") from None
    version = getattr(verl, "__version__", "?")
    if version != VERL_PIN:
        raise RuntimeError(f"verl {version} is installed; agpo's verl integration is pinned to {VERL_PIN}: "
                           f"pip install 'verl[verl-core]=={VERL_PIN}'")
    if _IMPORT_ERROR is not None:
        raise RuntimeError(f"the agpo verl plugin failed to import ({type(_IMPORT_ERROR).__name__}: "
                           f"{_IMPORT_ERROR}); reinstall agpo in this environment") from None
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, POLICY_LOSS_REGISTRY

    missing = [what for what, reg in (("policy loss", POLICY_LOSS_REGISTRY), ("advantage estimator",
                                                                           ADV_ESTIMATOR_REGISTRY))
               if "agpo" not in reg]
    if missing:
        raise RuntimeError(f"verl has no 'agpo' {' or '.join(missing)}: the verl.plugins entry point of agpo was "
                           "not loaded; pip install -e . (or pip install agpo) in this environment, and leave "
                           "VERL_USE_EXTERNAL_PLUGINS unset or include agpo")
