"""Per-row temperature on peaked bf16 logits: in the kernel, or by scaling the hidden states.

A head that takes a scalar temperature (Liger's fused log-prob op, verl's fused heads)
reaches a per-row one by feeding ``h / T`` per row at temperature 1 (verl PR #6110;
``bench/gpu_compare.py``'s "per-row T as h / T" variant): exact in real arithmetic, since
``(h / T) W^T = (h W^T) / T`` without a bias, but ``h / T`` is stored in the hidden's
dtype, bf16, which moves every logit by up to ``2^-8 sum_k |h_k w_jk| / T``. agpo takes the
fp32 temperature in the kernel, after the fp32-accumulated GEMM. Both routes are measured
against a float64 oracle on CPU, each held to a bound derived from its own rounding:

* a logit off by at most ``delta`` moves ``log p(y) = z_y - lse(z)`` by at most ``2 delta``
  (lse is 1-Lipschitz in the max norm) and the entropy by at most
  ``delta e^(2 delta) (sum_j p_j |z_j - zbar| + 2 delta)`` (``dH/dz_j = -p_j (z_j - zbar)``,
  along the segment ``p`` grows by at most ``e^(2 delta)`` and ``|z_j - zbar|`` by ``2 delta``);
* ``delta`` of an fp32-accumulated bf16 GEMM: products of two bf16 numbers are exact in
  fp32, the D-term sum is off by ``rounding_tol(fp32, D) sum_k |h_k w_jk|`` (tests/tolerance.py),
  and ``* 1/T`` adds two fp32 roundings; a path that stores the logits in bf16 (impl
  "reference", Liger's CPU fallback) adds ``2^-8 |z|``;
* the fp32 log-softmax itself: V-term sums of ``exp(z - m)`` off by ``rounding_tol(fp32, V)``
  relative, plus a few fp32 roundings of numbers of size ``max |z|``.

The scaled-hidden route's own error is computed exactly: the float64 oracle of the bf16
``h / T`` it actually feeds. Where its fp32 path's rounding bound is smaller than that, its
measured error is bounded below, and the test asserts it exceeds in-kernel agpo's.
"""

import math
import os

import pytest
import torch
from tolerance import rounding_tol

from agpo_kernels import linear_logprobs

EPS32 = torch.finfo(torch.float32).eps      # 2^-23
U16 = torch.finfo(torch.bfloat16).eps / 2   # 2^-8: bf16's unit roundoff (round to nearest)
D, V = 64, 1037                             # V odd, a multiple of no block size
BOOST = 30.0                                # the mode's raw logit ~ BOOST |w|^2 ~ 30
FP32_GEMM = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
IMPLS = FP32_GEMM + ["reference"]           # reference: logits formed in bf16, then fp32


