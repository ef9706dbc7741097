"""The AGPO trainer on verl 0.9.1's V1 trainer: ``trainer.v1.trainer_mode=agpo_sync``.

``AGPOTrainer`` is verl's ``PPOTrainerSync`` (colocated rollout, one weight sync per step)
with the order of ``agpo.train``'s step (docs/algorithm.md#one-training-step):

1. ``prepare_step``: the step's ``P`` prompts are submitted as the probe (``__rollout_n__`` =
   ``probe_size`` samples each, ``agpo_temperature`` = ``tau_base``); the trainer waits for
   their groups with verl's replay buffer (sync mode: the ``train`` partition holds nothing
   else), sums each row's ``rm_scores``, decodes the responses, and runs
   ``controller.probe_step`` on the driver in the fixed prompt order -> ``tau[P]``. The same
   prompts go out again, under fresh uids, as the train groups (``rollout.n`` samples each,
   ``agpo_temperature`` = ``tau[p]``: the agent loop ``agpo_single_turn`` puts it in each
   request). The probe rows are then cleared, or kept with ``probe_reuse``.
2. ``_step_once``: the train groups (and the reused probe rows, their ``uid`` rewritten to
   the prompt's train uid, so the estimator pools them) are sampled and balanced; every row
   gets a per-row ``temperature`` field in TransferQueue (its sampling temperature;
   padding rows ``tau_base``); old and reference log-probs are scored at it.
3. ``_clip``: per-group token-mean policy entropy of the train rows (a T=1 pass with
   ``entropy_temperature="one"``, agpo's default; else the old-log-prob pass's) ->
   ``controller.clip_step`` -> per-row ``agpo_eps`` (``eps[p]`` for every row of prompt
   ``p``, ``eps_base`` for padding), read by ``agpo_ppo_loss``, which ``_setup`` installs.
4. advantages (verl's, with the ``agpo`` estimator), the actor update, then one more
   log-prob pass at the rows' temperatures: per-group token-mean ``old - new`` of the train
   rows -> ``controller.update_step_kl`` (``kl/step`` is logged with either controller).

The scalar-temperature trap: verl's V1 methods write ``extra_info["temperature"] =
rollout.temperature``, which the worker (``verl.utils.transferqueue_utils._async_meta_to_realdata``)
assigns over the fetched fields, so it would silently replace the per-row tensor. Every worker call that scores
the policy at the rows' temperatures gets an ``extra_info`` that refuses the key
(``RowTemperatureInfo``); the T=1 entropy pass is the one call that sends a scalar, on
purpose.

The controller's state goes into verl's checkpoint folder (``global_step_N/agpo_controller.pt``)
and comes back on resume. Metrics use agpo.train's names where they exist (``tau/*``,
``eps/*``, ``kl/step``, ``probe/*``, ``controller/*``, ``tokens/generated_*``).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import uuid

import torch
import transfer_queue as tq
from tensordict import TensorDict
from transfer_queue import KVBatchMeta
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync
from verl.utils import tensordict_utils as tu
from verl.utils.config import omega_conf_to_dataclass
from verl.utils.debug import marked_timer
from verl.workers.utils.padding import response_from_nested

from agpo.algo.controllers import AGPOController, step_kl
from agpo.integrations.verl.checks import TRAINER_NAME, check_config
from agpo_kernels.integrations.verl.advantages import settings as advantage_settings
from agpo_kernels.integrations.verl.agent_loop import NAME as AGENT_LOOP
from agpo_kernels.integrations.verl.agent_loop import TEMPERATURE_KEY
from agpo_kernels.integrations.verl.losses import ROW_EPS_KEY, agpo_ppo_loss

logger = logging.getLogger(__name__)

STATE_FILE = "agpo_controller.pt"
"""What the AGPO trainer adds to verl's ``global_step_N`` checkpoint folder."""
ROW_TEMPERATURE_FIELD = "temperature"
"""The TransferQueue field verl's engine reads as the per-row temperature."""


