"""The forward-gradient row pass (statistics + closed-form AGPO epilogue + dL/dlogits)
against autograd through the O(N) reference objective (agpo_kernels.surrogate) in float64.

Both engines' row passes run on given fp32 logits, so every option is checked without any
projection: k1/k2/k3 (with and without the importance-ratio weighting), dual clip, entropy
bonus, importance weights, on-policy (old_logp None), per-sequence eps and temperature,
the three aggregations, fully masked sequences, masked-but-projected rows (validate=False)
holding garbage, and a chunk split across two launches.
"""

import pytest
import torch
from conftest import DEVICE

from agpo_kernels.epilogue import LossOptions
from agpo_kernels.inputs import loss_rows
from agpo_kernels.surrogate import agpo_objective
from agpo_kernels.torch_engine import engine as torch_tiled
from agpo_kernels.triton_engine import engine as triton_impl

ENGINES = {"torch": torch_tiled, "triton": triton_impl}
CASES = [
    dict(),
    dict(kl="k1", beta=0.1, ent=0.05),
    dict(kl="k2", beta=0.2, dual=2.5, agg="seq-mean-token-mean"),
    dict(kl="k3", beta=0.05, kl_ratio=True, isw=True, agg="seq-mean-token-sum-norm"),
    dict(kl="k3", beta=0.0, ref=True, on_policy=True, ent=0.01),            # KL as a metric only
    dict(kl="k1", beta=0.3, kl_ratio=True, on_policy=True, dual=3.0, isw=True),
    dict(kl="k2", beta=0.1, validate=False, isw=True, agg="seq-mean-token-mean"),
    dict(validate=False, dual=2.0, ent=0.02, agg="seq-mean-token-sum-norm"),
    dict(kl="k3", beta=0.5, kl_clamp=0.05, ent=0.03, ent_agg="token-mean", agg="seq-mean-token-mean"),
    dict(kl="k1", beta=0.4, kl_clamp=0.3, kl_ratio=True, ent=0.02, ent_agg="token-mean",
         agg="seq-mean-token-sum-norm", validate=False),
]


def case_id(c):
    return ",".join(f"{k}={v}" for k, v in c.items()) or "plain"


def make_case(c, seed=0, B=4, T=9, V=77):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[0, :2] = True
    mask[2] = False                                          # a fully masked sequence
    logits = torch.randn(B * T, V, generator=g) * 3.0
    bias = torch.randn(V, generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, generator=g)
    adv[1] = 0.0                                             # a zero advantage
    temp = torch.rand(B, generator=g) + 0.5
    z = (logits + bias).view(B, T, V) / temp.view(B, 1, 1)
    lp = torch.log_softmax(z.double(), -1).gather(-1, y.unsqueeze(-1)).squeeze(-1).float()
    old = lp + 0.5 * torch.randn(B, T, generator=g)        # both sides of the trust region
    adv[3] = -adv[3].abs() - 0.1                             # ratio e^1.5 > c with A < 0: the dual clip binds
    old[3, :3], mask[3, :3] = lp[3, :3] - 1.5, True
    ref = lp + 0.4 * torch.randn(B, T, generator=g)
    isw = torch.rand(B, T, generator=g) * 2.0
    if not c.get("validate", True):                          # garbage where nothing counts
        y[~mask] = -100
        for t in (old, ref, isw):
            t[~mask] = float("nan")
    eps = torch.rand(B, generator=g) * 0.2 + 0.1
    mask, logits, bias, y, adv, temp, old, ref, isw, eps = (
        t.to(DEVICE) for t in (mask, logits, bias, y, adv, temp, old, ref, isw, eps))
    rows = loss_rows(torch.zeros(B, T, 1, device=DEVICE), V, y, adv, None if c.get("on_policy") else old, mask=mask,
                     cu_seqlens=None, eps_low=eps, eps_high=eps * 1.4, temperature=temp,
                     ref_logp=ref if (c.get("beta") or c.get("ref")) else None,
                     is_weight=isw if c.get("isw") else None, beta=c.get("beta", 0.0),
                     loss_agg=c.get("agg", "token-mean"), kl_estimator=c.get("kl", "k3"),
                     dual_clip=c.get("dual"), max_len=None, validate=c.get("validate", True),
                     entropy_agg=c.get("ent_agg"))
    opts = LossOptions(beta=c.get("beta", 0.0), kl_estimator=c.get("kl", "k3"), entropy_coef=c.get("ent", 0.0),
                       dual_clip=c.get("dual"), kl_ratio_weight=c.get("kl_ratio", False), kl_clamp=c.get("kl_clamp"))
    pos = rows.index if rows.index is not None else torch.arange(B * T, device=DEVICE)
    return rows, opts, logits[pos].contiguous(), bias


