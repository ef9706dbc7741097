"""Rollout sampling: inverse-CDF draws with counter-based uniforms (``agpo.rollout.hf``,
``agpo.rollout.noise``).

Real components only: the tiny preset's HF model and tokenizer, real ``generate``, and
``transformers``' own ``TopPLogitsWarper`` as the reference for the nucleus rule. The
noise is a deterministic hash, so every statistical check below is deterministic too; its
tolerance (5 binomial standard deviations) is what an honest random sampler would need.
"""

import math

import pytest
import torch

from agpo.models import build_char_tokenizer, build_tiny_model
from agpo.rollout import (
    CounterSampler,
    counter_hash,
    row_keys,
    sample_groups,
    step_uniforms,
    top_p_filter,
)

PROMPTS = ["12+34=", "7*8=", "100-1=", "5+5=", "99*99=", "3-2="]
G = 3


@pytest.fixture(scope="module")
def tiny():
    tok = build_char_tokenizer()
    return build_tiny_model(tok, seed=0), tok


def _argmax_counts(z: torch.Tensor, tau: torch.Tensor, keys: torch.Tensor, *, step: int, top_p: float = 1.0):
    """Token counts of ``argmax(CounterSampler(...)(ids, z))`` with ``z`` repeated on every row."""
    n, V = keys.numel(), z.numel()
    prompt_len = 4
    ids = torch.zeros(n, prompt_len + step, dtype=torch.long)  # only its width matters: decode step `step`
    out = CounterSampler(tau, keys, prompt_len, top_p=top_p)(ids, z.float().expand(n, V).clone())
    assert out.dtype == torch.float32 and out.shape == (n, V)
    return torch.bincount(out.argmax(1), minlength=V).double()


def _assert_matches(counts: torch.Tensor, p: torch.Tensor, sigmas: float = 5.0):
    n = float(counts.sum())
    freq = counts / n
    tol = sigmas * torch.sqrt(p * (1 - p) / n) + 1e-12
    assert torch.all((freq - p).abs() <= tol), (freq, p, tol)


# -- the distribution --------------------------------------------------------------------
@pytest.mark.parametrize("T", [0.7, 2.0])
def test_argmax_of_perturbed_scores_samples_softmax(T):
    z = torch.tensor([1.3, -0.4, 0.0, 2.1, -2.5, 0.8, 1.9], dtype=torch.float64)
    p = torch.softmax(z / T, 0)
    n = 20_000
    for step, (seed, stream) in [(0, (0, 0)), (5, (11, 3))]:
        counts = _argmax_counts(z, torch.full((n,), T), row_keys(seed, stream, n), step=step)
        _assert_matches(counts, p)


def test_rows_of_one_call_use_their_own_temperature():
    z = torch.tensor([1.3, -0.4, 0.0, 2.1, -2.5, 0.8, 1.9], dtype=torch.float64)
    n = 20_000
    tau = torch.tensor([0.7, 2.0]).repeat(n // 2)  # interleaved rows
    keys = row_keys(4, 1, n)
    ids = torch.zeros(n, 3, dtype=torch.long)
    picks = CounterSampler(tau, keys, 0)(ids, z.float().expand(n, -1).clone()).argmax(1)
    for i, T in enumerate((0.7, 2.0)):
        _assert_matches(torch.bincount(picks[i::2], minlength=7).double(), torch.softmax(z / T, 0))


def test_top_p_keeps_the_nucleus_and_renormalises():
    z = torch.tensor([1.3, -0.4, 0.0, 2.1, -2.5, 0.8, 1.9], dtype=torch.float64)
    T, top_p, n = 0.7, 0.6, 20_000
    p = torch.softmax(z / T, 0)
    order = torch.argsort(p, descending=True)
    need = int(torch.searchsorted(torch.cumsum(p[order], 0), torch.tensor(top_p, dtype=torch.float64))) + 1
    nucleus = order[:need]  # the fewest most likely tokens holding >= top_p of the mass
    assert 1 < need < 7
    q = torch.zeros_like(p)
    q[nucleus] = p[nucleus] / p[nucleus].sum()
    counts = _argmax_counts(z, torch.full((n,), T), row_keys(2, 9, n), step=1, top_p=top_p)
    outside = torch.ones(7, dtype=torch.bool)
    outside[nucleus] = False
    assert counts[outside].sum() == 0
    _assert_matches(counts, q)


def test_top_p_filter_is_transformers_rule():
    from transformers import TopPLogitsWarper

    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(64, 50, generator=gen) * 3
    scores[0] = 0.0  # all tied
    scores[1, 7] = 40.0  # one token holds all the mass: it alone is kept
    for top_p in (1e-8, 0.05, 0.3, 0.9, 0.999):
        ours = top_p_filter(scores.clone(), top_p)
        ref = TopPLogitsWarper(top_p)(None, scores.clone())
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), top_p
        torch.testing.assert_close(ours[~torch.isinf(ours)], scores[~torch.isinf(ours)], rtol=0, atol=0)
        assert (~torch.isinf(ours)).sum(1).min() >= 1
    assert torch.equal(top_p_filter(scores, 1.0), scores)


