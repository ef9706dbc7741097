"""Surviving a long run, and reading what it wrote.

- ``checkpoint``: saving, finding and resuming checkpoints.
- ``guard``: the run's guard settings, non-finite steps, the exit status of an exception.
- ``preempt``: SIGTERM / SIGUSR1 handling (finish the step, checkpoint, exit 75).
- ``metrics_log``: ``metrics.jsonl`` / ``events.jsonl`` (and TensorBoard).
- ``plots``: training curves of run directories.

May import: ``agpo.errors``, ``agpo.scale`` (sharded saving); never training code or a
command-line module.
"""
