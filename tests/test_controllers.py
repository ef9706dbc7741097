"""AGPO controllers (agpo.algo.controllers) against a plain-Python oracle of docs/algorithm.md."""

import ast
import copy
import inspect
import json
import math
import statistics
from collections import Counter

import pytest
import torch

from agpo.algo import controllers
from agpo.algo.controllers import (
    AGPOController,
    ControllerConfig,
    adaptive_clip,
    centre_uncertainty,
    entropy_ratio,
    step_kl,
    temperature,
    uncertainty,
)

PAPER = dict(baseline_min=0.0)
"""The paper's formulas (docs/algorithm.md): no floor on the uncertainty baseline (the project's
default keeps it at or above 0.5; test_baseline_floor_keeps_tau_responsive)."""
PAPER_DEFAULTS = dict(eps_base=0.2, eps_min=0.05, eps_max=0.4, alpha_var=1.0, gamma_stepkl=0.5,
                      delta_probe_entropy=0.1, zeta_skew=0.0, dispersion="std", tau_base=1.0,
                      tau_min=0.5, tau_max=1.5, lambda_temp=0.15, w_r=1.0, w_e=1.0, w_k=0.0,
                      ema_alpha=0.1, h_min=0.5, h_max=1.5, h_ref_alpha=0.01, skew_sigma_min=1e-6,
                      kappa_max=10.0, adaptive_clip=True, adaptive_temp=True)


# ---------------------------------------------------------------- oracle (plain floats)

def o_skew(xs, sigma_min=1e-6, kappa_max=10.0):
    n = len(xs)
    std = statistics.stdev(xs) if n > 1 else 0.0
    if std < sigma_min or std == 0:
        return 0.0
    mean = sum(xs) / n
    k = sum(((x - mean) / std) ** 3 for x in xs) / n
    k *= math.sqrt(n * (n - 1)) / (n - 2) if n > 2 else 1.0
    return min(max(k, -kappa_max), kappa_max)


def o_entropy(keys):
    n = len(keys)
    return -sum(c / n * math.log(c / n) for c in Counter(keys).values())


class Oracle:
    """docs/algorithm.md (statistics, temperature, clip, step KL) with the default settings, group by group."""

    def __init__(self):
        self.b, self.S, self.h_ref, self.seen = 0.0, 0.0, None, False
        self.stats = []

    def probe(self, rewards, keys):
        taus, self.stats = [], []
        for r, k in zip(rewards, keys):
            sigma = statistics.stdev(r) if len(r) > 1 else 0.0
            kap, e = o_skew(r), o_entropy(k)
            u = sigma + e
            if self.b <= 1e-8:
                c, self.b = 0.0, u
            else:
                c, self.b = (u - self.b) / (self.b + 1e-8), 0.1 * u + 0.9 * self.b
            taus.append(min(max(1.0 * (1 + 0.15 * c), 0.5), 1.5))
            self.stats.append((sigma, kap, e))
        return taus

    def clip(self, hs):
        eps = []
        for (sigma, kap, e), h in zip(self.stats, hs):
            ref = h if self.h_ref is None else self.h_ref
            ratio = min(max(h / (ref + 1e-8), 0.5), 1.5)
            eps.append(min(max(0.2 * ratio * (1 + 0.1 * e) / (1 + sigma + 0.5 * self.S), 0.05), 0.4))
            self.h_ref = h if self.h_ref is None else 0.01 * h + 0.99 * ref
        return eps

    def kl(self, kls):
        self.S = 0.1 * (sum(max(0.0, v) for v in kls) / len(kls)) + 0.9 * self.S


def random_step(gen, P=5, G=6):
    rewards = torch.randint(0, 3, (P, G), generator=gen).double() * 0.5
    pool = ["1", "2", "3", ""]
    keys = [[pool[i] for i in torch.randint(0, 4, (G,), generator=gen).tolist()] for _ in range(P)]
    hs = (torch.rand(P, generator=gen, dtype=torch.float64) * 2 + 0.2).tolist()
    kls = (torch.rand(P, generator=gen, dtype=torch.float64) * 0.2 - 0.05).tolist()
    return rewards, keys, hs, kls


def run_step(ctl, data):
    rewards, keys, hs, kls = data
    tau = ctl.probe_step(rewards, keys, extract=None)
    eps = ctl.clip_step(hs)
    ctl.update_step_kl(kls)
    return tau, eps


