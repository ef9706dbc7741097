"""agpo as a verl plugin, against real verl 0.9.1 code (in ``.venv-verl``: ``bash
scripts/verl_env.sh``, then ``.venv-verl/bin/python -m pytest tests/test_verl_plugin.py``;
.ci/run does both; skipped where verl is not installed).

- ``import verl`` alone registers agpo's loss and estimator, in the driver and in a Ray worker;
  ``check()`` names a wrong verl version;
- the ``"agpo"`` policy loss equals verl's ``"vanilla"`` with a constant clip range (dual
  clip matched), loss and gradients, every aggregation;
- ``agpo_ppo_loss`` (verl's ``ppo_loss`` with per-row eps) equals ``agpo_loss(impl="reference")``
  with per-row eps, per-row temperature, k3 KL (clamped at 10 as verl's), entropy bonus and
  importance weights: loss and gradients;
- the ``"agpo"`` estimator equals agpo's group advantages per uid, uneven groups included;
- the ``"agpo_single_turn"`` agent loop sends each sample's request at its own temperature.
"""

import os
import subprocess
import sys

import pytest
import torch

verl = pytest.importorskip("verl", reason="verl is not installed here; .ci/run runs this file in .venv-verl")

from verl.trainer.ppo.core_algos import (  # noqa: E402
    ADV_ESTIMATOR_REGISTRY,
    POLICY_LOSS_REGISTRY,
    get_adv_estimator_fn,
    get_policy_loss_fn,
)
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402

import agpo_kernels.integrations.verl as plugin  # noqa: E402
from agpo.algo.stats import group_advantages  # noqa: E402
from agpo_kernels import agpo_loss, linear_logprobs  # noqa: E402
from agpo_kernels.integrations.verl.losses import agpo_ppo_loss  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def actor_config(**kw):
    base = dict(strategy="fsdp", ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=2, use_dynamic_bsz=False,
                rollout_n=1)
    return ActorConfig(**{**base, **kw})