def reference(rows, opts, x, bias):
    """float64 autograd: loss, per-row logp/H, metric sums and dL/dlogits."""
    x64 = x.double().requires_grad_()
    per_row = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
               for k, v in rows.per_row().items()}
    inv_t = per_row["inv_t"]
    z = (x64 + bias.double()) * (inv_t.unsqueeze(1) if isinstance(inv_t, torch.Tensor) else inv_t)
    logprobs = torch.log_softmax(z, -1)
    logp = logprobs.gather(1, per_row["targets"].unsqueeze(1)).squeeze(1)
    ent = -(logprobs.exp() * logprobs).sum(1)
    loss, metrics = agpo_objective(logp, ent, per_row, opts, rows.n_tokens.double())
    dz, = torch.autograd.grad(loss, x64)
    return loss, logp.detach(), ent.detach(), metrics, dz


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_row_pass_matches_autograd_through_the_reference_objective(impl, case):
    rows, opts, x, bias = make_case(case)
    N, M = x.shape[0], rows.targets.numel()
    out = torch.zeros(6, M, device=DEVICE)
    dz = torch.empty_like(x)
    split = N // 2 + 1  # one chunk in two launches: the second starts at a row offset
    for r0, r1 in ((0, split), (split, N)):
        buf = x[r0:r1].clone()
        d = ENGINES[impl].loss_chunk(buf, torch.empty_like(buf), rows, r0, r1, opts, bias, 0, None, out, True,
                                     torch.float32)
        dz[r0:r1] = d
    loss, logp, ent, metrics, o_dz = reference(rows, opts, x, bias)
    pos = rows.index if rows.index is not None else torch.arange(M, device=DEVICE)
    kept = rows.keep[pos] != 0 if rows.keep is not None else torch.ones(N, dtype=torch.bool, device=DEVICE)
    n = rows.n_tokens.clamp(min=1)
    assert torch.isfinite(out).all() and torch.isfinite(dz).all()
    assert out[0].sum().item() == pytest.approx(loss.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(out[1][pos], torch.where(kept, logp, 0.0).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[2][pos], torch.where(kept, ent, 0.0).float(), rtol=1e-5, atol=1e-5)
    for k, key in ((3, "clip_frac"), (4, "ratio_mean"), (5, "kl_mean")):
        assert (out[k].sum() / n).item() == pytest.approx(metrics[key].item(), rel=1e-5, abs=1e-6), key
    scale = o_dz.abs().max().item()
    torch.testing.assert_close(dz.double(), o_dz, rtol=1e-4, atol=1e-5 * scale)
    assert (metrics["clip_frac"].item() > 0) != bool(case.get("on_policy"))  # both branches taken


def test_masked_rows_of_a_fully_masked_sequence_count_nowhere():
    """validate=True drops masked rows (index); the fully masked sequence gets no row."""
    rows, _, x, _ = make_case(dict())
    assert rows.index is not None and not (rows.seq[rows.index] == 2).any()
    assert x.shape[0] == rows.n_rows < rows.targets.numel()