class RowTemperatureInfo(dict):
    """A batch's ``extra_info`` that drops any ``temperature`` written into it, so the
    per-row ``temperature`` field reaches the worker (module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.update(*args, **kwargs)

    def __setitem__(self, key, value):
        if key != ROW_TEMPERATURE_FIELD:
            super().__setitem__(key, value)

    def update(self, *args, **kwargs):
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return self.get(key)


def _uid(key: str) -> str:
    return key.split("_", 1)[0]


def _stats(prefix: str, t: torch.Tensor) -> dict[str, float]:
    t = t.double()
    return {f"{prefix}/mean": float(t.mean()), f"{prefix}/sd": float(t.std()) if t.numel() > 1 else 0.0,
            f"{prefix}/min": float(t.min()), f"{prefix}/max": float(t.max())}


@register_trainer(TRAINER_NAME)
class AGPOTrainer(PPOTrainerSync):
    """verl's sync V1 trainer running the AGPO step (module docstring)."""

    def __init__(self, config):
        self.agpo = check_config(config)
        self.controller = AGPOController(self.agpo.controller)
        self.group_size, self.probe_size = self.agpo.group_sizes(config.actor_rollout_ref.rollout.n)
        self.agpo_order: list[str] = []          # this step's train uids, in the controller's prompt order
        self.agpo_tau: dict[str, float] = {}     # train uid -> its temperature
        self.agpo_probe_of: dict[str, str] = {}  # reused probe uid -> the prompt's train uid
        self._probe_meta: KVBatchMeta | None = None
        self._probe_usable = True                # this step's probe gave finite statistics for every prompt
        self.agpo_tokens = {"probe": 0, "train": 0}
        super().__init__(config)

    def _build_replay_buffer(self):
        self.trainer_mode = "sync"  # verl's sync semantics: its replay buffer, no TransferQueue checkpoint
        return super()._build_replay_buffer()

    def _setup(self):
        super()._setup()
        self._install_loss()

    def _install_loss(self) -> None:
        """The actor's loss: ``agpo_ppo_loss`` (verl's ``ppo_loss`` with the rows' ``agpo_eps``)."""
        actor = omega_conf_to_dataclass(self.config.actor_rollout_ref.actor)
        self.actor_rollout_wg.set_loss_fn(functools.partial(agpo_ppo_loss, config=actor))

    # -- the probe and the submissions ----------------------------------------------------
    def _submit_phase(self, prompts: TensorDict, uids: list[str], n: int, tau: torch.Tensor) -> None:
        if "agent_name" in prompts.keys():  # a dataset column verl prefers to default_agent_loop
            names = {str(x) for x in prompts["agent_name"]}
            if names != {AGENT_LOOP}:
                raise ValueError(f"data: the prompts' agent_name column asks for {sorted(map(str, names))}; AGPO's "
                                 f"per-prompt temperature reaches the server only through {AGENT_LOOP!r}: drop the "
                                 "column from the dataset")
        batch = prompts.clone()
        tu.assign_non_tensor_stack(batch, "uid", list(uids))
        tu.assign_non_tensor_data(batch, "__rollout_n__", int(n))
        batch[TEMPERATURE_KEY] = tau.to(torch.float32).clone()
        self._submit_batch_to_rollout(batch)

    def prepare_step(self) -> dict:
        cfg = self.agpo.controller
        prompts = self._next_train_batch()
        P = len(prompts)
        probe_uids = list(prompts["uid"])
        m: dict[str, float] = {}
        self._probe_meta, self.agpo_probe_of = None, {}
        if cfg.needs_probe:
            self._submit_phase(prompts, probe_uids, self.probe_size, torch.full((P,), cfg.tau_base))
            meta, _ = self.replay_buffer.sample(global_steps=self.global_steps, partition_id="train", batch_size=P)
            if self.reward_loop_manager.reward_loop_worker_handles is None:
                meta = self._compute_reward_colocate(meta, metrics=m)
            rewards, texts, tokens = self._read_probe(meta, probe_uids)
            self.agpo_tokens["probe"] += tokens
            m["tokens/generated_probe"] = float(tokens)
            tau = None
            if rewards is not None and bool(torch.isfinite(rewards).all()):
                tau = self.controller.probe_step(rewards, texts, extract=self.agpo.vote_extract)
                m.update({"probe/reward_mean": float(rewards.mean()),
                          "probe/zero_std_frac": float((rewards.std(1) < 1e-12).double().mean()),
                          "probe/vote_entropy": self.controller.metrics().get("probe/entropy", math.nan)})
            self._probe_usable = tau is not None and bool(torch.isfinite(tau).all())
            if not self._probe_usable:  # no usable probe: a GRPO step (tau_base, eps_base), as agpo.train
                logger.warning("AGPO step %s: the probe came back incomplete or non-finite; this step samples at "
                               "tau_base and clips at eps_base", self.global_steps)
                tau = torch.full((P,), cfg.tau_base)
                m["probe/unusable"] = 1.0
        else:  # plain GRPO: no probe
            tau, meta, self._probe_usable = torch.full((P,), cfg.tau_base), None, True
        train_uids = [uuid.uuid4().hex for _ in range(P)]  # no "_": verl's keys are uid_session_index
        if meta is not None and self.agpo.probe_reuse:
            self._probe_meta = meta
            self.agpo_probe_of = dict(zip(probe_uids, train_uids))
        elif meta is not None:
            tq.kv_clear(keys=meta.keys, partition_id=meta.partition_id)
        self.agpo_order = train_uids
        self.agpo_tau = dict(zip(train_uids, tau.tolist()))
        self._submit_phase(prompts, train_uids, self.group_size, tau)
        m.update(_stats("tau", tau))
        return m

    def _read_probe(self, meta: KVBatchMeta, uids: list[str]):
        """``(rewards [P, k], P lists of k texts, generated tokens)`` of the probe, prompt order;
        rewards and texts None when a prompt came back short (a failed session)."""
        data = tq.kv_batch_get(keys=meta.keys, partition_id=meta.partition_id, select_fields=["rm_scores", "responses"])
        scores, responses = data["rm_scores"].unbind(), data["responses"].unbind()
        last: dict[tuple[str, int], tuple[int, int]] = {}  # (uid, session) -> (output index, row): the final output
        for row, key in enumerate(meta.keys):
            uid, session, index = key.rsplit("_", 2)
            if (uid, int(session)) not in last or last[(uid, int(session))][0] < int(index):
                last[(uid, int(session))] = (int(index), row)
        groups: dict[str, list[int]] = {}
        for (uid, _), (_, row) in sorted(last.items()):  # sessions in order
            groups.setdefault(uid, []).append(row)
        rewards, texts, tokens = [], [], 0
        for uid in uids:
            rows = groups.get(uid, [])
            tokens += sum(int(responses[r].numel()) for r in rows)
            if len(rows) != self.probe_size:
                logger.warning("probe: prompt %s came back with %d of %d samples (a failed rollout)", uid, len(rows),
                               self.probe_size)
                rewards = None
            if rewards is None:
                continue
            rewards.append([float(scores[r].sum()) for r in rows])
            texts.append([self.tokenizer.decode(responses[r].tolist(), skip_special_tokens=True) for r in rows])
        if rewards is None:
            return None, None, tokens
        return torch.tensor(rewards, dtype=torch.float64), texts, tokens

    # -- the step ---------------------------------------------------------------------------
    def _step_once(self, metrics: dict, timing_raw: dict, sample_batch_size: int) -> KVBatchMeta:
        with marked_timer("gen", timing_raw, color="red"):
            self.on_sample_begin()
            batch, sample_metrics = self.replay_buffer.sample(global_steps=self.global_steps, partition_id="train",
                                                              batch_size=sample_batch_size)
            metrics.update(sample_metrics)
            self.on_sample_end()
        if self.reward_loop_manager.reward_loop_worker_handles is None:
            with marked_timer("reward", timing_raw, color="yellow"):
                batch = self._compute_reward_colocate(batch, metrics=metrics)
        batch = self._with_probe_rows(batch)
        batch = self._balance_batch(batch, metrics=metrics)
        self._put_row_temperature(batch)
        with marked_timer("old_log_prob", timing_raw, color="blue"):
            batch = self._compute_old_log_prob(batch, metrics=metrics)
        if self.use_reference_policy:
            with marked_timer("ref", timing_raw, color="olive"):
                batch = self._compute_ref_log_prob(batch, metrics=metrics)
        if self.use_critic:
            with marked_timer("values", timing_raw, color="cyan"):
                batch = self._compute_values(batch, metrics=metrics)
        with marked_timer("agpo_clip", timing_raw, color="green"):
            batch = self._clip(batch, metrics)
        with marked_timer("adv", timing_raw, color="brown"):
            batch = self._compute_advantage(batch, metrics=metrics)
        if self.use_critic:
            with marked_timer("update_critic", timing_raw, color="pink"):
                batch = self._update_critic(batch, metrics=metrics)
        if self.config.trainer.critic_warmup <= self.global_steps:
            with marked_timer("update_actor", timing_raw, color="red"):
                batch = self._update_actor(batch, metrics=metrics)
            with marked_timer("agpo_step_kl", timing_raw, color="green"):
                self._step_kl(batch, metrics)
        train = sum(1 for k in batch.keys if _uid(k) in self.agpo_tau)
        metrics.update(self.controller.metrics())
        metrics["tokens/generated_train"] = float(self._train_tokens(batch))
        metrics["tokens/generated_total"] = float(sum(self.agpo_tokens.values()))
        metrics["agpo/train_rows"] = float(train)
        return batch

    def _train_tokens(self, batch: KVBatchMeta) -> int:
        n = sum(int(t.get("response_len", 0)) for k, t in zip(batch.keys, batch.tags) if _uid(k) in self.agpo_tau)
        self.agpo_tokens["train"] += n
        return n

    def _with_probe_rows(self, batch: KVBatchMeta) -> KVBatchMeta:
        """``probe_reuse``: the probe rows join the batch under their prompt's train uid."""
        probe, self._probe_meta = self._probe_meta, None
        if probe is None:
            return batch
        uids = [self.agpo_probe_of[_uid(k)] for k in probe.keys]
        fields = TensorDict({}, batch_size=len(uids))
        tu.assign_non_tensor_stack(fields, "uid", uids)
        tq.kv_batch_put(keys=probe.keys, partition_id=probe.partition_id, fields=fields)
        return KVBatchMeta(partition_id=batch.partition_id, keys=batch.keys + probe.keys,
                           tags=batch.tags + probe.tags, fields=batch.fields, extra_info=batch.extra_info)

    def _row_group(self, key: str) -> str | None:
        """The train uid a row belongs to (a reused probe row: its prompt's); None: padding."""
        uid = _uid(key)
        return uid if uid in self.agpo_tau else self.agpo_probe_of.get(uid)

    def _put_row_temperature(self, batch: KVBatchMeta) -> None:
        """Each row's sampling temperature as the TransferQueue field ``temperature``."""
        base = self.agpo.controller.tau_base
        temps = torch.tensor([self.agpo_tau.get(_uid(k), base) for k in batch.keys], dtype=torch.float32)
        tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id,
                        fields=TensorDict({ROW_TEMPERATURE_FIELD: temps}, batch_size=len(batch)))

    @staticmethod
    def _guard(batch: KVBatchMeta) -> KVBatchMeta:
        batch.extra_info = RowTemperatureInfo(batch.extra_info or {})
        return batch

    def _compute_old_log_prob(self, batch, metrics):
        return super()._compute_old_log_prob(self._guard(batch), metrics)

    def _compute_ref_log_prob(self, batch, metrics):
        return super()._compute_ref_log_prob(self._guard(batch), metrics)

    def _update_actor(self, batch, metrics):
        return super()._update_actor(self._guard(batch), metrics)

    def _compute_advantage(self, batch, metrics):
        cfg = self.agpo.controller  # the estimator "agpo" with the controller's dispersion and floor
        with advantage_settings(cfg.dispersion, cfg.adv_floor):
            return super()._compute_advantage(batch, metrics)

    def _score(self, batch: KVBatchMeta, extra_info: dict, field: str) -> dict[str, torch.Tensor]:
        """One ``compute_log_prob`` pass; ``field`` (response-aligned) of the train rows, by uid."""
        meta = KVBatchMeta(partition_id=batch.partition_id, keys=list(batch.keys), tags=list(batch.tags),
                           fields=batch.fields, extra_info=extra_info)
        self.actor_rollout_wg.compute_log_prob(meta)
        keys = [k for k in batch.keys if _uid(k) in self.agpo_tau]
        data = tq.kv_batch_get(keys=keys, partition_id=batch.partition_id,
                               select_fields=[field, "response_mask", "old_log_probs"])
        values = response_from_nested(data[field], data["response_mask"]).unbind()
        old = data["old_log_probs"].unbind()
        return {"keys": keys, "values": values, "old": old, "mask": data["response_mask"].unbind()}

    def _group_means(self, scored: dict, what) -> torch.Tensor:
        """Per-group token mean of ``what(values, old)`` over the train rows, in prompt order."""
        num = dict.fromkeys(self.agpo_order, 0.0)
        den = dict.fromkeys(self.agpo_order, 0.0)
        for key, v, o, m in zip(scored["keys"], scored["values"], scored["old"], scored["mask"]):
            m = m.to(torch.float64)
            num[_uid(key)] += float((what(v.double(), o.double()) * m).sum())
            den[_uid(key)] += float(m.sum())
        return torch.tensor([num[u] / max(den[u], 1.0) for u in self.agpo_order], dtype=torch.float64)

    def _clip(self, batch: KVBatchMeta, metrics: dict) -> KVBatchMeta:
        """The adaptive clip: per-group entropy -> ``clip_step`` -> per-row ``agpo_eps``."""
        cfg = self.agpo.controller
        if cfg.entropy_temperature == "one":  # the scalar wins on the worker here, on purpose: H at T=1
            info = {"calculate_entropy": True, "compute_loss": False, ROW_TEMPERATURE_FIELD: 1.0}
        else:
            info = RowTemperatureInfo(calculate_entropy=True, compute_loss=False)
        entropy = self._group_means(self._score(batch, info, "entropy"), lambda v, o: v)
        usable = bool(torch.isfinite(entropy).all()) and (self._probe_usable or not cfg.adaptive_clip)
        if usable:
            eps = self.controller.clip_step(entropy)
        else:  # no usable probe or entropy: eps_base, the controller untouched (agpo.train does the same)
            eps = torch.full((len(self.agpo_order),), cfg.eps_base, dtype=torch.float64)
            metrics["eps/unusable"] = 1.0
        by_uid = dict(zip(self.agpo_order, eps.tolist()))
        rows = torch.tensor([by_uid.get(self._row_group(k), cfg.eps_base) for k in batch.keys], dtype=torch.float32)
        tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id,
                        fields=TensorDict({ROW_EPS_KEY: rows}, batch_size=len(batch)))
        metrics.update({**_stats("eps", eps), "policy/entropy_groups": float(entropy.mean())})
        return batch

    def _step_kl(self, batch: KVBatchMeta, metrics: dict) -> None:
        """After the update: per-group token-mean ``old - new`` -> ``update_step_kl``."""
        info = RowTemperatureInfo(calculate_entropy=False, compute_loss=False)
        kl = self._group_means(self._score(batch, info, "log_probs"), lambda new, old: old - new)
        if not bool(torch.isfinite(kl).all()):
            metrics["kl/step"] = math.nan
            return
        ctl = self.controller  # measured for every algorithm; only the clip controller feeds on it
        metrics["kl/step"] = ctl.update_step_kl(kl) if ctl.config.adaptive_clip else step_kl(kl)
        metrics["kl/step_ema"] = ctl.step_kl_ema

    # -- checkpoints --------------------------------------------------------------------
    def agpo_state(self) -> dict:
        """What a checkpoint needs to continue the controller exactly."""
        return {"controller": self.controller.state_dict(), "tokens": dict(self.agpo_tokens)}

    def load_agpo_state(self, state: dict) -> None:
        self.controller.load_state_dict(state["controller"])
        self.agpo_tokens = {k: int(v) for k, v in state["tokens"].items()}

    def _save_checkpoint(self):
        folder = os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")
        os.makedirs(folder, exist_ok=True)
        torch.save(self.agpo_state(), os.path.join(folder, STATE_FILE))  # before verl marks the step complete
        super()._save_checkpoint()

    def _load_checkpoint(self):
        super()._load_checkpoint()
        if not self.global_steps:  # a fresh start
            return
        trainer = self.config.trainer  # the folder verl resumed from
        folder = (trainer.resume_from_path if trainer.resume_mode == "resume_path"
                  else os.path.join(trainer.default_local_dir, f"global_step_{self.global_steps}"))
        path = os.path.join(os.path.abspath(folder), STATE_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"trainer.resume_mode: {os.path.dirname(path)} has no {STATE_FILE} (not written "
                                    "by the AGPO trainer); resume it with the trainer that wrote it, or set "
                                    "trainer.resume_mode=disable")
        self.load_agpo_state(torch.load(path, map_location="cpu", weights_only=True))
