"""Full AGPO inside TRL: the probe group, the per-prompt temperature and the per-group clip,
run by ``trainer.train()`` (``agpo.integrations.trl.AGPOTrainer``).

The embedded default of ``python -m agpo.train`` (the tiny preset on the ``a+b=`` task, a
short supervised warm-up so that some answers are right), trained by TRL's ``GRPOTrainer``
with the AGPO rollout and the fused loss. Runs on a laptop CPU in under a minute and
prints, per step, the temperatures the controller gave the prompts and the clip ranges it
gave the groups. For real work pass your model, dataset and reward functions; keep
``use_vllm=False`` (AGPO samples each prompt at its own temperature with agpo's sampler).

    pip install -e ".[trl]"
    python examples/trl_agpo.py [--steps 4]
"""

import argparse
import tempfile

import torch
from datasets import Dataset
from trl import GRPOConfig

from agpo.algo.controllers import ControllerConfig
from agpo.integrations.trl import AGPOTrainer, AGPOTRLConfig
from agpo.learn.policy import Policy
from agpo.learn.sft import supervised_warmup
from agpo.models import load_model_and_tokenizer
from agpo.tasks.data import load_problems
from agpo.tasks.rewards import correctness_reward


def reward(prompts, completions, reference, **kwargs):
    """1.0 where the completion's answer equals the reference (agpo's correctness reward)."""
    return [correctness_reward(p, c, r) for p, c, r in zip(prompts, completions, reference)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="GRPO steps (default 4)")
    ap.add_argument("--sft-steps", type=int, default=400, help="supervised warm-up steps (default 400)")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer("tiny", seed=0)
    problems = load_problems(dataset="arith", split="train")
    supervised_warmup(Policy(model), tok, problems, steps=args.sft_steps, batch_size=64, lr=2e-3, progress=False)
    data = Dataset.from_dict({"prompt": [p.prompt for p in problems[:256]],
                              "reference": [p.reference for p in problems[:256]]})

    config = GRPOConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, bf16=False, report_to=[], save_strategy="no",
                        num_generations=8, per_device_train_batch_size=32, max_completion_length=8,
                        max_steps=args.steps, logging_steps=1, learning_rate=1e-4, beta=0.0, loss_type="dapo")
    agpo = AGPOTRLConfig(controller=ControllerConfig(lambda_temp=0.5))  # the paper's controllers; tau moves more
    trainer = AGPOTrainer(model=model, processing_class=tok, reward_funcs=reward, args=config, train_dataset=data,
                          agpo=agpo)
    trainer.train()
    for log in trainer.state.log_history:
        if "agpo/tau_mean" in log and "reward" in log:
            print(f"step {log['step']}: reward {log['reward']:.3f}  tau {log['agpo/tau_min']:.3f}-"
                  f"{log['agpo/tau_max']:.3f} (mean {log['agpo/tau_mean']:.3f})  eps {log['agpo/eps_min']:.3f}-"
                  f"{log['agpo/eps_max']:.3f} (mean {log['agpo/eps_mean']:.3f})  probe tokens "
                  f"{log['agpo/probe_tokens']}  generated {log['agpo/generated_tokens']}")


if __name__ == "__main__":
    main()