# ---------------------------------------------------------------- config

def test_config_defaults_are_the_papers():
    cfg = ControllerConfig()
    assert {k: getattr(cfg, k) for k in PAPER_DEFAULTS} == PAPER_DEFAULTS
    assert cfg.needs_probe
    assert not ControllerConfig(adaptive_clip=False, adaptive_temp=False).needs_probe


def test_config_is_keyword_only_and_every_field_has_a_docstring():
    with pytest.raises(TypeError):
        ControllerConfig(True)  # noqa
    tree = ast.parse(inspect.getsource(controllers.ControllerConfig))
    body = tree.body[0].body
    names = []
    for i, node in enumerate(body):
        if isinstance(node, ast.AnnAssign):
            names.append(node.target.id)
            doc = body[i + 1] if i + 1 < len(body) else None
            assert isinstance(doc, ast.Expr) and isinstance(doc.value.value, str) and doc.value.value, node.target.id
    assert set(PAPER_DEFAULTS) <= set(names)


@pytest.mark.parametrize("kwargs,field", [
    (dict(eps_min=0.3), "eps_min"), (dict(eps_base=0.5), "eps_base"), (dict(eps_min=0.0), "eps_min"),
    (dict(tau_base=2.0), "tau_base"), (dict(tau_min=0.0, tau_base=0.0), "tau_min"),
    (dict(dispersion="var"), "dispersion"), (dict(ema_alpha=0.0), "ema_alpha"),
    (dict(h_ref_alpha=1.5), "h_ref_alpha"), (dict(alpha_var=-1.0), "alpha_var"),
    (dict(gamma_stepkl=float("nan")), "gamma_stepkl"), (dict(lambda_temp=float("inf")), "lambda_temp"),
    (dict(lambda_temp=-0.1), "lambda_temp"), (dict(adaptive_clip=1), "adaptive_clip"),
    (dict(h_min=2.0), "h_min"), (dict(w_e="1"), "w_e"), (dict(kappa_max=0.0), "kappa_max"),
])
def test_config_checks_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ControllerConfig(**kwargs)


# ---------------------------------------------------------------- formula branches

def test_centre_uncertainty_cold_start_and_ema():
    cfg = ControllerConfig(**PAPER)
    assert centre_uncertainty(0.7, 0.0, cfg) == (0.0, 0.7)
    assert centre_uncertainty(0.7, 1e-8, cfg) == (0.0, 0.7)          # b <= floor is still cold
    c, b = centre_uncertainty(1.0, 0.5, cfg)
    assert c == pytest.approx(0.5 / (0.5 + 1e-8), abs=1e-15) and b == pytest.approx(0.55, abs=1e-15)
    c, _ = centre_uncertainty(0.25, 0.5, cfg)
    assert c == pytest.approx(-0.25 / (0.5 + 1e-8), abs=1e-15)


def test_uncertainty_weights_and_abs_skew():
    cfg = ControllerConfig(w_r=2.0, w_e=0.5, w_k=0.25)
    assert uncertainty(0.3, 1.2, -2.0, cfg) == pytest.approx(2 * 0.3 + 0.5 * 1.2 + 0.25 * 2.0, abs=1e-15)
    ctl = AGPOController(ControllerConfig(w_k=1.0, **PAPER))
    r = [1.0, 1.0, 1.0, 0.0]                                          # negative skew
    ctl.probe_step([r], [["a", "a", "b", "c"]], extract=None)
    want = statistics.stdev(r) + o_entropy(["a", "a", "b", "c"]) + abs(o_skew(r))
    assert o_skew(r) < 0 and ctl.baseline == pytest.approx(want, abs=1e-12)


def test_temperature_bidirectional_and_clamped_both_sides():
    cfg = ControllerConfig()
    assert temperature(0.0, cfg) == 1.0
    assert temperature(2 / 3, cfg) == pytest.approx(1.1, abs=1e-15)
    assert temperature(-2 / 3, cfg) == pytest.approx(0.9, abs=1e-15)
    assert temperature(10.0, cfg) == 1.5
    strong = ControllerConfig(lambda_temp=1.0)
    assert temperature(-0.9, strong) == 0.5                           # 0.1 -> tau_min
    assert temperature(3.0, ControllerConfig(adaptive_temp=False)) == 1.0


