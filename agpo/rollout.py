"""Rollouts: all groups of a phase sampled in one ``generate`` call, each row at its own
temperature, with sampling noise that depends only on the row's global index.

Sampling is Gumbel-max with counter-based noise. ``GumbelSampler`` is a logits processor
that divides row ``i``'s scores by ``tau[i]``, optionally keeps only the top-p nucleus (the
rule of ``transformers``' ``TopPLogitsWarper``) and adds Gumbel noise ``g = -log(-log(u))``
to every score; ``generate`` then decodes greedily (``do_sample=False``), and
``argmax(z / tau + g)`` is an exact sample from ``softmax(z / tau)`` (with top-p: from it
restricted to, and renormalised over, the nucleus). That is plain temperature sampling
(``top_k=0``, no repetition penalty): the distribution the loss's ``softmax(z / T)`` scores.

Why: the uniforms ``u`` come from no random generator. Each is a hash of (row key, decode
step, vocabulary index), and a row's key is a hash of (``seed``, ``stream``, global row
index) (``row_keys``; the trainer uses one stream per step and phase). So a row's sample
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

``sample_groups`` returns a ``Rollout``: the ``SequenceBatch`` the policy scores and
trains on, the decoded texts (cut at EOS, and at the stop string for plain-text prompts)
and the generated-token count that the token budget charges.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from agpo.policy import SequenceBatch

_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1


# -- counter-based noise -------------------------------------------------------------------
# Hashing works on int64 tensors (or Python ints) holding values in [0, 2^32): a product is
# formed from the 16-bit halves of its 32-bit constant, so no int64 product overflows, and
# right shifts only ever see non-negative values. The tensor versions work in place.
def _mul32_(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x = (x * c) mod 2^32`` in place, for ``x`` in [0, 2^32) and a 32-bit ``c``."""
    hi = x * (c >> 16)
    hi &= 0xFFFF
    hi <<= 16
    x *= c & 0xFFFF
    x += hi
    x &= _M32
    return x


