"""Running on many devices and big models.

- ``distributed``: process groups, collectives, sharded save / load, the HF export.
- ``parallel``: the FSDP2 layout of the policy (``prepare_layout``), activation checkpointing.
- ``loading``: empty (meta) models and weights streamed straight into each rank's shards.
- ``lora``: LoRA adapters (peft) and their placement.
- ``liger``: Liger-Kernel's RMSNorm / RoPE / SwiGLU in the decoder.
- ``dcp_safe``: reading a DCP checkpoint folder as untrusted input.
- ``memory``: the memory plan per GPU and phase from a config.json alone (``python -m agpo.plan``).
- ``sizing``: what a run does with its plan: the memory settings it left unset, the refusal
  of a run that does not fit, the plan as tables.

May import: ``agpo.errors``, ``agpo.models``, ``agpo.learn.policy`` (what it shards) and
each other; never a command-line module.
"""
