"""The HF engine's sampler per decode step: ``CounterSampler`` on 64 rows of a
SmolLM2-sized vocabulary (49152), fp32, with and without top-p.

``pytest bench/test_bench_sampler.py --benchmark-only``. The sampler draws one counter-based
uniform per row and step (an inverse-CDF draw) instead of hashing a Gumbel value for
every vocabulary entry; bench/results/ has the before/after figures.
"""

import pytest
import torch

from agpo.rollout import CounterSampler, row_keys

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_sampler_step(benchmark, top_p):
    rows, vocab = 64, 49152
    scores = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)).mul_(3).to(DEVICE)
    sampler = CounterSampler(torch.ones(rows), row_keys(0, 0, rows), prompt_len=4, top_p=top_p)
    steps = iter(range(10**6))

    def one_step():
        ids = torch.zeros(rows, 4 + next(steps), dtype=torch.long)
        sampler(ids, scores.clone())
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    one_step()
    benchmark.pedantic(one_step, rounds=15, iterations=1)
    benchmark.extra_info.update(bench="sampler", rows=rows, vocab=vocab, top_p=top_p, device=DEVICE)
