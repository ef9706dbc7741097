"""Group statistics (agpo.algo.stats) against hand values and float64 oracles from the stdlib/numpy."""

import math
import statistics

import numpy as np
import pytest
import torch

from agpo.algo.stats import (
    as_groups,
    dispersion,
    group_advantages,
    group_vote_entropy,
    skewness,
    unbiased_std,
    vote_entropy,
)


def oracle_skew(xs, sigma_min=1e-6, kappa_max=10.0):
    """The skewness of docs/algorithm.md#group-statistics in plain Python floats."""
    n = len(xs)
    if n < 2:
        return 0.0
    mean = sum(xs) / n
    std = statistics.stdev(xs)
    if std < sigma_min or std == 0:
        return 0.0
    k = sum(((x - mean) / std) ** 3 for x in xs) / n
    if n > 2:
        k *= math.sqrt(n * (n - 1)) / (n - 2)
    return min(max(k, -kappa_max), kappa_max)


GROUPS = [[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0], [3.0, -1.0, 7.5, 0.25],
          [0.5, 0.5, 0.5, 0.5]]


# ---------------------------------------------------------------- input checks

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_reward_is_an_error_naming_the_argument(bad):
    for fn in (dispersion, skewness, group_advantages):
        with pytest.raises(ValueError, match="rewards: contains NaN or inf"):
            fn(torch.tensor([[0.0, 1.0], [bad, 1.0]]))
    with pytest.raises(ValueError, match=r"first at index \(1, 0\)"):
        as_groups([[0.0, 1.0], [bad, 1.0]])


def test_malformed_inputs_are_errors():
    with pytest.raises(ValueError, match="rewards: .*scalar"):
        dispersion(torch.tensor(1.0))
    with pytest.raises(ValueError, match="rewards: needs at least one value"):
        dispersion(torch.zeros(3, 0))
    with pytest.raises(ValueError, match="rewards: cannot read"):
        dispersion([[1.0, 2.0], [3.0]])
    with pytest.raises(ValueError, match="kind"):
        dispersion([1.0, 2.0], "var")


# ---------------------------------------------------------------- dispersion

def test_std_is_unbiased_by_hand():
    assert dispersion([1.0, 2.0, 3.0, 4.0]).item() == pytest.approx(math.sqrt(5 / 3), abs=1e-15)
    assert dispersion([0.0, 1.0]).item() == pytest.approx(math.sqrt(0.5), abs=1e-15)


@pytest.mark.parametrize("kind", ["std", "mad", "iqr"])
def test_dispersion_single_response_and_equal_rewards_are_zero(kind):
    assert dispersion([[0.7]], kind).tolist() == [0.0]
    assert dispersion([[0.3, 0.3, 0.3]], kind).tolist() == [0.0]


def test_mad_by_hand_odd_and_even():
    # median 3, |r - 3| = [2, 1, 0, 1, 97], median 1
    assert dispersion([1.0, 2.0, 3.0, 4.0, 100.0], "mad").item() == pytest.approx(1.4826, abs=1e-15)
    # even group: median 0.5 (mean of the middle pair), every |r - 0.5| = 0.5
    assert dispersion([0.0, 0.0, 1.0, 1.0], "mad").item() == pytest.approx(0.7413, abs=1e-15)


def test_iqr_by_hand_odd_and_even():
    assert dispersion([5.0, 1.0, 4.0, 2.0, 3.0], "iqr").item() == pytest.approx(2 / 1.349, abs=1e-15)
    # linear interpolation: q25 at position 0.75 -> 0.75, q75 at 2.25 -> 2.25
    assert dispersion([0.0, 1.0, 2.0, 3.0], "iqr").item() == pytest.approx(1.5 / 1.349, abs=1e-15)


