"""Distributed building blocks (agpo.scale.distributed, agpo.scale.lora) on CPU with gloo.

The 2-rank parts run this same file as a torchrun worker script
(``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/test_distributed.py
--worker SCENARIO OUTDIR``; ``--standalone`` picks a free port). One "main" launch does all
the 2-rank work (sharded generate, sharded step, LoRA under FSDP, checkpoint, HF export) and
writes its measurements and artefacts to OUTDIR; the tests below check them, loading the
checkpoint and the export in this (single, process-group-free) process: world size 2 ->
world size 1. Two more launches check that a failing rank does not hang the other.
"""

from __future__ import annotations

import copy
import errno
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tolerance import assert_close_scaled, rounding_tol  # noqa: E402

from agpo.scale.distributed import (  # noqa: E402
    DistEnv,
    all_reduce_mean,
    all_reduce_sum,
    apply_activation_checkpointing,
    barrier,
    broadcast_object,
    device_mesh,
    export_hf,
    gather_objects,
    init_distributed,
    load_sharded,
    on_rank0,
    save_sharded,
    shard_model,
    shutdown_distributed,
    unsharded,
)

LR = 1e-2
ROWS = 4
HAVE_PEFT = importlib.util.find_spec("peft") is not None
needs_peft = pytest.mark.skipif(not HAVE_PEFT, reason="pip install peft")


# -- shared helpers (pytest process and torchrun workers) -------------------------------------
class LossModel(nn.Module):
    """What the trainer's Policy does: backbone hidden states -> fused loss, no logits."""

    def __init__(self, hf):
        super().__init__()
        self.model = hf

    def forward(self, input_ids, attention_mask, targets, advantages, old_logp, mask):
        from agpo_kernels import agpo_loss
        self.input_dtypes = [str(t.dtype) for t in (advantages, old_logp)]  # as the trainer passed them
        hidden = self.model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        loss, _ = agpo_loss(hidden, self.model.lm_head.weight, targets, advantages, old_logp, mask=mask,
                            eps_low=0.2, impl="torch", loss_agg="token-mean")
        return loss


def tiny():
    from agpo.models import build_char_tokenizer, build_tiny_model
    tok = build_char_tokenizer()
    return tok, build_tiny_model(tok, seed=0)


def make_batch(vocab: int, rows: int = ROWS, length: int = 12):
    """Rows with unequal numbers of loss tokens (so the cross-rank scaling matters)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (rows, length + 1), generator=g)
    attn = torch.ones(rows, length, dtype=torch.long)
    mask = torch.zeros(rows, length)
    for r in range(rows):
        mask[r, 4:4 + 2 + 3 * r] = 1.0                 # 2, 5, 8, 11 loss tokens
    adv = torch.randn(rows, generator=g)
    old_logp = -3.0 + 0.3 * torch.randn(rows, length, generator=g)
    return dict(input_ids=ids[:, :-1], attention_mask=attn, targets=ids[:, 1:], advantages=adv,
                old_logp=old_logp, mask=mask)


def rows_of(batch, lo, hi):
    return {k: v[lo:hi] for k, v in batch.items()}


def make_optimizer(params):
    """The optimiser of the sharded-vs-single-process comparisons: SGD (with momentum, so
    a checkpoint carries optimiser state). Its update is ``lr * g``, so parameters after
    a step differ exactly as much as the gradients, times lr. AdamW's first step,
    ``lr * g / (|g| + eps)``, would turn a 1e-9 rounding difference on a tiny gradient
    entry into a sizeable fraction of lr on another machine. (The trainer's AdamW under
    FSDP is covered by tests/test_train_scale.py.)"""
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


def reference_step(hf, batch):
    """One full-batch, single-process optimiser step; returns (loss, grads by name)."""
    lm = LossModel(hf)
    opt = make_optimizer([p for p in lm.parameters() if p.requires_grad])
    loss = lm(**batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in hf.named_parameters() if p.grad is not None}
    opt.step()
    return float(loss.detach()), grads


def clean(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "").removeprefix("model.", )


def sharded_step(root: LossModel, opt, batch, env: DistEnv):
    """This rank's half of the rows; the loss is scaled so FSDP's gradient average equals
    the full-batch token-mean gradient.

    token-mean on rank r is sum_r / n_r (n_r = its loss tokens). The global objective is
    (sum_0 + sum_1) / N. FSDP2 reduce-scatters the *mean* of the ranks' gradients, so each
    rank backpropagates loss_r * n_r * W / N: mean_r(n_r W / N * sum_r / n_r) = sum / N.
    """
    per = ROWS // env.world_size
    local = rows_of(batch, env.rank * per, (env.rank + 1) * per)
    n_local = float(local["mask"].sum())
    n_total = all_reduce_sum({"n": n_local}, env)["n"]
    loss = root(**local)
    scaled = loss * (n_local * env.world_size / n_total)
    scaled.backward()
    global_loss = all_reduce_sum({"loss": float(scaled.detach())}, env)["loss"] / env.world_size
    grads = {clean(n): p.grad.full_tensor() for n, p in root.named_parameters() if p.grad is not None}
    opt.step()
    return global_loss, grads


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b), (sorted(set(a) ^ set(b)))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


N_REDUCE = ROWS * 12 * 192
"""Terms in the sums behind one gradient entry, at most: the batch's tokens times the
tiny preset's hidden size (the rounding bound of tests/tolerance.py)."""


