"""Padding-free micro-batches (agpo.learn.packing) against the padded path, on the tiny preset.

Packed and padded runs compute the same function of the same real tokens, so their loss,
gradients and scores agree to fp32 rounding (tests/tolerance.py) for every aggregation,
on rows of very different lengths; sequences packed into one row do not see each other.
"""

import copy

import pytest
import torch
from tolerance import assert_close_scaled, rounding_tol

from agpo.config import TrainConfig
from agpo.learn.batches import SequenceBatch
from agpo.learn.launch import resolve_defaults
from agpo.learn.packing import _balanced, micro_batches, pack, processed_tokens
from agpo.learn.policy import Policy
from agpo.learn.trainer import Trainer
from agpo.models import load_model_and_tokenizer

AGGS = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


@pytest.fixture(scope="module")
def tiny():
    return load_model_and_tokenizer("tiny", seed=0)


def uneven_batch(vocab: int, seed: int = 0) -> SequenceBatch:
    """Rows whose prompt (1..9) and completion (0..40) lengths differ widely; one row has an
    empty completion."""
    g = torch.Generator().manual_seed(seed)
    plens, clens = [9, 1, 4, 7, 2, 5], [40, 3, 0, 17, 1, 26]
    P, C = max(plens), max(clens)
    rows = len(plens)
    prompt_ids = torch.zeros(rows, P, dtype=torch.long)
    prompt_mask = torch.zeros(rows, P, dtype=torch.long)
    completion_ids = torch.zeros(rows, C, dtype=torch.long)
    completion_mask = torch.zeros(rows, C, dtype=torch.long)
    for r, (p, c) in enumerate(zip(plens, clens)):
        prompt_ids[r, P - p:] = torch.randint(3, vocab, (p,), generator=g)
        prompt_mask[r, P - p:] = 1
        completion_ids[r, :c] = torch.randint(3, vocab, (c,), generator=g)
        completion_mask[r, :c] = 1
    temperature = torch.tensor([0.7, 1.0, 1.3, 0.9, 1.5, 1.1])
    return SequenceBatch(prompt_ids, prompt_mask, completion_ids, completion_mask, temperature)


