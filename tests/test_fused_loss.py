"""agpo_loss / linear_logprobs against the float64 oracle, for every implementation.

impl="triton" runs in the CPU interpreter when there is no GPU (see conftest.py).
"""

import pytest
import torch

from agpo_kernels import AGPOLoss, agpo_loss, linear_logprobs
from conftest import DEVICE
from oracle import oracle_loss, oracle_stats

IMPLS = ["reference", "torch", "triton"]
# Small memory budgets force several row chunks / vocabulary slabs at these tiny sizes.
BUDGET = {"reference": None, "torch": 40_000, "triton": 3_000}


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def make_problem(B=3, T=7, D=24, V=101, dtype=torch.float32, bias=True, scale=1.0, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    h = (torch.randn(B, T, D, generator=g) * scale).to(DEVICE, dtype)
    W = (torch.randn(V, D, generator=g) / D**0.5).to(DEVICE, dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(DEVICE, dtype) if bias else None
    y = torch.randint(0, V, (B, T), generator=g).to(DEVICE)
    mask = (torch.rand(B, T, generator=g) > 0.25).to(DEVICE)
    mask[0, 0] = True
    adv = torch.randn(B, generator=g).to(DEVICE)
    temp = (torch.rand(B, generator=g) + 0.5).to(DEVICE)
    with torch.no_grad():
        lp, _ = oracle_stats(h, W, b, y, temp.double().view(B, 1).expand(B, T))
    # Old / reference log-probs near the current ones, so that every branch (clipped on
    # both sides, unclipped) is taken.
    old = lp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64).to(DEVICE)
    # One token surely clipped: ratio e > 1 + eps on an unmasked token of a positive-advantage sequence.
    adv[0] = adv[0].abs() + 0.1
    old[0, 0] = lp[0, 0] - 1.0
    old = old.float()
    ref = (lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64).to(DEVICE)).float()
    return dict(h=h, W=W, b=b, y=y, mask=mask, adv=adv, temp=temp, old=old, ref=ref)


def leaves(p):
    return [t.detach().clone().requires_grad_() for t in (p["h"], p["W"], p["b"]) if t is not None]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("temp_kind", ["float", "per_seq", "per_token"])
def test_linear_logprobs_fp32(impl, bias, temp_kind):
    p = make_problem(bias=bias)
    B, T = p["y"].shape
    temp = {"float": 0.7, "per_seq": p["temp"].view(B, 1),
            "per_token": torch.rand(B, T, device=DEVICE) + 0.5}[temp_kind]
    ins = leaves(p)
    logp, ent = linear_logprobs(ins[0], ins[1], p["y"], bias=ins[2] if bias else None,
                                temperature=temp, impl=impl, memory_budget=BUDGET[impl])
    assert logp.dtype == ent.dtype == torch.float32 and logp.shape == p["y"].shape
    o_ins = [t.detach().double().requires_grad_() for t in ins]
    o_lp, o_ent = oracle_stats(o_ins[0], o_ins[1], o_ins[2] if bias else None, p["y"],
                               temp if isinstance(temp, float) else temp.expand(B, T))
    assert rel(logp, o_lp) < 1e-5 and rel(ent, o_ent) < 1e-5
    g1, g2 = torch.randn_like(logp), torch.randn_like(ent)
    grads = torch.autograd.grad((logp * g1).sum() + (ent * g2).sum(), ins)
    o_grads = torch.autograd.grad((o_lp * g1.double()).sum() + (o_ent * g2.double()).sum(), o_ins)
    for g, og in zip(grads, o_grads):
        assert g.dtype == torch.float32
        assert rel(g, og) < 1e-4


OPTION_SETS = [
    dict(),
    dict(eps_high=0.28, beta=0.05, kl="k3"),
    dict(beta=0.1, kl="k1", ent_coef=0.01),
    dict(beta=0.1, kl="k2", dual_clip=3.0),
    dict(beta=0.2, kl="k3", kl_ratio_weight=True),
    dict(agg="seq-mean-token-mean", ent_coef=0.02, per_seq_eps=True),
    dict(agg="seq-mean-token-sum-norm", per_seq_eps=True, beta=0.03),
]