def test_entropy_ratio_clamped_both_sides():
    cfg = ControllerConfig()
    assert entropy_ratio(1.5, 2.0, cfg) == pytest.approx(1.5 / (2.0 + 1e-8), abs=1e-15)
    assert entropy_ratio(4.0, 2.0, cfg) == 1.5
    assert entropy_ratio(0.1, 2.0, cfg) == 0.5
    assert entropy_ratio(0.0, 0.0, cfg) == 0.5


def test_adaptive_clip_by_hand_and_clamps():
    cfg = ControllerConfig()
    e = math.log(2)
    want = 0.2 * 0.9 * (1 + 0.1 * e) / (1 + 0.5 + 0.5 * 0.2)
    assert adaptive_clip(0.5, 3.0, e, 0.9, 0.2, cfg) == pytest.approx(want, abs=1e-15)
    skewed = ControllerConfig(zeta_skew=0.25)
    want = 0.2 * 0.9 * (1 + 0.1 * e) / (1 + 0.5 + 0.5 * 0.2 + 0.25 * 3.0)
    assert adaptive_clip(0.5, -3.0, e, 0.9, 0.2, skewed) == pytest.approx(want, abs=1e-15)
    wide = ControllerConfig(delta_probe_entropy=1.0)
    assert adaptive_clip(0.0, 0.0, math.log(8), 1.5, 0.0, wide) == 0.4     # 0.92 -> eps_max
    assert adaptive_clip(10.0, 0.0, 0.0, 1.0, 0.0, cfg) == 0.05            # 0.018 -> eps_min
    assert adaptive_clip(10.0, 0.0, 0.0, 1.0, 0.0, ControllerConfig(adaptive_clip=False)) == 0.2


def test_step_kl_ignores_negative_groups():
    assert step_kl([0.1, -0.2, 0.3]) == pytest.approx(0.4 / 3, abs=1e-15)
    ctl = AGPOController(ControllerConfig(**PAPER))
    assert ctl.update_step_kl(torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)) == pytest.approx(0.4 / 3, abs=1e-15)
    assert ctl.step_kl_ema == pytest.approx(0.04 / 3, abs=1e-15)
    ctl.update_step_kl([0.05])
    assert ctl.step_kl_ema == pytest.approx(0.1 * 0.05 + 0.9 * 0.04 / 3, abs=1e-15)


# ---------------------------------------------------------------- one controller over steps

def test_controller_matches_oracle_over_steps():
    gen = torch.Generator().manual_seed(0)
    ctl, ref = AGPOController(ControllerConfig(**PAPER)), Oracle()
    for _ in range(4):
        rewards, keys, hs, kls = random_step(gen)
        tau = ctl.probe_step(rewards, keys, extract=None)
        assert tau.dtype == torch.float32 and tau.shape == (5,)
        assert tau.tolist() == pytest.approx(ref.probe(rewards.tolist(), keys), abs=1e-6)
        assert ctl.baseline == pytest.approx(ref.b, rel=1e-12)
        eps = ctl.clip_step(torch.tensor(hs, dtype=torch.float64))
        assert eps.dtype == torch.float32 and eps.shape == (5,)
        assert eps.tolist() == pytest.approx(ref.clip(hs), abs=1e-7)
        assert ctl.h_ref == pytest.approx(ref.h_ref, rel=1e-12)
        ctl.update_step_kl(kls)
        ref.kl(kls)
        assert ctl.step_kl_ema == pytest.approx(ref.S, rel=1e-12)


def test_cold_start_first_group_samples_at_tau_base():
    ctl = AGPOController(ControllerConfig(**PAPER))
    tau = ctl.probe_step([[0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]], [["1", "1", "2", "3"], ["5"] * 4],
                         extract=None)
    u0 = statistics.stdev([0.0, 1.0, 1.0, 1.0]) + o_entropy(["1", "1", "2", "3"])
    assert tau[0].item() == 1.0                                      # c = 0
    assert tau[1].item() == pytest.approx(1 + 0.15 * (0 - u0) / (u0 + 1e-8), abs=1e-6)   # below b: cooler
    assert ctl.baseline == pytest.approx(0.9 * u0, rel=1e-12)


