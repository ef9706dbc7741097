"""What ``python -m agpo.verl`` and the AGPO trainer refuse, against verl 0.9.1's own composed
config (``agpo.integrations.verl.checks``), and the entry command itself: each bad config is
refused in one line naming the fix, before Ray starts; AGPO's defaults are set only where
verl's stand. Skipped where verl is not installed (``.ci/run`` runs it in ``.venv-verl``).
"""

import os
import subprocess
import sys

import pytest

verl = pytest.importorskip("verl", reason="verl is not installed here; .ci/run runs this file in .venv-verl")

from agpo.integrations.verl.checks import apply_defaults, check_config  # noqa: E402
from agpo.integrations.verl.config import AGPOVerlConfig  # noqa: E402
from verl_cpu import verl_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


BAD = [
    (["trainer.v1.trainer_mode=colocate_async"], r"^trainer\.v1\.trainer_mode: 'colocate_async'; an async mode .*: "
     r"set trainer\.v1\.trainer_mode=agpo_sync$"),
    (["trainer.v1.trainer_mode=separate_async"], r"^trainer\.v1\.trainer_mode: 'separate_async'; an async mode"),
    (["trainer.use_v1=false"], r"^trainer\.use_v1: false .* set trainer\.use_v1=true$"),
    (["actor_rollout_ref.model.use_fused_kernels=true"],
     r"^actor_rollout_ref\.model\.use_fused_kernels: verl's fused head \(torch\) refuses a per-row temperature; set "
     r"actor_rollout_ref\.model\.use_fused_kernels=false, or .*impl_backend=agpo"),
    (["actor_rollout_ref.model.use_fused_kernels=true", "actor_rollout_ref.model.fused_kernel_options.impl_backend=agpo",
      "trainer.device=npu"],
     r"^actor_rollout_ref\.model\.fused_kernel_options\.impl_backend=agpo: agpo's head is an FSDP engine for CUDA, "
     r"here strategy='fsdp' on trainer\.device='npu'; set actor_rollout_ref\.model\.use_fused_kernels=false$"),
    (["actor_rollout_ref.actor.policy_loss.loss_mode=gspo"],
     r"^actor_rollout_ref\.actor\.policy_loss\.loss_mode: 'gspo'; .*: set actor_rollout_ref\.actor\.policy_loss\."
     r"loss_mode=agpo$"),
    (["algorithm.adv_estimator=grpo"], r"^algorithm\.adv_estimator: 'grpo'; .*: set algorithm\.adv_estimator=agpo$"),
    (["actor_rollout_ref.rollout.agent.default_agent_loop=tool_agent"],
     r"^actor_rollout_ref\.rollout\.agent\.default_agent_loop: 'tool_agent'; .*=agpo_single_turn$"),
    (["algorithm.filter_groups.enable=true"], r"^algorithm\.filter_groups\.enable: .*set algorithm\.filter_groups"
     r"\.enable=false$"),
    (["trainer.v1.sampler.sync_refill_failed_groups=true"],
     r"^trainer\.v1\.sampler\.sync_refill_failed_groups: True; .*: set trainer\.v1\.sampler\.sync_refill_failed_"
     r"groups=false$"),
    (["trainer.v1.sampler.custom_sampler.path=my.py"], r"^trainer\.v1\.sampler\.custom_sampler\.path: 'my\.py'; .*=null$"),
    (["algorithm.rollout_correction.bypass_mode=true"], r"^algorithm\.rollout_correction\.bypass_mode: True; .*=false$"),
    (["distillation.enabled=true"], r"^distillation\.enabled: True; .*: set distillation\.enabled=false$"),
    (["+algorithm.agpo.dispersion=mad"], r"^algorithm\.agpo: .* move the settings there$"),
    (["+agpo.probe_size=1"], r"^agpo\.probe_size: expected an int >= 2 or null, got 1"),
    (["+agpo.bogus=1"], r"^agpo: unknown keys \['bogus'\]"),
    (["+agpo.controller.tau_bas=1"], "^agpo\\.controller: unk"),
    (["actor_rollout_ref.rollout.n=1"], r"^actor_rollout_ref\.rollout\.n: 1; AGPO's group statistics need >= 2"),
]


@pytest.mark.parametrize("overrides, message", BAD)
def test_check_config_refuses_with_one_line(overrides, message):
    cfg = verl_config("actor_rollout_ref.rollout.n=4", *overrides)
    with pytest.raises(ValueError) as err:
        check_config(cfg)
    text = str(err.value)
    assert "\n" not in text
    assert __import__("re").search(message, text), text