def peaked(n: int, seed: int):
    """bf16 hidden [n, D] and weight [V, D] with one dominant token per row (its margin over
    the next token 10-30 nats: candidate rows outside are drawn again), fp32 per-row
    temperatures in [0.6, 1.3] that bf16 cannot hold, random targets (row 0's is its mode
    where n > 1: the mode's log-prob errs through the log-sum-exp alone)."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(V, D, generator=g) / D**0.5).bfloat16()
    rows = []
    while len(rows) < n:
        mode = int(torch.randint(0, V, (), generator=g))
        h = (torch.randn(D, generator=g) + BOOST * w[mode].float()).bfloat16()
        t = 0.6 + 0.7 * torch.rand((), generator=g)
        top2 = (w.double() @ h.double()).topk(2).values / float(t)
        if 10 <= float(top2[0] - top2[1]) <= 30:
            rows.append((h, t, mode))
    h, t, mode = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]), [r[2] for r in rows]
    y = torch.randint(0, V, (n,), generator=g)
    if n > 1:
        y[0] = mode[0]
    assert t.dtype == torch.float32 and bool((t.bfloat16().float() != t).all())
    return h, w, y, t


def oracle(h, w, y, t):
    """Float64 logits ``h W^T / T``, log-prob of ``y`` and entropy, per row."""
    z = h.double() @ w.double().t() / torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1)
    lp = torch.log_softmax(z, dim=-1)
    return z, lp.gather(1, y[:, None]).squeeze(1), -(lp.exp() * lp).sum(-1)


def gemm_delta(h, w, t, bf16_logits=False):
    """Per-row bound on how far a computed logit ``z_j`` is from ``h W^T / T`` (float64)."""
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    s = (h.double().abs() @ w.double().abs().t()).amax(1) / t       # max_j sum_k |h_k w_jk| / T
    zmax = (h.double() @ w.double().t()).abs().amax(1) / t
    delta = rounding_tol(torch.float32, D) * s + 2 * EPS32 * zmax   # fp32 sum, then * (1/T)
    return delta + U16 * zmax if bf16_logits else delta


def bounds(z, logp, delta, centred=True):
    """Per-row bounds ``(|logp error|, |entropy error|)`` of an fp32 log-softmax of logits
    each off ``z`` (float64 [n, V]) by at most ``delta [n]``. ``centred``: the entropy is
    formed around the row max (agpo, log_softmax); False: as ``lse - sum p z`` (Liger)."""
    p = torch.softmax(z, dim=-1)
    zmax = z.abs().amax(1)
    spread = (p * (z - (p * z).sum(1, keepdim=True)).abs()).sum(1)
    below = (p * (z.amax(1, keepdim=True) - z)).sum(1)               # E_p (m - z)
    sums = rounding_tol(torch.float32, V) + EPS32 * (2 * zmax + 4)   # relative error of the V-term sums
    lp = 2 * delta + sums + EPS32 * (4 * zmax + logp.abs() + math.log(V))
    ent = delta * torch.exp(2 * delta) * (spread + 2 * delta) + sums * (2 + (below if centred else zmax) + math.log(V))
    return lp, ent


def errors(got, want):
    return [(g.double() - w).abs() for g, w in zip(got, want)]


def check(what, err, bound):
    for name, e, b in zip(("log-prob", "entropy"), err, bound):
        print(f"{what}: max {name} error {float(e.max()):.3g} nats (bound {float(b.max()):.3g})")
        assert bool((e <= b).all()), f"{what}: {name} error {e.tolist()} above its bound {b.tolist()}"


@pytest.mark.parametrize("n,seed", [(1, 11), (6, 12)])
@pytest.mark.parametrize("impl", IMPLS)
def test_in_kernel_temperature_within_its_rounding_bound(impl, n, seed):
    """agpo's per-row fp32 temperature in the kernel: fp32 GEMM bound ("torch", "triton"), or
    that plus bf16 logits ("reference", the eager baseline: its logits are bf16 before ``/ T``)."""
    h, w, y, t = peaked(n, seed)
    z, lp0, h0 = oracle(h, w, y, t)
    got = linear_logprobs(h, w, y, temperature=t, impl=impl)
    bound = bounds(z, lp0, gemm_delta(h, w, t, bf16_logits=impl == "reference"))
    check(f"{impl}, T={[round(float(v), 4) for v in t]} in the kernel", errors(got, (lp0, h0)), bound)


@pytest.mark.parametrize("n,seed", [(1, 11), (6, 12)])
@pytest.mark.parametrize("impl", IMPLS)
def test_scaled_hidden_route_carries_bf16_rounding_of_h_over_t(impl, n, seed):
    """``h / T`` in bf16 at temperature 1 through the same ``linear_logprobs``: within its
    exact-arithmetic error plus its path's rounding; through an fp32 GEMM, provably worse
    than the in-kernel temperature on this case."""
    h, w, y, t = peaked(n, seed)
    z, lp0, h0 = oracle(h, w, y, t)
    hs = (h.float() / t[:, None]).to(h.dtype)                        # what the route feeds, at T = 1
    zs, lps, hs0 = oracle(hs, w, y, torch.ones(n))
    shift = (zs - z).abs().amax(1)
    a_priori = (U16 + EPS32) * (h.double().abs() @ w.double().abs().t()).amax(1) / t.double()
    assert bool((shift <= a_priori).all()), (shift, a_priori)         # hs is h / T rounded once
    own = errors((lps, hs0), (lp0, h0))                              # the route's error in exact arithmetic
    fp = bounds(zs, lps, gemm_delta(hs, w, 1.0, bf16_logits=impl == "reference"))
    got = errors(linear_logprobs(hs, w, y, temperature=1.0, impl=impl), (lp0, h0))
    print(f"{impl}: h / T rounded to bf16 moves logits by up to {float(shift.max()):.3g} nats "
          f"(a priori {float(a_priori.max()):.3g}); exact-arithmetic log-prob error {float(own[0].max()):.3g}, "
          f"entropy {float(own[1].max()):.3g}")
    check(f"{impl}, h / T in bf16", got, [o + b for o, b in zip(own, fp)])
    if impl not in FP32_GEMM:
        return
    ours = errors(linear_logprobs(h, w, y, temperature=t, impl=impl), (lp0, h0))
    ours_bound = bounds(z, lp0, gemm_delta(h, w, t))[0]
    lower = (own[0] - fp[0]).max()       # the route's log-prob error is at least this, on its worst row
    assert lower > ours_bound.max(), "this case cannot separate the routes: choose a more peaked one"
    assert got[0].max() >= lower and got[0].max() > ours[0].max(), (got[0], ours[0])
    print(f"{impl}: log-prob error h / T {float(got[0].max()):.3g} >= {float(lower):.3g} > in the kernel "
          f"{float(ours[0].max()):.3g} (bound {float(ours_bound.max()):.3g})")


@pytest.mark.parametrize("n,seed", [(1, 11), (6, 12)])
def test_scaled_hidden_through_liger(n, seed):
    """The bench's rival route itself, on CPU: Liger's op (its fallback there, which forms the
    logits and returns the entropy in the input dtype) fed bf16 ``h / T`` at temperature 1."""
    pytest.importorskip("liger_kernel")
    from liger_kernel.ops.fused_linear_scaled_cross_entropy import LigerFusedLinearScaledCrossEntropyFunction

    h, w, y, t = peaked(n, seed)
    z, lp0, h0 = oracle(h, w, y, t)
    hs = (h.float() / t[:, None]).to(h.dtype)
    zs, lps, hs0 = oracle(hs, w, y, torch.ones(n))
    own = errors((lps, hs0), (lp0, h0))
    nll, ent = LigerFusedLinearScaledCrossEntropyFunction.apply(hs, w, y, 1.0, -100, 1, True)
    lp_b, ent_b = bounds(zs, lps, gemm_delta(hs, w, 1.0, bf16_logits=True), centred=False)
    ent_b = ent_b + U16 * (hs0 + ent_b)                               # the entropy is returned in bf16
    check("liger, h / T in bf16", errors((-nll, ent), (lp0, h0)), [own[0] + lp_b, own[1] + ent_b])


@pytest.mark.parametrize("impl", IMPLS)
def test_temperature_stays_fp32(impl):
    """Exact integer logits (|z| <= 256, exact in bf16 and in any fp32 sum), so that only the
    temperature's handling can err: T = 0.93 (fp32) must give float64 T = 0.93's log-probs
    to fp32 precision, not T rounded to bf16 (0.9297), which is off by far more here."""
    g = torch.Generator().manual_seed(7)
    w = torch.randint(-1, 2, (V, D), generator=g).to(torch.bfloat16)
    mode = torch.randint(0, V, (4,), generator=g)
    h = (2 * w[mode].float() + torch.randint(-1, 2, (4, D), generator=g)).to(torch.bfloat16)
    t64 = torch.tensor([0.93, 0.61, 1.17, 0.77], dtype=torch.float64)
    raw = h.double() @ w.double().t()
    y = raw.argmin(1)                                                  # a peaked row's least likely token
    assert raw.abs().max() <= 256 and bool((raw.topk(2, dim=1).values.diff(dim=1).abs() >= 10).all())
    _, lp0, h0 = oracle(h, w, y, t64)
    t_bf16 = t64.to(torch.bfloat16).double()
    assert bool((t_bf16 != t64).all())
    z, lp_bf16, _ = oracle(h, w, y, t_bf16)
    tol = bounds(z, lp0, gemm_delta(h, w, t64) + EPS32 * z.abs().amax(1))[0]   # + T's own fp32 rounding
    gap = (lp_bf16 - lp0).abs()
    assert bool((gap >= 10 * tol).all()), (gap, tol)                  # bf16 T would fail the bound
    err = errors(linear_logprobs(h, w, y, temperature=t64.float(), impl=impl), (lp0, h0))[0]
    print(f"{impl}: T in fp32 log-prob error {float(err.max()):.3g}, bound {float(tol.max()):.3g}; "
          f"T in bf16 would be off by {float(gap.min()):.3g}-{float(gap.max()):.3g}")
    assert bool((err <= tol).all()), (err, tol)
