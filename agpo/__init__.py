"""agpo: a lean AGPO (Adaptive Group Policy Optimization) training engine.

Parts live in their own modules: ``controllers`` (adaptive clip and temperature),
``rewards`` and ``data`` (tasks and verifiable rewards), ``models`` (presets and
loading), the ``rollout`` package (HF and vLLM engines), the trainer/checkpoint modules,
and ``train`` / ``eval`` entry points.
The fused LM-head loss is in the sibling package ``agpo_kernels``.
"""

__version__ = "0.1.0"