def test_more_uncertainty_than_baseline_samples_hotter():
    ctl = AGPOController(ControllerConfig(**PAPER))
    ctl.probe_step([[0.0, 0.0, 1.0, 1.0]], [["a", "a", "b", "b"]], extract=None)   # baseline
    state = ctl.state_dict()
    levels = [([0.0] * 4, ["a"] * 4), ([0.0, 0.0, 0.0, 1.0], ["a", "a", "a", "b"]),
              ([0.0, 0.0, 1.0, 1.0], ["a", "a", "b", "b"]), ([0.0, 1.0, 2.0, 3.0], ["a", "b", "c", "d"])]
    taus = []
    for rewards, keys in levels:
        ctl.load_state_dict(state)
        taus.append(ctl.probe_step([rewards], [keys], extract=None).item())
    assert taus[0] < taus[1] < 1.0 < taus[3]
    assert taus[2] == pytest.approx(1.0, abs=1e-6)                    # u == b: tau_base


def test_more_dispersion_gives_smaller_eps():
    ctl = AGPOController(ControllerConfig(**PAPER))
    groups = [[0.0] * 4, [0.0, 0.0, 0.0, 0.5], [0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]]
    ctl.probe_step(groups, [["7"] * 4] * 5, extract=None)
    eps = ctl.clip_step([1.0] * 5).tolist()
    assert all(a > b for a, b in zip(eps, eps[1:])), eps
    assert eps[0] == pytest.approx(0.2 / (1 + 1e-8), abs=1e-7)


def test_more_step_kl_gives_smaller_eps():
    eps = []
    for kl in (0.0, 0.1, 0.5, 2.0):
        ctl = AGPOController(ControllerConfig(**PAPER))
        for _ in range(3):
            ctl.update_step_kl([kl, kl])
        assert ctl.step_kl_ema == pytest.approx(kl * (1 - 0.9 ** 3), rel=1e-12)
        ctl.probe_step([[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]], [["1", "2", "2"], ["2"] * 3], extract=None)
        eps.append(ctl.clip_step([1.2, 1.2]))
    for a, b in zip(eps, eps[1:]):
        assert bool((a > b).all()), (a, b)


def test_policy_entropy_reference_order_and_clamps():
    ctl = AGPOController(ControllerConfig(**PAPER))
    hs = [2.0, 1.5, 4.0, 0.5]
    ctl.probe_step([[1.0, 1.0]] * 4, [["x", "x"]] * 4, extract=None)     # sigma = E = 0
    eps = ctl.clip_step(hs).tolist()
    refs, ref = [], None
    for h in hs:
        refs.append(h if ref is None else ref)
        ref = h if ref is None else 0.01 * h + 0.99 * ref
    want = [0.2 * min(max(h / (r + 1e-8), 0.5), 1.5) for h, r in zip(hs, refs)]
    assert want[2] == 0.2 * 1.5 and want[3] == 0.2 * 0.5                 # h clamped both sides
    assert eps == pytest.approx(want, abs=1e-7)
    assert eps[0] == pytest.approx(0.2, abs=1e-7)                         # first group: ratio ~1
    assert ctl.h_ref == pytest.approx(ref, rel=1e-15) and ctl.h_count == 4


def test_switches_off_give_plain_grpo():
    grpo = AGPOController(ControllerConfig(adaptive_clip=False, adaptive_temp=False))
    for step in range(3):                                                 # no probe needed
        assert grpo.clip_step([0.1, 3.0, 1.0]).tolist() == pytest.approx([0.2] * 3, abs=1e-7)
        grpo.update_step_kl([0.5, 0.5, 0.5])
    wild = [[0.0, 5.0, 0.0, 9.0], [1.0, 1.0, 1.0, 0.0]]
    keys = [["1", "2", "3", "4"], ["1", "1", "1", "2"]]
    grpo.probe_step(wild, keys, extract=None)
    assert grpo.probe_step(wild, keys, extract=None).tolist() == [1.0, 1.0]
    assert grpo.clip_step([0.1, 3.0]).tolist() == pytest.approx([0.2, 0.2], abs=1e-7)

    temp_only = AGPOController(ControllerConfig(adaptive_clip=False))
    temp_only.probe_step(wild, keys, extract=None)
    assert temp_only.clip_step([1.0, 1.0]).tolist() == pytest.approx([0.2, 0.2], abs=1e-7)

    clip_only = AGPOController(ControllerConfig(adaptive_temp=False))
    assert clip_only.probe_step(wild, keys, extract=None).tolist() == [1.0, 1.0]
    assert clip_only.probe_step(wild[::-1], keys[::-1], extract=None).tolist() == [1.0, 1.0]
    assert clip_only.clip_step([1.0, 1.0])[0].item() < 0.2 - 1e-3        # still adaptive


