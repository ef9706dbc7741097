"""Bad input gets a ValueError that names the argument."""

import pytest
import torch

from agpo_kernels import agpo_loss, linear_logprobs

B, T, D, V = 2, 3, 8, 11


def args(**over):
    a = dict(hidden=torch.randn(B, T, D), weight=torch.randn(V, D), targets=torch.randint(0, V, (B, T)),
             advantages=torch.randn(B), old_logp=-torch.rand(B, T))
    a.update(over)
    return a


def call(kw=None, **over):
    a = args(**over)
    return agpo_loss(a.pop("hidden"), a.pop("weight"), a.pop("targets"), a.pop("advantages"),
                     a.pop("old_logp"), impl="torch", **(kw or {}))


@pytest.mark.parametrize("over,kw,name", [
    (dict(targets=torch.full((B, T), V)), None, "targets"),
    (dict(targets=torch.full((B, T), -1)), None, "targets"),
    (dict(targets=torch.zeros(B, T)), None, "targets"),
    (dict(targets=torch.zeros(B, T + 1, dtype=torch.long)), None, "targets"),
    (dict(weight=torch.randn(V, D + 1)), None, "weight"),
    (dict(weight=torch.randn(V, D, dtype=torch.float64)), None, "weight"),
    (dict(hidden=torch.randn(B, T, D, dtype=torch.float64), weight=torch.randn(V, D, dtype=torch.float64)), None, "hidden"),
    (dict(advantages=torch.tensor([0.0, float("nan")])), None, "advantages"),
    (dict(advantages=torch.randn(B + 1)), None, "advantages"),
    (dict(old_logp=torch.full((B, T), float("inf"))), None, "old_logp"),
    (dict(old_logp=torch.zeros(B, T + 1)), None, "old_logp"),
    (dict(), dict(eps_low=0.0), "eps_low"),
    (dict(), dict(eps_high=torch.tensor([0.2, -0.1])), "eps_high"),
    (dict(), dict(temperature=0.0), "temperature"),
    (dict(), dict(temperature=torch.tensor([1.0, -1.0])), "temperature"),
    (dict(), dict(loss_agg="mean"), "loss_agg"),
    (dict(), dict(kl_estimator="k4", ref_logp=torch.zeros(B, T), beta=0.1), "kl_estimator"),
    (dict(), dict(beta=0.1), "ref_logp"),
    (dict(), dict(beta=-1.0), "beta"),
    (dict(), dict(beta=float("inf"), ref_logp=torch.zeros(B, T)), "beta"),
    (dict(), dict(beta="high", ref_logp=torch.zeros(B, T)), "beta"),
    (dict(), dict(dual_clip=0.5), "dual_clip"),
    (dict(), dict(dual_clip=float("nan")), "dual_clip"),
    (dict(), dict(entropy_coef=float("nan")), "entropy_coef"),
    (dict(), dict(entropy_coef=None), "entropy_coef"),
    (dict(), dict(eps_low="wide"), "eps_low"),
    (dict(), dict(mask=torch.ones(B, T + 1)), "mask"),
    (dict(), dict(impl="cuda-magic"), "impl"),
    (dict(hidden=torch.randn(0, T, D), targets=torch.zeros(0, T, dtype=torch.long),
          advantages=torch.zeros(0), old_logp=torch.zeros(0, T)), None, "hidden"),
    (dict(), dict(backward="twice"), "backward"),
    (dict(), dict(compute_dtype=torch.int32), "compute_dtype"),
    (dict(), dict(memory_budget=0), "memory_budget"),
    (dict(), dict(is_weight=torch.full((B, T), -0.5)), "is_weight"),
    (dict(), dict(is_weight=torch.full((B, T), float("nan"))), "is_weight"),
    (dict(), dict(is_weight=torch.ones(B, T + 1)), "is_weight"),
    (dict(), dict(max_len=0), "max_len"),
    (dict(), dict(process_group=object()), "process_group"),
    (dict(weight=torch.randn(V, D).to("meta")), None, "weight"),
])
def test_agpo_loss_rejects(over, kw, name):
    kw = dict(kw or {})
    impl = kw.pop("impl", None)
    a = args(**over)
    with pytest.raises(ValueError, match=f"^{name}:"):
        agpo_loss(a.pop("hidden"), a.pop("weight"), a.pop("targets"), a.pop("advantages"),
                  a.pop("old_logp"), impl=impl or "torch", **kw)


def test_packed_layout_checks():
    h, W = torch.randn(5, D), torch.randn(V, D)
    y, old = torch.randint(0, V, (5,)), torch.zeros(5)
    with pytest.raises(ValueError, match="^cu_seqlens:"):
        agpo_loss(h, W, y, torch.zeros(2), old, cu_seqlens=torch.tensor([0, 2, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="^hidden:"):
        agpo_loss(h.view(1, 5, D), W, y, torch.zeros(2), old, cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32))
    loss, _ = agpo_loss(h, W, y, torch.zeros(2), old, cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32))
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="^cu_seqlens: on meta"):
        agpo_loss(h, W, y, torch.zeros(2), old, cu_seqlens=torch.tensor([0, 2, 5], device="meta"))


def test_linear_logprobs_rejects():
    h, W = torch.randn(4, D), torch.randn(V, D)
    with pytest.raises(ValueError, match="^targets:"):
        linear_logprobs(h, W, torch.randint(0, V, (5,)))
    with pytest.raises(ValueError, match="^targets:"):
        linear_logprobs(h, W, torch.full((4,), V))
    with pytest.raises(ValueError, match="^temperature:"):
        linear_logprobs(h, W, torch.zeros(4, dtype=torch.long), temperature=torch.ones(3))
    with pytest.raises(ValueError, match="^bias:"):
        linear_logprobs(h, W, torch.zeros(4, dtype=torch.long), bias=torch.zeros(V + 1))
    with pytest.raises(ValueError, match="^impl:"):
        linear_logprobs(h, W, torch.zeros(4, dtype=torch.long), impl="fast")
    with pytest.raises(ValueError, match="^targets:"):  # -100 is ignored, other negatives are errors
        linear_logprobs(h, W, torch.tensor([0, -100, -5, 1]))
    with pytest.raises(ValueError, match="^mask:"):
        linear_logprobs(h, W, torch.zeros(4, dtype=torch.long), mask=torch.ones(5))
    with pytest.raises(ValueError, match="^temperature:"):
        linear_logprobs(h, W, torch.zeros(4, dtype=torch.long), temperature=torch.tensor([1.0, 1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="^compute_dtype:"):
        linear_logprobs(h, W, torch.zeros(4, dtype=torch.long), compute_dtype=torch.float64)


def test_vllm_head_dtype_is_checked():
    """--vllm-head-dtype takes auto (the default), float32 or model; anything else is refused
    on the command line and in a config file, naming the flag and its values."""
    from agpo.config import RolloutConfig, TrainConfig, config_from_args
    from agpo.errors import ConfigError

    assert RolloutConfig().vllm_head_dtype == "auto"
    for value in ("auto", "float32", "model"):
        assert config_from_args(["--vllm-head-dtype", value]).rollout.vllm_head_dtype == value
    with pytest.raises(ConfigError, match="--vllm-head-dtype.*auto.*float32.*model"):
        config_from_args(["--vllm-head-dtype", "bf16"])
    with pytest.raises(ConfigError, match="^--vllm-head-dtype: expected auto, float32 or model, got 'fp32'"):
        TrainConfig.from_dict({"rollout": {"vllm_head_dtype": "fp32"}})
