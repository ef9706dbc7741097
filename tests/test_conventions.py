"""Where RL trainers differ, ``agpo_loss`` states its rule and offers the other one
(docs/algorithm.md, "Conventions against verl, TRL and OpenRLHF").

* ``kl_ratio_weight=True`` differentiates through the importance ratio (as TRL's
  ``use_bias_correction_kl``), checked against the hand-derived gradient and shown to differ
  from a detached ratio;
* ``kl_clamp`` bounds each token's KL (verl, OpenRLHF: 10) with no gradient where it binds;
* fully masked sequences in the sequence divisor: each mode's default and
  ``count_empty_seqs`` both ways, against hand-computed divisors;
* ``entropy_agg``: the entropy bonus aggregated as TRL and OpenRLHF do (a token mean) while
  the loss is a sequence mean.
"""

import pytest
import torch
from oracle import oracle_loss

from agpo_kernels import agpo_loss

IMPLS = [("reference", "forward"), ("torch", "forward"), ("torch", "recompute"), ("triton", "forward")]
IDS = [f"{i}-{b}" for i, b in IMPLS]


def problem(seed, B=4, T=6, D=16, V=53):
    g = torch.Generator().manual_seed(seed)
    p = dict(h=torch.randn(B, T, D, generator=g), W=torch.randn(V, D, generator=g) / D**0.5,
             y=torch.randint(0, V, (B, T), generator=g), adv=torch.randn(B, generator=g),
             mask=torch.rand(B, T, generator=g) > 0.3, temp=torch.rand(B, generator=g) + 0.5)
    p["mask"][1] = False          # a fully masked sequence
    p["mask"][0, :2] = True
    with torch.no_grad():
        lp = agpo_loss(p["h"], p["W"], p["y"], p["adv"], impl="reference", temperature=p["temp"])[1]["logp"]
    p["old"] = lp + 0.3 * torch.randn(B, T, generator=g)
    p["ref"] = lp + 0.5 * torch.randn(B, T, generator=g)
    return p


def run(p, impl, backward, **kw):
    h, W = p["h"].clone().requires_grad_(), p["W"].clone().requires_grad_()
    loss, _ = agpo_loss(h, W, p["y"], p["adv"], p["old"], mask=p["mask"], temperature=p["temp"], impl=impl,
                        backward=backward, memory_budget=3000, **kw)
    dh, dW = torch.autograd.grad(loss, (h, W))
    return loss.detach(), dh, dW


def oracle(p, **kw):
    h, W = p["h"].double().requires_grad_(), p["W"].double().requires_grad_()
    loss, _ = oracle_loss(h, W, p["y"], p["adv"], p["old"], p["mask"], temperature=p["temp"], **kw)
    dh, dW = torch.autograd.grad(loss, (h, W))
    return loss.detach(), dh, dW


def assert_matches(ours, theirs, rtol=2e-5):
    for a, b in zip(ours, theirs):
        scale = b.abs().max().clamp(min=1e-12)
        assert ((a.double() - b).abs().max() / scale).item() < rtol


@pytest.mark.parametrize("impl,backward", IMPLS, ids=IDS)
def test_kl_ratio_weight_differentiates_through_the_ratio(impl, backward):
    p = problem(0)
    kw = dict(eps_low=0.2, eps_high=0.2, ref_logp=p["ref"], beta=0.3, kl_estimator="k3")
    ours = run(p, impl, backward, kl_ratio_weight=True, **kw)
    through = oracle(p, ref=p["ref"], beta=0.3, kl="k3", kl_ratio_weight=True, eps_low=0.2, eps_high=0.2)
    assert_matches(ours, through)
    # The hand-derived per-token gradient of beta * r * k3 through the ratio r = exp(logp - old):
    # d/dlogp = beta * r * (k3 + dk3), dk3 = 1 - exp(ref - logp); a detached ratio drops the k3 term.
    logp = torch.tensor([-1.2, -0.4]).requires_grad_()
    old, ref = torch.tensor([-1.0, -0.9]), torch.tensor([-2.0, -0.1])
    ones = torch.ones(1, 2, dtype=torch.long)
    r, k3 = torch.exp(logp - old), torch.exp(ref - logp) - (ref - logp) - 1
    hand = 0.3 * r * (k3 + 1 - torch.exp(ref - logp))
    detached = 0.3 * r * (1 - torch.exp(ref - logp))
    # a one-token head whose log-prob is logp: weight rows [0, logp-lse] via a bias on V = 2
    for t in range(2):
        h = torch.zeros(1, 1, 1, requires_grad=True)
        b = torch.tensor([0.0, 0.0]).requires_grad_()
        # softmax over two columns with bias (0, x): p(col 1) = sigmoid(x); choose x so log p = logp[t]
        x = (torch.log(torch.exp(-logp[t].detach()) - 1)).neg()
        with torch.no_grad():
            b[1] = x
        loss, m = agpo_loss(h, torch.zeros(2, 1), ones[:, :1], torch.zeros(1), old[t].view(1, 1), bias=b,
                            ref_logp=ref[t].view(1, 1), beta=0.3, kl_estimator="k3", kl_ratio_weight=True,
                            impl=impl, backward=backward)
        assert m["logp"].item() == pytest.approx(logp[t].item(), abs=1e-6)
        g_b, = torch.autograd.grad(loss, b)
        # dL/db_1 = dL/dlogp * dlogp/db_1 = g * (1 - p1)
        p1 = torch.exp(logp[t].detach())
        assert g_b[1].item() == pytest.approx((hand[t] * (1 - p1)).item(), rel=1e-5)
        assert abs(g_b[1].item() - (detached[t] * (1 - p1)).item()) > 0.1 * abs(g_b[1].item())