def loss_args(batch: SequenceBatch, agg: str, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    R, C = batch.completion_ids.shape
    return dict(advantages=torch.randn(R, generator=g), old_logp=-3.0 + torch.randn(R, C, generator=g),
                ref_logp=-3.0 + torch.randn(R, C, generator=g), eps_low=torch.full((R,), 0.2),
                eps_high=torch.full((R,), 0.28), beta=0.05, kl_estimator="k3", entropy_coef=0.01, loss_agg=agg,
                max_len=48)


def loss_and_grads(policy: Policy, inp, args: dict):
    policy.zero_grad(set_to_none=True)
    loss, m = policy(inp, args)
    loss.backward()
    return loss.detach(), m, {n: p.grad.detach().clone() for n, p in policy.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("agg", AGGS)
def test_packed_equals_padded(tiny, agg):
    model, _ = tiny
    policy = Policy(copy.deepcopy(model), impl="torch")
    batch = uneven_batch(model.config.vocab_size)
    args = loss_args(batch, agg)
    l_pad, m_pad, g_pad = loss_and_grads(policy, batch, args)
    packed = pack(batch)
    assert packed.tokens == int(batch.prompt_mask[batch.completion_mask.sum(1) > 0].sum() + batch.completion_mask.sum())
    flat = {k: packed.flat(v) if k in ("old_logp", "ref_logp") else v for k, v in args.items()}
    l_pack, m_pack, g_pack = loss_and_grads(policy, packed, flat)
    n_reduce = int(batch.completion_mask.sum()) * model.config.hidden_size
    assert float(l_pack) == pytest.approx(float(l_pad), rel=rounding_tol(torch.float32, n_reduce))
    assert_close_scaled(g_pack, g_pad, dtype=torch.float32, n_reduce=n_reduce, what=f"{agg}: ")
    for k in ("clip_frac", "ratio_mean", "kl_mean", "entropy_mean"):
        assert float(m_pack[k]) == pytest.approx(float(m_pad[k]), rel=1e-4, abs=1e-6), k
    torch.testing.assert_close(m_pack["logp"], m_pad["logp"][batch.completion_mask.bool()], rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # scoring: [R, C] like the padded batch
        lp_pad, h_pad = policy(batch)
        lp_pack, h_pack = policy(packed)
    torch.testing.assert_close(lp_pack, lp_pad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h_pack, h_pad, rtol=1e-4, atol=1e-5)


def test_packed_sequences_do_not_see_each_other(tiny):
    """Changing one sequence's tokens leaves the other sequences' hidden states as they were
    (bit for bit would be too strong: another row length changes the SDPA kernel's tiling)."""
    model, _ = tiny
    policy = Policy(model, impl="torch")
    batch = uneven_batch(model.config.vocab_size)
    other = copy.deepcopy(batch)
    other.completion_ids[3, :17] = (other.completion_ids[3, :17] + 1 - 3) % (model.config.vocab_size - 3) + 3
    with torch.no_grad():
        a, b = policy.packed_hidden(pack(batch)), policy.packed_hidden(pack(other))
    lens = batch.completion_mask.sum(1).tolist()
    start = sum(lens[:3])
    keep = torch.ones(a.shape[0], dtype=torch.bool)
    keep[start + 1:start + lens[3]] = False  # row 3's own later positions see its changed tokens
    torch.testing.assert_close(a[keep], b[keep], rtol=1e-5, atol=1e-6)
    assert (a[~keep] - b[~keep]).abs().max() > 1e-3


def test_balanced_micro_batches():
    sizes = [50, 3, 3, 40, 7, 30, 30, 12, 90, 1]
    bins = _balanced(sizes, 60)
    assert sorted(i for b in bins for i in b) == list(range(len(sizes)))
    loads = [sum(sizes[i] for i in b) for b in bins]
    assert [b for b in bins if sizes[b[0]] > 60] == [[8]]           # too long for any bin: alone
    assert all(load <= 60 for b, load in zip(bins, loads) if b != [8])
    assert len(bins) == 3 + 1                                        # the other 176 tokens fit 3 bins of 60
    fitting = [load for b, load in zip(bins, loads) if b != [8]]
    assert max(fitting) - min(fitting) <= 2                          # similar work: 58, 58, 60


def test_update_packed_equals_padded_and_counts_tokens(tiny):
    """Through the trainer: micro-batched, packed and padded updates apply the same
    gradient; the packed pass processes only real tokens (the padded one more
    (about 1.2x) on this batch)."""
    model, tok = tiny
    batch = uneven_batch(model.config.vocab_size, seed=2)
    args = loss_args(batch, "token-mean")
    runs = {}
    for packing in (True, False):
        cfg = TrainConfig()
        cfg.model.device, cfg.rollout.engine = "cpu", "hf"  # whatever this machine has
        cfg = resolve_defaults(cfg)
        cfg.optim.update_epochs, cfg.optim.micro_batch_tokens, cfg.optim.packing = 1, 60, packing
        tr = Trainer(cfg, copy.deepcopy(model), tok, [object()])
        names = {id(p): n for n, p in tr.model.named_parameters()}
        grads = []
        tr.optimizer.register_step_pre_hook(lambda opt, a, k: grads.append(
            {names[id(p)]: p.grad.clone() for g in opt.param_groups for p in g["params"] if p.grad is not None}))
        m = tr.update(batch, args["advantages"], args["eps_low"], args["old_logp"], args["ref_logp"])
        runs[packing] = (m, grads[0])
    (m_pack, g_pack), (m_pad, g_pad) = runs[True], runs[False]
    assert m_pack["update/processed_tokens"] / m_pack["update/real_tokens"] <= 1.05
    assert m_pad["update/processed_tokens"] / m_pad["update/real_tokens"] > 1.15  # what packing saves here
    n_reduce = int(batch.completion_mask.sum()) * model.config.hidden_size
    assert m_pack["loss/policy"] == pytest.approx(m_pad["loss/policy"], rel=rounding_tol(torch.float32, n_reduce))
    assert_close_scaled(g_pack, g_pad, dtype=torch.float32, n_reduce=n_reduce)
    groups = micro_batches(batch, 60)
    real, processed = processed_tokens(batch, groups, packed=True)
    assert len(groups) > 1 and processed <= real
