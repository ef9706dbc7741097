"""Group statistics for AGPO: what the controllers and the advantages are computed from.

A *group* is the ``G`` responses sampled for one prompt. Every function here works on the
last dimension of a ``[..., G]`` reward tensor (usually ``[P, G]``: ``P`` prompts of a
step) and returns one value per group, in float64. docs/algorithm.md#group-statistics:

- ``dispersion``        ``sigma = disp(r)``: ``std`` (unbiased; 0 when G < 2),
                       ``mad`` (1.4826 * median|r - median r|), ``iqr``
                       ((q75 - q25) / 1.349).
- ``skewness``          ``k``: adjusted Fisher-Pearson
                       ``sqrt(n(n-1))/(n-2) * mean(((r - mean)/std)^3)`` (factor only for
                       n > 2), 0 when std < ``sigma_min``, clamped to ``[-kappa_max, kappa_max]``.
- ``vote_entropy``      ``E``: Shannon entropy (nats) of the empirical distribution
                       of one group's extracted final answers.
- ``group_vote_entropy`` the same for ``P`` groups of answer texts; the extraction is
                       ``agpo.tasks.rewards.answer_key`` (shared with the rewards, not rewritten)
                       or, for the paper's recipe, ``raw_answer_key`` (``VOTE_KEYS``).
- ``group_advantages`` (#advantages) ``A_i = (r_i - mean r) / max(disp(r), floor)`` with the
                       fall-back to std and ``A = 0`` for all-equal rewards.

Conventions the paper leaves open (chosen here): ``std`` in the skewness is the same
unbiased std as the dispersion (as in the paper's released code); medians and quartiles
interpolate linearly between order statistics (``numpy.quantile`` default, so the median
of an even group is the mean of its two middle values); "disp ~ 0" in step 4 means
``disp <= floor``. Inputs with NaN or inf raise ``ValueError`` naming the argument.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence

import torch

from agpo.tasks.rewards import answer_key

DISPERSIONS = ("std", "mad", "iqr")
MAD_SCALE = 1.4826
IQR_SCALE = 1.349


def as_groups(values, name: str = "rewards") -> torch.Tensor:
    """``values`` (tensor, array or nested lists) as a float64 ``[..., G]`` tensor, checked.

    Raises ``ValueError`` naming ``name`` for a scalar, an empty group, a ragged or
    non-numeric input, or any NaN/inf entry.
    """
    try:
        if isinstance(values, torch.Tensor):
            t = values.detach().to(torch.float64)
        else:
            t = torch.as_tensor(values, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{name}: cannot read as a float tensor ({exc})") from None
    if t.dim() == 0:
        raise ValueError(f"{name}: expected a [..., G] tensor of group values, got a scalar")
    if t.shape[-1] == 0:
        raise ValueError(f"{name}: needs at least one value on its last dimension, shape {tuple(t.shape)}")
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{name}: contains NaN or inf (first at index {where}); "
                         "repair or drop those entries before computing group statistics")
    return t


def _median(t: torch.Tensor) -> torch.Tensor:
    return torch.quantile(t, 0.5, dim=-1)


def unbiased_std(rewards) -> torch.Tensor:
    """Sample std (divisor G - 1) per group; 0 when G < 2."""
    r = as_groups(rewards)
    if r.shape[-1] < 2:
        return torch.zeros(r.shape[:-1], dtype=torch.float64, device=r.device)
    return r.std(dim=-1, correction=1)


def dispersion(rewards, kind: str = "std") -> torch.Tensor:
    """``disp(r)`` per group (docs/algorithm.md#group-statistics): ``std``, ``mad`` or ``iqr``;
    ``[..., G] -> [...]``."""
    if kind not in DISPERSIONS:
        raise ValueError(f"kind: expected one of {DISPERSIONS}, got {kind!r}")
    r = as_groups(rewards)
    if kind == "std":
        return unbiased_std(r)
    if kind == "mad":
        med = _median(r).unsqueeze(-1)
        return MAD_SCALE * _median((r - med).abs())
    q = torch.quantile(r, torch.tensor([0.25, 0.75], dtype=torch.float64, device=r.device), dim=-1)
    return (q[1] - q[0]) / IQR_SCALE


def skewness(rewards, sigma_min: float = 1e-6, kappa_max: float = 10.0) -> torch.Tensor:
    """Adjusted Fisher-Pearson skewness per group with the guards of docs/algorithm.md#group-statistics.

    ``sqrt(n(n-1))/(n-2) * mean(((r - mean)/std)^3)`` with the unbiased std; the factor is
    applied only for n > 2; 0 where std < ``sigma_min`` (or std is 0); clamped to
    ``[-kappa_max, kappa_max]``.
    """
    if not (sigma_min >= 0 and math.isfinite(sigma_min)):
        raise ValueError(f"sigma_min: must be finite and >= 0, got {sigma_min}")
    if not (kappa_max > 0):
        raise ValueError(f"kappa_max: must be > 0, got {kappa_max}")
    r = as_groups(rewards)
    n = r.shape[-1]
    std = unbiased_std(r)
    flat = (std < sigma_min) | (std == 0)
    safe = torch.where(flat, torch.ones_like(std), std).unsqueeze(-1)
    z = (r - r.mean(dim=-1, keepdim=True)) / safe
    k = (z ** 3).mean(dim=-1)
    if n > 2:
        k = k * (math.sqrt(n * (n - 1)) / (n - 2))
    k = torch.where(flat, torch.zeros_like(k), k)
    return k.clamp(-kappa_max, kappa_max)


def vote_entropy(keys: Sequence[str]) -> float:
    """Shannon entropy (nats) of the empirical distribution of one group's answer keys.

    ``keys`` are already-extracted final answers (equal keys are the same vote); the
    empty string is a valid key.
    """
    if isinstance(keys, str):
        raise ValueError("keys: expected a sequence of answer keys, got a single str")
    n = len(keys)
    if n == 0:
        raise ValueError("keys: a group needs at least one answer")
    counts = Counter(keys)
    return -sum((c / n) * math.log(c / n) for c in counts.values())


RAW_KEY_MAX_CHARS = 100_000
"""``raw_answer_key`` reads at most this many trailing characters of a completion (the
final answer is at its end), so a megabyte of degenerate text costs no more than this."""
_RAW_BOXED = re.compile(r"\\boxed\{([^{}]+)\}")
_RAW_NUMBER = re.compile(r"[-+]?\d*\.?\d+(?:/[1-9]\d*)?")


def raw_answer_key(text: str) -> str:
    """The vote key of the paper's released code: the raw extracted answer, lower-cased.

    The last ``\\boxed{...}`` without nested braces, else the text after the last
    ``####``, else the last number (thousands commas removed), else the
    whitespace-normalised text. Unlike ``agpo.tasks.rewards.answer_key`` nothing is normalised:
    ``1/2``, ``0.5`` and ``\\frac{1}{2}`` are three different votes (and ``\\boxed{\\frac{1}{2}}``
    reads ``2``), so a group that agrees in substance can still show vote entropy. Offered
    for ``--recipe paper`` (``--vote-keys raw``); the default keeps the normalised key.
    """
    stripped = text[-RAW_KEY_MAX_CHARS:].strip()
    boxed = _RAW_BOXED.findall(stripped)
    if boxed:
        return boxed[-1].strip().lower()
    if "####" in stripped:
        return stripped.rsplit("####", 1)[-1].strip().lower()
    numbers = _RAW_NUMBER.findall(stripped.replace(",", ""))
    if numbers:
        return numbers[-1].strip().lower()
    return re.sub(r"\s+", " ", stripped).lower()


VOTE_KEYS = {"normalized": answer_key, "raw": raw_answer_key}
"""Answer-key extractions for the vote entropy, by ``--vote-keys`` name."""


def group_vote_entropy(answers: Sequence[Sequence[str]],
                       extract: Callable[[str], str] | None = answer_key) -> torch.Tensor:
    """Vote entropy per group: ``answers`` is ``P`` lists of response texts -> float64 ``[P]``.

    ``extract`` maps a text to its final-answer key (default: ``agpo.tasks.rewards.answer_key``,
    the rewards' own extraction); pass ``None`` when ``answers`` already holds keys.
    """
    if isinstance(answers, str) or not isinstance(answers, Sequence):
        raise ValueError(f"answers: expected a list of groups (lists of str), got {type(answers).__name__}")
    out = []
    for p, group in enumerate(answers):
        if isinstance(group, str) or not isinstance(group, Sequence):
            raise ValueError(f"answers[{p}]: expected a list of str, got {type(group).__name__}")
        for i, text in enumerate(group):
            if not isinstance(text, str):
                raise ValueError(f"answers[{p}][{i}]: expected str, got {type(text).__name__}")
        keys = list(group) if extract is None else [extract(text) for text in group]
        if len(keys) == 0:
            raise ValueError(f"answers[{p}]: a group needs at least one answer")
        out.append(vote_entropy(keys))
    return torch.tensor(out, dtype=torch.float64)


def group_advantages(rewards, kind: str = "std", floor: float = 1e-8) -> torch.Tensor:
    """Group-normalised advantages (docs/algorithm.md#advantages), ``[..., G] -> [..., G]`` float64.

    ``A_i = (r_i - mean r) / max(disp(r), floor)``; where ``disp <= floor`` but the rewards
    are not all equal, std replaces ``disp``; groups of all-equal rewards (and G = 1) get
    ``A = 0`` exactly.
    """
    if not (floor > 0 and math.isfinite(floor)):
        raise ValueError(f"floor: must be finite and > 0, got {floor}")
    r = as_groups(rewards)
    disp = dispersion(r, kind)
    equal = r.amax(dim=-1) == r.amin(dim=-1)
    if kind != "std":
        disp = torch.where((disp <= floor) & ~equal, unbiased_std(r), disp)
    adv = (r - r.mean(dim=-1, keepdim=True)) / disp.clamp(min=floor).unsqueeze(-1)
    return torch.where(equal.unsqueeze(-1), torch.zeros_like(adv), adv)