@pytest.mark.parametrize("impl,backward", IMPLS, ids=IDS)
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_clamp_bounds_each_token_and_stops_its_gradient(impl, backward, estimator):
    p = problem(1)
    kw = dict(eps_low=0.2, eps_high=0.2, ref_logp=p["ref"], beta=0.5, kl_estimator=estimator)
    c = 0.1
    ours = run(p, impl, backward, kl_clamp=c, **kw)
    want = oracle(p, ref=p["ref"], beta=0.5, kl=estimator, kl_clamp=c, eps_low=0.2, eps_high=0.2)
    assert_matches(ours, want)
    unclamped = run(p, impl, backward, **kw)
    assert not torch.allclose(ours[0], unclamped[0])  # it binds on this problem
    _, m = agpo_loss(p["h"], p["W"], p["y"], p["adv"], p["old"], mask=p["mask"], temperature=p["temp"],
                     impl=impl, backward=backward, kl_clamp=c, **kw)
    assert m["kl_mean"].item() <= c


@pytest.mark.parametrize("impl,backward", IMPLS, ids=IDS)
@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("count_empty", [None, True, False])
def test_fully_masked_sequences_in_the_divisor(impl, backward, agg, count_empty):
    p = problem(2)
    B, T = p["y"].shape
    kw = dict(eps_low=0.2, eps_high=0.28, loss_agg=agg)
    ours = run(p, impl, backward, count_empty_seqs=count_empty, **kw)
    assert_matches(ours, oracle(p, eps_low=0.2, eps_high=0.28, agg=agg, count_empty=count_empty))
    # hand: the divisor is B (empty counted) or B - 1 here; the default counts it only under sum-norm
    other = run(p, impl, backward, count_empty_seqs=not (count_empty if count_empty is not None
                                                          else agg == "seq-mean-token-sum-norm"), **kw)
    counted = (count_empty if count_empty is not None else agg == "seq-mean-token-sum-norm")
    ratio = (ours[0] / other[0]).item()
    assert ratio == pytest.approx((B - 1) / B if counted else B / (B - 1), rel=1e-5)


@pytest.mark.parametrize("impl,backward", IMPLS, ids=IDS)
def test_entropy_bonus_as_a_token_mean_beside_a_sequence_mean_loss(impl, backward):
    p = problem(3)
    kw = dict(eps_low=0.2, eps_high=0.2, loss_agg="seq-mean-token-mean", entropy_coef=0.1)
    ours = run(p, impl, backward, entropy_agg="token-mean", **kw)
    assert_matches(ours, oracle(p, eps_low=0.2, eps_high=0.2, agg="seq-mean-token-mean", ent_coef=0.1,
                                ent_agg="token-mean"))
    like_loss = run(p, impl, backward, **kw)
    assert not torch.allclose(ours[0], like_loss[0])
    assert_matches(like_loss, oracle(p, eps_low=0.2, eps_high=0.2, agg="seq-mean-token-mean", ent_coef=0.1))


@pytest.mark.parametrize("kw,arg", [(dict(kl_clamp=0.0), "kl_clamp"), (dict(kl_clamp=float("nan")), "kl_clamp"),
                                    (dict(entropy_agg="seq-mean"), "entropy_agg"),
                                    (dict(count_empty_seqs="yes"), "count_empty_seqs")])
def test_bad_convention_arguments_name_themselves(kw, arg):
    p = problem(4)
    with pytest.raises(ValueError, match=f"^{arg}: "):
        agpo_loss(p["h"], p["W"], p["y"], p["adv"], p["old"], mask=p["mask"], impl="torch", **kw)