def assert_same_step(step: dict) -> None:
    """Sharded gradients equal the single process's to fp32 rounding; so do the parameters
    after the SGD step, which differ by lr times the gradients' difference plus one
    rounding of ``p - lr * g``."""
    assert_close_scaled(step["grads"], step["ref_grads"], dtype=torch.float32, n_reduce=N_REDUCE)
    tol = rounding_tol(torch.float32, N_REDUCE)
    eps = torch.finfo(torch.float32).eps
    assert step["params"].keys() == step["ref_params"].keys()
    for name, want in step["ref_params"].items():
        g = step["ref_grads"].get(name)
        bound = 2 * eps * float(want.abs().max()) + (LR * tol * float(g.abs().max()) if g is not None else 0.0)
        err = float((step["params"][name] - want).abs().max())
        assert err <= bound, (name, err, bound)


def full_params(root: nn.Module) -> dict:
    out = {}
    for n, p in root.named_parameters():
        out[clean(n)] = p.full_tensor().detach().clone() if hasattr(p, "full_tensor") else p.detach().clone()
    return out


# -- torchrun worker --------------------------------------------------------------------------
def _count_all_gathers():
    """Patch FSDP2's per-group all-gather entry point with a counter."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as pg
    counter = {"n": 0}
    orig = pg.foreach_all_gather

    def counted(*args, **kwargs):
        counter["n"] += 1
        return orig(*args, **kwargs)

    pg.foreach_all_gather = counted
    return counter


def worker_main(env: DistEnv, out: Path) -> dict:
    res: dict = {}
    tok, hf_ref = tiny()
    _, hf = tiny()
    vocab = hf.config.vocab_size
    batch = make_batch(vocab)

    # small collectives
    res["gather"] = gather_objects(env.rank, env)
    res["bcast"] = broadcast_object({"r": env.rank}, env)
    res["mean"] = all_reduce_mean({"x": float(env.rank), "y": 1.0}, env)

    # shard (with activation checkpointing) ---------------------------------------------
    root = LossModel(hf)
    layers = apply_activation_checkpointing(hf.model.layers)
    shard_model(root, list(layers), mesh=device_mesh(env))
    # The optimizer must be built right after sharding: it has to hold the sharded DTensor
    # parameters (after a no-grad forward the root's parameters are left unsharded).
    opt = make_optimizer(root.parameters())
    res["n_fsdp_modules"] = sum(type(m).__name__.startswith("FSDP") for m in root.modules())

    # (d) generate under unsharded(): same tokens as the plain model, bounded all-gathers
    counter = _count_all_gathers()
    prompts = tok(["12+3=", "7*8=", "1="], return_tensors="pt", padding=True)
    gen_kw = dict(max_new_tokens=5, do_sample=False, min_new_tokens=5)
    with torch.no_grad():
        want = hf_ref.generate(**prompts, **gen_kw)
        before = counter["n"]
        with unsharded(root):
            got = hf.generate(**prompts, **gen_kw)
        res["gen_all_gathers"] = counter["n"] - before
        res["gen_equal"] = bool(torch.equal(want, got))
        res["gen_new_tokens"] = int(got.shape[1] - prompts["input_ids"].shape[1])
        # control: only the root gathered, layers reshard after every forward as in training
        before = counter["n"]
        root.unshard()
        got2 = hf.generate(**prompts, **gen_kw)
        root.reshard()
        res["gen_all_gathers_layers_sharded"] = counter["n"] - before
        res["gen_equal_layers_sharded"] = bool(torch.equal(want, got2))
        after_exit = counter["n"]
        # afterwards the model is sharded again: a forward all-gathers again
        root(**rows_of(batch, 0, 1))
        res["all_gathers_after_exit"] = counter["n"] - after_exit

    # (a) 2-rank sharded loss / grads / optimiser step == 1-process full batch --------------
    ref_loss, ref_grads = reference_step(hf_ref, batch)
    loss, grads = sharded_step(root, opt, batch, env)
    res["loss"], res["ref_loss"] = loss, ref_loss
    res["grad_max_abs"] = max(float(g.abs().max()) for g in ref_grads.values())
    params = full_params(root)
    if env.is_main:
        torch.save({"grads": grads, "ref_grads": ref_grads, "params": params,
                    "ref_params": {n: p.detach() for n, p in hf_ref.named_parameters()}}, out / "step.pt")
    res["tied_after_step"] = bool(hf.lm_head.weight is hf.model.embed_tokens.weight)

    # (b) sharded checkpoint at world size 2 (loaded at world size 1 by the test) ---------
    save_sharded(out / "ckpt", root, opt, extra={"step": 1, "controller": {"b": 0.5}})
    res["on_rank0_errnos"] = gather_objects(_rank0_write_fails(), env)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    msd, osd = get_state_dict(root, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # (c) HF export + logits of the sharded model on a fixed input
    export_hf(root, hf, tok, out / "hf", env)
    with torch.no_grad(), unsharded(root):
        logits = hf(**prompts).logits
    if env.is_main:
        torch.save({"model": msd, "optim": osd, "logits": logits, "prompts": dict(prompts)}, out / "full.pt")

    worker_mixed_precision(env, res, batch, prompts, gen_kw, ref_loss, ref_grads)
    if HAVE_PEFT:
        worker_lora(env, out, res, tok, batch, prompts)
    return res


def _rank0_write_fails():
    """A rank-0-only write that runs out of space: the errno every rank sees."""
    def write():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    try:
        on_rank0(write)
    except OSError as e:
        return e.errno
    return None


def worker_lora(env: DistEnv, out: Path, res: dict, tok, batch, prompts) -> None:
    """(e') LoRA under FSDP: sharded step == single-process step, only adapters move."""
    from agpo.scale.lora import apply_lora
    _, base_ref = tiny()
    _, base = tiny()
    torch.manual_seed(5)                                # lora_A is initialised from the global RNG
    lref = apply_lora(base_ref, rank=4)
    torch.manual_seed(5)
    lsh = apply_lora(base, rank=4)
    with torch.no_grad():                               # non-zero B so every adapter gets grads
        for m in (lref, lsh):
            g = torch.Generator().manual_seed(3)
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.copy_(0.01 * torch.randn(p.shape, generator=g))
    inner_ref, inner = lref.get_base_model(), lsh.get_base_model()
    lroot = LossModel(inner)
    shard_model(lroot, list(inner.model.layers), mesh=device_mesh(env))
    lopt = make_optimizer([p for p in lroot.parameters() if p.requires_grad])
    _, l_ref_grads = reference_step(inner_ref, batch)
    _, l_grads = sharded_step(lroot, lopt, batch, env)
    p_after = full_params(lroot)
    if env.is_main:
        torch.save({"grads": l_grads, "ref_grads": l_ref_grads, "params": p_after,
                    "ref_params": {n: p.detach() for n, p in inner_ref.named_parameters()}}, out / "lora_step.pt")
    res["lora_grad_names"] = sorted(l_grads)
    export_hf(lroot, lsh, tok, out / "hf_lora", env)
    with torch.no_grad(), unsharded(lroot):
        l_logits = inner(**prompts).logits
    if env.is_main:
        torch.save(l_logits, out / "lora_logits.pt")


def worker_mixed_precision(env: DistEnv, res: dict, batch, prompts, gen_kw, ref_loss, ref_grads) -> None:
    """bf16 mixed precision (the GPU setting): the model loaded in bf16, fp32 sharded master
    weights (upcast layer by layer while sharding), bf16 compute."""
    _, hf_mp = tiny()
    _, hf_bf16 = tiny()
    hf_mp.to(torch.bfloat16)
    loaded = {n: p.detach().float().clone() for n, p in hf_mp.named_parameters()}
    mroot = LossModel(hf_mp)
    shard_model(mroot, list(apply_activation_checkpointing(hf_mp.model.layers)), param_dtype=torch.bfloat16,
                master_dtype=torch.float32, mesh=device_mesh(env))
    from torch.distributed.tensor import DTensor
    res["mp_all_dtensor"] = all(isinstance(p, DTensor) for p in hf_mp.parameters())
    full = {n.replace("_checkpoint_wrapped_module.", ""): p.full_tensor() for n, p in hf_mp.named_parameters()}
    res["mp_master_equals_loaded"] = set(full) == set(loaded) and all(
        torch.equal(full[n], loaded[n]) for n in loaded)
    mopt = make_optimizer(mroot.parameters())
    with torch.no_grad():
        with unsharded(mroot):
            res["mp_gen_dtype"] = str(hf_mp.lm_head.weight.dtype)
            got = hf_mp.generate(**prompts, **gen_kw)
        res["mp_gen_equal_bf16"] = bool(torch.equal(got, hf_bf16.to(torch.bfloat16).generate(**prompts, **gen_kw)))
    mloss, mgrads = sharded_step(mroot, mopt, batch, env)
    res["mp_loss_diff"] = abs(mloss - ref_loss)
    res["mp_grad_max_diff"] = max_diff(mgrads, ref_grads)
    res["mp_master_dtype"] = str(next(mroot.parameters()).dtype)
    res["mp_loss_input_dtypes"] = mroot.input_dtypes


def worker(scenario: str, out: Path) -> None:
    if scenario == "main":
        env = init_distributed(device="cpu", timeout_s=60)
        res = worker_main(env, out)
        if env.is_main:
            (out / "result.json").write_text(json.dumps(res))
        barrier(env)
        shutdown_distributed()
        return
    env = init_distributed(device="cpu", timeout_s=5)
    t0 = time.monotonic()
    if env.rank == 1:
        if scenario == "raise":
            raise RuntimeError("rank 1 fails before the collective")
        time.sleep(60)                                  # "hang": alive but never joins
        return
    try:
        all_reduce_mean({"x": 1.0}, env)
    except Exception as e:                              # noqa: BLE001
        (out / "rank0.json").write_text(json.dumps({"error": f"{type(e).__name__}: {e}"[:300],
                                                     "seconds": time.monotonic() - t0}))
        raise
    (out / "rank0.json").write_text(json.dumps({"error": None, "seconds": time.monotonic() - t0}))


def launch(scenario: str, out: Path, timeout: float):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", TORCHELASTIC_ERROR_FILE="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--monitor-interval", "0.5", __file__, "--worker", scenario, str(out)]
    t0 = time.monotonic()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return p, time.monotonic() - t0


# -- tests ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_rank(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist2")
    p, _ = launch("main", out, timeout=150)
    if p.returncode != 0 or not (out / "result.json").exists():
        pytest.fail(f"2-rank worker failed (rc={p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return out, json.loads((out / "result.json").read_text())


@pytest.mark.timeout(180)
def test_collectives_2_ranks(two_rank):
    _, res = two_rank
    assert res["gather"] == [0, 1]
    assert res["bcast"] == {"r": 0}
    assert res["mean"] == {"x": 0.5, "y": 1.0}


@pytest.mark.timeout(180)
def test_sharded_step_matches_single_process(two_rank):
    out, res = two_rank
    assert res["n_fsdp_modules"] == 4                   # 3 layers + the root
    assert res["loss"] == pytest.approx(res["ref_loss"], rel=rounding_tol(torch.float32, N_REDUCE))
    assert_same_step(torch.load(out / "step.pt", weights_only=False))
    assert res["tied_after_step"]


@pytest.mark.timeout(180)
def test_unsharded_generate(two_rank):
    _, res = two_rank
    assert res["gen_equal"] and res["gen_new_tokens"] == 5
    # one all-gather per FSDP group on entry, none per decoding step
    # (without unsharded: >= 5 tokens x 3 layers)
    assert res["gen_all_gathers"] == res["n_fsdp_modules"]
    assert res["gen_equal_layers_sharded"] and res["gen_all_gathers_layers_sharded"] >= 5 * 3
    assert res["all_gathers_after_exit"] >= 3           # resharded on exit


@pytest.mark.timeout(180)
def test_bf16_mixed_precision(two_rank):
    _, res = two_rank
    assert res["mp_master_dtype"] == "torch.float32" and res["mp_gen_dtype"] == "torch.bfloat16"
    assert res["mp_all_dtensor"] and res["mp_master_equals_loaded"]
    assert res["mp_loss_input_dtypes"] == ["torch.float32"] * 2  # fp32 loss inputs are not cast to bf16
    assert res["mp_gen_equal_bf16"]
    # bf16 compute on fp32 masters against the fp32 run: weights and activations are rounded
    # to bf16 (relative 2^-8 each) with fp32 accumulation, so the loss and the gradients
    # agree to a few bf16 ulps of their scale, not to fp32 rounding.
    bf16_ulp = torch.finfo(torch.bfloat16).eps
    assert res["mp_loss_diff"] < 1.5 * bf16_ulp * max(1.0, abs(res["ref_loss"]))
    assert res["mp_grad_max_diff"] < 2.5 * bf16_ulp * res["grad_max_abs"]


@pytest.mark.timeout(180)
def test_checkpoint_2_ranks_loads_at_1(two_rank):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    out, res = two_rank
    full = torch.load(out / "full.pt", weights_only=False)
    _, hf = tiny()                                      # fresh weights, no process group
    root = LossModel(hf)
    opt = make_optimizer(root.parameters())
    extra = load_sharded(out / "ckpt", root, opt)
    assert extra == {"step": 1, "controller": {"b": 0.5}}
    assert not (out / "ckpt.tmp").exists()
    assert res["on_rank0_errnos"] == [errno.ENOSPC, errno.ENOSPC]  # rank 1 is not left waiting
    msd, osd = get_state_dict(root, opt, options=StateDictOptions(full_state_dict=True))
    assert set(msd) == set(full["model"])
    for k in msd:
        assert torch.equal(msd[k], full["model"][k]), k
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    assert set(osd["state"]) == set(full["optim"]["state"])
    for k, st in osd["state"].items():
        for s, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(full["optim"]["state"][k][s])), (k, s)
    assert osd["param_groups"][0]["lr"] == LR


@pytest.mark.timeout(180)
def test_export_hf_reloads(two_rank):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out, _ = two_rank
    full = torch.load(out / "full.pt", weights_only=False)
    assert any(f.suffix == ".safetensors" for f in (out / "hf").iterdir())
    m = AutoModelForCausalLM.from_pretrained(out / "hf")
    assert m.config.tie_word_embeddings and m.lm_head.weight is m.model.embed_tokens.weight
    torch.testing.assert_close(m.model.embed_tokens.weight, full["model"]["model.model.embed_tokens.weight"],
                               rtol=0, atol=0)
    with torch.no_grad():
        logits = m(**full["prompts"]).logits
    torch.testing.assert_close(logits, full["logits"], rtol=0, atol=1e-6)
    assert len(AutoTokenizer.from_pretrained(out / "hf")) == 18


@needs_peft
@pytest.mark.timeout(180)
def test_lora_under_fsdp(two_rank):
    from transformers import AutoModelForCausalLM
    out, res = two_rank
    assert_same_step(torch.load(out / "lora_step.pt", weights_only=False))
    assert res["lora_grad_names"] and all(".lora_" in n for n in res["lora_grad_names"])
    m = AutoModelForCausalLM.from_pretrained(out / "hf_lora")
    assert not any("lora" in n for n, _ in m.named_parameters())
    with torch.no_grad():
        logits = m(**torch.load(out / "full.pt", weights_only=False)["prompts"]).logits
    torch.testing.assert_close(logits, torch.load(out / "lora_logits.pt"), rtol=0, atol=1e-5)


@needs_peft
@pytest.mark.timeout(60)
def test_lora_single_process(tmp_path):
    from transformers import AutoModelForCausalLM

    from agpo.scale.lora import (
        adapters_disabled,
        apply_lora,
        merged_state_for_export,
        trainable_parameter_report,
    )
    tok, hf = tiny()
    base_copy = copy.deepcopy(hf)
    peft_model = apply_lora(hf, rank=4, alpha=8)
    rep = trainable_parameter_report(peft_model)
    assert 0 < rep["trainable"] < rep["total"] and all(".lora_" in n for n in rep["trainable_names"])
    inner = peft_model.get_base_model()
    assert not inner.lm_head.weight.requires_grad
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    batch = make_batch(hf.config.vocab_size)
    lm = LossModel(inner)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=LR)
    for _ in range(2):                                  # step 1 moves B off zero, step 2 moves A too
        opt.zero_grad()
        lm(**batch).backward()
        opt.step()
    for n, p in peft_model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (".lora_" in n), n
    ids = tok(["12+3=", "7*8="], return_tensors="pt", padding=True)
    with torch.no_grad():
        want = base_copy(**ids).logits
        lora_logits = peft_model(**ids).logits
        with adapters_disabled(peft_model):
            off = peft_model(**ids).logits
    assert torch.equal(off, want)                       # exactly the base model
    assert not torch.allclose(lora_logits, want)
    # merged export without mutating the peft model
    merged = merged_state_for_export(peft_model)
    assert not any("lora" in k or "base_layer" in k for k in merged)
    inner.save_pretrained(tmp_path / "m", state_dict=merged)
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(m(**ids).logits, lora_logits, rtol=0, atol=1e-5)
    assert any(".lora_" in n for n, _ in peft_model.named_parameters())