# -- the noise ---------------------------------------------------------------------------
def test_hash_is_uniform():
    keys = row_keys(0, 0, 128)
    h = torch.cat([counter_hash(keys, t, 2048) for t in range(4)])  # 1M values
    assert int(h.min()) >= 0 and int(h.max()) < 2 ** 32
    u = ((h >> 8).double() + 0.5) / 2 ** 24
    n = u.numel()
    assert abs(float(u.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / n)
    bins = torch.bincount((u * 16).long().view(-1), minlength=16).double()
    chi2 = float(((bins - n / 16) ** 2 / (n / 16)).sum())
    assert chi2 < 50, chi2  # 15 degrees of freedom: mean 15, sd 5.5


def test_step_uniforms_are_uniform_with_52_bits():
    keys = row_keys(3, 1, 4096)
    u = torch.cat([step_uniforms(keys, t) for t in range(64)])  # 262k values
    assert u.dtype == torch.float64 and float(u.min()) > 0 and float(u.max()) < 1
    n = u.numel()
    assert abs(float(u.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(float(u.var()) - 1 / 12) < 5 * math.sqrt(1 / 180 / n)
    bins = torch.bincount((u * 64).long(), minlength=64).double()
    assert float(((bins - n / 64) ** 2 / (n / 64)).sum()) < 120  # 63 degrees of freedom: mean 63, sd 11
    # the low bits are random too (more than float32's 24): a draw can resolve p ~ 1e-12
    low = (u * 2.0 ** 40).floor() % 2
    assert abs(float(low.mean()) - 0.5) < 5 * math.sqrt(0.25 / n)
    # the extremes of the hash map inside (0, 1)
    h = torch.tensor([[0, 0], [2 ** 32 - 1, 2 ** 32 - 1]])
    bits = (h[:, 0] << 20) | (h[:, 1] >> 12)
    ext = (bits.double() + 0.5) * 2.0 ** -52
    assert float(ext[0]) > 0 and float(ext[1]) < 1


def test_noise_differs_across_rows_and_steps():
    keys = row_keys(0, 0, 512)
    u = torch.stack([step_uniforms(keys, t) for t in range(64)])  # [step, row]
    assert torch.unique(u).numel() == u.numel()
    for a, b in [(u[:, :-1], u[:, 1:]), (u[:-1], u[1:])]:  # neighbouring rows / steps are not correlated
        c = torch.corrcoef(torch.stack([a.reshape(-1), b.reshape(-1)]))[0, 1]
        assert abs(float(c)) < 5 / math.sqrt(a.numel()), float(c)
    # the same (key, step) gives the same uniform, on any shape of call
    torch.testing.assert_close(step_uniforms(keys[10:13], 5), step_uniforms(keys, 5)[10:13], rtol=0, atol=0)


def test_sampler_returns_one_hot_scores_and_logprobs():
    """The drawn token gets score 0 and every other -inf (greedy takes it); its recorded
    log-prob is that of the (top-p) distribution it was drawn from."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(5, 301, generator=gen) * 4
    z[:, 7] = z[:, -1] = -float("inf")  # tokens of zero mass (also the last) are never drawn
    tau = torch.tensor([0.5, 1.0, 1.5, 2.0, 0.8])
    keys = row_keys(1, 2, 5)
    for top_p in (1.0, 0.7):
        s = CounterSampler(tau, keys, prompt_len=2, top_p=top_p)
        for step in range(3):
            out = s(torch.zeros(5, 2 + step, dtype=torch.long), z.clone())
            pick = out.argmax(1)
            assert (out == 0).sum(1).tolist() == [1] * 5 and torch.isinf(out).sum() == 5 * 300
            assert not ((pick == 7) | (pick == 300)).any()
            ref = torch.log_softmax(top_p_filter(z.double() / tau.double().unsqueeze(1), top_p), 1)
            torch.testing.assert_close(s.logprobs[-1].double(), ref.gather(1, pick.unsqueeze(1)).squeeze(1),
                                       rtol=1e-5, atol=1e-5)


def test_row_keys_are_global_and_distinct():
    k = row_keys(7, 3, 40)
    assert k.dtype == torch.int64 and k.shape == (40,)
    assert torch.equal(row_keys(7, 3, 40), k)
    assert torch.equal(row_keys(7, 3, 15, offset=25), k[25:])
    grid = torch.cat([row_keys(s, st, 256) for s in (0, 1, 2, 2 ** 40, -1) for st in range(8)])
    assert torch.unique(grid).numel() == grid.numel()
    assert int(grid.min()) >= 0 and int(grid.max()) < 2 ** 32
    with pytest.raises(ValueError):
        row_keys(0, 0, 4, offset=-1)


# -- sample_groups -----------------------------------------------------------------------
def _sample(model, tok, prompts, tau=1.5, **kw):
    return sample_groups(model, tok, prompts, torch.full((len(prompts),), tau), group_size=G, max_new_tokens=6,
                         seed=kw.pop("seed", 5), **kw)


def _rows(roll):
    """Each row's completion tokens up to its end (mask), as lists."""
    ids, mask = roll.batch.completion_ids, roll.batch.completion_mask
    return [ids[r, :int(mask[r].sum())].tolist() for r in range(ids.shape[0])]


def test_samples_do_not_depend_on_batching_or_process(tiny):
    model, tok = tiny
    ref = _sample(model, tok, PROMPTS, stream=2)
    assert len(set(ref.texts)) >= 10, ref.texts  # really sampled
    split = _sample(model, tok, PROMPTS, stream=2, batch_rows=4)
    assert split.texts == ref.texts
    assert torch.equal(split.batch.completion_ids, ref.batch.completion_ids)
    assert torch.equal(split.batch.completion_mask, ref.batch.completion_mask)
    # two "ranks", each with a contiguous block of prompts, and their own batch_rows
    first = _sample(model, tok, PROMPTS[:3], stream=2, row_offset=0)
    second = _sample(model, tok, PROMPTS[3:], stream=2, row_offset=3 * G, batch_rows=2)
    assert first.texts + second.texts == ref.texts
    assert _rows(first) + _rows(second) == _rows(ref)
    # one short prompt alone, in the middle of the global order: a narrower padded prompt,
    # so the decode step must count from the call's own prompt width
    assert len(PROMPTS[3]) < max(map(len, PROMPTS))
    mid = _sample(model, tok, PROMPTS[3:4], stream=2, row_offset=3 * G)
    assert mid.texts == ref.texts[3 * G:4 * G]
    assert _rows(mid) == _rows(ref)[3 * G:4 * G]


def test_global_rng_does_not_matter_and_streams_do(tiny):
    model, tok = tiny
    torch.manual_seed(1)
    a = _sample(model, tok, PROMPTS, tau=3.0, stream=0)
    torch.manual_seed(2)
    b = _sample(model, tok, PROMPTS, tau=3.0, stream=0)
    assert a.texts == b.texts and torch.equal(a.batch.completion_ids, b.batch.completion_ids)
    c = _sample(model, tok, PROMPTS, tau=3.0, stream=1)
    d = _sample(model, tok, PROMPTS, tau=3.0, stream=0, seed=6)
    for other in (c, d):
        assert sum(x != y for x, y in zip(a.texts, other.texts)) >= len(a.texts) // 2
    # the groups of one prompt are not copies of each other
    assert all(len(set(a.texts[p * G:(p + 1) * G])) > 1 for p in range(len(PROMPTS)))


def test_tiny_temperature_gives_greedy(tiny):
    model, tok = tiny
    roll = _sample(model, tok, PROMPTS, tau=1e-4, stream=3)
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    greedy = model.generate(**enc, do_sample=False, max_new_tokens=6)[:, enc["input_ids"].shape[1]:]
    texts = []
    for row in greedy.tolist():
        if tok.eos_token_id in row:
            row = row[:row.index(tok.eos_token_id)]
        texts.append(tok.decode(row, skip_special_tokens=True))
    assert roll.texts == [t for t in texts for _ in range(G)]
    torch.testing.assert_close(roll.batch.temperature, torch.full((len(PROMPTS) * G,), 1e-4))


def test_bad_temperatures_are_refused(tiny):
    model, tok = tiny
    was_training = model.training
    for tau in (torch.tensor([1.0, 0.0]), torch.tensor([1.0, float("nan")]), torch.tensor([1.0, float("inf")]),
                torch.tensor([1.0, -1.0]), torch.ones(3)):
        with pytest.raises(ValueError, match="tau"):
            sample_groups(model, tok, PROMPTS[:2], tau, group_size=2, max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        sample_groups(model, tok, PROMPTS[:2], torch.ones(2), group_size=2, max_new_tokens=2, top_p=0.0)
    assert model.training == was_training
    keys = row_keys(0, 0, 2)
    for tau in (torch.tensor([1.0, 0.0]), torch.tensor([float("nan"), 1.0]), torch.ones(2, 1)):
        with pytest.raises(ValueError, match="tau"):
            CounterSampler(tau, keys, 0)
    with pytest.raises(ValueError, match="keys"):
        CounterSampler(torch.ones(3), keys, 0)
    with pytest.raises(ValueError, match="rows"):
        CounterSampler(torch.ones(2), keys, 0)(torch.zeros(3, 1, dtype=torch.long), torch.zeros(3, 5))