def test_dispersion_batched_matches_float64_oracles():
    r = torch.tensor(GROUPS, dtype=torch.float32)
    std = [statistics.stdev(g) for g in GROUPS]
    mad = [1.4826 * statistics.median([abs(x - statistics.median(g)) for x in g]) for g in GROUPS]
    iqr = [(np.quantile(g, 0.75) - np.quantile(g, 0.25)) / 1.349 for g in GROUPS]
    for kind, want in (("std", std), ("mad", mad), ("iqr", iqr)):
        got = dispersion(r, kind)
        assert got.dtype == torch.float64 and got.shape == (len(GROUPS),)
        assert got.tolist() == pytest.approx(want, abs=1e-12)
    # leading dims are batch dims
    assert dispersion(r.reshape(5, 1, 4)).shape == (5, 1)


def test_unbiased_std_of_one_response_is_zero():
    assert unbiased_std([[2.0], [5.0]]).tolist() == [0.0, 0.0]


# ---------------------------------------------------------------- skewness

def test_skewness_by_hand():
    # [0, 0, 1]: mean 1/3, std sqrt(1/3); mean z^3 = 2/(3 sqrt 3); factor sqrt(6)
    want = math.sqrt(6) * 2 / (3 * math.sqrt(3))
    assert skewness([0.0, 0.0, 1.0]).item() == pytest.approx(want, abs=1e-12)
    assert skewness([1.0, 1.0, 0.0]).item() == pytest.approx(-want, abs=1e-12)


def test_skewness_batched_matches_oracle():
    got = skewness(torch.tensor(GROUPS))
    assert got.tolist() == pytest.approx([oracle_skew(g) for g in GROUPS], abs=1e-12)


def test_skewness_small_groups_have_no_factor_and_no_nan():
    assert skewness([[4.0]]).tolist() == [0.0]
    # n = 2: no sqrt(n(n-1))/(n-2) factor (it would divide by 0); two points are symmetric
    out = skewness([[0.0, 1.0], [3.0, -2.0]])
    assert torch.isfinite(out).all() and out.tolist() == pytest.approx([0.0, 0.0], abs=1e-15)


def test_skewness_sigma_guard():
    tiny = [0.0, 0.0, 1e-7]                       # std ~ 5.8e-8 < 1e-6
    assert skewness(tiny).item() == 0.0
    assert skewness(tiny, sigma_min=0.0).item() == pytest.approx(oracle_skew([0.0, 0.0, 1.0]), rel=1e-9)
    assert skewness([2.0, 2.0, 2.0], sigma_min=0.0).item() == 0.0     # std exactly 0: no 0/0


def test_skewness_clamped_on_both_sides():
    outlier = [0.0] * 199 + [1.0]                 # adjusted skewness ~ 14.1
    assert oracle_skew(outlier, kappa_max=1e9) > 10
    assert skewness(outlier).item() == 10.0
    assert skewness([-x for x in outlier]).item() == -10.0
    assert skewness([0.0, 0.0, 1.0], kappa_max=0.5).item() == 0.5
    assert skewness([0.0, 1.0, 1.0], kappa_max=0.5).item() == -0.5


# ---------------------------------------------------------------- vote entropy

def test_vote_entropy_by_hand():
    want = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert vote_entropy(["7", "7", "8", "x"]) == pytest.approx(want, abs=1e-15)
    assert vote_entropy(["a"] * 5) == 0.0
    assert vote_entropy(["a", "b", "c", "d", "e", "f"]) == pytest.approx(math.log(6), abs=1e-15)
    assert vote_entropy([""]) == 0.0
    assert vote_entropy(["", "", "1"]) == pytest.approx(-(2 / 3) * math.log(2 / 3) - math.log(1 / 3) / 3)


def test_vote_entropy_bad_input():
    with pytest.raises(ValueError, match="keys"):
        vote_entropy([])
    with pytest.raises(ValueError, match="keys"):
        vote_entropy("abc")


def test_group_vote_entropy_keys_and_custom_extract():
    out = group_vote_entropy([["1", "1"], ["1", "2"], ["", ""]], extract=None)
    assert out.dtype == torch.float64
    assert out.tolist() == pytest.approx([0.0, math.log(2), 0.0], abs=1e-15)
    # the extractor decides what counts as the same vote
    texts = [["A", "a", "b"]]
    assert group_vote_entropy(texts, extract=None).item() == pytest.approx(math.log(3))
    assert group_vote_entropy(texts, extract=str.lower).item() == pytest.approx(
        -(2 / 3) * math.log(2 / 3) - math.log(1 / 3) / 3)


