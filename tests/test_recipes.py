"""``--recipe paper`` and the choices where the project and the paper's code differ:
the scoring temperature, the controller's entropy temperature, the vote-entropy keys, the
clamp metrics, the task a model preset trains on (issue 19), whether the probe trains,
and configs built from several threads."""

import copy
import math
from collections import Counter

import pytest
import torch

import agpo.learn.policy
from agpo.algo.controllers import AGPOController, ControllerConfig
from agpo.algo.recipes import RECIPES
from agpo.algo.stats import group_vote_entropy, raw_answer_key
from agpo.config import ConfigError, TrainConfig, config_from_args
from agpo.learn.launch import resolve_defaults
from agpo.learn.policy import Policy
from agpo.learn.trainer import Trainer, scoring_batch
from agpo.models import load_model_and_tokenizer
from agpo.rollout import sample_groups
from agpo.tasks.data import held_out, load_problems

FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"


def test_paper_recipe_sets_the_authors_defaults_and_flags_win():
    cfg = config_from_args(["--recipe", "paper"])
    assert (cfg.optim.update_epochs, cfg.optim.lr, cfg.optim.adam_beta2, cfg.optim.schedule) == (4, 1e-5, 0.999, "cosine")
    assert (cfg.loss.beta, cfg.loss.kl_estimator, cfg.loss.loss_agg) == (0.03, "k1", "seq-mean-token-mean")
    assert (cfg.loss.score_temperature, cfg.controller.vote_keys, cfg.rollout.top_p) == ("one", "raw", 0.9)
    assert cfg.to_dict()["run"]["recipe"] == "paper"
    again = TrainConfig.from_dict(cfg.to_dict())  # config.yaml round trip: the same run
    assert again == cfg
    # flags and YAML values win over the recipe; LoRA drops the (absent) reference KL
    cfg = config_from_args(["--recipe", "paper", "--lr", "3e-5", "--update-epochs", "2"])
    assert (cfg.optim.lr, cfg.optim.update_epochs, cfg.optim.adam_beta2) == (3e-5, 2, 0.999)
    lora = config_from_args(["--recipe", "paper", "--lora-rank", "8"])
    assert lora.loss.beta == 0.0 and lora.loss.kl_estimator == "k1"
    assert config_from_args(["--recipe", "paper", "--lora-rank", "8", "--beta", "0.05"]).loss.beta == 0.05
    # the default recipe is the project's defaults
    assert config_from_args([]) == TrainConfig() and RECIPES["default"] == {}
    with pytest.raises(ConfigError, match="--recipe"):
        config_from_args(["--recipe", "authors"])


@pytest.mark.parametrize("args, reuses", [
    ([], True), (["--no-probe-reuse"], False), (["--probe-reuse"], True),
    (["--recipe", "paper"], False), (["--recipe", "paper", "--probe-reuse"], True),
    (["--algo", "grpo"], False), (["--algo", "grpo", "--adaptive-clip", "--clip-from-train"], False),
    (["--no-adaptive-temp"], True), (["--no-adaptive-clip"], True),
])
def test_agpo_trains_on_its_probe_by_default(args, reuses):
    """Probe reuse is the default wherever a probe is drawn (the paired experiments of
    docs/recipes.md); ``--no-probe-reuse`` and the paper recipe give the authors' design,
    and the value round-trips through config.yaml."""
    cfg = config_from_args(args)
    assert cfg.reuses_probe is reuses
    assert TrainConfig.from_dict(cfg.to_dict()).reuses_probe is reuses


def test_probe_reuse_default_follows_a_later_change():
    """The default is resolved when it is read, so a config changed after it was built (as
    tests and library users do) does not keep a stale answer."""
    cfg = config_from_args([])
    cfg.controller.adaptive_clip = cfg.controller.adaptive_temp = False  # now GRPO: no probe
    assert not cfg.reuses_probe
    cfg.controller.adaptive_clip = True
    assert cfg.reuses_probe


