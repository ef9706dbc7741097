"""The AGPO trainer on verl 0.9.1's V1 trainer (``agpo.integrations.verl``), against real verl
code: verl's config, replay buffer, advantage computation, balancing and padding, its
``PPOTrainer`` methods, and a real TransferQueue (Ray, 4 logical CPUs). Fakes stand only
where verl needs a GPU: the rollout (a scripted agent-loop manager that writes trajectories
into TransferQueue as verl's ``AgentLoopWorkerTQ`` does) and the actor worker group (it reads
each batch with verl's own worker-side ``_async_meta_to_realdata`` and scores with known
formulas). Skipped where verl is not installed (``.ci/run`` runs it in ``.venv-verl``).

- probe at ``tau_base`` with ``n = probe_size``, train with ``n = rollout.n`` at ``tau[p]``;
- scoring and update calls reach the worker at the per-row temperatures (verl's stock
  methods, on the same batch, let the scalar win); both controllers off: GRPO, no probe;
- per-row ``agpo_eps`` equals ``clip_step``'s eps expanded per sample (padding: eps_base);
- the step-KL pass follows the update and feeds ``update_step_kl``; tau and eps over 3 steps
  equal agpo's own ``AGPOController`` driven in agpo.train's order;
- checkpoint round trip (a resumed trainer takes the same next step); a probe that comes
  back short falls back to tau_base; a dataset's ``agent_name`` column is refused.
(The config refusals and the entry command: tests/test_verl_checks.py.)
"""

import copy
import os

import pytest
import torch

verl = pytest.importorskip("verl", reason="verl is not installed here; .ci/run runs this file in .venv-verl")

import numpy as np  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402

from agpo.algo.controllers import AGPOController, ControllerConfig  # noqa: E402
from verl_cpu import verl_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
P, G, K = 3, 4, 3  # prompts per step, train group, probe group
VOCAB = ["\\boxed{", "}", " so", " it", " is"] + [str(d) for d in range(10)]


def base_overrides(tmp, *more):
    return [f"data.train_batch_size={P}", f"actor_rollout_ref.actor.ppo_mini_batch_size={P}",
            f"actor_rollout_ref.rollout.n={G}", "actor_rollout_ref.actor.use_kl_loss=true",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
            "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
            f"trainer.default_local_dir={tmp}", f"+agpo.probe_size={K}", *more]


# -- fakes where verl needs a GPU ----------------------------------------------------------
class Tokenizer:
    eos_token_id, pad_token_id = 1, 0
    decode = staticmethod(lambda ids, skip_special_tokens=True: "".join(VOCAB[i] for i in ids))


def answer_ids(answer: int, filler: list[int]) -> list[int]:
    return filler + [0, 5 + answer, 1]


