"""One AGPO/GRPO policy update with agpo_loss on a Hugging Face model, no logits built.

The backbone returns hidden states; the LM-head weight (tied or not) goes to the fused
loss, which projects only the response tokens. Runs on a CPU in seconds with a small
randomly initialised Qwen2 model; swap in ``AutoModelForCausalLM.from_pretrained(...)``.

    python examples/plain_pytorch_step.py
"""

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from agpo_kernels import agpo_loss, linear_logprobs

torch.manual_seed(0)
cfg = Qwen2Config(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
model = Qwen2ForCausalLM(cfg)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

# A batch of 4 sampled sequences (prompt + response), 2 groups with per-group eps and tau.
B, P, R = 4, 6, 10
ids = torch.randint(0, cfg.vocab_size, (B, P + R))
resp_mask = torch.zeros(B, P + R, dtype=torch.bool)
resp_mask[:, P:] = True
resp_mask[1, -3:] = False  # a response that stopped early
rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
advantages = torch.cat([(r - r.mean()) / (r.std() + 1e-6) for r in rewards.view(2, 2)])
eps = torch.tensor([0.15, 0.15, 0.25, 0.25])          # per-sequence (per group) clip
tau = torch.tensor([0.8, 0.8, 1.2, 1.2])              # per-sequence sampling temperature

# Hidden state at position t predicts token t+1.
targets = ids[:, 1:]
mask = resp_mask[:, 1:]


def hidden_states():
    return model.model(input_ids=ids[:, :-1]).last_hidden_state  # [B, T, D], no logits


with torch.no_grad():  # scoring: old log-probs at each row's temperature
    old_logp, entropy = linear_logprobs(hidden_states(), model.lm_head.weight, targets,
                                        temperature=tau.view(B, 1))

for epoch in range(2):
    loss, metrics = agpo_loss(hidden_states(), model.lm_head.weight, targets, advantages, old_logp,
                              mask=mask, eps_low=eps, temperature=tau, loss_agg="token-mean")
    opt.zero_grad()
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    print(f"epoch {epoch}: loss {loss.item():+.4f}  ratio {metrics['ratio_mean'].item():.4f}  "
          f"clip_frac {metrics['clip_frac'].item():.3f}  entropy {metrics['entropy_mean'].item():.3f}  "
          f"grad_norm {grad_norm.item():.3f}")
