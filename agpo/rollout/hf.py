"""The Hugging Face rollout engine (the default, and the reference the vLLM engine is tested
against): all groups of a phase sampled in one ``generate`` call of the policy itself, each
row at its own temperature, with sampling noise that depends only on the row's global index.

Sampling is an inverse-CDF draw with counter-based uniforms. ``CounterSampler`` is a
logits processor that divides row ``i``'s scores by ``tau[i]``, optionally keeps only the
top-p nucleus (the rule of ``transformers``' ``TopPLogitsWarper``), and picks the first
token whose cumulative probability exceeds ``u``; it hands ``generate`` a one-hot score
row, which greedy decoding (``do_sample=False``) takes. That is an exact sample from
``softmax(z / tau)`` (with top-p: from it restricted to, and renormalised over, the
nucleus): plain temperature sampling (``top_k=0``, no repetition penalty), the
distribution the loss's ``softmax(z / T)`` scores.

Why: the uniform ``u`` comes from no random generator. It is a hash of (row key, decode
step), and a row's key is a hash of (``seed``, ``stream``, global row index)
(``row_keys``; the trainer uses one stream per step and phase). So a row's sample
depends on those and on its logits only: not on the global RNG, on which other rows share
the ``generate`` call, on ``batch_rows``, or on the process. Ranks that each generate a
contiguous block of rows (``row_offset`` = global index of the block's first row) produce
exactly what one process generating all rows produces, and a run is reproducible row by
row. (The logits themselves may differ at float-rounding level between batchings, e.g.
through a different left-padding width; that flips a choice only on a near-exact tie.)

The probe (every row at ``tau_base``) and the train groups (group ``p``'s rows at
``tau[p]``) are single batched calls with left padding, KV cache and EOS stops, instead of
one call per group. ``RowTemperature`` (the temperature alone, for ``generate``'s own
sampler) is kept for other callers.

``sample_groups`` (``sample_encoded`` for prompts another trainer tokenised) returns a ``Rollout`` (``agpo.rollout.base``): the ``SequenceBatch`` the
policy scores and trains on, the decoded texts (cut at EOS, and at the stop string for
plain-text prompts), the generated-token count that the token budget charges, and the
log-probs of the sampled tokens under the distribution they were drawn from
(``log_softmax(top_p_filter(z / tau))``, recorded by ``CounterSampler``). ``HFEngine`` is
the ``RolloutEngine`` the trainer calls: it samples from the policy's own weights (gathered
once per phase when sharded), so it never needs a weight sync.
"""

from __future__ import annotations

import time

import torch

from agpo.rollout.base import Rollout, RolloutEngine, assemble, check_request, stop_ids
from agpo.rollout.noise import row_keys, step_uniforms


def _check_tau(tau: torch.Tensor) -> None:
    if (not isinstance(tau, torch.Tensor) or tau.dim() != 1 or not bool((tau > 0).all())
            or not bool(torch.isfinite(tau).all())):
        raise ValueError(f"tau: expected a 1-D tensor of finite temperatures > 0, got {tau}")


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """``transformers``' ``TopPLogitsWarper`` rule: tokens whose cumulative probability (in
    ascending order) is at most ``1 - top_p`` get ``-inf``; the top token is always kept."""
    if top_p >= 1.0:
        return scores
    sorted_scores, order = torch.sort(scores, dim=-1, descending=False)
    cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cum <= (1 - top_p)
    drop_sorted[..., -1:] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return scores.masked_fill(drop, -float("inf"))


class RowTemperature:
    """Logits processor: ``scores[i] / tau[i]`` (a ``transformers`` LogitsProcessor by
    interface: ``__call__(input_ids, scores) -> scores``)."""

    def __init__(self, tau: torch.Tensor):
        _check_tau(tau)
        self.tau = tau

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != self.tau.shape[0]:
            raise ValueError(f"RowTemperature: {self.tau.shape[0]} temperatures for {scores.shape[0]} rows")
        return scores / self.tau.to(device=scores.device, dtype=scores.dtype).unsqueeze(1)


