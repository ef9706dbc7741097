"""The verl settings the AGPO trainer cannot run with, refused on the driver before any Ray
worker starts, each with one line naming the fix.

``apply_defaults(config)`` first sets AGPO's choices where a key is still at verl's default
value (``python -m agpo.verl`` calls it): ``trainer.v1.trainer_mode`` sync -> ``agpo_sync``,
``actor.policy_loss.loss_mode`` vanilla -> ``agpo``, ``algorithm.adv_estimator`` gae ->
``agpo``, ``rollout.agent.default_agent_loop`` single_turn_agent -> ``agpo_single_turn``.
A key set to anything else is the user's choice, and ``check_config`` refuses it when it
breaks AGPO:

- another verl than the pinned release, or agpo's plugin not loaded
  (``agpo_kernels.integrations.verl.check``);
- the legacy trainer (``trainer.use_v1=false``) or another V1 trainer mode: the async modes
  (``colocate_async``, ``separate_async``) sample the next batch while the last one trains,
  and AGPO's train temperatures need this step's probe first;
- verl's fused log-prob head (``model.use_fused_kernels=true`` with a verl backend): it
  asserts on a per-row temperature; agpo's (``impl_backend=agpo``) where it is not
  registered: another strategy than FSDP/FSDP2, or another device than CUDA;
- a policy loss, estimator or agent loop other than agpo's (the per-row clip range reaches
  only the ``agpo`` loss, the advantages are agpo's, the per-prompt temperature reaches the
  server only through ``agpo_single_turn``);
- DAPO's group filter (``algorithm.filter_groups``), the replay buffer's refill of failed
  groups (``trainer.v1.sampler.sync_refill_failed_groups``) and a custom sampler: they would
  evict probe groups or refill with prompts that have no temperature;
- rollout correction's bypass mode (``algorithm.rollout_correction.bypass_mode``): the old
  log-probs would be the rollout engine's, and the step KL that feeds the clip controller
  would measure the engine mismatch as well as the update;
- verl's on-policy distillation (its loss replaces the one that carries the clip range), and
  an ``algorithm.agpo`` block (the estimator's settings on this trainer are
  ``agpo.controller.dispersion`` and ``adv_floor``);
- a malformed ``agpo:`` block or a group size below 2.

``check_paths(config)`` (the command line's, as the driver's files are the ones it can see)
refuses a local model folder or data file that is not there: a path starting with ``/``,
``~`` or ``.``; anything else is left to verl (a Hugging Face model id, a remote file).
"""

from __future__ import annotations

from agpo.integrations.verl.config import AGPOVerlConfig

TRAINER_NAME = "agpo_sync"
"""The V1 trainer mode ``agpo.integrations.verl.trainer`` registers."""
VERL_FUSED_BACKENDS = ("torch", "triton", "liger")
"""``fused_kernel_options.impl_backend`` values with which verl patches in its own fused head."""

_DEFAULTS = (  # (path, verl's default, agpo's value)
    ("trainer.v1.trainer_mode", "sync", TRAINER_NAME),
    ("actor_rollout_ref.actor.policy_loss.loss_mode", "vanilla", "agpo"),
    ("algorithm.adv_estimator", "gae", "agpo"),
    ("actor_rollout_ref.rollout.agent.default_agent_loop", "single_turn_agent", "agpo_single_turn"),
)


def _get(config, path: str, default=None):
    node = config
    for part in path.split("."):
        node = node.get(part, None) if hasattr(node, "get") else getattr(node, part, None)
        if node is None:
            return default
    return node


def apply_defaults(config) -> list[str]:
    """Sets AGPO's value of each key still at verl's default (module docstring); returns the
    ``path=value`` overrides it made. ``config`` must be writable (OmegaConf: not read-only)."""
    from omegaconf import OmegaConf, open_dict

    made = []
    for path, verl_default, ours in _DEFAULTS:
        if _get(config, path) == verl_default:
            with open_dict(config):
                OmegaConf.update(config, path, ours, merge=False)
            made.append(f"{path}={ours}")
    return made


