"""One whole update micro-batch of a real-architecture model: the fused head against eager logits.

    python bench/update_step.py [--device cuda] [--layers 2] [--tokens 4096,8192] [--json OUT]
    python bench/update_step.py --small          # the same on a CPU-sized model (a dry run)

The model is a Qwen2 decoder with Qwen2.5-14B's layer and head shapes (hidden 5120, 40/8
heads, MLP 13824, vocabulary 152064, untied head) and ``--layers`` decoder layers, random
init, bf16, activation checkpointing on: the update of the 14B path, scaled in depth only.
For each micro-batch size: the median of ``--reps`` timed forward + backward passes (after
a warm-up) with ``agpo_loss`` (forward-gradient design) and with eager logits
(``impl="reference"``: logits, log-softmax, gather, the same clipped surrogate), and the peak
memory of each on CUDA. The head is only 5-6% of a 14B model's forward FLOPs; what the fused
head buys in an update is memory, so the report ends with the micro-batch tokens each path
fits in the memory eager needs at the first size (peak memory is linear in tokens: a line
through the two sizes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

QWEN14B_LAYER = dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=8,
                     vocab_size=152064)
SMALL_LAYER = dict(hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2,
                   vocab_size=1003)


def build(layers: int, shape: dict, device: str, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(num_hidden_layers=layers, max_position_embeddings=32768, tie_word_embeddings=False,
                      attn_implementation="sdpa", **shape)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    return model


def batch(tokens: int, vocab: int, device: str, seq: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    B = max(1, tokens // seq)
    T = tokens // B
    ids = torch.randint(0, vocab, (B, T + 1), generator=g)
    return dict(ids=ids[:, :-1].to(device), y=ids[:, 1:].to(device), adv=torch.randn(B, generator=g).to(device),
                old=(-torch.rand(B, T, generator=g) * 5 - 8).to(device))


def step_fn(model, x: dict, impl: str):
    from agpo_kernels import agpo_loss

    def step():
        model.zero_grad(set_to_none=True)
        h = model.model(input_ids=x["ids"]).last_hidden_state
        loss, _ = agpo_loss(h, model.lm_head.weight, x["y"], x["adv"], x["old"], eps_low=0.2, impl=impl)
        loss.backward()
    return step


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(model, x: dict, impl: str, device: str, reps: int) -> dict:
    step = step_fn(model, x, impl)
    try:
        step()  # warm-up: JIT compiles, allocator growth
        sync(device)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
        out = dict(ms=statistics.median(times))
        if device.startswith("cuda"):
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            sync(device)
            out.update(peak_gib=(torch.cuda.max_memory_allocated() - base) / 2**30)
        return out
    except torch.OutOfMemoryError as e:
        return dict(error=f"OOM ({str(e).splitlines()[0][:80]})")
    finally:
        model.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def tokens_at(peaks: dict, sizes: list[int], budget_gib: float) -> float | None:
    """Tokens a path fits in ``budget_gib``, on the line through its two measured peaks."""
    (t1, p1), (t2, p2) = [(t, peaks[t]) for t in sizes[:2]]
    if p1 is None or p2 is None or p2 <= p1:
        return None
    return t1 + (budget_gib - p1) * (t2 - t1) / (p2 - p1)


def run(args) -> dict:
    shape = SMALL_LAYER if args.small else QWEN14B_LAYER
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    model = build(args.layers, shape, args.device, dtype)
    sizes = [int(t) for t in args.tokens.split(",")]
    res = dict(device=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
               layers=args.layers, shape=shape, dtype=str(dtype), rows={})
    for tokens in sizes:
        x = batch(tokens, shape["vocab_size"], args.device, args.seq)
        for label, impl in (("fused", "auto"), ("eager", "reference")):
            r = measure(model, x, impl, args.device, args.reps)
            res["rows"][f"{label} {tokens}"] = r
            print(f"  {label} {tokens} tokens: {r}", flush=True)
    peaks = {label: {t: res["rows"][f"{label} {t}"].get("peak_gib") for t in sizes} for label in ("fused", "eager")}
    if len(sizes) >= 2 and peaks["eager"][sizes[0]] is not None:
        budget = peaks["eager"][sizes[0]]
        res["at_eager_memory"] = dict(gib=budget, tokens={k: tokens_at(v, sizes, budget) for k, v in peaks.items()})
    return res


def table(res: dict) -> str:
    out = [f"### update micro-batch: Qwen2, {res['layers']} layers of {res['shape']['hidden_size']} hidden, "
           f"V={res['shape']['vocab_size']}, {res['dtype']}, activation checkpointing; {res['device']}", "",
           "| path | tokens | median ms | peak GiB |", "|---|---|---|---|"]
    for key, r in res["rows"].items():
        label, tokens = key.split()
        if "error" in r:
            out.append(f"| {label} | {tokens} | {r['error']} | |")
        else:
            peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else "-"
            out.append(f"| {label} | {tokens} | {r['ms']:.1f} | {peak} |")
    at = res.get("at_eager_memory")
    if at and all(v is not None for v in at["tokens"].values()):
        f, e = at["tokens"]["fused"], at["tokens"]["eager"]
        out += ["", f"in the {at['gib']:.1f} GiB eager needs for {round(e)} tokens, the fused head fits about "
                    f"{round(f)} tokens: {f / e:.2f}x the micro-batch (extrapolated along the line through the "
                    "two measured peaks)"]
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", default="4096,8192", help="micro-batch sizes, comma-separated")
    ap.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--small", action="store_true", help="a CPU-sized model of the same architecture")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    res = run(args)
    print(table(res), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