def test_recipe_fields_exist():
    """Every value a recipe sets is a real config field (a typo would silently do nothing)."""
    base = TrainConfig().to_dict()
    for name, sections in RECIPES.items():
        for section, values in sections.items():
            assert set(values) <= set(base[section]), (name, section, set(values) - set(base[section]))


def test_raw_vote_keys_are_the_papers():
    """Eight spellings of one half: one vote with the normalised keys, several with the raw
    ones (the authors' extraction, which also reads ``\\boxed{\\frac{1}{2}}`` as "2")."""
    texts = [r"so \boxed{\frac{1}{2}}", "it is 1/2", "0.5", "#### 1/2", r"\boxed{0.5}", "The answer: 0.50",
             r"\boxed{\dfrac{1}{2}}", "half, i.e. 1/2"]
    raw = [raw_answer_key(t) for t in texts]
    assert raw == ["2", "1/2", "0.5", "1/2", "0.5", "0.50", "2", "1/2"]
    counts = Counter(raw).values()
    want = -sum(c / 8 * math.log(c / 8) for c in counts)
    assert group_vote_entropy([texts], raw_answer_key).item() == pytest.approx(want, abs=1e-12)
    assert want == pytest.approx(1.3208883431493221)
    assert group_vote_entropy([texts]).item() == 0.0  # normalised: one answer
    ctl = AGPOController(ControllerConfig(vote_keys="raw"))
    ctl.probe_step([[1.0] * 8], [texts])
    assert ctl.probe.entropy[0] == pytest.approx(want)
    assert raw_answer_key("1" * 200_000 + " 7") == "7"  # long text: bounded, still the last number
    with pytest.raises(ValueError, match="vote_keys"):
        ControllerConfig(vote_keys="lower")


def test_clamp_shares_are_logged():
    cfg = resolve_defaults(TrainConfig())
    tr = Trainer.__new__(Trainer)
    tr.cfg = cfg
    c = cfg.controller
    tau = torch.tensor([c.tau_max, c.tau_min, 1.0, c.tau_max])
    eps = torch.tensor([c.eps_min, 0.2, 0.2, 0.2])
    assert tr._clamp_shares(tau, eps) == {"tau/at_max": 0.5, "tau/at_min": 0.25, "eps/at_max": 0.0,
                                          "eps/at_min": 0.25}


@pytest.fixture(scope="module")
def tiny():
    model, tok = load_model_and_tokenizer("tiny", seed=0)
    return model, tok


def _oracle_entropy(model, batch, temperature):
    """Float64 entropy of the completion tokens from the model's own logits (the head the
    fused path skips), at one temperature per row."""
    ids = torch.cat([batch.prompt_ids, batch.completion_ids], 1)
    attn = torch.cat([batch.prompt_mask, batch.completion_mask], 1)
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits.double()
    P, C = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    z = logits[:, P - 1:P - 1 + C] / temperature.double().view(-1, 1, 1)
    logp = torch.log_softmax(z, -1)
    return -(logp.exp() * logp).sum(-1) * batch.completion_mask


def test_scoring_and_entropy_temperatures(tiny):
    """``score_temperature=one`` scores every row untempered; the controller's entropy is
    taken at temperature 1 when asked, in the same pass over the decoder."""
    model, tok = tiny
    roll = sample_groups(model, tok, ["1+2=", "33+4="], torch.tensor([0.7, 1.4]), group_size=3, max_new_tokens=4)
    batch = roll.batch
    assert scoring_batch(batch, "sample") is batch
    one = scoring_batch(batch, "one")
    assert torch.equal(one.temperature, torch.ones(6)) and torch.equal(batch.temperature[:3], torch.full((3,), 0.7))
    policy = Policy(model, impl="torch")
    with torch.no_grad():
        _, ent_sample = policy(batch)
        _, ent_one = policy(batch, entropy_temperature=1.0)
        _, ent_scored_one = policy(one)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent_sample.double(), _oracle_entropy(model, batch, batch.temperature), **tol)
    torch.testing.assert_close(ent_one.double(), _oracle_entropy(model, batch, torch.ones(6)), **tol)
    torch.testing.assert_close(ent_scored_one, ent_one, rtol=0, atol=1e-6)
    assert (ent_one - ent_sample).abs().max() > 1e-3  # the temperatures really differ


