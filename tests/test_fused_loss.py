"""agpo_loss / linear_logprobs against the float64 oracle, for every implementation and
both designs of agpo_loss (forward-gradient, recompute).

impl="triton" runs in the CPU interpreter when there is no GPU (see conftest.py).
"""

import pytest
import torch
from conftest import DEVICE
from oracle import oracle_loss, oracle_stats

from agpo_kernels import AGPOLoss, agpo_loss, linear_logprobs

IMPLS = ["reference", "torch", "triton"]
# agpo_loss: (impl, backward) pairs; "reference" is eager autograd whatever the design.
DESIGNS = [("reference", "forward"), ("torch", "forward"), ("torch", "recompute"), ("triton", "forward"),
           ("triton", "recompute")]
DESIGN_IDS = [f"{i}-{b}" for i, b in DESIGNS]
# Small memory budgets force several row chunks at these tiny sizes (a few rows each).
BUDGET = {"reference": None, "torch": 4_000, "triton": 3_000}


def rel(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def make_problem(B=3, T=7, D=24, V=101, dtype=torch.float32, bias=True, scale=1.0, seed=None):
    # seed None: a draw from the global generator, which conftest seeds per test by its name
    g = torch.Generator().manual_seed(seed if seed is not None else int(torch.randint(2**31, ())))
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
    dict(is_weight=True, beta=0.05, dual_clip=2.0, per_seq_eps=True),   # truncated importance sampling
    dict(on_policy=True, beta=0.05, ent_coef=0.01, agg="seq-mean-token-mean"),
    dict(beta=0.5, kl="k3", kl_clamp=0.03),                      # binds on some tokens (k3 ~ d^2/2)
    dict(beta=0.5, kl="k1", kl_clamp=0.2, kl_ratio_weight=True, per_seq_eps=True),
    dict(agg="seq-mean-token-mean", ent_coef=0.05, ent_agg="token-mean", beta=0.1),   # TRL's entropy bonus
    dict(agg="seq-mean-token-sum-norm", ent_coef=0.05, ent_agg="token-mean"),
]
# Half the option sets run on the packed layout (alternating), all on both designs.
LOSS_CASES = [(o, i % 2 == 1) for i, o in enumerate(OPTION_SETS)]


def run_loss(p, impl, opts, ins, *, packed=False, backward="forward", budget=None):
    B, T = p["y"].shape
    budget = BUDGET[impl] if budget is None else budget
    old = None if opts.get("on_policy") else p["old"]
    isw = (torch.rand(B, T, device=DEVICE) * 1.5) if opts.get("is_weight") else None
    eps_low = torch.rand(B, device=DEVICE) * 0.2 + 0.05 if opts.get("per_seq_eps") else 0.2
    eps_high = opts.get("eps_high", None if not opts.get("per_seq_eps") else eps_low * 1.3)
    kw = dict(eps_low=eps_low, eps_high=eps_high, temperature=p["temp"],
              ref_logp=p["ref"] if "beta" in opts else None, beta=opts.get("beta", 0.0),
              kl_estimator=opts.get("kl", "k3"), entropy_coef=opts.get("ent_coef", 0.0),
              dual_clip=opts.get("dual_clip"), loss_agg=opts.get("agg", "token-mean"),
              kl_ratio_weight=opts.get("kl_ratio_weight", False), backward=backward, memory_budget=budget,
              kl_clamp=opts.get("kl_clamp"), entropy_agg=opts.get("ent_agg"))
    b = ins[2] if len(ins) == 3 else None
    if not packed:
        loss, m = agpo_loss(ins[0], ins[1], p["y"], p["adv"], old, mask=p["mask"], bias=b, impl=impl,
                            is_weight=isw, **kw)
    else:  # same tokens as a packed batch: each sequence keeps its T positions
        cu = torch.arange(0, (B + 1) * T, T, device=DEVICE, dtype=torch.int32)
        flat = lambda t: None if t is None else t.reshape(B * T)
        loss, m = agpo_loss(ins[0].reshape(B * T, -1), ins[1], flat(p["y"]), p["adv"], flat(old),
                            cu_seqlens=cu, mask=flat(p["mask"]), bias=b, impl=impl, max_len=T,
                            is_weight=flat(isw), **{**kw, "ref_logp": flat(kw["ref_logp"])})
        m["logp"], m["entropy"] = m["logp"].view(B, T), m["entropy"].view(B, T)
    o_ins = [t.detach().double().requires_grad_() for t in ins]
    o_loss, o_m = oracle_loss(o_ins[0], o_ins[1], p["y"], p["adv"], old, p["mask"], is_weight=isw,
                              eps_low=eps_low, eps_high=eps_low if eps_high is None else eps_high,
                              temperature=p["temp"], ref=kw["ref_logp"], beta=kw["beta"],
                              kl=kw["kl_estimator"], ent_coef=kw["entropy_coef"],
                              dual_clip=kw["dual_clip"], agg=kw["loss_agg"],
                              bias=o_ins[2] if b is not None else None,
                              kl_ratio_weight=kw["kl_ratio_weight"], kl_clamp=kw["kl_clamp"],
                              ent_agg=kw["entropy_agg"])
    return loss, m, o_loss, o_m, o_ins


