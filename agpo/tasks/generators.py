"""Generated tasks: the embedded arithmetic task and reasoning-gym generators, with splits
that never overlap.

``arith_problems``: "a+b=" for all pairs a, b in 0..max_operand (10,000 pairs by
default; ``terms=3`` asks "a+b+c=", a harder task, whose large question spaces are sampled). One permutation of the pairs, drawn from ``seed``, is cut into test (first
``test_size``), validation (next ``val_size``) and train (the rest), so a held-out pair
is never trained on. Prompt "12+34=", reference "46"; the completion the tiny model
learns is "46" followed by its end-of-sequence token. Sized after the CPU measurements in
the project notes: a 3-layer model reaches partial accuracy after a short supervised
warm-up and RL has room to lift it.

``reasoning_gym_problems``: ``reasoning-gym`` generators (basic_arithmetic, chain_sum,
gsm_symbolic, or any other name it knows). reasoning-gym draws item ``i`` from
``Random(seed + i)``, so each split gets its own block of seeds: ``split_seed(seed, split)``
= ``k * 2**30 + seed * 2**20`` (k = 0 train, 1 validation, 2 test; seed < 1024, fewer than
2**20 items), and no two splits or base seeds share an item seed. Small question spaces
still repeat by chance, so held-out questions are also removed from the train split by
text, and validation questions that also occur in test are dropped.
"""

from __future__ import annotations

import importlib.util
import itertools
import random

from agpo.errors import DataError
from agpo.tasks.problems import Problem

RG_TASKS = ("basic_arithmetic", "chain_sum", "gsm_symbolic")
"""reasoning-gym generators with a name of their own in ``--dataset``."""
RG_DEFAULT_TRAIN_SIZE = 10_000
_SPLIT_OFFSET = {"train": 0, "validation": 1, "test": 2}


def split_seed(seed: int, split: str) -> int:
    """The reasoning-gym seed of one split (see the module docstring)."""
    if not 0 <= seed < 1024:
        raise DataError(f"--seed {seed}: reasoning-gym sources take seeds in 0..1023")
    return _SPLIT_OFFSET[split] * 2**30 + seed * 2**20


ARITH_ENUMERATED = 200_000
"""Largest question space of ``arith`` with three or more terms that is enumerated and
shuffled; a larger one is sampled, ``ARITH_SAMPLED_TRAIN`` train questions unless ``size``.
Two terms are always every pair, as they always were."""
ARITH_SAMPLED_TRAIN = 20_000


def arith_split_pairs(*, seed: int = 0, max_operand: int = 99, test_size: int = 400, val_size: int = 200,
                      terms: int = 2, train_size: int | None = None) -> dict[str, list[tuple[int, ...]]]:
    """The disjoint test / validation / train operand tuples of the embedded task (``terms``
    operands in 0..``max_operand``). Two operands of up to 99 (the default task) are every
    pair in one seeded shuffle, as they always were."""
    if max_operand < 1:
        raise DataError(f"arith: max_operand must be >= 1, got {max_operand}")
    if not 2 <= terms <= 8:
        raise DataError(f"arith: terms must be in 2..8, got {terms}")
    space = (max_operand + 1) ** terms
    held = test_size + val_size
    if test_size < 0 or val_size < 0 or held >= space:
        raise DataError(f"arith: test_size {test_size} + val_size {val_size} must leave training pairs "
                        f"out of {space}")
    rng = random.Random(f"agpo-arith-{seed}" if terms == 2 else f"agpo-arith{terms}-{seed}")
    if terms == 2 or space <= ARITH_ENUMERATED:
        tuples = list(itertools.product(range(max_operand + 1), repeat=terms))
        rng.shuffle(tuples)
    else:  # distinct tuples in the order drawn
        want = held + (train_size if train_size is not None else ARITH_SAMPLED_TRAIN)
        if want > space // 2:
            raise DataError(f"arith: {want} questions out of {space} possible; ask for fewer (--size)")
        seen: set[tuple[int, ...]] = set()
        tuples = []
        while len(tuples) < want:
            t = tuple(rng.randint(0, max_operand) for _ in range(terms))
            if t not in seen:
                seen.add(t)
                tuples.append(t)
    return {"test": tuples[:test_size], "validation": tuples[test_size:held], "train": tuples[held:]}


def arith_problems(*, split: str = "test", seed: int = 0, max_operand: int = 99, test_size: int = 400,
                   val_size: int = 200, size: int | None = None, terms: int = 2) -> list[Problem]:
    """One split of the embedded "a+b=" task, or "a+b+c=" with ``terms=3`` (``size`` caps the
    train split)."""
    tuples = arith_split_pairs(seed=seed, max_operand=max_operand, test_size=test_size, val_size=val_size,
                               terms=terms, train_size=size)[split]
    if split == "train" and size is not None:
        tuples = tuples[:size]
    out = []
    for t in tuples:
        q = "+".join(map(str, t))
        out.append(Problem(prompt=f"{q}=", reference=str(sum(t)), id=f"arith-{split}-{q}", source="arith",
                           verbatim=True))
    return out


def _rg_items(name: str, seed: int, size: int, options: dict) -> list[dict]:
    import reasoning_gym

    try:
        return list(reasoning_gym.create_dataset(name, seed=seed, size=size, **options))
    except Exception as e:  # unknown name, bad options
        raise DataError(f"reasoning-gym {name!r}: cannot generate ({type(e).__name__}: {e})") from e


def reasoning_gym_problems(name: str, *, split: str = "test", seed: int = 0, size: int | None = None,
                           test_size: int = 400, val_size: int = 200, options: dict | None = None) -> list[Problem]:
    """One split of a reasoning-gym task; held-out questions never appear in train."""
    if importlib.util.find_spec("reasoning_gym") is None:
        raise DataError(f"--dataset {name}: needs the reasoning-gym package (pip install reasoning-gym)")
    options = dict(options or {})
    n = {"train": size or RG_DEFAULT_TRAIN_SIZE, "validation": val_size, "test": test_size}[split]
    if not 1 <= n < 2**20:
        raise DataError(f"--dataset {name} ({split}): size must be in 1..{2**20 - 1}, got {n}")
    items = _rg_items(name, split_seed(seed, split), n, options)
    exclude: set[str] = set()
    if split in ("train", "validation") and test_size:
        exclude |= {it["question"] for it in _rg_items(name, split_seed(seed, "test"), test_size, options)}
    if split == "train" and val_size:
        exclude |= {it["question"] for it in _rg_items(name, split_seed(seed, "validation"), val_size, options)}
    out = []
    for i, it in enumerate(items):
        if it["question"] in exclude:
            continue
        out.append(Problem(prompt=it["question"], reference=str(it["answer"]).strip(),
                           id=f"{name}-{split}-{seed}-{i}", source=name))
    return out