def fake_logp(tok: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return -(1.0 + (tok % 7).double()) * 0.1 / t


def fake_entropy(tok: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (0.3 + 0.1 * (tok % 5).double()) * t


def fake_shift(tok: torch.Tensor, eps: float) -> torch.Tensor:
    """How much one update lowers a token's log-prob (depends on the row's eps the update saw)."""
    return eps * (1.0 + (tok % 3).double()) * 0.1


class Rollout:
    """Scripted agent-loop manager: each prompt row of ``generate_sequences`` gives
    ``__rollout_n__`` trajectories in TransferQueue (fields and tags as AgentLoopWorkerTQ's)."""

    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)
        self.calls, self.rows = [], {}
        self.drop = set()  # (call, prompt, session): a sample that fails (never reaches TransferQueue)

    def generate_sequences(self, batch):
        import transfer_queue as tq

        n = int(tu.get(batch, "__rollout_n__"))
        uids = list(batch["uid"])
        temps = batch["agpo_temperature"].tolist()
        self.calls.append({"uids": uids, "n": n, "temps": temps, "raw": list(batch["raw_prompt"])})
        for i, uid in enumerate(uids):
            keys, fields, tags = [], [], []
            for s in range(n):
                if (len(self.calls) - 1, i, s) in self.drop:
                    continue
                answer = int(torch.randint(0, 3, (1,), generator=self.g))
                filler = torch.randint(2, 15, (int(torch.randint(0, 4, (1,), generator=self.g)),), generator=self.g)
                resp = torch.tensor(answer_ids(answer, filler.tolist()), dtype=torch.long)
                reward = float(torch.randint(0, 2, (1,), generator=self.g))
                self.rows[f"{uid}_{s}_0"] = (resp, reward)
                prompt = torch.tensor([3, 4, 2 + i], dtype=torch.long)
                scores = torch.zeros(len(resp))
                scores[-1] = reward
                field = {"prompts": prompt, "responses": resp, "response_mask": torch.ones(len(resp), dtype=torch.long),
                         "input_ids": torch.cat([prompt, resp]), "attention_mask": torch.ones(3 + len(resp),
                                                                                              dtype=torch.long),
                         "position_ids": torch.arange(3 + len(resp)), "rm_scores": scores, "num_turns": 2,
                         "rollout_log_probs": fake_logp(resp, torch.tensor(float(temps[i]))).float(),
                         "uid": uid, "session_id": s, "raw_prompt": batch["raw_prompt"][i],
                         "agpo_temperature": float(temps[i]), "global_steps": int(tu.get(batch, "global_steps"))}
                field["loss_mask"] = field["response_mask"]
                keys.append(f"{uid}_{s}_0")
                fields.append(field)
                tags.append({"status": "success", "prompt_len": 3, "response_len": len(resp), "seq_len": 3 + len(resp),
                             "global_steps": field["global_steps"], "min_global_steps": 0, "max_global_steps": 0})
            tq.kv_batch_put(keys=keys, partition_id="train", fields=tu.list_of_dict_to_tensordict(fields), tags=tags)
            tq.kv_put(key=uid, partition_id="train", tag={"status": "finished"})


class ActorWG:
    """The actor (and reference) worker group: reads each batch as verl's worker does."""

    def __init__(self):
        self.calls, self.shift, self.loss_fn, self.saved = [], {}, None, []
        self._dispatch_info = {}

    def _query_dispatch_info(self, role):
        return [0]  # one dp rank

    def set_loss_fn(self, fn):
        self.loss_fn = fn

    def _read(self, meta, what):
        import transfer_queue as tq
        from verl.utils.transferqueue_utils import _async_meta_to_realdata, _run_async_in_temp_loop

        data = _run_async_in_temp_loop(_async_meta_to_realdata, copy.deepcopy(meta))
        temp = tu.get(data, "temperature")
        eps = data["agpo_eps"].tolist() if "agpo_eps" in data.keys() else None
        self.calls.append({"what": what, "keys": list(meta.keys), "temperature": temp, "eps": eps,
                           "extra": dict(meta.extra_info)})
        return data, tq

    def compute_log_prob(self, meta, what="compute_log_prob"):
        data, tq = self._read(meta, what)
        temp = self.calls[-1]["temperature"]
        lps, ents = [], []
        for r, key in enumerate(meta.keys):
            resp, prompt = data["responses"][r], data["prompts"][r]
            t = torch.as_tensor(temp[r] if isinstance(temp, torch.Tensor) else float(temp), dtype=torch.float64)
            lp = fake_logp(resp, t) - self.shift.get(key, 0.0)
            pad = torch.zeros(len(prompt) - 1, dtype=torch.float64)
            lps.append(torch.cat([pad, lp, torch.zeros(1, dtype=torch.float64)]).float())
            ents.append(torch.cat([pad, fake_entropy(resp, t), torch.zeros(1, dtype=torch.float64)]).float())
        out = tu.get_tensordict({"log_probs": torch.nested.as_nested_tensor(lps, layout=torch.jagged),
                                 "entropy": torch.nested.as_nested_tensor(ents, layout=torch.jagged)})
        tq.kv_batch_put(keys=list(meta.keys), partition_id=meta.partition_id, fields=out)
        return meta

    def compute_ref_log_prob(self, meta):
        return self.compute_log_prob(meta, what="compute_ref_log_prob")

    def update_actor(self, meta):
        data, _ = self._read(meta, "update_actor")
        for r, key in enumerate(meta.keys):
            self.shift[key] = self.shift.get(key, 0.0) + fake_shift(data["responses"][r], float(data["agpo_eps"][r]))
        return {"metrics": {"mfu": 0.0, "pg_loss": 0.0}}

    def save_checkpoint(self, *args, **kwargs):
        self.saved.append(args)

    load_checkpoint = save_checkpoint


class Sleeper:  # verl's checkpoint manager: sleeps and wakes the rollout replicas
    def __init__(self):
        self.calls = []
        self.sleep_replicas = lambda: self.calls.append("sleep")
        self.update_weights = lambda step: self.calls.append(("update", step))


class Loader:  # the dataloader's checkpoint state
    state_dict, load_state_dict = staticmethod(lambda: {"pos": 0}), staticmethod(lambda state: None)


def prompts():
    i = 0
    while True:
        yield {"raw_prompt": np.array([[{"role": "user", "content": f"q{i + j}"}] for j in range(P)], dtype=object),
               "index": np.arange(i, i + P), "data_source": np.array(["t"] * P, dtype=object)}
        i += P


@pytest.fixture(scope="module")
def tq_ray():
    import ray
    import transfer_queue as tq

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    tq.init()
    yield
    tq.close()
    ray.shutdown()


def make_trainer(cfg, seed, tq_ray):  # verl's trainer, fakes where its init would start GPU workers
    from agpo.integrations.verl.trainer import AGPOTrainer

    tr = AGPOTrainer(cfg)
    tr.tokenizer, tr.actor_rollout_wg = Tokenizer(), ActorWG()
    tr.ref_policy_wg, tr.ref_in_actor = tr.actor_rollout_wg, False
    tr.reward_loop_manager = type("R", (), {"reward_loop_worker_handles": ["streaming"]})()
    tr.checkpoint_manager, tr.agent_loop_manager = Sleeper(), Rollout(seed)
    tr.train_dataloader, tr.train_dataloader_it = Loader(), prompts()
    tr.global_steps, tr.timing_raw, tr.curr_step_profile, tr.distillation_config = 1, {}, False, None
    return tr


def run_step(tr, clear=True):
    import transfer_queue as tq

    metrics, tr.timing_raw = {}, {}
    batch = tr.step(metrics, tr.timing_raw)
    tr.on_step_end()
    if clear:  # as fit() does after the step
        tq.kv_clear(keys=batch.keys, partition_id=batch.partition_id)
    tr.global_steps += 1
    return batch, metrics


def _step_expectations(tr, ctl: AGPOController, rollout_before: int):
    """Drive ``ctl`` (agpo's own controller) in agpo.train's order from what the fake rollout
    produced this step; returns ``(tau, eps)``."""
    roll = tr.agent_loop_manager
    probe, train = roll.calls[rollout_before], roll.calls[rollout_before + 1]
    rewards = [[roll.rows[f"{u}_{s}_0"][1] for s in range(K)] for u in probe["uids"]]
    texts = [[Tokenizer().decode(roll.rows[f"{u}_{s}_0"][0].tolist()) for s in range(K)] for u in probe["uids"]]
    tau = ctl.probe_step(torch.tensor(rewards, dtype=torch.float64), texts)
    # the clip's entropy: token mean per train group at T=1 (agpo.train's default entropy_temperature="one")
    ents = []
    for u in train["uids"]:
        toks = torch.cat([roll.rows[f"{u}_{s}_0"][0] for s in range(G)])
        ents.append(float(fake_entropy(toks, torch.tensor(1.0, dtype=torch.float64)).mean()))
    eps = ctl.clip_step(torch.tensor(ents, dtype=torch.float64))
    kls = []
    for p, u in enumerate(train["uids"]):
        toks = torch.cat([roll.rows[f"{u}_{s}_0"][0] for s in range(G)])
        kls.append(float(fake_shift(toks, float(eps[p])).mean()))  # old - new = the update's shift
    ctl.update_step_kl(torch.tensor(kls, dtype=torch.float64))
    return tau, eps


def test_three_steps_match_agpo_controller_and_reach_the_worker(tq_ray, tmp_path):
    cfg = verl_config(*base_overrides(tmp_path))
    tr = make_trainer(cfg, seed=11, tq_ray=tq_ray)
    ref = AGPOController(ControllerConfig())
    wg, roll = tr.actor_rollout_wg, tr.agent_loop_manager
    for step in range(3):
        c0, r0 = len(wg.calls), len(roll.calls)
        _, metrics = run_step(tr)
        tau, eps = _step_expectations(tr, ref, r0)
        probe, train = roll.calls[r0], roll.calls[r0 + 1]
        # submissions: probe at tau_base with n = probe size, train with n = G at tau[p], same prompts
        assert probe["n"] == K and train["n"] == G
        assert probe["temps"] == [1.0] * P
        torch.testing.assert_close(torch.tensor(train["temps"]), tau, rtol=0, atol=1e-6)
        assert [str(x) for x in probe["raw"]] == [str(x) for x in train["raw"]]
        assert not set(probe["uids"]) & set(train["uids"])
        # the worker calls, in order: old log-prob, ref, T=1 entropy, update, step-KL pass
        calls = wg.calls[c0:]
        assert [c["what"] for c in calls] == ["compute_log_prob", "compute_ref_log_prob", "compute_log_prob",
                                              "update_actor", "compute_log_prob"]
        row_tau = {u: float(t) for u, t in zip(train["uids"], tau)}
        for c in (calls[0], calls[1], calls[3], calls[4]):  # the per-row temperature reached the worker
            assert isinstance(c["temperature"], torch.Tensor), (c["what"], c["temperature"])
            want = torch.tensor([row_tau[k.split("_")[0]] for k in c["keys"]])
            torch.testing.assert_close(c["temperature"], want, rtol=0, atol=1e-6)
            assert "temperature" not in c["extra"]
        assert calls[2]["temperature"] == 1.0  # the clip's entropy at T=1, on purpose
        # the update saw eps[p] on each row of prompt p
        row_eps = {u: float(e) for u, e in zip(train["uids"], eps)}
        want = [row_eps[k.split("_")[0]] for k in calls[3]["keys"]]
        assert calls[3]["eps"] == pytest.approx(want, abs=1e-6)
        # metrics named as agpo.train's
        assert metrics["tau/mean"] == pytest.approx(float(tau.mean()), abs=1e-6)
        assert metrics["eps/max"] == pytest.approx(float(eps.max()), abs=1e-6)
        assert metrics["kl/step_ema"] == pytest.approx(ref.step_kl_ema, rel=1e-6)
        assert metrics["tokens/generated_probe"] == sum(len(roll.rows[f"{u}_{s}_0"][0]) for u in probe["uids"]
                                                        for s in range(K))
        assert tr.checkpoint_manager.calls[-2:] == ["sleep", ("update", tr.global_steps - 1)]
    # the controllers moved (a trajectory of constants would prove nothing)
    assert ref.step_kl_ema > 0 and len({round(float(t), 6) for t in torch.tensor(roll.calls[-1]["temps"])}) > 1
    sa, sb = tr.controller.state_dict(), ref.state_dict()
    assert [sa[k] for k in ("baseline", "step_kl_ema", "h_ref")] == pytest.approx(
        [sb[k] for k in ("baseline", "step_kl_ema", "h_ref")], rel=1e-6, abs=1e-9)
    assert (sa["h_count"], sa["kl_steps"]) == (sb["h_count"], sb["kl_steps"])


def test_verl_stock_methods_let_the_scalar_win(tq_ray, tmp_path):
    """The guard's test can fail: on the same batch, verl's own PPOTrainer methods deliver the
    scalar rollout temperature to the worker in place of the per-row field."""
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    cfg = verl_config(*base_overrides(tmp_path))
    tr = make_trainer(cfg, seed=5, tq_ray=tq_ray)
    tr.prepare_step()
    batch, _ = tr.replay_buffer.sample(global_steps=1, partition_id="train", batch_size=P)
    batch = tr._balance_batch(batch, metrics={})
    tr._put_row_temperature(batch)
    PPOTrainer._compute_old_log_prob(tr, copy.deepcopy(batch), {})
    assert not isinstance(tr.actor_rollout_wg.calls[-1]["temperature"], torch.Tensor)
    tr._compute_old_log_prob(batch, {})
    assert isinstance(tr.actor_rollout_wg.calls[-1]["temperature"], torch.Tensor)
    import transfer_queue as tq

    tq.kv_clear(keys=batch.keys, partition_id="train")


@pytest.mark.parametrize("kind", ["std", "iqr"])
def test_probe_reuse_pools_probe_rows_and_pads_with_eps_base(tq_ray, tmp_path, kind):
    cfg = verl_config(*base_overrides(tmp_path, "+agpo.probe_reuse=true", f"+agpo.controller.dispersion={kind}"))
    tr = make_trainer(cfg, seed=3, tq_ray=tq_ray)
    wg, roll = tr.actor_rollout_wg, tr.agent_loop_manager
    c0 = len(wg.calls)
    batch, _ = run_step(tr, clear=False)
    probe, train = roll.calls[0], roll.calls[1]
    upd = [c for c in wg.calls[c0:] if c["what"] == "update_actor"][0]
    rows = len(upd["keys"])
    assert rows == 24  # P*(G+K) = 21 rows, padded to a multiple of ppo_mini_batch_size * n = 12
    of = dict(zip(probe["uids"], train["uids"]))
    group = {}
    for key, e, t in zip(upd["keys"], upd["eps"], upd["temperature"].tolist()):
        u = key.split("_")[0]
        if u in of:  # a probe row: its prompt's eps, sampled (and scored) at tau_base
            group.setdefault(of[u], set()).add(round(e, 6))
            assert t == pytest.approx(1.0)
        elif u in train["uids"]:
            group.setdefault(u, set()).add(round(e, 6))
        else:  # verl's padding rows
            assert u.startswith("pad") and e == pytest.approx(0.2)
    assert all(len(v) == 1 for v in group.values()) and len(group) == P
    # the estimator pooled each prompt's train and probe rows (one uid): agpo's group advantages over G + K
    import transfer_queue as tq

    from agpo.algo.stats import group_advantages

    keys = [k for k in upd["keys"] if not k.startswith("pad")]
    data = tq.kv_batch_get(keys=keys, partition_id="train", select_fields=["advantages", "uid"])
    adv = {k: float(a[0]) for k, a in zip(keys, data["advantages"].unbind())}
    for pu, tu_ in of.items():
        ks = [f"{tu_}_{s}_0" for s in range(G)] + [f"{pu}_{s}_0" for s in range(K)]
        want = group_advantages(torch.tensor([[roll.rows[k][1] for k in ks]], dtype=torch.float64), kind).view(-1)
        assert [adv[k] for k in ks] == pytest.approx(want.tolist(), abs=1e-5)
    tq.kv_clear(keys=batch.keys, partition_id=batch.partition_id)


def test_controller_checkpoint_round_trip(tq_ray, tmp_path):
    """Save after step 2; a fresh trainer resumed from it takes the same step 3 (tau, eps, state)."""
    cfg = verl_config(*base_overrides(tmp_path))
    a = make_trainer(cfg, seed=21, tq_ray=tq_ray)
    run_step(a)
    run_step(a)
    a.global_steps -= 1  # the step just taken (fit saves before it advances)
    a._save_checkpoint()
    a.global_steps += 1
    assert os.path.exists(tmp_path / "global_step_2" / "agpo_controller.pt")
    b = make_trainer(cfg, seed=0, tq_ray=tq_ray)
    b._load_checkpoint()  # verl's resume_mode=auto: the latest global_step_N
    assert b.global_steps == 2 and b.controller.state_dict() == a.controller.state_dict()
    assert a.controller.state_dict() != AGPOController(ControllerConfig()).state_dict()
    b.global_steps = a.global_steps
    b.agent_loop_manager, b.train_dataloader_it = Rollout(99), prompts()
    a.agent_loop_manager, a.train_dataloader_it = Rollout(99), prompts()
    run_step(a)
    run_step(b)
    for x, y in zip(a.agent_loop_manager.calls, b.agent_loop_manager.calls):
        assert x["temps"] == y["temps"] and x["n"] == y["n"]
    ea = [c["eps"] for c in a.actor_rollout_wg.calls if c["what"] == "update_actor"][-1]
    eb = [c["eps"] for c in b.actor_rollout_wg.calls if c["what"] == "update_actor"][-1]
    assert sorted(ea) == sorted(eb)
    assert a.controller.state_dict() == b.controller.state_dict()
    # a resume without the controller file is refused, naming the fix
    os.remove(tmp_path / "global_step_2" / "agpo_controller.pt")
    c = make_trainer(cfg, seed=0, tq_ray=tq_ray)
    with pytest.raises(FileNotFoundError, match=r"has no agpo_controller.pt .* trainer.resume_mode=disable"):
        c._load_checkpoint()


def test_both_controllers_off_is_grpo_without_a_probe(tq_ray, tmp_path):
    off = ("+agpo.controller.adaptive_clip=false", "+agpo.controller.adaptive_temp=false")
    tr = make_trainer(verl_config(*base_overrides(tmp_path, *off)), seed=7, tq_ray=tq_ray)
    run_step(tr)
    (call,) = tr.agent_loop_manager.calls  # no probe: one submission, G samples at tau_base
    assert call["n"] == G and call["temps"] == [1.0] * P
    upd = [c for c in tr.actor_rollout_wg.calls if c["what"] == "update_actor"][0]
    assert upd["eps"] == pytest.approx([0.2] * P * G) and upd["temperature"].tolist() == [1.0] * P * G


def test_loss_installed_is_agpo_ppo_loss_with_verls_actor_config(tq_ray, tmp_path):
    from verl.workers.config import ActorConfig

    from agpo_kernels.integrations.verl.losses import agpo_ppo_loss

    tr = make_trainer(verl_config(*base_overrides(tmp_path)), seed=0, tq_ray=tq_ray)
    tr._install_loss()
    fn = tr.actor_rollout_wg.loss_fn
    assert fn.func is agpo_ppo_loss and isinstance(fn.keywords["config"], ActorConfig)
    assert fn.keywords["config"].policy_loss.loss_mode == "agpo"


def test_a_short_probe_is_a_grpo_step_and_leaves_the_controller(tq_ray, tmp_path):
    """A probe sample that failed (verl keeps the group sampleable): that step samples at
    tau_base and clips at eps_base, as agpo.train does with unusable probe statistics; the
    temperature controller's state does not move, and the next step is AGPO again."""
    tr = make_trainer(verl_config(*base_overrides(tmp_path)), seed=11, tq_ray=tq_ray)
    roll, wg = tr.agent_loop_manager, tr.actor_rollout_wg
    roll.drop = {(0, 1, 0)}  # the first call is step 1's probe: prompt 1 loses its first sample
    before = tr.controller.state_dict()
    _, metrics = run_step(tr)
    assert roll.calls[1]["temps"] == [1.0] * P and metrics["probe/unusable"] == 1.0 and metrics["eps/unusable"] == 1.0
    upd = [c for c in wg.calls if c["what"] == "update_actor"][0]
    assert upd["eps"] == pytest.approx([0.2] * len(upd["eps"]))
    after = tr.controller.state_dict()
    assert (after["baseline"], after["probe_steps"], after["clip_steps"]) == (
        before["baseline"], before["probe_steps"], before["clip_steps"])
    _, metrics = run_step(tr)  # a whole probe again: the controllers act
    assert "probe/unusable" not in metrics and tr.controller.state_dict()["probe_steps"] == 1


def test_a_dataset_agent_name_column_is_refused(tq_ray, tmp_path):
    """verl prefers a prompt's agent_name column to default_agent_loop: another loop would
    sample at the rollout's temperature what the trainer scores at tau[p]."""
    tr = make_trainer(verl_config(*base_overrides(tmp_path)), seed=0, tq_ray=tq_ray)
    rows = prompts()
    tr.train_dataloader_it = ({**b, "agent_name": np.array(["tool_agent"] * P, dtype=object)} for b in rows)
    with pytest.raises(ValueError, match=r"^data: the prompts' agent_name column asks for \['tool_agent'\]; .*drop"):
        tr.prepare_step()