def test_group_vote_entropy_bad_input():
    with pytest.raises(ValueError, match=r"answers\[0\]\[1\]"):
        group_vote_entropy([["1", None]], extract=None)
    with pytest.raises(ValueError, match=r"answers\[1\]"):
        group_vote_entropy([["1"], []], extract=None)
    with pytest.raises(ValueError, match="answers"):
        group_vote_entropy("1", extract=None)


def test_group_vote_entropy_uses_the_reward_answer_extraction():
    texts = [["so \\boxed{1,000}", "#### 1000", "We get \\boxed{\\frac{1}{2}}", "it is \\boxed{\\frac{1}{2}}"],
             ["", "", "", ""],
             ["", "", "\\boxed{3}", "#### 3"]]
    out = group_vote_entropy(texts)
    assert out[0].item() == pytest.approx(math.log(2), abs=1e-12)   # {1000: 2, 1/2: 2}
    assert out[1].item() == 0.0                                      # empty texts: one (empty) vote
    assert out[2].item() == pytest.approx(math.log(2), abs=1e-12)   # {"": 2, "3": 2}


# ---------------------------------------------------------------- advantages

def test_advantages_std_by_hand():
    # mean 0.75, unbiased std 0.5
    assert group_advantages([[0.0, 1.0, 1.0, 1.0]]).tolist() == [[-1.5, 0.5, 0.5, 0.5]]


@pytest.mark.parametrize("kind", ["std", "mad", "iqr"])
def test_advantages_all_equal_and_single_are_exactly_zero(kind):
    a = group_advantages([[0.1, 0.1, 0.1], [1.0, 1.0, 1.0]], kind)
    assert a.tolist() == [[0.0] * 3, [0.0] * 3]
    assert group_advantages([[3.0], [-1.0]], kind).tolist() == [[0.0], [0.0]]


@pytest.mark.parametrize("kind,rewards", [("mad", [0.0, 0.0, 0.0, 0.0, 1.0]),
                                          ("iqr", [0.0, 0.0, 0.0, 0.0, 0.0, 1.0])])
def test_robust_dispersion_near_zero_falls_back_to_std(kind, rewards):
    assert dispersion(rewards, kind).item() == 0.0
    mean, std = statistics.mean(rewards), statistics.stdev(rewards)
    want = [(x - mean) / std for x in rewards]
    assert group_advantages([rewards], kind)[0].tolist() == pytest.approx(want, abs=1e-12)


def test_robust_dispersion_used_when_not_degenerate():
    r = [0.0, 1.0, 2.0, 3.0, 10.0]                # median 2, |r - 2| median 1 -> mad 1.4826
    want = [(x - 3.2) / 1.4826 for x in r]
    assert group_advantages([r], "mad")[0].tolist() == pytest.approx(want, abs=1e-12)
    want_iqr = [(x - 3.2) / (2.0 / 1.349) for x in r]
    assert group_advantages([r], "iqr")[0].tolist() == pytest.approx(want_iqr, abs=1e-12)


def test_advantage_denominator_floor():
    # rewards differ by 1e-12: std ~7e-13 < 1e-8, so the denominator is the floor
    a = group_advantages([[0.0, 1e-12]])[0].tolist()
    assert a == pytest.approx([-5e-5, 5e-5], rel=1e-9)
    with pytest.raises(ValueError, match="floor"):
        group_advantages([[0.0, 1.0]], floor=0.0)


def test_advantages_batched_match_per_group():
    r = torch.tensor(GROUPS, dtype=torch.float64)
    batched = group_advantages(r, "mad")
    for p, g in enumerate(GROUPS):
        assert torch.equal(batched[p], group_advantages([g], "mad")[0])
    a = group_advantages(r)
    assert a.sum(-1).abs().max().item() < 1e-12                       # centred
    nonflat = [p for p, g in enumerate(GROUPS) if len(set(g)) > 1]
    assert a[nonflat].std(-1).tolist() == pytest.approx([1.0] * len(nonflat), abs=1e-12)