def test_check_config_accepts_the_defaults_and_names_a_wrong_verl(monkeypatch):
    check_config(verl_config("actor_rollout_ref.rollout.n=4", "actor_rollout_ref.model.use_fused_kernels=true",
                             "actor_rollout_ref.model.fused_kernel_options.impl_backend=agpo"))  # agpo's head: fine
    cfg = verl_config("actor_rollout_ref.rollout.n=4", "+agpo.probe_size=3", "+agpo.controller.tau_base=0.9")
    agpo = check_config(cfg)
    assert agpo.probe_size == 3 and agpo.controller.tau_base == 0.9 and agpo.group_sizes(4) == (4, 3)
    assert AGPOVerlConfig.from_config(verl_config("actor_rollout_ref.rollout.n=4")) == AGPOVerlConfig()
    monkeypatch.setattr(verl, "__version__", "0.10.0")
    with pytest.raises(RuntimeError, match=r"^verl 0\.10\.0 is installed; .* pinned to 0\.9\.1: pip install"):
        check_config(cfg)


def test_check_config_names_a_missing_plugin(monkeypatch):
    from verl.trainer.ppo import core_algos

    monkeypatch.delitem(core_algos.POLICY_LOSS_REGISTRY, "agpo")
    with pytest.raises(RuntimeError, match=r"^verl has no 'agpo' policy loss: the verl.plugins entry point of agpo was "
                                           r"not loaded; pip install -e \."):
        check_config(verl_config("actor_rollout_ref.rollout.n=4"))


def test_apply_defaults_sets_only_verls_defaults():
    cfg = verl_config("algorithm.adv_estimator=grpo", defaults=False)
    made = apply_defaults(cfg)
    assert "algorithm.adv_estimator=agpo" not in made and cfg.algorithm.adv_estimator == "grpo"
    assert cfg.trainer.v1.trainer_mode == "agpo_sync" and cfg.actor_rollout_ref.actor.policy_loss.loss_mode == "agpo"
    assert cfg.actor_rollout_ref.rollout.agent.default_agent_loop == "agpo_single_turn"


ENTRY_REFUSALS = [  # (argv, the one line on stderr)
    (["trainer.v1.trainer_mode=separate_async"],
     "agpo.verl: trainer.v1.trainer_mode: 'separate_async'; an async mode samples the next batch while the last "
     "trains, and AGPO's temperatures need this step's probe first: set trainer.v1.trainer_mode=agpo_sync"),
    (["actor_rollout_ref.rollout.n=4", "actor_rollout_ref.model.path=/nonexistent/qwen"],
     "agpo.verl: actor_rollout_ref.model.path: /nonexistent/qwen does not exist; point it at a local model folder "
     "(docs/verl.md)"),
    (["actor_rollout_ref.rollout.n=4", "actor_rollout_ref.model.path=Qwen/Qwen2.5-0.5B",
      "data.train_files=./no/train.parquet"],
     "agpo.verl: data.train_files: ./no/train.parquet does not exist; point it at a local parquet file "
     "(docs/verl.md)"),
    (["missing.yaml"], "agpo.verl: CONFIG: {root}/missing.yaml is not a file; pass a Hydra config such as "
     "examples/verl/agpo_trainer.yaml, or overrides alone"),
    (["actor_rollout_ref.actor.no_such_key=1"], "agpo.verl: Could not override 'actor_rollout_ref.actor.no_such_key'."),
]


def test_entry_refuses_before_ray_starts():
    """``python -m agpo.verl`` with what AGPO cannot run: one line on stderr, exit 2, no Ray."""
    code = ("import contextlib, io, json, sys, ray\nfrom agpo.verl import main\nout = []\n"
            f"for argv in {[a for a, _ in ENTRY_REFUSALS]!r}:\n"
            "    err = io.StringIO()\n    with contextlib.redirect_stderr(err):\n        rc = main(argv)\n"
            "    out.append([rc, [x for x in err.getvalue().splitlines() if x.startswith('agpo.verl:')]])\n"
            "print(json.dumps({'ray': ray.is_initialized(), 'runs': out}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    got = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    assert got["ray"] is False
    for (argv, line), (rc, lines) in zip(ENTRY_REFUSALS, got["runs"]):
        assert rc == 2 and len(lines) == 1, (argv, lines)
        assert lines[0].startswith(line.format(root=ROOT)), (argv, lines[0])


def test_entry_task_runner_is_verls_with_the_trainer_registered():
    """The entry's task runner is verl's V1 runner class, and the trainer module registers
    ``agpo_sync`` in verl's registry."""
    from verl.trainer.main_ppo import TaskRunnerV1
    from verl.trainer.ppo.v1 import PPOTrainerSync, get_trainer_cls

    from agpo.integrations.verl.trainer import AGPOTrainer
    from agpo.verl import _task_runner

    runner = _task_runner()
    assert issubclass(runner.__ray_actor_class__, TaskRunnerV1.__ray_actor_class__)
    assert get_trainer_cls("agpo_sync") is AGPOTrainer and issubclass(AGPOTrainer, PPOTrainerSync)
