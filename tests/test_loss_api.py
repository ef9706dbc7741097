"""What trainer authors rely on: on-policy calls, ignore_index, mixed precision, host-sync
freedom, few kernel launches, and clear errors at the sharp edges (double backward,
devices, a GPU Triton cannot serve)."""

import math
import warnings

import numpy as np
import pytest
import torch
from conftest import DEVICE
from oracle import oracle_loss, oracle_stats
from test_fused_loss import BUDGET, FAST, FAST_IDS, leaves, make_problem, rel
from torch.utils._python_dispatch import TorchDispatchMode

from agpo_kernels import agpo_loss, dispatch, linear_logprobs


def loss_call(p, ins, impl, backward="forward", **kw):
    kw.setdefault("memory_budget", BUDGET[impl])
    return agpo_loss(ins[0], ins[1], p["y"], p["adv"], kw.pop("old", p["old"]), mask=p["mask"],
                     bias=ins[2] if len(ins) > 2 else None, temperature=p["temp"], impl=impl,
                     backward=backward, **kw)


@pytest.mark.parametrize("impl,backward", FAST, ids=FAST_IDS)
def test_on_policy_equals_passing_the_detached_logprobs(impl, backward):
    p = make_problem()
    ins = leaves(p)
    a, ma = loss_call(p, ins, impl, backward, old=None, ref_logp=p["ref"], beta=0.05, entropy_coef=0.01)
    ga = torch.autograd.grad(a, ins)
    assert ma["ratio_mean"].item() == pytest.approx(1.0) and ma["clip_frac"].item() == 0.0
    b, mb = loss_call(p, ins, impl, backward, old=ma["logp"], ref_logp=p["ref"], beta=0.05, entropy_coef=0.01)
    gb = torch.autograd.grad(b, ins)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("impl,backward", FAST, ids=FAST_IDS)
def test_double_backward_is_a_clear_error(impl, backward):
    p = make_problem(B=2, T=3)
    ins = leaves(p)
    loss, _ = loss_call(p, ins, impl, backward)
    with pytest.raises(RuntimeError, match=r"double backward \(create_graph=True"):
        torch.autograd.grad(loss, ins[0], create_graph=True)
    if backward == "recompute":
        logp, _ = linear_logprobs(ins[0], ins[1], p["y"], impl=impl)
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(logp.sum(), ins[0], create_graph=True)
    else:  # gradients are formed in the forward and handed out once
        loss, _ = loss_call(p, ins, impl, backward)
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="backward ran twice"):
            loss.backward()


@pytest.mark.parametrize("name", ["weight", "bias", "targets", "advantages", "old_logp", "mask", "is_weight"])
def test_tensors_on_another_device_are_a_clear_error(name):
    p = make_problem(B=2, T=3)
    args = dict(hidden=p["h"], weight=p["W"], targets=p["y"], advantages=p["adv"], old_logp=p["old"],
                bias=p["b"], mask=p["mask"], is_weight=torch.ones_like(p["old"]))
    args[name] = args[name].to("meta")
    with pytest.raises(ValueError, match=f"^{name}: on meta but hidden is on {DEVICE}"):
        agpo_loss(args.pop("hidden"), args.pop("weight"), args.pop("targets"), args.pop("advantages"),
                  args.pop("old_logp"), impl="torch", **args)


def test_auto_falls_back_to_torch_with_one_warning_where_triton_cannot_run():
    dispatch.triton_problem.cache_clear()
    dispatch._warn_once.cache_clear()
    assert dispatch.resolve_impl("auto", torch.device("cpu")) == "torch"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        picks = [dispatch.resolve_impl("auto", torch.device("cuda", 0)) for _ in range(3)]
    ours = [w for w in seen if "Triton kernels unavailable" in str(w.message)]
    if torch.cuda.is_available() and torch.cuda.get_device_capability(0) >= (8, 0):
        assert picks == ["triton"] * 3 and not ours
    else:  # no usable GPU here: the probe really fails, once
        assert picks == ["torch"] * 3 and len(ours) == 1, [str(w.message) for w in seen]
    assert dispatch.resolve_impl("reference", torch.device("cuda", 0)) == "reference"