class CounterSampler:
    """Logits processor for greedy ``generate`` that draws row ``i``'s next token from
    ``softmax(top_p_filter(scores[i] / tau[i]))`` by inverse CDF: the first token whose
    cumulative probability reaches ``u * total``, with ``u`` the counter-based uniform of
    row key ``keys[i]`` at decode step ``input_ids.shape[1] - prompt_len``
    (``agpo.rollout.noise.step_uniforms``). It returns float32 scores that are 0 at the
    drawn token and -inf elsewhere, so greedy decoding takes it.

    One uniform per row and step instead of a Gumbel value per vocabulary entry: the same
    exact sample distribution and the same reproducibility (a row's draw depends on the
    run seed, stream, global row, decode step and its own logits only), for a softmax and a
    cumulative sum over the vocabulary instead of a hash and two logarithms per entry
    (bench: bench/results/). The cumulative sum is taken in float64.

    ``logprobs`` collects, per decode step, the float32 log-prob of the drawn token under
    that top-p restricted, renormalised distribution: the log-probs of the distribution
    actually sampled from."""

    def __init__(self, tau: torch.Tensor, keys: torch.Tensor, prompt_len: int, top_p: float = 1.0):
        _check_tau(tau)
        if not isinstance(keys, torch.Tensor) or keys.dim() != 1 or keys.shape[0] != tau.shape[0]:
            raise ValueError(f"CounterSampler: keys must be 1-D with one key per temperature ({tau.shape[0]}), "
                             f"got {tuple(keys.shape) if isinstance(keys, torch.Tensor) else keys!r}")
        if not 0.0 < float(top_p) <= 1.0:
            raise ValueError(f"top_p: expected a value in (0, 1], got {top_p}")
        if prompt_len < 0:
            raise ValueError(f"CounterSampler: prompt_len {prompt_len} < 0")
        self.tau, self.keys, self.prompt_len, self.top_p = tau, keys.to(torch.int64), int(prompt_len), float(top_p)
        self.logprobs: list[torch.Tensor] = []
        self._cdf = self._out = self._picked = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != self.tau.shape[0]:
            raise ValueError(f"CounterSampler: {self.tau.shape[0]} temperatures for {scores.shape[0]} rows")
        step = input_ids.shape[1] - self.prompt_len
        if step < 0:
            raise ValueError(f"CounterSampler: {input_ids.shape[1]} tokens, fewer than the prompt ({self.prompt_len})")
        # in place on generate's fresh logits of this step (copied when not fp32), into buffers
        # kept across steps: at 64 x 49k the work is a few passes, fresh tensors cost more
        z = scores.float().div_(self.tau.to(device=scores.device, dtype=torch.float32).unsqueeze(1))
        w = top_p_filter(z, self.top_p)
        w = w.sub_(w.amax(1, keepdim=True)).exp_()                    # unnormalised: max 1, -inf -> 0
        if self._cdf is None or self._cdf.shape != w.shape or self._cdf.device != w.device:
            self._cdf = torch.empty(w.shape, dtype=torch.float64, device=w.device)
            self._out = torch.full(w.shape, -float("inf"), device=w.device)
            self._picked = None
        cdf = torch.cumsum(w, 1, dtype=torch.float64, out=self._cdf)
        total = cdf[:, -1:]
        u = step_uniforms(self.keys, step, device=w.device).unsqueeze(1)
        # the first token whose cumulative mass reaches u * total: u in (0, 1), so a token of
        # zero mass (its cumulative mass equal to an earlier token's) is never the first
        pick = torch.searchsorted(cdf, u * total)
        # a token of zero mass is never drawn, so the log is finite
        self.logprobs.append((w.gather(1, pick).double().log_() - total.log()).squeeze(1).float().cpu())
        if self._picked is not None:
            self._out.scatter_(1, self._picked, -float("inf"))
        self._picked = pick
        return self._out.scatter_(1, pick, 0.0)


@torch.no_grad()
def sample_groups(model, tokenizer, prompts: list[str], tau: torch.Tensor, *, group_size: int, max_new_tokens: int,
                  top_p: float = 1.0, batch_rows: int = 0, add_special_tokens: bool = True,
                  stop: str | None = None, seed: int = 0, stream: int = 0, row_offset: int = 0) -> Rollout:
    """``group_size`` samples of each prompt, prompt ``p``'s rows at temperature ``tau[p]``.

    Row ``r`` of this call is global row ``row_offset + r`` (``row_offset`` = global index
    of the first prompt times ``group_size``); its noise is keyed by ``row_keys(seed,
    stream, ...)``, so the result of a row does not depend on ``batch_rows``, on the other
    prompts of the call, on the global RNG or on the rank (see the module docstring)."""
    if len(prompts) != tau.numel():
        raise ValueError(f"tau: {tau.numel()} temperatures for {len(prompts)} prompts")
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    return sample_encoded(model, tokenizer, enc["input_ids"], enc["attention_mask"], tau, group_size=group_size,
                          max_new_tokens=max_new_tokens, top_p=top_p, batch_rows=batch_rows, stop=stop, seed=seed,
                          stream=stream, row_offset=row_offset)