@pytest.mark.parametrize("impl,backward", DESIGNS, ids=DESIGN_IDS)
@pytest.mark.parametrize("opts,packed", LOSS_CASES,
                         ids=lambda o: (",".join(f"{k}={v}" for k, v in o.items()) or "plain")
                         if isinstance(o, dict) else ("packed" if o else "padded"))
def test_agpo_loss_fp32(impl, backward, opts, packed):
    p = make_problem(bias=not packed)
    ins = leaves(p)
    loss, m, o_loss, o_m, o_ins = run_loss(p, impl, opts, ins, packed=packed, backward=backward)
    assert abs(loss.item() - o_loss.item()) <= 1e-5 * max(1.0, abs(o_loss.item()))
    for k in ("clip_frac", "ratio_mean", "kl_mean", "entropy_mean"):
        assert abs(m[k].item() - o_m[k].item()) < 2e-5, k
    # the problem really exercises the clipped branch (on-policy: the ratio is 1, never clipped)
    assert (o_m["clip_frac"].item() > 0) != bool(opts.get("on_policy"))
    assert rel(m["logp"], o_m["logp"]) < 1e-5 and rel(m["entropy"], o_m["entropy"]) < 1e-5
    grads = torch.autograd.grad(loss, ins)
    o_grads = torch.autograd.grad(o_loss, o_ins)
    for g, og in zip(grads, o_grads):
        assert rel(g, og) < 1e-4


FAST = [d for d in DESIGNS if d[0] != "reference"]
FAST_IDS = [f"{i}-{b}" for i, b in FAST]


# Fixed seeds, not a fresh draw per run: over seeds 0-23 the worst ratio to eager's error
# was 1.06 (bf16, seed 10) and 1.43 (fp16, seed 16), against the 2x margin; 38 is one that
# gave NaN dh in bf16 before the row tails of dz were zeroed.
LOW_PRECISION_SEEDS = (10, 16, 38)