def _fmix32_(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser in place: a bijection of [0, 2^32) with full avalanche."""
    h ^= h >> 16
    _mul32_(h, 0x85EBCA6B)
    h ^= h >> 13
    _mul32_(h, 0xC2B2AE35)
    h ^= h >> 16
    return h


def _fmix32(h: int) -> int:
    """``_fmix32_`` for one Python int in [0, 2^32)."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def _hash64(x: int) -> int:
    """A Python int hashed to 32 bits (through its 64-bit two's complement)."""
    x &= _M64
    return _fmix32((x & _M32) ^ _fmix32((x >> 32) ^ 0x3C6EF372))


def row_keys(seed: int, stream: int, rows: int, offset: int = 0) -> torch.Tensor:
    """``LongTensor[rows]`` in [0, 2^32): the noise key of global rows ``offset`` ..
    ``offset + rows - 1``, a hash of (``seed``, ``stream``, global row). Distinct rows of one
    (seed, stream) get distinct keys (every step is a bijection of the row index)."""
    if rows < 0 or offset < 0:
        raise ValueError(f"row_keys: rows={rows}, offset={offset}: expected non-negative")
    a = _fmix32(_hash64(seed) ^ _fmix32(_hash64(stream) ^ 0x5BD1E995))
    b = _fmix32(a ^ 0x27D4EB2F)
    k = torch.arange(offset, offset + rows, dtype=torch.int64)
    k += a
    k &= _M32
    _fmix32_(k)
    k ^= b
    return _fmix32_(k)


def counter_hash(keys: torch.Tensor, step: int, vocab: int, device=None) -> torch.Tensor:
    """``LongTensor[rows, vocab]`` in [0, 2^32): the hash of (``keys[r]``, ``step``, ``v``).

    Key and step are mixed first into one value per row (``fmix(key ^ fmix(step * C1 + C2))``,
    distinct steps of one key give distinct values); it is xor-ed with a hash of ``v`` and the
    result goes through murmur3's finaliser (two multiply / xor-shift rounds)."""
    if step < 0:
        raise ValueError(f"counter_hash: step {step} < 0")
    keys = keys.to(device=device, dtype=torch.int64) & _M32
    s = _fmix32(((step * 0x9E3779B1) + 0x7F4A7C15) & _M32)
    r = _fmix32_(keys ^ s)
    v = torch.arange(vocab, dtype=torch.int64, device=keys.device)
    _mul32_(v, 0x27D4EB2F)
    v += 0x165667B1
    v &= _M32
    _fmix32_(v)
    return _fmix32_(r.unsqueeze(1) ^ v.unsqueeze(0))


def gumbel_from_hash(h: torch.Tensor) -> torch.Tensor:
    """Float32 Gumbel noise ``-log(-log(u))`` from 32-bit hashes, ``u = (h24 + 0.5) / 2^24``
    with ``h24`` the top 24 bits: ``u`` in (0, 1), never 0 or 1.

    ``-log(u)`` is taken as ``-log(p)`` with ``p = u`` below 1/2 and as ``-log1p(-p)`` with
    ``p = 1 - u`` above, so ``p`` (an odd multiple of ``2^-25``, at most 1/2) is exact in
    float32 and the top values do not round to ``u = 1`` (an infinite ``g``)."""
    h24 = (h >> 8).to(torch.int32)
    upper = h24 >= (1 << 23)
    b = torch.where(upper, ((1 << 24) - 1) - h24, h24)           # in [0, 2^23)
    p = b.to(torch.float32).add_(0.5).mul_(2.0 ** -24)            # exact, < 1/2
    log_u = torch.where(upper, torch.log1p(p.neg()), torch.log(p))
    return log_u.neg_().log_().neg_()


def gumbel_noise(keys: torch.Tensor, step: int, vocab: int, device=None) -> torch.Tensor:
    """Float32 ``[rows, vocab]`` Gumbel noise of rows ``keys`` at decode step ``step``."""
    return gumbel_from_hash(counter_hash(keys, step, vocab, device))


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


class GumbelSampler:
    """Logits processor for greedy ``generate``: ``top_p_filter(scores[i] / tau[i]) + g[i]``
    with ``g`` the counter-based Gumbel noise of row key ``keys[i]`` at decode step
    ``input_ids.shape[1] - prompt_len``. The argmax of the result is a sample from
    ``softmax(scores / tau)`` (top-p restricted). Returns float32 scores."""

    def __init__(self, tau: torch.Tensor, keys: torch.Tensor, prompt_len: int, top_p: float = 1.0):
        _check_tau(tau)
        if not isinstance(keys, torch.Tensor) or keys.dim() != 1 or keys.shape[0] != tau.shape[0]:
            raise ValueError(f"GumbelSampler: keys must be 1-D with one key per temperature ({tau.shape[0]}), "
                             f"got {tuple(keys.shape) if isinstance(keys, torch.Tensor) else keys!r}")
        if not 0.0 < float(top_p) <= 1.0:
            raise ValueError(f"top_p: expected a value in (0, 1], got {top_p}")
        if prompt_len < 0:
            raise ValueError(f"GumbelSampler: prompt_len {prompt_len} < 0")
        self.tau, self.keys, self.prompt_len, self.top_p = tau, keys.to(torch.int64), int(prompt_len), float(top_p)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != self.tau.shape[0]:
            raise ValueError(f"GumbelSampler: {self.tau.shape[0]} temperatures for {scores.shape[0]} rows")
        step = input_ids.shape[1] - self.prompt_len
        if step < 0:
            raise ValueError(f"GumbelSampler: {input_ids.shape[1]} tokens, fewer than the prompt ({self.prompt_len})")
        z = scores.float() / self.tau.to(device=scores.device, dtype=torch.float32).unsqueeze(1)
        z = top_p_filter(z, self.top_p)
        if self.keys.device != z.device:
            self.keys = self.keys.to(z.device)
        return z + gumbel_noise(self.keys, step, z.shape[1], device=z.device)


@dataclass
class Rollout:
    """Samples of one phase: ``groups`` prompts x ``group_size`` rows, group-major."""

    batch: SequenceBatch
    """Token layout for scoring and training (on the CPU)."""
    texts: list[str]
    """Decoded completions, one per row."""
    group_size: int
    """Rows per prompt."""
    generated_tokens: int
    """Tokens the model generated (EOS included): what the token budget counts."""
    seconds: float
    """Wall time of generation."""

    @property
    def lengths(self) -> torch.Tensor:
        return self.batch.completion_mask.sum(1)


def _completion_mask(new: torch.Tensor, eos_ids: list[int], pad_id: int | None, stopped_by_pad: bool) -> torch.Tensor:
    """1 up to and including the first EOS; with stop strings also up to the first pad."""
    C = new.shape[1]
    end = torch.full((new.shape[0],), C, dtype=torch.long)
    if eos_ids:
        is_eos = torch.isin(new, torch.tensor(eos_ids))
        end = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, end)
    if stopped_by_pad and pad_id is not None and pad_id not in eos_ids:
        is_pad = new == pad_id
        end = torch.minimum(end, torch.where(is_pad.any(1), is_pad.int().argmax(1), end))
    return (torch.arange(C).unsqueeze(0) < end.unsqueeze(1)).to(torch.long)