def test_score_temperature_one_reaches_the_loss(tiny, monkeypatch):
    model, tok = tiny
    cfg = resolve_defaults(config_from_args(["--score-temperature", "one", "--sft-steps", "0", "--prompts-per-step",
                                             "2", "--group-size", "2", "--update-epochs", "1", "--eval-size", "0"]))
    tr = Trainer(cfg, copy.deepcopy(model), tok, load_problems(cfg.data, split="train"))
    tr.controller.baseline = 0.5
    temps, real = [], agpo.learn.policy.agpo_loss
    monkeypatch.setattr(agpo.learn.policy, "agpo_loss", lambda *a, **kw: temps.append(kw["temperature"]) or real(*a, **kw))
    tr.step()
    assert temps and all(torch.equal(t.cpu(), torch.ones_like(t.cpu())) for t in temps)


def test_presets_choose_their_task(tmp_path):
    assert resolve_defaults(config_from_args([])).data.dataset == "arith"
    assert resolve_defaults(config_from_args(["--model", "smollm2-135m"])).data.dataset == "chain_sum"
    assert resolve_defaults(config_from_args(["--model", "qwen14b"])).data.dataset == "gsm8k"
    assert resolve_defaults(config_from_args(["--model", "qwen14b", "--dataset", "math500"])).data.dataset == "math500"
    assert resolve_defaults(config_from_args(["--model", str(tmp_path)])).data.dataset == "gsm8k"
    # GSM8K: train from --data-path, held-out problems from the packaged test set (never the train file)
    cfg = resolve_defaults(config_from_args(["--model", "qwen14b", "--data-path", str(FIXTURES / "gsm8k_sample.jsonl")]))
    train = load_problems(cfg.data, split="train")
    test = load_problems(held_out(cfg.data), split="test")
    assert [p.id.split(":")[0] for p in train] == [str(FIXTURES / "gsm8k_sample.jsonl")] * len(train)
    assert len(test) == 1319 and not {p.prompt for p in train} & {p.prompt for p in test}
    cfg.data.eval_path = str(FIXTURES / "gsm8k_sample.jsonl")
    assert len(load_problems(held_out(cfg.data), split="test")) == len(train)
    arith = resolve_defaults(config_from_args([])).data
    assert held_out(arith) is arith
    # reasoning-gym options from the command line, over the YAML's
    (tmp_path / "c.yaml").write_text("data: {generator_options: {min_terms: 3, max_digits: 2}}\n")
    opts = config_from_args(["--config", str(tmp_path / "c.yaml"), "--task-option", "min_terms=2"]).data
    assert opts.generator_options == {"min_terms": 2, "max_digits": 2}
    with pytest.raises(ConfigError, match="--task-option"):
        config_from_args(["--task-option", "max_terms"])


def test_configs_are_built_from_several_threads_one_source_read_at_a_time(monkeypatch):
    """``evidence.py run`` resolves its runs' configs from worker threads; the flags' help is
    read from the config classes' source, which CPython 3.11 cannot parse in two threads at
    once (cpython#106905). Each class's source is read once, one reader at a time."""
    import inspect
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import agpo.config.cli as cli

    monkeypatch.setattr(cli, "_DOCS", {})
    active, reads, real = [0], [], inspect.getsource

    def slow_getsource(obj):
        active[0] += 1
        try:
            assert active[0] == 1, "two threads read a config class's source at once"
            time.sleep(0.02)  # long enough for the other threads to arrive
            reads.append(obj)
            return real(obj)
        finally:
            active[0] -= 1

    monkeypatch.setattr(inspect, "getsource", slow_getsource)
    barrier = threading.Barrier(4)

    def build(_):
        barrier.wait()
        return cli.config_from_args(["--seed", "1"]).run.seed

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(build, range(4))) == [1] * 4
    assert reads and len(reads) == len(set(reads))  # each class once