def test_import_verl_registers_agpo_in_the_driver_and_a_ray_worker():
    code = ("import verl\nfrom verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, ADV_ESTIMATOR_REGISTRY\n"
            "import ray\nray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)\n"
            "@ray.remote\ndef seen():\n    import verl\n    from verl.trainer.ppo.core_algos import "
            "POLICY_LOSS_REGISTRY as P, ADV_ESTIMATOR_REGISTRY as A\n    return 'agpo' in P and 'agpo' in A\n"
            "print('driver', 'agpo' in POLICY_LOSS_REGISTRY and 'agpo' in ADV_ESTIMATOR_REGISTRY)\n"
            "print('worker', ray.get(seen.remote()))\nray.shutdown()\n")
    env = {k: v for k, v in os.environ.items() if k != "VERL_USE_EXTERNAL_PLUGINS"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "driver True" in out.stdout and "worker True" in out.stdout, out.stdout[-2000:]


def test_check_passes_here_and_names_another_version(monkeypatch):
    plugin.check()
    assert "agpo" in POLICY_LOSS_REGISTRY and "agpo" in ADV_ESTIMATOR_REGISTRY
    monkeypatch.setattr(verl, "__version__", "0.10.0")
    with pytest.raises(RuntimeError, match=r"verl 0\.10\.0 is installed; .* pinned to 0\.9\.1: pip install"):
        plugin.check()


def _inputs(seed, B=4, R=7):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, R, generator=g) * 3 - 0.2
    old = lp + 0.4 * torch.randn(B, R, generator=g)
    adv = torch.randn(B, 1, generator=g).expand(B, R).clone()
    mask = torch.rand(B, R, generator=g) > 0.2
    mask[2] = False  # a fully masked response
    mask[0, :3] = True
    adv[0] = -adv[0].abs() - 0.1  # a negative advantage whose ratio passes the dual clip's 3
    old[0, :3] = lp[0, :3] - 1.5
    isw = torch.rand(B, R, generator=g) + 0.5
    return lp, old, adv, mask, isw


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("isw", [False, True])
def test_agpo_policy_loss_equals_vanilla_with_a_constant_clip(agg, isw):
    lp, old, adv, mask, w = _inputs(0)
    cfg = actor_config(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0)
    out = {}
    for mode in ("agpo", "vanilla"):
        x = lp.clone().requires_grad_()
        loss, metrics = get_policy_loss_fn(mode)(old_log_prob=old, log_prob=x, advantages=adv, response_mask=mask,
                                                 loss_agg_mode=agg, config=cfg,
                                                 rollout_is_weights=w if isw else None)
        out[mode] = (loss, torch.autograd.grad(loss, x)[0], metrics)
    torch.testing.assert_close(out["agpo"][0], out["vanilla"][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out["agpo"][1], out["vanilla"][1], rtol=1e-6, atol=1e-7)
    for k in ("actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl"):
        assert out["agpo"][2][k] == pytest.approx(out["vanilla"][2][k], abs=1e-6), k
    assert out["vanilla"][2]["actor/pg_clipfrac"] > 0 and out["vanilla"][2]["actor/pg_clipfrac_lower"] > 0


def _verl_batch(logp, ent, y, prompt_len, mask, old, adv, isw, ref, eps):
    """verl's padded micro-batch TensorDict and model output for responses ``y [B, R]`` with
    full prompts of ``prompt_len`` tokens (log-probs sit one position left of their token)."""
    B, R = y.shape
    flat_lp, flat_ent = [], []
    for b in range(B):
        n = int(mask[b].sum()) if mask[b].any() else 0
        z = torch.zeros(prompt_len - 1, dtype=logp.dtype)
        flat_lp += [z, logp[b, :n], torch.zeros(1, dtype=logp.dtype)]
        flat_ent += [z, ent[b, :n], torch.zeros(1, dtype=ent.dtype)]
    prompts = torch.ones(B, prompt_len, dtype=torch.long)
    attention = torch.cat([torch.ones(B, prompt_len, dtype=torch.long), mask.long()], 1)
    data = tu.get_tensordict({"prompts": prompts, "responses": y, "attention_mask": attention,
                              "response_mask": mask.long(), "old_log_probs": old, "advantages": adv,
                              "rollout_is_weights": isw, "ref_log_prob": ref, "agpo_eps": eps},
                             non_tensor_dict={"dp_size": 1, "batch_num_tokens": None, "global_batch_size": None})
    return {"log_probs": torch.cat(flat_lp), "entropy": torch.cat(flat_ent)}, data


def test_agpo_ppo_loss_equals_agpo_loss_with_per_row_eps_temperature_kl_and_weights():
    g = torch.Generator().manual_seed(3)
    B, R, D, V = 4, 6, 16, 41
    h0, W0 = torch.randn(B, R, D, generator=g), torch.randn(V, D, generator=g) / D**0.5
    y = torch.randint(0, V, (B, R), generator=g)
    mask = torch.ones(B, R, dtype=torch.bool)
    mask[1, 4:] = False  # responses end at different lengths (right padding)
    mask[3, 2:] = False
    temp = torch.tensor([0.7, 1.0, 1.3, 0.9])
    eps = torch.tensor([0.1, 0.25, 0.2, 0.35])
    with torch.no_grad():
        lp0, _ = linear_logprobs(h0, W0, y, temperature=temp[:, None], impl="reference")
    old = (lp0 + 0.3 * torch.randn(B, R, generator=g)) * mask
    ref = (lp0 + 0.5 * torch.randn(B, R, generator=g)) * mask
    isw = (torch.rand(B, R, generator=g) + 0.5) * mask
    adv_seq = torch.randn(B, generator=g)
    cfg = actor_config(clip_ratio=0.2, clip_ratio_c=3.0, entropy_coeff=0.01, use_kl_loss=True, kl_loss_coef=0.05,
                       kl_loss_type="low_var_kl", policy_loss={"loss_mode": "agpo"})

    h, W = h0.clone().requires_grad_(), W0.clone().requires_grad_()
    logp, ent = linear_logprobs(h, W, y, temperature=temp[:, None], impl="reference", mask=mask)
    out, data = _verl_batch(logp, ent, y, 3, mask, old, adv_seq[:, None].expand(B, R).contiguous(), isw, ref, eps)
    loss_verl, metrics = agpo_ppo_loss(cfg, out, data)
    g_verl = torch.autograd.grad(loss_verl, (h, W))

    h, W = h0.clone().requires_grad_(), W0.clone().requires_grad_()
    loss_agpo, _ = agpo_loss(h, W, y, adv_seq, old, mask=mask, eps_low=eps, eps_high=eps, temperature=temp,
                             ref_logp=ref, beta=0.05, kl_estimator="k3", kl_clamp=10.0, entropy_coef=0.01,
                             dual_clip=3.0, is_weight=isw, loss_agg="token-mean", impl="reference")
    g_agpo = torch.autograd.grad(loss_agpo, (h, W))
    torch.testing.assert_close(loss_verl, loss_agpo, rtol=1e-5, atol=1e-7)
    for a, b in zip(g_verl, g_agpo):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # the per-row eps mattered: a constant one gives another loss
    out, data = _verl_batch(logp.detach(), ent.detach(), y, 3, mask, old, adv_seq[:, None].expand(B, R).contiguous(),
                            isw, ref, torch.full((B,), 0.2))
    assert not torch.allclose(agpo_ppo_loss(cfg, out, data)[0], loss_verl.detach())


def test_agpo_ppo_loss_needs_the_agpo_policy_loss():
    cfg = actor_config()
    with pytest.raises(ValueError, match="^actor.policy_loss.loss_mode: 'vanilla'; .* set loss_mode=agpo"):
        agpo_ppo_loss(cfg, {}, tu.get_tensordict({"x": torch.zeros(1)}))


def test_agpo_estimator_is_agpo_group_advantages_per_uid():
    import numpy as np

    rewards = torch.zeros(7, 5)
    scores = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.5, 0.2, 0.9])
    lengths = torch.tensor([5, 3, 4, 5, 2, 5, 1])
    mask = (torch.arange(5)[None, :] < lengths[:, None]).float()
    for i, n in enumerate(lengths.tolist()):
        rewards[i, n - 1] = scores[i]  # outcome reward on the last token, as verl's reward managers put it
    uid = np.array(["a", "b", "a", "c", "c", "a", "b"], dtype=object)
    adv, returns = get_adv_estimator_fn("agpo")(token_level_rewards=rewards, response_mask=mask, index=uid,
                                                config=None)
    for u in ("a", "b", "c"):
        rows = [i for i, x in enumerate(uid) if x == u]
        want = group_advantages(scores[rows].double().view(1, -1)).view(-1).float()
        torch.testing.assert_close(adv[rows, 0], want, rtol=1e-6, atol=1e-7)
    assert torch.equal(adv, returns) and bool((adv[mask == 0] == 0).all())
    assert bool((adv[3:5] == 0).all())  # "c": equal rewards -> 0