def test_call_order_is_enforced():
    ctl = AGPOController(ControllerConfig(**PAPER))
    with pytest.raises(RuntimeError, match="probe_step"):
        ctl.clip_step([1.0])
    ctl.probe_step([[0.0, 1.0]], [["a", "b"]], extract=None)
    with pytest.raises(ValueError, match="policy_entropy"):
        ctl.clip_step([1.0, 1.0])
    ctl.clip_step([1.0])
    with pytest.raises(RuntimeError, match="probe_step"):
        ctl.clip_step([1.0])
    with pytest.raises(ValueError, match="answers"):
        ctl.probe_step([[0.0, 1.0]], [["a", "b", "c"]], extract=None)
    with pytest.raises(ValueError, match="answers"):
        ctl.probe_step([[0.0, 1.0], [1.0, 1.0]], [["a", "b"]], extract=None)
    with pytest.raises(ValueError, match="rewards"):
        ctl.probe_step([0.0, 1.0], [["a", "b"]], extract=None)


# ---------------------------------------------------------------- edge cases

def test_single_response_groups():
    ctl = AGPOController(ControllerConfig(**PAPER))
    tau = ctl.probe_step([[1.0], [0.0]], [["x"], ["y"]], extract=None)
    assert tau.tolist() == [1.0, 1.0] and ctl.baseline == 0.0            # u = 0 stays cold
    assert ctl.clip_step([1.0, 1.0]).tolist() == pytest.approx([0.2, 0.2], abs=1e-7)
    assert ctl.advantages([[1.0], [0.0]]).tolist() == [[0.0], [0.0]]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_are_errors_naming_the_argument(bad):
    ctl = AGPOController(ControllerConfig(**PAPER))
    with pytest.raises(ValueError, match="rewards"):
        ctl.probe_step([[0.0, bad]], [["a", "b"]], extract=None)
    assert ctl.probe is None and ctl.probe_steps == 0                    # nothing half-updated
    ctl.probe_step([[0.0, 1.0]], [["a", "b"]], extract=None)
    with pytest.raises(ValueError, match="policy_entropy"):
        ctl.clip_step([bad])
    with pytest.raises(ValueError, match="kl_per_group"):
        ctl.update_step_kl([0.1, bad])
    with pytest.raises(ValueError, match="rewards"):
        ctl.advantages([[bad, 1.0]])


def test_negative_entropy_rounding_is_zero_and_real_negatives_fail():
    ctl = AGPOController(ControllerConfig(adaptive_clip=False))
    ctl.clip_step([-1e-6])
    assert ctl.h_ref == 0.0
    with pytest.raises(ValueError, match="policy_entropy"):
        ctl.clip_step([-0.5])


def test_empty_answer_texts_and_default_extraction():
    ctl = AGPOController(ControllerConfig(**PAPER))
    tau = ctl.probe_step([[0.0, 0.0, 0.0], [1.0, 0.0, 1.0]], [["", "", ""], ["#### 12", "", "\\boxed{12}"]])
    assert torch.isfinite(tau).all()
    assert ctl.probe.entropy[0] == 0.0
    assert ctl.probe.entropy[1] == pytest.approx(o_entropy(["12", "", "12"]), abs=1e-12)


def test_advantages_use_configured_dispersion():
    r = [[0.0, 0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 2.0, 3.0, 10.0]]
    a = AGPOController(ControllerConfig(dispersion="mad")).advantages(r)
    assert a.dtype == torch.float32 and a.shape == (2, 5)
    s = statistics.stdev(r[0])
    assert a[0].tolist() == pytest.approx([(x - 0.2) / s for x in r[0]], abs=1e-6)  # mad 0 -> std
    assert a[1].tolist() == pytest.approx([(x - 3.2) / 1.4826 for x in r[1]], abs=1e-6)


# ---------------------------------------------------------------- state