def left_padded(prompt_ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists (another trainer's tokenisation) as left-padded ``(ids, mask)``."""
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        if len(p):
            ids[i, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
    return ids, mask


def sample_encoded(model, tokenizer, ids: torch.Tensor, mask: torch.Tensor, tau: torch.Tensor, *, group_size: int,
                   max_new_tokens: int, top_p: float = 1.0, batch_rows: int = 0, stop: str | None = None,
                   seed: int = 0, stream: int = 0, row_offset: int = 0) -> Rollout:
    """``sample_groups`` on prompts already tokenised: left-padded ``ids``/``mask [P, L]``."""
    from transformers import GenerationConfig, LogitsProcessorList

    if ids.shape[0] != tau.numel():
        raise ValueError(f"tau: {tau.numel()} temperatures for {ids.shape[0]} prompts")
    device = next(model.parameters()).device
    eos_ids, pad_id = stop_ids(model, tokenizer)
    if not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p: expected a value in (0, 1], got {top_p}")
    # Greedy decoding over CounterSampler's one-hot scores: generate adds no sampling warpers
    # of its own (temperature / top-k / top-p only apply with do_sample=True), and the explicit
    # neutral values keep a checkpoint's generation_config.json from filling them in.
    gen_cfg = GenerationConfig(do_sample=False, temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens,
                               eos_token_id=eos_ids or None, pad_token_id=pad_id, repetition_penalty=1.0,
                               stop_strings=[stop] if stop else None)
    ids = ids.repeat_interleave(group_size, 0)
    mask = mask.repeat_interleave(group_size, 0)
    row_tau = tau.detach().float().cpu().repeat_interleave(group_size)
    _check_tau(row_tau)
    rows = ids.shape[0]
    keys = row_keys(seed, stream, rows, row_offset)
    step = batch_rows if batch_rows > 0 else rows
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    pieces, lps = [], []
    try:
        for s in range(0, rows, step):
            sl = slice(s, min(s + step, rows))
            kw = dict(tokenizer=tokenizer) if stop else {}
            sampler = CounterSampler(row_tau[sl], keys[sl], prompt_len=ids[sl].shape[1], top_p=top_p)
            out = model.generate(input_ids=ids[sl].to(device), attention_mask=mask[sl].to(device),
                                 generation_config=gen_cfg, synced_gpus=False,  # gathered: no per-token sync
                                 logits_processor=LogitsProcessorList([sampler]), **kw)
            pieces.append(out[:, ids.shape[1]:].cpu())
            lps.append(torch.stack(sampler.logprobs, 1)[:, :pieces[-1].shape[1]])
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - t0
    width = max(p.shape[1] for p in pieces)
    fill = pad_id if pad_id is not None else 0
    new = torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=fill) for p in pieces])
    logprobs = torch.cat([torch.nn.functional.pad(lp, (0, width - lp.shape[1])) for lp in lps])
    return assemble(tokenizer, ids, mask, new, row_tau, eos_ids=eos_ids, pad_id=pad_id, stop=stop,
                    group_size=group_size, seconds=seconds, logprobs=logprobs, engine="hf", stopped_by_pad=bool(stop))


class HFEngine(RolloutEngine):
    """Rollouts with ``generate`` on the policy itself (``sample_groups``): no second copy of
    the weights, nothing to sync; under FSDP2 the model is gathered once per phase
    (``Layout.generation``, collective)."""

    name = "hf"

    def __init__(self, layout, tokenizer, *, batch_rows: int = 0):
        self.layout, self.tokenizer, self.batch_rows = layout, tokenizer, batch_rows

    def sample(self, prompts, tau, *, group_size, max_new_tokens, top_p=1.0, stop=None, add_special_tokens=True,
               seed=0, stream=0, row_offset=0, weights_version=0) -> Rollout:
        tau = check_request(prompts, tau, top_p)
        with self.layout.generation() as model:
            return sample_groups(model, self.tokenizer, prompts, tau, group_size=group_size,
                                 max_new_tokens=max_new_tokens, top_p=top_p, batch_rows=self.batch_rows,
                                 add_special_tokens=add_special_tokens, stop=stop, seed=seed, stream=stream,
                                 row_offset=row_offset)

    def describe(self) -> str:
        return "hf (transformers generate on the policy, counter-based inverse-CDF sampling)"
