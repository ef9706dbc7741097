"""Vocabulary-parallel head (``process_group=``): 2 gloo ranks on CPU, each holding half of
the LM head, give the results of the unsharded head.

This file is also the torchrun worker (``--worker OUTDIR``): both ranks build the same
problem, run ``agpo_loss`` (both designs, torch and Triton-interpreter engines, with the
options that touch every per-row term) and ``linear_logprobs`` once with the full weight
and once with their shard, and rank 0 writes the largest relative differences of loss,
metrics, per-token outputs and gradients (``dh`` whole, ``dW``/``db`` the rank's rows), with
a plain bias and with a masked vocabulary (``-inf`` bias over all of rank 1's shard).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CASES = [("torch", "forward"), ("torch", "recompute"), ("triton", "forward"), ("triton", "recompute")]


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def worker(out: Path) -> None:
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT))
    from agpo_kernels import agpo_loss, linear_logprobs

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)  # the same problem on every rank
    B, T, D, V = 3, 7, 24, 102            # 51 columns per rank: tiles end inside a shard
    h = torch.randn(B, T, D, generator=g)
    W = torch.randn(V, D, generator=g) / D**0.5
    b = torch.randn(V, generator=g) * 0.5
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, :3] = torch.tensor([0, V // 2 - 1, V // 2])  # targets at both shards' edges
    b_plain, y_plain = b, y
    mask = torch.rand(B, T, generator=g) > 0.2
    adv, temp = torch.randn(B, generator=g), torch.rand(B, generator=g) + 0.5
    old = -torch.rand(B, T, generator=g) * 4 - 2
    ref, isw = old + 0.3 * torch.randn(B, T, generator=g), torch.rand(B, T, generator=g) * 2
    lo, hi = rank * (V // world), (rank + 1) * (V // world)
    # A masked vocabulary (-inf bias): all of rank 1's shard and two of rank 0's columns, the
    # targets moved into rank 0's unmasked columns. A shard with no unmasked column must
    # merge to "absent", not NaN.
    b_masked = b.clone()
    b_masked[V // 2:] = float("-inf")
    b_masked[[3, 20]] = float("-inf")
    y_masked = y % (V // 2)
    y_masked[(y_masked == 3) | (y_masked == 20)] += 1
    res = {}
    for (impl, backward), masked in [(c, m) for c in CASES for m in (False, True)]:
        b, y = (b_masked, y_masked) if masked else (b_plain, y_plain)
        outs = []
        for sharded in (False, True):
            leaves = [t.clone().requires_grad_() for t in (h, W[lo:hi] if sharded else W, b[lo:hi] if sharded else b)]
            kw = dict(process_group=dist.group.WORLD) if sharded else {}
            loss, m = agpo_loss(leaves[0], leaves[1], y, adv, old, mask=mask, bias=leaves[2], temperature=temp,
                                ref_logp=ref, beta=0.1, entropy_coef=0.02, is_weight=isw, dual_clip=3.0,
                                impl=impl, backward=backward, memory_budget=4000, **kw)
            grads = torch.autograd.grad(loss, leaves)
            lp, ent = linear_logprobs(leaves[0], leaves[1], y, bias=leaves[2], temperature=temp.view(B, 1),
                                      impl=impl, memory_budget=4000, **kw)
            lgrads = torch.autograd.grad((lp * 0.7).sum() + ent.sum(), leaves)
            outs.append(dict(loss=loss.detach().reshape(1), logp=m["logp"], ent=m["entropy"],
                             metrics=torch.stack([m[k] for k in ("clip_frac", "ratio_mean", "kl_mean",
                                                                  "entropy_mean")]),
                             dh=grads[0], dw=grads[1], db=grads[2], lp=lp.detach(), lent=ent.detach(),
                             ldh=lgrads[0], ldw=lgrads[1], ldb=lgrads[2]))
        full, part = outs
        for k in ("dw", "db", "ldw", "ldb"):  # a rank's shard of the weight gradient
            full[k] = full[k][lo:hi]
        for k, v in part.items():
            assert torch.isfinite(v).all(), (impl, backward, masked, k)
        res[f"{impl}-{backward}" + ("-masked" if masked else "")] = {k: _rel(part[k], full[k]) for k in full}
    worst = torch.tensor([max(r.values()) for r in res.values()])
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    if rank == 0:
        res["worst_over_ranks"] = worst.tolist()
        (out / "result.json").write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("vp")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1", TRITON_INTERPRET="1", TORCHELASTIC_ERROR_FILE="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--monitor-interval", "0.5", __file__, "--worker", str(out)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    if p.returncode != 0 or not (out / "result.json").exists():
        pytest.fail(f"2-rank worker failed (rc={p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return json.loads((out / "result.json").read_text())


@pytest.mark.parametrize("masked", [False, True], ids=["bias", "masked-vocab"])
@pytest.mark.parametrize("impl,backward", CASES, ids=[f"{i}-{b}" for i, b in CASES])
def test_sharded_head_equals_the_unsharded_one(result, impl, backward, masked):
    r = result[f"{impl}-{backward}" + ("-masked" if masked else "")]
    print(r)
    assert set(r) >= {"loss", "logp", "ent", "metrics", "dh", "dw", "db", "lp", "lent", "ldh", "ldw", "ldb"}
    for k, v in r.items():
        assert v < 1e-5, (k, v)
    assert max(result["worst_over_ranks"]) < 1e-5  # rank 1's shard as well


if __name__ == "__main__" and "--worker" in sys.argv:
    worker(Path(sys.argv[sys.argv.index("--worker") + 1]))
