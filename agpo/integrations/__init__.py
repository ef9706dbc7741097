"""AGPO inside other RL trainers: adapters that run the whole AGPO step (probe, per-prompt
temperature, per-group clip) in an engine users already train with, calling ``agpo.algo``
for the controllers and ``agpo.rollout`` for the per-row-temperature sampler, never a second
copy of the step.

- ``trl``: ``AGPOTrainer``, TRL's ``GRPOTrainer`` with the AGPO rollout and the fused loss
  of ``agpo_kernels.integrations.trl``.

May import ``agpo.algo``, ``agpo.rollout`` and ``agpo_kernels``; nothing in ``agpo`` imports it.
"""