# -- host synchronisations and launches ----------------------------------------------------
def _meta_problem(B=3, T=5, D=8, V=33):
    dev = "meta"
    return dict(h=torch.randn(B, T, D, device=dev, requires_grad=True),
                W=torch.randn(V, D, device=dev, requires_grad=True), y=torch.randint(0, V, (B, T), device=dev),
                adv=torch.randn(B, device=dev), old=torch.randn(B, T, device=dev),
                mask=torch.ones(B, T, dtype=torch.bool, device=dev), temp=torch.rand(B, device=dev) + 0.5)


@pytest.mark.parametrize("backward", ["forward", "recompute"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_validate_false_never_reads_a_value_on_the_host(backward, agg):
    """On the meta device a tensor has no values: every host read (.item(), bool(t),
    nonzero, .cpu()) raises. validate=False runs through forward and backward; the
    default validate=True does read (it checks values), which shows the probe works."""
    x = _meta_problem()
    kw = dict(mask=x["mask"], ref_logp=x["old"], beta=0.1, is_weight=x["old"], temperature=x["temp"],
              eps_low=x["adv"].abs(), loss_agg=agg, impl="torch", backward=backward)
    loss, m = agpo_loss(x["h"], x["W"], x["y"], x["adv"], x["old"], validate=False, **kw)
    loss.backward()
    assert x["h"].grad.shape == x["h"].shape and m["logp"].shape == x["y"].shape
    packed = agpo_loss(x["h"].view(15, 8), x["W"], x["y"].view(15), x["adv"], None, validate=False,
                       cu_seqlens=torch.tensor([0, 4, 9, 15], device="meta"), impl="torch", backward=backward)
    packed[0].backward()
    logp, ent = linear_logprobs(x["h"], x["W"], x["y"], mask=x["mask"], temperature=x["temp"].view(-1, 1),
                                impl="torch", validate=False)
    (logp.sum() + ent.sum()).backward()
    with pytest.raises((RuntimeError, NotImplementedError), match="meta"):
        agpo_loss(x["h"], x["W"], x["y"], x["adv"], x["old"], **kw)


SYNC_OPS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "masked_select", "bincount",
            "_unique2", "unique_dim", "repeat_interleave", "allclose", "item"}


IN_TRITON = [False]  # inside a Triton launch: the interpreter's own tensor copies do not count


class Counter(TorchDispatchMode):
    """Counts aten ops that run a kernel (not views, not bare allocations) and those that
    synchronise with the host on a GPU."""

    def __init__(self):
        super().__init__()
        self.kernels, self.syncs = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if IN_TRITON[0]:
            return func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in SYNC_OPS and not (name == "repeat_interleave" and isinstance(args[1], int)):
            self.syncs.append(name)
        if not func.is_view and name not in ("empty", "empty_like", "empty_strided", "_local_scalar_dense",
                                             "detach", "lift_fresh", "set_"):
            self.kernels += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def triton_launches(monkeypatch):
    """Counts Triton kernel launches (under the interpreter: InterpretedFunction.run)."""
    from triton.runtime import interpreter

    count = [0]
    run = interpreter.InterpretedFunction.run

    def counted(self, *a, **k):
        count[0] += 1
        IN_TRITON[0] = True
        try:
            return run(self, *a, **k)
        finally:
            IN_TRITON[0] = False

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", counted)
    return count


OPTION_SETS = [dict(), dict(ref=True, beta=0.1, kl_estimator="k1", entropy_coef=0.02),
               dict(ref=True, beta=0.2, kl_estimator="k2", dual_clip=2.0),
               dict(ref=True, beta=0.05, kl_ratio_weight=True, isw=True), dict(on_policy=True, ref=True)]


@pytest.mark.skipif(DEVICE == "cuda", reason="counts Triton launches through the CPU interpreter")
def test_triton_path_launches_few_kernels_whatever_the_options(triton_launches):
    """One agpo_loss call (forward + backward) on the Triton path, validate=False: the
    number of kernels (aten ops that launch one + Triton launches) does not depend on the
    loss options, is a small constant plus a few per chunk, and no op synchronises."""
    p = make_problem(B=4, T=8, D=32, V=101, bias=False)
    N = p["mask"].numel()

    def count(opts, budget, validate=False):
        ins = leaves(p)
        kw = {k: v for k, v in opts.items() if k not in ("ref", "isw", "on_policy")}
        isw = torch.rand_like(p["old"]) if opts.get("isw") else None
        with Counter() as c:
            triton_launches[0] = 0
            loss, _ = loss_call(p, ins, "triton", old=None if opts.get("on_policy") else p["old"],
                                ref_logp=p["ref"] if opts.get("ref") else None, is_weight=isw,
                                memory_budget=budget, validate=validate, **kw)
            loss.backward()
        return c.kernels, triton_launches[0], c.syncs

    per_row = 4 * 101 + 2 * 32 * 4
    one = count(OPTION_SETS[0], per_row * N)          # one chunk
    three = count(OPTION_SETS[0], per_row * math.ceil(N / 3))  # three chunks
    assert one[2] == [] and three[2] == []
    for opts in OPTION_SETS[1:]:
        assert count(opts, per_row * N) == one, opts
    per_chunk = ((three[0] - one[0]) / 2, (three[1] - one[1]) / 2)
    # per chunk: the logits GEMM (a Triton GEMM here; cuBLAS on a GPU) and one fused row kernel
    assert per_chunk[1] == 2
    assert per_chunk[0] <= 6 and one[0] - per_chunk[0] <= 30, (one, three)
    print(f"kernels per call: {one[0] - per_chunk[0]:.0f} + {per_chunk[0]:.0f}/chunk aten, "
          f"{per_chunk[1]:.0f}/chunk Triton")
    assert count(OPTION_SETS[0], per_row * N, validate=True)[2]  # the checks do sync


# -- ignore_index / mask ------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
def test_linear_logprobs_ignore_index_and_mask(impl):
    p = make_problem(B=3, T=6)
    y = p["y"].clone()
    y[0, 4:] = -100                      # ignored targets
    mask = torch.ones_like(p["mask"])
    mask[2, :2] = False                  # masked positions
    gone = (y == -100) | ~mask
    h = p["h"].clone()
    h[gone] = float("nan")              # never projected: NaN there cannot leak
    h.requires_grad_()
    logp, ent = linear_logprobs(h, p["W"], y, mask=mask, bias=p["b"], impl=impl)
    assert (logp[gone] == 0).all() and (ent[gone] == 0).all() and torch.isfinite(logp).all()
    o_lp, o_ent = oracle_stats(p["h"].double(), p["W"], p["b"], y.clamp(min=0), 1.0)
    assert rel(logp[~gone], o_lp[~gone]) < 1e-5 and rel(ent[~gone], o_ent[~gone]) < 1e-5
    (g,) = torch.autograd.grad(logp.sum() + ent.sum(), h)
    assert (g[gone] == 0).all() and torch.isfinite(g).all()
    # validate=False projects every position (finite hidden needed) and zeroes the ignored ones.
    h2 = p["h"].clone().requires_grad_()
    lp2, ent2 = linear_logprobs(h2, p["W"], y, mask=mask, bias=p["b"], impl=impl, validate=False)
    torch.testing.assert_close(lp2, torch.where(gone, 0.0, logp.detach()), rtol=1e-5, atol=1e-6)
    (g2,) = torch.autograd.grad(lp2.sum() + ent2.sum(), h2)
    torch.testing.assert_close(g2, g, rtol=1e-4, atol=1e-6)


# -- mixed precision ----------------------------------------------------------------------------
@pytest.mark.parametrize("impl,backward", FAST, ids=FAST_IDS)
def test_bf16_hidden_with_fp32_weight_computes_in_bf16(impl, backward):
    """The head runs in the activation dtype (what autocast's F.linear does with fp32
    master weights): the result equals the call with the weight rounded to bf16, differs
    from an fp32 head, and each gradient comes back in its input's dtype."""
    p = make_problem(dtype=torch.bfloat16, B=3, T=8, D=32, V=97, seed=3)
    noise = torch.randn(p["W"].shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)  # fixed, not drawn per run
    W32 = (p["W"].float() + noise * 1e-3).requires_grad_()  # not bf16-exact
    h = p["h"].clone().requires_grad_()
    kw = dict(ref_logp=p["ref"], beta=0.05)
    loss, m = loss_call(p, [h, W32], impl, backward, **kw)
    dh, dw = torch.autograd.grad(loss, (h, W32))
    assert dh.dtype == torch.bfloat16 and dw.dtype == torch.float32
    h16, W16 = p["h"].clone().requires_grad_(), W32.detach().bfloat16().requires_grad_()
    loss16, m16 = loss_call(p, [h16, W16], impl, backward, **kw)
    dh16, dw16 = torch.autograd.grad(loss16, (h16, W16))
    torch.testing.assert_close(loss, loss16, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(dh, dh16, rtol=0, atol=0)
    assert rel(dw, dw16.float()) < 2 ** -7                     # the same gradient up to bf16 rounding
    o_h, o_w = p["h"].double().requires_grad_(), W16.detach().double().requires_grad_()
    o_loss, _ = oracle_loss(o_h, o_w, p["y"], p["adv"], p["old"], p["mask"], eps_low=0.2, eps_high=0.2,
                            temperature=p["temp"], ref=p["ref"], beta=0.05)
    o_dw, = torch.autograd.grad(o_loss, o_w)
    assert rel(dw, o_dw) <= rel(dw16, o_dw) + 1e-6             # accumulated in fp32: no worse
    loss32, _ = loss_call(p, [h, W32], impl, backward, compute_dtype=torch.float32, **kw)
    # fp32 is another head: it differs from the bf16 one by bf16 rounding (2e-4 to 5e-3 of the
    # loss measured), far beyond fp32 rounding (~1e-7 of it)
    assert (loss32 - loss).abs().item() > 1e-5 * loss.abs().item()
    # Under autocast, fp32 inputs follow the autocast dtype, gradients stay fp32.
    h32 = p["h"].float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=DEVICE == "cpu"), \
            torch.autocast("cuda", dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
        loss_ac, _ = loss_call(p, [h32, W32], impl, backward, **kw)
    ga = torch.autograd.grad(loss_ac, (h32, W32))
    assert all(g.dtype == torch.float32 for g in ga)
    torch.testing.assert_close(loss_ac, loss, rtol=1e-6, atol=1e-7)


# -- masked lanes -------------------------------------------------------------------------------
@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter evaluates masked lanes with numpy")
@pytest.mark.parametrize("shift", [-5000.0, 5000.0])
def test_kernels_compute_nothing_unset_in_masked_lanes(shift):
    """Under the interpreter every lane of a tile is computed with numpy, masked or not.
    With overflow and invalid operations raising, rows past the chunk and columns past V
    must stay out of every exp: with logits near -5000 an unmasked column past V (z = 0)
    would overflow exp(z - lse); near +5000 an unmasked padding row (z = b, lse = 0) would.
    Runs the row kernel (forward-gradient design) and both recompute kernels."""
    p = make_problem(B=3, T=7, D=24, V=77)
    with torch.no_grad():
        p["b"] += shift
    ins = leaves(p)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        loss, _ = loss_call(p, ins, "triton", "forward", old=None, entropy_coef=0.1)
        loss.backward()
        logp, ent = linear_logprobs(ins[0], ins[1], p["y"], bias=ins[2], impl="triton", memory_budget=3000)
        (logp.sum() + ent.sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in ins)
