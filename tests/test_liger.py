"""Liger-Kernel's decoder kernels on the policy (agpo.scale.liger), run in Triton's CPU interpreter.

Two gaps of the interpreter (triton 3.9) keep Liger's kernels from running there as they
are, and ``interpreter_gaps`` fills them for the test only: float scalar arguments reach
the kernel as Python floats (compiled Triton passes fp32 scalars, on which Liger calls
``.to``), and libdevice's ``rsqrt`` (CUDA's) is not interpreted (``tl.rsqrt`` is the same
function). The kernels' own code runs unchanged.
"""

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("liger_kernel")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from test_packing import loss_args, uneven_batch  # noqa: E402
from tolerance import assert_close_scaled  # noqa: E402
from transformers.models.qwen2 import modeling_qwen2  # noqa: E402

from agpo.config import TrainConfig  # noqa: E402
from agpo.learn.launch import resolve_defaults  # noqa: E402
from agpo.learn.policy import Policy  # noqa: E402
from agpo.learn.trainer import Trainer  # noqa: E402
from agpo.models import load_model_and_tokenizer  # noqa: E402
from agpo.scale.liger import LigerError, apply_liger, wants_liger  # noqa: E402


@triton.jit
def _rsqrt(x):
    return tl.rsqrt(x)


@pytest.fixture
def interpreter_gaps(monkeypatch):
    from triton.runtime import interpreter

    if not hasattr(interpreter, "_implicit_cvt"):
        pytest.skip("this triton's interpreter has another layout; the shim needs updating")
    convert = interpreter._implicit_cvt

    def with_fp32_scalars(arg):
        if isinstance(arg, float):
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return convert(arg)

    import liger_kernel.ops.rms_norm as liger_rms_norm
    monkeypatch.setattr(interpreter, "_implicit_cvt", with_fp32_scalars)
    monkeypatch.setattr(liger_rms_norm, "rsqrt", _rsqrt)
    # Liger patches module-level names of the family: restore them after the test
    for name in ("apply_rotary_pos_emb", "Qwen2RMSNorm", "Qwen2MLP"):
        monkeypatch.setattr(modeling_qwen2, name, getattr(modeling_qwen2, name))
    monkeypatch.setattr(modeling_qwen2.Qwen2ForCausalLM, "forward", modeling_qwen2.Qwen2ForCausalLM.forward)


def test_liger_decoder_equals_the_plain_one(interpreter_gaps):
    """Logits equal within fp32 rounding; one training step's gradient equal within the
    rounding bound; Liger's loss is never applied (the model's forward and the cross-entropy
    stay transformers')."""
    model, tok = load_model_and_tokenizer("tiny", seed=0)
    ids = tok(["12+34=", "5+6=", "99+1="], return_tensors="pt", padding=True)
    batch = uneven_batch(model.config.vocab_size, seed=3)
    args = loss_args(batch, "token-mean")
    with torch.no_grad():
        want = model(**ids).logits
    grads = {}
    forward = type(model).forward
    for name in ("plain", "liger"):
        cfg = TrainConfig()
        cfg.model.device, cfg.rollout.engine = "cpu", "hf"  # whatever this machine has
        cfg = resolve_defaults(cfg)
        cfg.optim.update_epochs, cfg.model.liger = 1, name == "liger"
        net = copy.deepcopy(model)
        if name == "liger":
            assert apply_liger(net, "cpu") == "qwen2"
            from liger_kernel.transformers.rms_norm import LigerRMSNorm
            from liger_kernel.transformers.rope import liger_rotary_pos_emb
            from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
            assert net.model.norm.forward.__func__ is LigerRMSNorm.forward
            assert net.model.layers[0].mlp.forward.__func__ is LigerSwiGLUMLP.forward
            assert modeling_qwen2.apply_rotary_pos_emb is liger_rotary_pos_emb
            assert type(net).forward is forward and "forward" not in vars(net)  # no fused linear cross-entropy
            with torch.no_grad():
                got = net(**ids).logits
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        tr = Trainer(cfg, net, tok, [object()])
        names = {id(p): n for n, p in tr.model.named_parameters()}
        seen = []
        tr.optimizer.register_step_pre_hook(lambda opt, a, k: seen.append(
            {names[id(p)]: p.grad.clone() for g in opt.param_groups for p in g["params"] if p.grad is not None}))
        tr.update(batch, args["advantages"], args["eps_low"], args["old_logp"], args["ref_logp"])
        grads[name] = seen[0]
    n_reduce = int(batch.completion_mask.sum()) * model.config.hidden_size
    assert_close_scaled(grads["liger"], grads["plain"], dtype=torch.float32, n_reduce=n_reduce)


def test_liger_refuses_what_it_cannot_do(monkeypatch):
    model, _ = load_model_and_tokenizer("tiny", seed=0)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(LigerError, match="--liger: .*need a CUDA device.*--no-liger"):
        apply_liger(model, "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    other = copy.deepcopy(model)
    other.config.model_type = "no-such-family"
    with pytest.raises(LigerError, match="no kernels for model type 'no-such-family'"):
        apply_liger(other, "cpu")
    # the default: on only where it can run (CUDA and a family Liger knows), else off, no error
    assert not wants_liger(model, "cpu") and not wants_liger(other, "cuda")
    assert wants_liger(model, "cuda")
    assert isinstance(Policy(model).model, type(model))
