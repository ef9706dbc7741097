"""``python -m agpo.verl [CONFIG.yaml] [hydra overrides]`` (or ``agpo-verl``): verl's PPO
entry (``verl.trainer.main_ppo``) with the AGPO trainer.

Composes verl's own ``ppo_trainer`` config, or CONFIG.yaml (a Hydra config whose defaults
start from ``ppo_trainer``: examples/verl/agpo_trainer.yaml), with the overrides (plus an
``agpo:`` block, e.g. ``+agpo.probe_size=4`` where the config has none), sets AGPO's choices where verl's
defaults stand (``agpo.integrations.verl.checks.apply_defaults``), refuses what AGPO cannot
run with (``check_config``: one line, exit status 2) before Ray starts, and then runs verl's
``run_ppo`` with a task runner that imports the AGPO trainer in its own process (so
``trainer.v1.trainer_mode=agpo_sync`` is registered there). Imported by nothing.
"""

from __future__ import annotations

import sys


def _config(overrides: list[str]):
    """The composed config; a first argument ending in .yaml/.yml is the config file."""
    import os

    from hydra import compose, initialize_config_dir
    from verl.trainer import main_ppo

    folder = os.path.join(os.path.dirname(os.path.abspath(main_ppo.__file__)), "config")
    name = "ppo_trainer"
    if overrides and overrides[0].endswith((".yaml", ".yml")):
        path = os.path.abspath(overrides.pop(0))
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CONFIG: {path} is not a file; pass a Hydra config such as "
                                    "examples/verl/agpo_trainer.yaml, or overrides alone")
        folder, name = os.path.dirname(path), os.path.splitext(os.path.basename(path))[0]
    with initialize_config_dir(config_dir=folder, version_base=None):
        return compose(config_name=name, overrides=overrides)


def _task_runner():
    import ray
    from verl.trainer.main_ppo import TaskRunnerV1

    class AGPOTaskRunner(TaskRunnerV1.__ray_actor_class__):
        """verl's V1 task runner, with the AGPO trainer registered in its process."""

        def run(self, config):
            import agpo.integrations.verl.trainer  # noqa: F401  (registers agpo_sync in this process)

            return super().run(config)

    return ray.remote(num_cpus=1)(AGPOTaskRunner)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    from hydra.errors import HydraException

    from agpo.integrations.verl.checks import apply_defaults, check_config, check_paths

    try:
        config = _config(argv)
        made = apply_defaults(config)
        check_config(config)
        check_paths(config)
    except (ValueError, RuntimeError, FileNotFoundError, HydraException) as exc:
        print("agpo.verl: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    if made:
        print("agpo.verl: set " + " ".join(made), file=sys.stderr)
    from verl.trainer.main_ppo import run_ppo
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    auto_set_device(config)
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    run_ppo(config, task_runner_class=_task_runner())
    return 0


if __name__ == "__main__":
    sys.exit(main())