@needs_peft
@pytest.mark.timeout(60)
def test_lora_fp32_adapters_on_bf16_base():
    from agpo.scale.lora import apply_lora, upcast_adapters
    tok, hf = tiny()
    m = upcast_adapters(apply_lora(hf.to(torch.bfloat16), rank=4))
    assert {p.dtype for n, p in m.named_parameters() if ".lora_" in n} == {torch.float32}
    assert {p.dtype for n, p in m.named_parameters() if ".lora_" not in n} == {torch.bfloat16}
    m(**tok(["12+3="], return_tensors="pt")).logits.float().sum().backward()
    assert {p.grad.dtype for p in m.parameters() if p.grad is not None} == {torch.float32}


@pytest.mark.timeout(60)
def test_activation_checkpointing_same_grads():
    _, hf = tiny()
    hf_ac = copy.deepcopy(hf)
    apply_activation_checkpointing(hf_ac.model.layers)
    assert all(type(m).__name__ == "CheckpointWrapper" for m in hf_ac.model.layers)
    batch = make_batch(hf.config.vocab_size)
    _, g = reference_step(hf, batch)
    _, g_ac = reference_step(hf_ac, batch)
    g_ac = {n.replace("_checkpoint_wrapped_module.", ""): v for n, v in g_ac.items()}
    assert set(g) == set(g_ac)
    for k in g:
        torch.testing.assert_close(g_ac[k], g[k], rtol=0, atol=1e-7)
    assert set(hf_ac.state_dict()) == set(hf.state_dict())


