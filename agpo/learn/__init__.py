"""The learner: from rollouts to optimiser steps.

- ``batches``: ``SequenceBatch`` (a rollout batch) and ``PackedBatch`` (its rows packed).
- ``packing``: padding-free micro-batches sized by real tokens.
- ``policy``: the policy's scoring through the fused head (``agpo_kernels``).
- ``trainer``: one AGPO / GRPO step: rollouts, rewards, controllers, the update.
- ``phases``: the step's sampling phases: prompts, samples, rewards, the probe phase.
- ``update``: scoring a rollout batch and the optimiser steps on it (micro-batched).
- ``metrics``: the step's metric keys and per-group statistics.
- ``probe``: the probe filter and probe reuse (``--probe-filter``, ``--probe-reuse``).
- ``refill``: dropping all-equal train groups and refilling the step (``--filter-groups``).
- ``heldout``: the held-out evaluation during a run, through the engine or HF ``generate``.
- ``clipstats``: what the clip did in an update (per epoch, and against a fixed eps).
- ``sft``: the supervised warm-up.
- ``schedule``: prompt order and the learning-rate schedule.
- ``preflight``: the checks of a run's config against the machine, before anything loads.
- ``launch``: one whole run from a ``TrainConfig`` (``run``).

May import: everything below it (``algo``, ``tasks``, ``rollout``, ``scale``, ``runtime``,
``config``, ``models``, ``errors``, ``agpo_kernels``); never a command-line module.
"""
