"""Integrations of the fused loss with third-party trainers.

``agpo_kernels.integrations.trl``: ``AGPOGRPOTrainer`` (a ``trl.GRPOTrainer`` whose policy
loss is ``agpo_loss`` on hidden states) and ``AGPOClipCallback`` (AGPO's adaptive clip
controller alone: TRL's sampling temperature is not controlled and there is no probe
group; ``AGPOControllerCallback`` is its deprecated old name). Needs the
``trl`` extra (``pip install "agpo[trl]"``); imported on demand, so this package itself
has no third-party requirements.
"""