def test_agent_loop_sends_each_sample_at_its_own_temperature():
    """verl's real single-turn loop under the plugin's subclass, a recording fake server (the
    pattern of verl's own CPU agent-loop tests): rows with ``agpo_temperature`` reach the
    server at it, a row without it at the rollout's; the shared params are not changed."""
    import asyncio

    from omegaconf import OmegaConf
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap, _agent_loop_registry
    from verl.utils.dataset.rl_dataset import RLHFDataset
    from verl.workers.rollout.replica import TokenOutput

    from agpo_kernels.integrations.verl.agent_loop import AGPOSingleTurnAgentLoop

    assert _agent_loop_registry["agpo_single_turn"]["_target_"].endswith("AGPOSingleTurnAgentLoop")
    sent = []

    class Server:
        async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs):
            sent.append(dict(sampling_params))
            return TokenOutput(token_ids=[11, 12], log_probs=[0.0, 0.0])

    class Tok:
        padding_side = "right"

        def apply_chat_template(self, messages, **kwargs):
            return [101, 102]

        def decode(self, ids, skip_special_tokens=True):
            return "x"

    config = OmegaConf.create({"actor_rollout_ref": {"rollout": {"prompt_length": 8, "response_length": 8,
                                                                 "multi_turn": {"tool_config_path": None}},
                                                     "model": {"path": "dummy", "tokenizer_path": "dummy"}},
                               "data": {"tool_config_path": None, "apply_chat_template_kwargs": {}}})
    shared = {"temperature": 1.0, "top_p": 1.0}
    prompt = [{"role": "user", "content": "1+1="}]

    async def rows():  # the loop object binds the running event loop: build it inside
        loop = AGPOSingleTurnAgentLoop(trainer_config=DictConfigWrap(config), server_manager=Server(), tokenizer=Tok(),
                                       processor=None, dataset_cls=RLHFDataset, data_config=DictConfigWrap(config.data))
        for tau in (0.6, 1.2, None):
            kw = {} if tau is None else {"agpo_temperature": tau}
            await loop.run(sampling_params=shared, raw_prompt=prompt, **kw)
        with pytest.raises(ValueError, match="^agpo_temperature: expected a finite temperature > 0"):
            await loop.run(sampling_params=shared, raw_prompt=prompt, agpo_temperature=0.0)
    asyncio.run(rows())
    assert [s["temperature"] for s in sent] == [0.6, 1.2, 1.0]
    assert shared == {"temperature": 1.0, "top_p": 1.0}
