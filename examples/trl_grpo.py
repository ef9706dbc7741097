"""GRPO with TRL, the policy loss computed by agpo_loss from hidden states (no logits).

``AGPOGRPOTrainer`` replaces ``trl.GRPOTrainer`` one for one; ``AGPOClipCallback``
adds AGPO's adaptive per-group clip range, and only that: TRL samples every row at its one
``temperature`` and there is no probe group, so this is GRPO plus the adaptive clip, not
the full AGPO of ``python -m agpo.train`` (docs/algorithm.md). Runs on a CPU in well under a minute with a
tiny random Qwen2 model and a character tokenizer; for real work pass a model name
(``model="Qwen/Qwen2.5-0.5B-Instruct"``) and your dataset and reward functions.

    pip install -e ".[trl]"
    python examples/trl_grpo.py
"""

import tempfile

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from trl import GRPOConfig

from agpo.algo.controllers import ControllerConfig
from agpo_kernels.integrations.trl import AGPOClipCallback, AGPOGRPOTrainer

# A tiny model and tokenizer, saved to a folder as TRL loads the reference model by path.
chars = list("abcdefghijklmnopqrstuvwxyz0123456789 +=?.")
vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
torch.manual_seed(0)
config = Qwen2Config(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1)
model_dir = tempfile.mkdtemp()
Qwen2ForCausalLM(config).save_pretrained(model_dir)
tokenizer.save_pretrained(model_dir)

dataset = Dataset.from_dict({"prompt": ["1+1=", "2+3=", "4+4=", "9+0="] * 4})


def digit_reward(completions, **kwargs):
    """Toy reward: how many digits the completion contains."""
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]


args = GRPOConfig(
    output_dir=tempfile.mkdtemp(), use_cpu=True, bf16=False, report_to=[], save_strategy="no",
    max_completion_length=8, num_generations=4, per_device_train_batch_size=8, max_steps=3,
    logging_steps=1, learning_rate=1e-3,
    loss_type="dapo",              # -> agpo_loss(loss_agg="token-mean"), TRL's normaliser
    beta=0.04,                     # k3 KL to the reference model
    use_bias_correction_kl=True,   # TRL's default: k3 weighted by the ratio (kl_ratio_weight=True)
)
trainer = AGPOGRPOTrainer(
    model=model_dir, reward_funcs=digit_reward, args=args, train_dataset=dataset,
    callbacks=[AGPOClipCallback(ControllerConfig(adaptive_temp=False))],  # per-group eps from each batch
)
assert trainer.agpo_fallback is None  # this config runs on the fused loss
trainer.train()
for log in trainer.state.log_history[:-1]:
    print(f"step {log['step']}: loss {log['loss']:+.4f}  reward {log['reward']:.3f}  kl {log['kl']:.5f}  "
          f"entropy {log['entropy']:.3f}  eps {log['agpo/eps_mean']:.3f}")
