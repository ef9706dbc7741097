"""A masked vocabulary: a ``bias`` of ``-inf`` on some columns (the padded rows of a head such
as Qwen2.5's 152064 for 151665 tokens, or banned tokens) makes those columns absent.

Every engine (reference, torch, Triton under the interpreter) and both designs of
``agpo_loss`` must give what the float64 oracle gives on the *unmasked columns only*:
finite values and gradients, exactly zero gradient into the masked rows of the weight and
the bias. Masked columns sit at the start (a whole first tile), inside and at the end of
the vocabulary. A target that is itself masked, and NaN or ``+inf`` in the bias, are input
errors. The vocabulary-parallel head with a masked bias (a shard with no unmasked column
included) is checked by tests/test_vocab_parallel.py.
"""

import pytest
import torch
from oracle import oracle_loss, oracle_stats
from tolerance import rounding_tol

from agpo_kernels import agpo_loss, linear_logprobs

N, D, V = 64, 32, 1000
DESIGNS = [("reference", "forward"), ("torch", "forward"), ("torch", "recompute"), ("triton", "forward"),
           ("triton", "recompute")]


def masked_problem(seed=0, half=False):
    """``half``: all of columns 500.. masked, which covers whole vocabulary splits of the
    Triton forward (under the interpreter it splits V = 1000 at 512) and whole tiles."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g)
    W = torch.randn(V, D, generator=g) / D**0.5
    b = torch.randn(V, generator=g) * 0.5
    masked = torch.zeros(V, dtype=torch.bool)
    masked[:40] = True          # the whole first tile(s)
    masked[900:] = True         # the tail, as a padded head has
    masked[torch.tensor([97, 333, 334, 512])] = True
    if half:
        masked[500:] = True
    b[masked] = float("-inf")
    kept = (~masked).nonzero().squeeze(1)
    pick = torch.randint(0, kept.numel(), (N,), generator=g)
    return dict(h=h, W=W, b=b, masked=masked, kept=kept, y=kept[pick], y_kept=pick,
                temp=torch.rand(N, generator=g) + 0.5)


def close(actual, expected, n_reduce, what):
    tol = rounding_tol(torch.float32, n_reduce) * expected.abs().max().clamp(min=1e-6)
    err = (actual.double() - expected).abs().max()
    assert torch.isfinite(actual).all(), f"{what}: not finite"
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("half", [False, True], ids=["scattered", "half-masked"])
@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
def test_linear_logprobs_ignores_masked_columns(impl, half):
    p = masked_problem(half=half)
    leaves = [p["h"].clone().requires_grad_(), p["W"].clone().requires_grad_(), p["b"].clone().requires_grad_()]
    lp, ent = linear_logprobs(leaves[0], leaves[1], p["y"], bias=leaves[2], temperature=p["temp"], impl=impl,
                              memory_budget=40_000)
    g_lp = torch.linspace(-1, 1, N)
    # an entropy weight above 1: the upstream gradient times a clamped -inf must stay finite
    dh, dW, db = torch.autograd.grad((g_lp * lp).sum() + 2.5 * ent.sum(), leaves)

    # the oracle on the unmasked columns alone, in float64
    k = p["kept"]
    o = [p["h"].double().requires_grad_(), p["W"][k].double().requires_grad_(), p["b"][k].double().requires_grad_()]
    olp, oent = oracle_stats(o[0], o[1], o[2], p["y_kept"], p["temp"].double())
    odh, odW, odb = torch.autograd.grad((g_lp.double() * olp).sum() + 2.5 * oent.sum(), o)
    close(lp, olp.detach(), D + V, "logp")
    close(ent, oent.detach(), D + V, "entropy")
    close(dh, odh, D + V, "dh")
    close(dW[k], odW, N, "dW (unmasked rows)")
    close(db[k], odb, N, "db (unmasked columns)")
    assert torch.equal(dW[p["masked"]], torch.zeros_like(dW[p["masked"]])), "gradient into masked weight rows"
    assert torch.equal(db[p["masked"]], torch.zeros_like(db[p["masked"]])), "gradient into masked bias entries"


@pytest.mark.parametrize("impl,backward", DESIGNS, ids=[f"{i}-{b}" for i, b in DESIGNS])
def test_agpo_loss_with_entropy_and_kl_ignores_masked_columns(impl, backward):
    p = masked_problem(seed=1)
    B, T = 4, N // 4
    g = torch.Generator().manual_seed(2)
    y, yk = p["y"].view(B, T), p["y_kept"].view(B, T)
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[3] = False  # a fully masked sequence
    adv, temp = torch.randn(B, generator=g), torch.rand(B, generator=g) + 0.5
    k = p["kept"]
    with torch.no_grad():
        lp0, _ = oracle_stats(p["h"].view(B, T, D), p["W"][k], p["b"][k], yk, temp.double().view(B, 1).expand(B, T))
    old = (lp0 + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    ref = (lp0 + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    kw = dict(eps_low=0.2, eps_high=0.28, beta=0.05, entropy_coef=0.01, dual_clip=3.0)

    leaves = [p["h"].view(B, T, D).clone().requires_grad_(), p["W"].clone().requires_grad_(),
              p["b"].clone().requires_grad_()]
    loss, m = agpo_loss(leaves[0], leaves[1], y, adv, old, mask=mask, bias=leaves[2], temperature=temp,
                        ref_logp=ref, kl_estimator="k3", loss_agg="seq-mean-token-mean", impl=impl,
                        backward=backward, memory_budget=40_000, **kw)
    dh, dW, db = torch.autograd.grad(loss, leaves)

    o = [p["h"].view(B, T, D).double().requires_grad_(), p["W"][k].double().requires_grad_(),
         p["b"][k].double().requires_grad_()]
    oloss, _ = oracle_loss(o[0], o[1], yk, adv, old, mask, temperature=temp, ref=ref, kl="k3", ent_coef=kw["entropy_coef"],
                        beta=kw["beta"], eps_low=kw["eps_low"], eps_high=kw["eps_high"], dual_clip=kw["dual_clip"],
                        agg="seq-mean-token-mean", bias=o[2])
    odh, odW, odb = torch.autograd.grad(oloss, o)
    close(loss.reshape(1), oloss.detach().reshape(1), N * (D + V), "loss")
    assert torch.isfinite(m["entropy"]).all() and torch.isfinite(m["entropy_mean"])
    close(dh, odh, D + V, "dh")
    close(dW[k], odW, N, "dW (unmasked rows)")
    close(db[k], odb, N, "db (unmasked columns)")
    assert torch.equal(dW[p["masked"]], torch.zeros_like(dW[p["masked"]]))
    assert torch.equal(db[p["masked"]], torch.zeros_like(db[p["masked"]]))


@pytest.mark.parametrize("call", ["linear_logprobs", "agpo_loss"])
def test_a_masked_target_is_an_input_error_naming_its_position(call):
    p = masked_problem()
    y = p["y"].clone()
    y[37] = 905  # masked by the bias
    if call == "linear_logprobs":
        with pytest.raises(ValueError, match=r"targets: position 37 has target id 905, which the bias masks"):
            linear_logprobs(p["h"], p["W"], y, bias=p["b"], impl="torch")
    else:  # [2, 32] layout: flat position 37 is (1, 5)
        with pytest.raises(ValueError, match=r"targets: position \(1, 5\) has target id 905, which the bias masks"):
            agpo_loss(p["h"].view(2, N // 2, D), p["W"], y.view(2, N // 2), torch.ones(2), bias=p["b"], impl="torch")
    # the same position masked out is fine: the masked target is never projected
    mask = torch.ones(N, dtype=torch.bool)
    mask[37] = False
    lp, _ = linear_logprobs(p["h"], p["W"], y, bias=p["b"], mask=mask, impl="torch")
    assert lp[37] == 0 and torch.isfinite(lp).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_plus_inf_in_the_bias_is_an_input_error(bad):
    p = masked_problem()
    b = p["b"].clone()
    b[500] = bad
    with pytest.raises(ValueError, match=r"bias: contains NaN or \+inf"):
        linear_logprobs(p["h"], p["W"], p["y"], bias=b, impl="torch")
    with pytest.raises(ValueError, match=r"bias: contains NaN or \+inf"):
        agpo_loss(p["h"].view(2, N // 2, D), p["W"], p["y"].view(2, N // 2), torch.ones(2), bias=b, impl="torch")


@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
def test_a_nan_logit_stays_nan_with_a_bias(impl):
    """Masking acts on -inf only: a diverged row (NaN hidden state) gives NaN in every engine,
    never a finite value that would hide the divergence."""
    p = masked_problem()
    h = p["h"].clone()
    h[5] = float("nan")
    lp, ent = linear_logprobs(h, p["W"], p["y"], bias=p["b"], impl=impl)
    assert torch.isnan(lp[5]) and torch.isnan(ent[5])
    assert torch.isfinite(lp[torch.arange(N) != 5]).all()