def test_single_process_env_and_noops():
    env = init_distributed(device="cpu")
    assert (env.rank, env.world_size, env.is_main, env.distributed) == (0, 1, True, False)
    assert all_reduce_mean({"a": 2.0}, env) == {"a": 2.0}
    assert gather_objects("x", env) == ["x"] and broadcast_object(3, env) == 3
    barrier(env)
    _, hf = tiny()
    with unsharded(hf) as m:                            # not sharded: no-op
        assert m is hf


def test_export_casts_and_records_dtype(tmp_path):
    """fp32 (master) weights exported in bf16: the files and config.json say bf16."""
    from safetensors.torch import load_file
    tok, hf = tiny()
    export_hf(hf, hf, tok, tmp_path / "x", init_distributed(device="cpu"), dtype=torch.bfloat16)
    assert json.loads((tmp_path / "x" / "config.json").read_text())["dtype"] == "bfloat16"
    saved = load_file(str(tmp_path / "x" / "model.safetensors"))
    want = {k: v for k, v in hf.state_dict().items() if k in saved}
    assert want and set(saved) <= set(hf.state_dict())
    for k, v in want.items():
        assert saved[k].dtype == torch.bfloat16 and torch.equal(saved[k], v.to(torch.bfloat16)), k


def test_device_index_under_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(ValueError, match="--device cuda:1: under torchrun"):
        init_distributed(device="cuda:1")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scenario", ["raise", "hang"])
def test_failing_rank_does_not_hang(tmp_path, scenario):
    p, secs = launch(scenario, tmp_path, timeout=55)
    assert p.returncode != 0
    assert secs < 30, secs
    r0 = tmp_path / "rank0.json"                        # rank 0 may also be killed by torchrun first
    if scenario == "raise" and r0.exists():             # gloo: "Connection closed by peer"
        assert json.loads(r0.read_text())["error"]
    if scenario == "hang":                              # rank 0 itself times out (timeout_s=5)
        r0 = json.loads((tmp_path / "rank0.json").read_text())
        assert r0["error"] and r0["seconds"] < 20, r0


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    worker(sys.argv[2], Path(sys.argv[3]))
