"""AGPO's trainer on verl 0.9.1: the V1 trainer mode ``agpo_sync`` and what it needs.

- ``config``: ``AGPOVerlConfig``, the ``agpo:`` block of a verl config (controller settings,
  ``probe_size``, ``probe_reuse``, the vote-entropy answer keys);
- ``checks``: ``apply_defaults`` (AGPO's loss, estimator, agent loop and trainer mode where
  verl's defaults stand) and ``check_config``, which refuses what AGPO cannot run with (another
  verl, the plugin not loaded, an async or legacy trainer, verl's fused head with per-row
  temperature, another loss / estimator / agent loop, DAPO's filter), one line naming the
  fix, before any Ray worker starts;
- ``trainer``: ``AGPOTrainer`` (``@register_trainer("agpo_sync")``, verl's ``PPOTrainerSync``):
  probe -> ``probe_step`` -> train groups at their temperatures -> old/ref log-probs at each
  row's temperature -> ``clip_step`` -> per-row ``agpo_eps`` -> update -> step KL; the
  controller state in verl's checkpoint.

Why here and not beside the plugin in ``agpo_kernels.integrations.verl``: the trainer drives
``agpo.algo``'s controllers and answer keys, and the plugin (loaded by ``import verl`` in
every process) must stay cheap and passive. This package may import ``agpo.algo``,
``agpo_kernels`` (the plugin's loss, agent loop and ``check()``) and verl; nothing in
``agpo`` imports it except the command line ``python -m agpo.verl``. Importing ``trainer``
registers ``agpo_sync`` in verl's trainer registry (verl's task runner process imports it
through ``agpo.verl``'s task runner).
"""