@pytest.mark.parametrize("seed", LOW_PRECISION_SEEDS)
@pytest.mark.parametrize("impl,backward", FAST, ids=FAST_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_eager(impl, backward, dtype, seed):
    """bf16/fp16 inputs: error against the float64 oracle (on the same rounded inputs) is
    within 2x of what naive eager PyTorch in the same dtype gets (the rounding points
    differ, so on a finite random problem the two errors fluctuate around each other).
    The budget makes 6 row chunks, so the weight gradient is accumulated in 16 bits
    across chunks (docs/kernels.md, "dW precision")."""
    p = make_problem(dtype=dtype, B=4, T=16, D=64, V=257, seed=seed)
    opts = dict(beta=0.05, ent_coef=0.01)
    rows = int(p["mask"].sum())
    budget = -(-rows // 6) * (8 * 257 + 4 * 64)  # ~6 chunks for either engine
    errs = {}
    for name in ("reference", impl):
        ins = leaves(p)
        loss, m, o_loss, o_m, o_ins = run_loss(p, name, opts, ins, backward=backward, budget=budget)
        grads = torch.autograd.grad(loss, ins)
        o_grads = torch.autograd.grad(o_loss, o_ins)
        assert all(g.dtype == dtype for g in grads)
        errs[name] = [abs(loss.item() - o_loss.item()), rel(m["logp"], o_m["logp"])] + \
                     [rel(g, og) for g, og in zip(grads, o_grads)]
    for ours, eager in zip(errs[impl], errs["reference"]):
        assert ours <= 2.0 * eager + 1e-6, (errs[impl], errs["reference"])


@pytest.mark.parametrize("impl,backward", DESIGNS, ids=DESIGN_IDS)
def test_single_token_and_fully_masked_rows(impl, backward):
    p = make_problem(B=3, T=4)
    p["mask"][1] = False  # a fully masked sequence
    ins = leaves(p)
    for opts in (dict(), dict(agg="seq-mean-token-mean")):
        loss, m, o_loss, o_m, o_ins = run_loss(p, impl, opts, ins, backward=backward)
        assert torch.isfinite(loss) and abs(loss.item() - o_loss.item()) < 1e-5
        grads = torch.autograd.grad(loss, ins)
        assert all(torch.isfinite(g).all() for g in grads)
        assert (grads[0][1] == 0).all()  # the masked sequence gets no gradient
        assert (m["logp"][1] == 0).all()
    # N = 1 token
    q = make_problem(B=1, T=1, bias=False)
    loss, m, o_loss, _, _ = run_loss(q, impl, dict(), leaves(q), backward=backward)
    assert abs(loss.item() - o_loss.item()) < 1e-5


@pytest.mark.parametrize("impl,backward", DESIGNS, ids=DESIGN_IDS)
def test_all_tokens_masked_gives_zero_loss_and_zero_grads(impl, backward):
    p = make_problem(B=2, T=3)
    p["mask"][:] = False
    ins = leaves(p)
    loss, m = agpo_loss(ins[0], ins[1], p["y"], p["adv"], p["old"], mask=p["mask"], bias=ins[2], impl=impl,
                        backward=backward)
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
    # The forward-gradient design's row pass on the same logits (entropy bonus on).
    if impl != "reference":
        p["old"], p["temp"] = o_lp.detach().float() + 0.1, torch.ones_like(p["temp"])
        ins = leaves(p)
        loss, m, o_loss, o_m, o_ins = run_loss(p, impl, dict(ent_coef=0.1), ins)
        assert abs(loss.item() - o_loss.item()) <= 1e-3 and torch.isfinite(m["entropy"]).all()
        for a, b in zip(torch.autograd.grad(loss, ins), torch.autograd.grad(o_loss, o_ins)):
            assert torch.isfinite(a).all() and rel(a, b) < 1e-3


@pytest.mark.parametrize("impl,backward", FAST, ids=FAST_IDS)
def test_gradients_only_for_what_requires_grad(impl, backward):
    """A frozen head (LoRA, a reference model) gets no dW GEMM at all; a hidden state that
    needs no gradient gets no dh GEMM; the rest equals the oracle."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class GemmShapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.out = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            res = func(*args, **(kwargs or {}))
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
                self.out.append(tuple(res.shape))
            return res

    p = make_problem(bias=False)
    V, D = p["W"].shape
    o_h, o_w = p["h"].double().requires_grad_(), p["W"].double().requires_grad_()
    o_loss, _ = oracle_loss(o_h, o_w, p["y"], p["adv"], p["old"], p["mask"], eps_low=0.2, eps_high=0.2,
                            temperature=1.0)
    o_dh, o_dw = torch.autograd.grad(o_loss, (o_h, o_w))
    for frozen in ("weight", "hidden"):
        h = p["h"].clone().requires_grad_(frozen != "hidden")
        w = p["W"].clone().requires_grad_(frozen != "weight")
        with GemmShapes() as gemms:
            loss, _ = agpo_loss(h, w, p["y"], p["adv"], p["old"], mask=p["mask"], impl=impl, backward=backward,
                                memory_budget=BUDGET[impl])
            loss.backward()
        assert ((V, D) in gemms.out) == (frozen != "weight"), gemms.out  # the dW GEMM
        assert any(s[1] == D and s[0] < V for s in gemms.out) == (frozen != "hidden"), gemms.out  # dh
        if frozen == "weight":
            assert w.grad is None and rel(h.grad, o_dh) < 1e-4
        else:
            assert h.grad is None and rel(w.grad, o_dw) < 1e-4


def test_module_matches_functional_and_overrides():
    p = make_problem(bias=False)
    mod = AGPOLoss(eps_low=0.1, beta=0.0, impl="torch")
    eps = torch.full((p["y"].shape[0],), 0.3, device=DEVICE)
    a, _ = mod(p["h"], p["W"], p["y"], p["adv"], p["old"], mask=p["mask"], eps_low=eps)
    b, _ = agpo_loss(p["h"], p["W"], p["y"], p["adv"], p["old"], mask=p["mask"], eps_low=0.3, impl="torch")
    assert torch.allclose(a, b)
    c, _ = mod(p["h"], p["W"], p["y"], p["adv"], p["old"], mask=p["mask"], eps_low=eps, backward="recompute")
    assert torch.allclose(a, c)
    with pytest.raises(TypeError, match="unknown options"):
        mod(p["h"], p["W"], p["y"], p["adv"], p["old"], epsilon=0.2)


def _strided(t, k=3, j=1):
    """A non-contiguous view holding the same values as ``t``: column j of a [*, k] buffer."""
    buf = torch.randn(*t.shape, k, device=t.device).to(t.dtype)
    buf[..., j] = t
    view = buf[..., j]
    assert not view.is_contiguous() or view.numel() <= 1
    return view


@pytest.mark.parametrize("impl,backward", FAST, ids=FAST_IDS)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_strided_inputs_give_the_contiguous_answer(impl, backward, packed):
    """Every tensor argument as a strided view (targets = ids[:, 0], old_logp = stats[:, 0],
    a weight sliced from a wider buffer, hidden with a row stride): the same loss, metrics and
    gradients as contiguous copies, whatever the engine reads with unit stride."""
    p = make_problem(B=3, T=5, D=24, V=101, bias=True)
    B, T = p["y"].shape
    isw = torch.rand(B, T, device=DEVICE) + 0.5
    eps = torch.rand(B, device=DEVICE) * 0.2 + 0.05
    tok = (lambda t: t.reshape(B * T)) if packed else (lambda t: t)
    cu = torch.arange(0, (B + 1) * T, T, device=DEVICE, dtype=torch.int32) if packed else None
    D = p["h"].shape[-1]
    hid = p["h"].reshape(B * T, D) if packed else p["h"]

    def call(h, w, b, y, adv, old, mask, ref, iw, e_lo, e_hi, temp):
        return agpo_loss(h, w, y, adv, old, mask=mask, bias=b, cu_seqlens=cu, eps_low=e_lo, eps_high=e_hi,
                         temperature=temp, ref_logp=ref, beta=0.05, entropy_coef=0.01, is_weight=iw,
                         impl=impl, backward=backward, memory_budget=BUDGET[impl], max_len=T if packed else None)

    args = [tok(p["y"]), p["adv"], tok(p["old"]), tok(p["mask"]), tok(p["ref"]), tok(isw), eps, eps * 1.3, p["temp"]]
    dense = [t.contiguous() for t in args]
    strided = [_strided(t) for t in args]
    results = []
    for h_src, w_src, b_src, rest in ((hid, p["W"], p["b"], dense), (None, None, None, strided)):
        if h_src is None:  # strided hidden / weight / bias leaves, same values
            wide_h = torch.zeros(*hid.shape[:-1], D + 5, device=DEVICE, dtype=hid.dtype)
            wide_h[..., 2:2 + D] = hid
            wide_w = torch.zeros(p["W"].shape[0], D + 3, device=DEVICE, dtype=hid.dtype)
            wide_w[:, 1:1 + D] = p["W"]
            h_leaf, w_leaf = wide_h.requires_grad_(), wide_w.requires_grad_()
            b_leaf = _strided(p["b"]).detach().requires_grad_()
            h, w, b = h_leaf[..., 2:2 + D], w_leaf[:, 1:1 + D], b_leaf
            assert not (h.is_contiguous() or w.is_contiguous() or b.is_contiguous())
        else:
            h_leaf, w_leaf, b_leaf = (t.detach().clone().requires_grad_() for t in (h_src, w_src, b_src))
            h, w, b = h_leaf, w_leaf, b_leaf
        loss, m = call(h, w, b, *rest)
        gh, gw, gb = torch.autograd.grad(loss, (h, w, b))
        results.append((loss, m, (gh, gw, gb)))
    (l0, m0, g0), (l1, m1, g1) = results
    assert abs(l0.item() - l1.item()) <= 1e-6 * max(1.0, abs(l0.item())), (l0.item(), l1.item())
    for k in ("clip_frac", "ratio_mean", "kl_mean", "entropy_mean"):
        assert abs(m0[k].item() - m1[k].item()) <= 1e-6, k
    assert rel(m1["logp"], m0["logp"]) < 1e-6 and rel(m1["entropy"], m0["entropy"]) < 1e-6
    for a, c in zip(g1, g0):
        assert rel(a, c) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_linear_logprobs_inputs(impl):
    p = make_problem(B=2, T=6, D=24, V=101, bias=False)
    B, T = p["y"].shape
    temp = torch.rand(B, T, device=DEVICE) + 0.5
    ref_lp, ref_ent = linear_logprobs(p["h"], p["W"], p["y"], temperature=temp, mask=p["mask"], impl=impl,
                                      memory_budget=BUDGET[impl])
    wide_w = torch.zeros(p["W"].shape[0], 30, device=DEVICE)
    wide_w[:, 3:27] = p["W"]
    lp, ent = linear_logprobs(p["h"].transpose(0, 1).contiguous().transpose(0, 1), wide_w[:, 3:27],
                              _strided(p["y"]), temperature=_strided(temp), mask=_strided(p["mask"]),
                              impl=impl, memory_budget=BUDGET[impl])
    assert rel(lp, ref_lp) < 1e-6 and rel(ent, ref_ent) < 1e-6


@pytest.mark.skipif(DEVICE != "cuda", reason="a cross-warp race: only a GPU runs warps concurrently")
def test_in_place_bf16_dz_is_deterministic_and_matches_a_separate_buffer():
    """The row kernel writes the bf16 dz over the fp32 logits it reads; without ordering the
    warps of a program, a store can overwrite a logit another warp has yet to load. Then
    gradients vary from call to call and differ from the torch engine, which writes dz into
    a buffer of its own."""
    g = torch.Generator().manual_seed(7)
    N, D, V = 512, 256, 3 * 4096 + 64
    h = torch.randn(N, D, generator=g).to(DEVICE, torch.bfloat16)
    W = (torch.randn(V, D, generator=g) / D**0.5).to(DEVICE, torch.bfloat16)
    y = torch.randint(0, V, (N,), generator=g).to(DEVICE)
    adv = torch.randn(N, generator=g).to(DEVICE)
    cu = torch.arange(N + 1, device=DEVICE, dtype=torch.int32)
    old = torch.randn(N, generator=g).to(DEVICE) * 0.1 - 9.0

    def grads(impl):
        hh, ww = h.clone().requires_grad_(), W.clone().requires_grad_()
        loss, _ = agpo_loss(hh, ww, y, adv, old, cu_seqlens=cu, impl=impl, entropy_coef=0.01)
        return torch.autograd.grad(loss, (hh, ww))

    first = grads("triton")
    for _ in range(10):
        again = grads("triton")
        assert all(torch.equal(a, b) for a, b in zip(first, again))
    for ours, theirs in zip(first, grads("torch")):
        assert rel(ours, theirs) < 2e-2