def run_loss(p, impl, opts, ins, *, packed=False):
    B, T = p["y"].shape
    eps_low = torch.rand(B, device=DEVICE) * 0.2 + 0.05 if opts.get("per_seq_eps") else 0.2
    eps_high = opts.get("eps_high", None if not opts.get("per_seq_eps") else eps_low * 1.3)
    kw = dict(eps_low=eps_low, eps_high=eps_high, temperature=p["temp"],
              ref_logp=p["ref"] if "beta" in opts else None, beta=opts.get("beta", 0.0),
              kl_estimator=opts.get("kl", "k3"), entropy_coef=opts.get("ent_coef", 0.0),
              dual_clip=opts.get("dual_clip"), loss_agg=opts.get("agg", "token-mean"),
              kl_ratio_weight=opts.get("kl_ratio_weight", False))
    b = ins[2] if len(ins) == 3 else None
    if not packed:
        loss, m = agpo_loss(ins[0], ins[1], p["y"], p["adv"], p["old"], mask=p["mask"], bias=b,
                            impl=impl, memory_budget=BUDGET[impl], **kw)
    else:  # same tokens as a packed batch: each sequence keeps its T positions
        cu = torch.arange(0, (B + 1) * T, T, device=DEVICE, dtype=torch.int32)
        flat = lambda t: None if t is None else t.reshape(B * T)
        loss, m = agpo_loss(ins[0].reshape(B * T, -1), ins[1], flat(p["y"]), p["adv"], flat(p["old"]),
                            cu_seqlens=cu, mask=flat(p["mask"]), bias=b, impl=impl,
                            memory_budget=BUDGET[impl], max_len=T,
                            **{**kw, "ref_logp": flat(kw["ref_logp"])})
        m["logp"], m["entropy"] = m["logp"].view(B, T), m["entropy"].view(B, T)
    o_ins = [t.detach().double().requires_grad_() for t in ins]
    o_loss, o_m = oracle_loss(o_ins[0], o_ins[1], p["y"], p["adv"], p["old"], p["mask"],
                              eps_low=eps_low, eps_high=eps_low if eps_high is None else eps_high,
                              temperature=p["temp"], ref=kw["ref_logp"], beta=kw["beta"],
                              kl=kw["kl_estimator"], ent_coef=kw["entropy_coef"],
                              dual_clip=kw["dual_clip"], agg=kw["loss_agg"],
                              bias=o_ins[2] if b is not None else None,
                              kl_ratio_weight=kw["kl_ratio_weight"])
    return loss, m, o_loss, o_m, o_ins


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("opts", OPTION_SETS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_agpo_loss_fp32(impl, opts, packed):
    p = make_problem(bias=not packed)
    ins = leaves(p)
    loss, m, o_loss, o_m, o_ins = run_loss(p, impl, opts, ins, packed=packed)
    assert abs(loss.item() - o_loss.item()) <= 1e-5 * max(1.0, abs(o_loss.item()))
    for k in ("clip_frac", "ratio_mean", "kl_mean", "entropy_mean"):
        assert abs(m[k].item() - o_m[k].item()) < 2e-5, k
    assert o_m["clip_frac"].item() > 0  # the problem really exercises the clipped branch
    assert rel(m["logp"], o_m["logp"]) < 1e-5 and rel(m["entropy"], o_m["entropy"]) < 1e-5
    grads = torch.autograd.grad(loss, ins)
    o_grads = torch.autograd.grad(o_loss, o_ins)
    for g, og in zip(grads, o_grads):
        assert rel(g, og) < 1e-4


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_eager(impl, dtype):
    """bf16/fp16 inputs: error against the float64 oracle (on the same rounded inputs) is
    within 2x of what naive eager PyTorch in the same dtype gets (the rounding points
    differ, so on a finite random problem the two errors fluctuate around each other)."""
    p = make_problem(dtype=dtype, B=4, T=16, D=64, V=257)
    opts = dict(beta=0.05, ent_coef=0.01)
    errs = {}
    for name in ("reference", impl):
        ins = leaves(p)
        loss, m, o_loss, o_m, o_ins = run_loss(p, name, opts, ins)
        grads = torch.autograd.grad(loss, ins)
        o_grads = torch.autograd.grad(o_loss, o_ins)
        assert all(g.dtype == dtype for g in grads)
        errs[name] = [abs(loss.item() - o_loss.item()), rel(m["logp"], o_m["logp"])] + \
                     [rel(g, og) for g, og in zip(grads, o_grads)]
    for ours, eager in zip(errs[impl], errs["reference"]):
        assert ours <= 2.0 * eager + 1e-6, (errs[impl], errs["reference"])


@pytest.mark.parametrize("impl", IMPLS)
def test_single_token_and_fully_masked_rows(impl):
    p = make_problem(B=3, T=4)
    p["mask"][1] = False  # a fully masked sequence
    ins = leaves(p)
    for opts in (dict(), dict(agg="seq-mean-token-mean")):
        loss, m, o_loss, o_m, o_ins = run_loss(p, impl, opts, ins)
        assert torch.isfinite(loss) and abs(loss.item() - o_loss.item()) < 1e-5
        grads = torch.autograd.grad(loss, ins)
        assert all(torch.isfinite(g).all() for g in grads)
        assert (grads[0][1] == 0).all()  # the masked sequence gets no gradient
        assert (m["logp"][1] == 0).all()
    # N = 1 token
    q = make_problem(B=1, T=1, bias=False)
    loss, m, o_loss, _, _ = run_loss(q, impl, dict(), leaves(q))
    assert abs(loss.item() - o_loss.item()) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_all_tokens_masked_gives_zero_loss_and_zero_grads(impl):
    p = make_problem(B=2, T=3)
    p["mask"][:] = False
    ins = leaves(p)
    loss, m = agpo_loss(ins[0], ins[1], p["y"], p["adv"], p["old"], mask=p["mask"], bias=ins[2], impl=impl)
    assert loss.item() == 0.0 and m["clip_frac"].item() == 0.0
    loss.backward()
    assert all(t.grad is not None and (t.grad == 0).all() for t in ins)


@pytest.mark.parametrize("impl", IMPLS)
def test_large_logits(impl):
    """|z| ~ 1e4: no overflow, entropy stays accurate (near-deterministic rows)."""
    p = make_problem(B=2, T=5, D=16, V=77, scale=1.0)
    with torch.no_grad():
        p["W"] *= 2500.0  # logits of order 1e4
    ins = leaves(p)
    logp, ent = linear_logprobs(ins[0], ins[1], p["y"], bias=ins[2], impl=impl, memory_budget=BUDGET[impl])
    o_ins = [t.detach().double().requires_grad_() for t in ins]
    o_lp, o_ent = oracle_stats(o_ins[0], o_ins[1], o_ins[2], p["y"], 1.0)
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
    assert (logp.double().cpu() - o_lp.detach().cpu()).abs().max() <= 1e-6 * o_lp.abs().max().item() + 1e-3
    assert (ent.double().cpu() - o_ent.detach().cpu()).abs().max() < 1e-3
    g = torch.randn_like(logp)
    grads = torch.autograd.grad((logp * g).sum() + ent.sum(), ins)
    o_grads = torch.autograd.grad((o_lp * g.double()).sum() + o_ent.sum(), o_ins)
    for a, b in zip(grads, o_grads):
        assert torch.isfinite(a).all() and rel(a, b) < 1e-3


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_frozen_head_skips_weight_grad(impl):
    p = make_problem(bias=False)
    h = p["h"].clone().requires_grad_()
    loss, _ = agpo_loss(h, p["W"], p["y"], p["adv"], p["old"], mask=p["mask"], impl=impl)
    loss.backward()
    o_h = p["h"].double().requires_grad_()
    o_loss, _ = oracle_loss(o_h, p["W"], p["y"], p["adv"], p["old"], p["mask"], eps_low=0.2,
                            eps_high=0.2, temperature=1.0)
    o_loss.backward()
    assert p["W"].grad is None and rel(h.grad, o_h.grad) < 1e-4


def test_module_matches_functional_and_overrides():
    p = make_problem(bias=False)
    mod = AGPOLoss(eps_low=0.1, beta=0.0, impl="torch")
    eps = torch.full((p["y"].shape[0],), 0.3, device=DEVICE)
    a, _ = mod(p["h"], p["W"], p["y"], p["adv"], p["old"], mask=p["mask"], eps_low=eps)
    b, _ = agpo_loss(p["h"], p["W"], p["y"], p["adv"], p["old"], mask=p["mask"], eps_low=0.3, impl="torch")
    assert torch.allclose(a, b)
    with pytest.raises(TypeError, match="unknown options"):
        mod(p["h"], p["W"], p["y"], p["adv"], p["old"], epsilon=0.2)


def test_auto_picks_triton_on_cuda_and_torch_on_cpu():
    from agpo_kernels.dispatch import resolve_impl, triton_available

    assert triton_available()
    assert resolve_impl("auto", torch.device("cuda", 0)) == "triton"
    assert resolve_impl("auto", torch.device("cpu")) == "torch"
    assert resolve_impl("reference", torch.device("cuda", 0)) == "reference"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_is_weight_scales_the_surrogate_only(impl, packed):
    """``is_weight`` (truncated importance sampling) against the float64 oracle: weights
    in [0, 2] with exact zeros and the cap, on a problem with a KL term and an entropy
    bonus (which the weight must leave alone) and clipped tokens."""
    p = make_problem(B=4, T=6, bias=not packed)
    B, T = p["y"].shape
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    isw = (torch.rand(B, T, generator=g) * 2.0).to(DEVICE)
    isw[0, 1], isw[1, 0], isw[2, :] = 0.0, 2.0, 1.0
    ins = leaves(p)
    kw = dict(eps_low=0.2, eps_high=0.28, temperature=p["temp"], beta=0.05, entropy_coef=0.03,
              impl=impl, memory_budget=BUDGET[impl])
    if not packed:
        loss, _ = agpo_loss(ins[0], ins[1], p["y"], p["adv"], p["old"], mask=p["mask"], bias=ins[2],
                            ref_logp=p["ref"], is_weight=isw, **kw)
    else:
        cu = torch.arange(0, (B + 1) * T, T, device=DEVICE, dtype=torch.int32)
        loss, _ = agpo_loss(ins[0].reshape(B * T, -1), ins[1], p["y"].reshape(-1), p["adv"], p["old"].reshape(-1),
                            cu_seqlens=cu, mask=p["mask"].reshape(-1), ref_logp=p["ref"].reshape(-1),
                            is_weight=isw.reshape(-1), max_len=T, **kw)
    o_ins = [t.detach().double().requires_grad_() for t in ins]
    o_loss, o_m = oracle_loss(o_ins[0], o_ins[1], p["y"], p["adv"], p["old"], p["mask"], eps_low=0.2, eps_high=0.28,
                              temperature=p["temp"], ref=p["ref"], beta=0.05, ent_coef=0.03,
                              bias=o_ins[2] if len(o_ins) == 3 else None, is_weight=isw)
    assert o_m["clip_frac"].item() > 0
    assert abs(loss.item() - o_loss.item()) <= 1e-5 * max(1.0, abs(o_loss.item()))
    for gr, og in zip(torch.autograd.grad(loss, ins), torch.autograd.grad(o_loss, o_ins)):
        assert rel(gr, og) < 1e-4
    # the weight really matters: the unweighted oracle is a different loss
    plain, _ = oracle_loss(*[t.detach().double() for t in ins[:2]], p["y"], p["adv"], p["old"], p["mask"],
                           eps_low=0.2, eps_high=0.28, temperature=p["temp"], ref=p["ref"], beta=0.05,
                           ent_coef=0.03, bias=ins[2].detach().double() if len(ins) == 3 else None)
    assert abs(plain.item() - o_loss.item()) > 1e-3


def test_is_weight_bad_input():
    p = make_problem(B=2, T=3)
    args = (p["h"], p["W"], p["y"], p["adv"], p["old"])
    with pytest.raises(ValueError, match="is_weight.*shape"):
        agpo_loss(*args, mask=p["mask"], is_weight=torch.ones(2, 4, device=DEVICE))
    with pytest.raises(ValueError, match="is_weight.*>= 0"):
        agpo_loss(*args, mask=p["mask"], is_weight=-torch.ones(2, 3, device=DEVICE))
    with pytest.raises(ValueError, match="is_weight.*NaN"):
        agpo_loss(*args, mask=torch.ones(2, 3, dtype=torch.bool, device=DEVICE),
                  is_weight=torch.full((2, 3), float("nan"), device=DEVICE))
