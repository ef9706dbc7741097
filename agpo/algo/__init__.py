"""The algorithm: what AGPO computes from a group of rewards, with no model in sight.

- ``stats``: group statistics (advantages, dispersion, vote entropy of the answers).
- ``controllers``: the adaptive clip (per-group eps) and temperature (per-group tau)
  controllers, ``AGPOController``.
- ``recipes``: named sets of defaults (``--recipe``).

May import: ``agpo.errors`` and ``agpo.tasks.rewards`` (answer keys for vote entropy).
Never model, rollout, distributed or training code: the TRL integration of
``agpo_kernels`` uses this package alone.
"""
