"""agpo: a lean AGPO (Adaptive Group Policy Optimization) training engine.

The tree says where a thing lives; each sub-package's docstring says what it owns and
what it may import:

- ``agpo.algo``: the algorithm. Group statistics, the adaptive clip and temperature
  controllers, the recipes. Pure: no model, rollout or distributed code.
- ``agpo.tasks``: problems, generators, rewards and the verifier, the evaluation library.
  No training code.
- ``agpo.rollout``: the engines that sample the policy (HF ``generate``, colocated vLLM)
  and the weight sync to them.
- ``agpo.learn``: the learner. Batches and packing, the policy's scoring, the trainer's
  step, the supervised warm-up, the schedule, one whole run (``launch.run``).
- ``agpo.scale``: running on many devices. Distributed setup, FSDP2 layouts, streamed
  loading, LoRA, Liger-Kernel, safe DCP reading.
- ``agpo.runtime``: surviving a long run. Checkpoints, the step guard and exit statuses,
  preemption (SIGTERM), metrics logs and plots.
- ``agpo.integrations``: the whole AGPO step inside other trainers (TRL's ``GRPOTrainer``).
  Imported by nothing of ``agpo``.
- Shared at the top: ``config`` (the run config and its CLI), ``models`` (presets and
  loading), ``errors`` (the errors that end a run, with their exit statuses).
- Command-line modules, thin, imported by nothing: ``train``, ``eval``, ``plot``, ``plan`` (the
  memory plan of a run, ``agpo.scale.memory``), ``verl`` (AGPO on verl's trainer,
  ``agpo.integrations.verl``; it needs verl's own environment).

Rules checked by tests/test_layout.py: no import cycle between modules; ``agpo.algo``
imports only ``agpo.algo``, ``agpo.errors`` and ``agpo.tasks.rewards`` (answer keys);
``agpo.tasks`` imports no ``learn``, ``rollout``, ``scale`` or ``runtime`` code; nothing
imports a command-line module. The fused LM-head loss is the sibling package
``agpo_kernels``, which imports nothing of ``agpo`` (its trainer integrations aside).
"""

__version__ = "0.1.0"
