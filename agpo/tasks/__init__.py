"""Tasks: problems with verifiable answers, how answers are rewarded, how a model is evaluated.

- ``problems``: the ``Problem`` record every source produces.
- ``data``: ``DataConfig`` and ``load_problems`` (files, packaged sets, Hugging Face).
- ``generators``: the embedded ``a+b=`` task and the reasoning-gym generators.
- ``rewards``: answer extraction and the reward functions (GSM8K, MATH, ...).
- ``verifier``: symbolic answer equivalence in worker processes, with timeouts.
- ``evaluate``: batched generation and held-out accuracy.

May import: ``agpo.errors``, ``agpo.models``. Never training, rollout, scale or runtime code.
"""