def check_config(config) -> AGPOVerlConfig:
    """Raises ``ValueError`` (``RuntimeError`` for the installation) with one line naming the
    fix for a config the AGPO trainer cannot run; returns the parsed ``agpo:`` block."""
    from agpo_kernels.integrations.verl import check

    check()
    if not _get(config, "trainer.use_v1", True):
        raise ValueError("trainer.use_v1: false selects verl's legacy trainer; AGPO runs on the V1 trainer: set "
                         "trainer.use_v1=true")
    mode = _get(config, "trainer.v1.trainer_mode")
    if mode != TRAINER_NAME:
        why = ("an async mode samples the next batch while the last trains, and AGPO's temperatures need this "
               "step's probe first" if "async" in str(mode) else "it is not the AGPO trainer")
        raise ValueError(f"trainer.v1.trainer_mode: {mode!r}; {why}: set trainer.v1.trainer_mode={TRAINER_NAME}")
    model = "actor_rollout_ref.model"
    backend = _get(config, f"{model}.fused_kernel_options.impl_backend", "torch")
    if _get(config, f"{model}.use_fused_kernels", False) and backend in VERL_FUSED_BACKENDS:
        raise ValueError(f"{model}.use_fused_kernels: verl's fused head ({backend}) refuses a per-row temperature; "
                         f"set {model}.use_fused_kernels=false, or {model}.fused_kernel_options.impl_backend=agpo "
                         "(agpo's head)")
    if _get(config, f"{model}.use_fused_kernels", False) and backend == "agpo":
        strategy, device = _get(config, "actor_rollout_ref.actor.strategy", "fsdp"), _get(config, "trainer.device",
                                                                                            "cuda")
        if strategy not in ("fsdp", "fsdp2") or device != "cuda":
            raise ValueError(f"{model}.fused_kernel_options.impl_backend=agpo: agpo's head is an FSDP engine for CUDA, "
                             f"here strategy={strategy!r} on trainer.device={device!r}; set "
                             f"{model}.use_fused_kernels=false")
    wanted = (("actor_rollout_ref.actor.policy_loss.loss_mode", "the per-row clip range reaches only agpo's loss"),
              ("algorithm.adv_estimator", "AGPO's advantages are agpo's group advantages"),
              ("actor_rollout_ref.rollout.agent.default_agent_loop",
               "each prompt's temperature reaches the server only through agpo's agent loop"))
    for path, why in wanted:
        value, ours = _get(config, path), dict((p, o) for p, _, o in _DEFAULTS)[path]
        if value != ours:
            raise ValueError(f"{path}: {value!r}; {why}: set {path}={ours}")
    if _get(config, "algorithm.filter_groups.enable", False):
        raise ValueError("algorithm.filter_groups.enable: DAPO's filter would evict AGPO's probe groups and refill "
                         "with prompts that have no temperature: set algorithm.filter_groups.enable=false")
    for path, fix in (("trainer.v1.sampler.sync_refill_failed_groups", "=false"),
                      ("trainer.v1.sampler.custom_sampler.path", "=null"),
                      ("algorithm.rollout_correction.bypass_mode", "=false"),
                      ("distillation.enabled", "=false")):
        if _get(config, path, None) not in (None, False):
            raise ValueError(f"{path}: {_get(config, path)!r}; the AGPO trainer does not run with it "
                             f"(agpo/integrations/verl/checks.py says why): set {path}{fix}")
    if _get(config, "algorithm.agpo", None) is not None:
        raise ValueError("algorithm.agpo: the AGPO trainer's advantages take agpo.controller.dispersion and "
                         "agpo.controller.adv_floor: move the settings there")
    agpo = AGPOVerlConfig.from_config(config)
    agpo.group_sizes(_get(config, "actor_rollout_ref.rollout.n"))
    return agpo


def check_paths(config) -> None:
    """Raises ``ValueError`` naming the key of a local model folder or data file that is missing."""
    import os

    for path in ("actor_rollout_ref.model.path", "data.train_files", "data.val_files"):
        value = _get(config, path)
        for item in ([value] if isinstance(value, str) else list(value or [])):
            item = str(item)
            if item.startswith(("/", "~", ".")) and not os.path.exists(os.path.expanduser(item)):
                raise ValueError(f"{path}: {item} does not exist; point it at a local "
                                 f"{'model folder' if 'model' in path else 'parquet file'} (docs/verl.md)")