def plain(x):
    if isinstance(x, dict):
        return all(isinstance(k, str) and plain(v) for k, v in x.items())
    if isinstance(x, list):
        return all(plain(v) for v in x)
    return x is None or type(x) in (bool, int, float)


@pytest.mark.parametrize("cut", ["between_steps", "after_probe"])
def test_resumed_controller_continues_bit_for_bit(cut):
    gen = torch.Generator().manual_seed(1)
    steps = [random_step(gen) for _ in range(7)]
    full = AGPOController(ControllerConfig(**PAPER))
    outs = [run_step(full, d) for d in steps]

    part = AGPOController(ControllerConfig(**PAPER))
    for d in steps[:3]:
        run_step(part, d)
    if cut == "after_probe":
        part.probe_step(steps[3][0], steps[3][1], extract=None)
    state = part.state_dict()
    assert plain(state)
    resumed = AGPOController(ControllerConfig(**PAPER))
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert resumed.state_dict() == state
    first = 3
    if cut == "after_probe":
        eps = resumed.clip_step(steps[3][2])
        resumed.update_step_kl(steps[3][3])
        assert torch.equal(eps, outs[3][1])
        first = 4
    for d, (tau, eps) in zip(steps[first:], outs[first:]):
        t2, e2 = run_step(resumed, d)
        assert torch.equal(t2, tau) and torch.equal(e2, eps)
    assert resumed.state_dict() == full.state_dict()
    assert resumed.metrics() == full.metrics()


def test_state_dict_is_a_copy_and_load_checks():
    ctl = AGPOController(ControllerConfig(**PAPER))
    run_step(ctl, random_step(torch.Generator().manual_seed(2)))
    state = ctl.state_dict()
    snapshot = copy.deepcopy(state)
    run_step(ctl, random_step(torch.Generator().manual_seed(3)))
    assert state == snapshot
    for key, value in [("baseline", float("nan")), ("h_count", -1), ("h_count", 1.5), ("probe", {"sigma": []})]:
        bad = dict(snapshot, **{key: value})
        with pytest.raises(ValueError, match=key):
            AGPOController(ControllerConfig(**PAPER)).load_state_dict(bad)
    with pytest.raises(ValueError, match="missing"):
        AGPOController(ControllerConfig(**PAPER)).load_state_dict({"baseline": 0.0})


def test_baseline_floor_keeps_tau_responsive():
    """The default floor on b (0.5): after a long easy stretch (unanimous groups, u = 0) the
    paper's b decays toward 0 and the next uncertain group pins tau at tau_max; with the
    floor, b stays at 0.5, easy groups still cool to tau_base * (1 - lambda_temp) and
    uncertain ones get graded temperatures below the clamp."""
    easy = ([[1.0] * 4], [["7"] * 4])
    levels = [([[0.0, 0.0, 0.0, 1.0]], [["7", "7", "7", "8"]]), ([[0.0, 0.0, 1.0, 1.0]], [["7", "7", "8", "9"]])]
    for floor in (0.0, 0.5):
        cfg = ControllerConfig(baseline_min=floor)
        ctl = AGPOController(cfg)
        ctl.probe_step([[0.0, 1.0, 1.0, 1.0]], [["1", "1", "2", "3"]], extract=None)  # cold start: b = u
        easy_taus = [ctl.probe_step(*easy, extract=None).item() for _ in range(150)]
        assert 1 - cfg.lambda_temp <= easy_taus[-1] < 0.9                               # c near -1: cooler
        state = ctl.state_dict()
        taus = []
        for rewards, keys in levels:
            ctl.load_state_dict(state)
            taus.append(ctl.probe_step(rewards, keys, extract=None).item())
        if floor == 0.0:
            assert state["baseline"] < 1e-5 and taus == [cfg.tau_max] * 2               # the paper: pinned
        else:
            b = state["baseline"]
            assert b == 0.5 and easy_taus[-1] == pytest.approx(1 - cfg.lambda_temp, abs=1e-6)  # c = -1
            u = [statistics.stdev(r[0]) + o_entropy(k[0]) for r, k in levels]
            assert taus == pytest.approx([1 + cfg.lambda_temp * (x - b) / (b + 1e-8) for x in u], abs=1e-6)
            assert taus[0] < taus[1] < cfg.tau_max                                       # graded, not pinned
    with pytest.raises(ValueError, match="baseline_min"):
        ControllerConfig(baseline_min=-0.1)