@torch.no_grad()
def sample_groups(model, tokenizer, prompts: list[str], tau: torch.Tensor, *, group_size: int, max_new_tokens: int,
                  top_p: float = 1.0, batch_rows: int = 0, add_special_tokens: bool = True,
                  stop: str | None = None, seed: int = 0, stream: int = 0, row_offset: int = 0) -> Rollout:
    """``group_size`` samples of each prompt, prompt ``p``'s rows at temperature ``tau[p]``.

    Row ``r`` of this call is global row ``row_offset + r`` (``row_offset`` = global index
    of the first prompt times ``group_size``); its noise is keyed by ``row_keys(seed,
    stream, ...)``, so the result of a row does not depend on ``batch_rows``, on the other
    prompts of the call, on the global RNG or on the rank (see the module docstring)."""
    from transformers import GenerationConfig, LogitsProcessorList

    if len(prompts) != tau.numel():
        raise ValueError(f"tau: {tau.numel()} temperatures for {len(prompts)} prompts")
    device = next(model.parameters()).device
    own = model.generation_config
    eos = own.eos_token_id if own.eos_token_id is not None else tokenizer.eos_token_id
    eos_ids = [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    pad_id = own.pad_token_id if own.pad_token_id is not None else tokenizer.pad_token_id
    if not 0.0 < float(top_p) <= 1.0:
        raise ValueError(f"top_p: expected a value in (0, 1], got {top_p}")
    # Greedy decoding over GumbelSampler's perturbed scores: generate adds no sampling warpers
    # of its own (temperature / top-k / top-p only apply with do_sample=True), and the explicit
    # neutral values keep a checkpoint's generation_config.json from filling them in.
    gen_cfg = GenerationConfig(do_sample=False, temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens,
                               eos_token_id=eos_ids or None, pad_token_id=pad_id, repetition_penalty=1.0,
                               stop_strings=[stop] if stop else None)
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
    ids = enc["input_ids"].repeat_interleave(group_size, 0)
    mask = enc["attention_mask"].repeat_interleave(group_size, 0)
    row_tau = tau.detach().float().cpu().repeat_interleave(group_size)
    _check_tau(row_tau)
    rows = ids.shape[0]
    keys = row_keys(seed, stream, rows, row_offset)
    step = batch_rows if batch_rows > 0 else rows
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    pieces = []
    try:
        for s in range(0, rows, step):
            sl = slice(s, min(s + step, rows))
            kw = dict(tokenizer=tokenizer) if stop else {}
            out = model.generate(input_ids=ids[sl].to(device), attention_mask=mask[sl].to(device),
                                 generation_config=gen_cfg, synced_gpus=False,  # gathered: no per-token sync
                                 logits_processor=LogitsProcessorList(
                                     [GumbelSampler(row_tau[sl], keys[sl], prompt_len=ids[sl].shape[1], top_p=top_p)]),
                                 **kw)
            pieces.append(out[:, ids.shape[1]:].cpu())
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - t0
    width = max(p.shape[1] for p in pieces)
    fill = pad_id if pad_id is not None else 0
    new = torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1]), value=fill) for p in pieces])
    cmask = _completion_mask(new, eos_ids, pad_id, stopped_by_pad=bool(stop))
    new = new.masked_fill(cmask == 0, fill)
    texts = []
    for r in range(rows):
        text = tokenizer.decode(new[r, :int(cmask[r].sum())], skip_special_tokens=True)
        if stop and stop in text:
            text = text[:text.index(stop)]
        texts.append(text)
    batch = SequenceBatch(prompt_ids=ids, prompt_mask=mask, completion_ids=new, completion_mask=cmask,
                          temperature=row_tau)
    return Rollout(batch=batch, texts=texts, group_size=group_size, generated_tokens=int(cmask.sum()),
                   seconds=seconds)
