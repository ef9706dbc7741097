"""AGPO inside other RL trainers: adapters that run the whole AGPO step (probe, per-prompt
temperature, per-group clip) in an engine users already train with, calling ``agpo.algo``
for the controllers and ``agpo.rollout`` for the per-row-temperature sampler, never a second
copy of the step.

- ``trl``: ``AGPOTrainer``, TRL's ``GRPOTrainer`` with the AGPO rollout and the fused loss
  of ``agpo_kernels.integrations.trl``.
- ``verl``: ``AGPOTrainer`` on verl's V1 trainer (trainer mode ``agpo_sync``), its ``agpo:``
  config block and the checks made before Ray starts; the loss, estimator, agent loop and
  engine it runs with are the plugin ``agpo_kernels.integrations.verl``.

May import ``agpo.algo``, ``agpo.rollout`` and ``agpo_kernels``; nothing in ``agpo`` imports it
(the command line ``agpo.verl`` aside).
"""
