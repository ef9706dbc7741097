"""Full AGPO inside TRL's ``GRPOTrainer``: the probe group, the per-prompt temperature and the
per-group clip, all in ``trainer.train()``.

    from agpo.integrations.trl import AGPOTRLConfig, AGPOTrainer

    trainer = AGPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...,
                          agpo=AGPOTRLConfig())
    trainer.train()

``AGPOTrainer`` is ``agpo_kernels.integrations.trl.AGPOGRPOTrainer`` (the fused loss, equal
to TRL's) with TRL's ``rollout_func`` set to the AGPO rollout. Each generation batch (TRL
hands this process its prompts, each repeated ``num_generations`` times) runs the order of
``agpo.train``'s step (docs/algorithm.md#one-training-step):

1. the step KL of the previous batch: its old log-probs against the policy after the
   update, per-group token means -> ``controller.update_step_kl``;
2. probe: ``probe_size`` samples per prompt at ``tau_base`` with agpo's per-row-temperature
   sampler (``agpo.rollout.hf``, counter-based noise keyed by the global step), scored by the
   trainer's own reward functions -> ``controller.probe_step`` (reward dispersion, skew,
   vote entropy of the answers) -> tau per prompt;
3. the train group: ``num_generations`` samples of prompt ``p`` at ``tau[p]``, returned to
   TRL, which scores their rewards (``probe_reuse``: the train group is
   ``num_generations - probe_size`` of them and the probe rows follow it, trained too, with
   advantages pooled over both, as ``agpo.train --probe-reuse``);
4. old and reference log-probs are scored at each row's temperature (the fused head, no
   logits: TRL's own scoring has its one ``temperature``); advantages are agpo's group
   advantages; the rows' token-mean entropy per group -> ``controller.clip_step`` -> eps
   per group, written per row into ``eps_low``/``eps_high``, with ``temperature`` per row;
5. the fused loss applies them.

The controller sees the whole step's groups (gathered over processes, in global order) so
every process holds the same state. Its state, the pending step-KL batch and the token
counts go into TRL's checkpoints (``agpo_state.pt``) and come back on resume, so a resumed
run takes the same next step. The probe's generated tokens are logged
(``agpo/probe_tokens``, ``agpo/generated_tokens``: the paper's accounting charges them).

Generation runs through agpo's HF sampler only: TRL's vLLM paths send one
``SamplingParams`` per call, so ``use_vllm=True`` is refused (``python -m agpo.train
--rollout vllm`` samples per-prompt temperatures with vLLM).
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import torch
from accelerate.utils import gather_object
from trl import GRPOTrainer

from agpo.algo.controllers import AGPOController, ControllerConfig, step_kl
from agpo.rollout.hf import left_padded, sample_encoded
from agpo_kernels.integrations.trl import AGPOClipCallback, AGPOGRPOTrainer, _group_mean, add_hidden_forward
from agpo_kernels.linear_logprobs import linear_logprobs

STATE_FILE = "agpo_state.pt"
"""What ``AGPOTrainer`` adds to a TRL checkpoint folder."""


@dataclasses.dataclass(kw_only=True)
class AGPOTRLConfig:
    """AGPO's part of a TRL run (TRL's ``GRPOConfig`` keeps the rest)."""

    controller: ControllerConfig = dataclasses.field(default_factory=ControllerConfig)
    """The two controllers (docs/algorithm.md); ``tau_base`` replaces TRL's ``temperature``."""
    probe_size: int | None = None
    """Probe samples per prompt (None: ``num_generations``, or half of it with ``probe_reuse``)."""
    extract: str = "default"
    """Answer extractor for the vote entropy: "default" (the controller's ``vote_keys``)."""
    seed: int = 0
    """Seed of the sampling noise (each row's noise is keyed by seed, global step, phase and row)."""
    probe_reuse: bool = False
    """Train on the probe rows too (``agpo.train --probe-reuse``): each prompt's
    ``num_generations`` rows are then its train group (``num_generations - probe_size`` rows
    at its temperature) followed by its probe (``probe_size`` rows at ``tau_base``), with
    advantages pooled over both; eps comes from the train rows' entropy. Off unless set, though
    ``agpo.train`` reuses by default: here it changes what ``num_generations`` counts."""
    stop: str | None = None
    """A stop string for plain-text prompts (a base model that goes on to invent the next
    question): generation stops there, and the completion is cut at it for the answers."""

    def __post_init__(self) -> None:
        if not isinstance(self.controller, ControllerConfig):
            raise TypeError(f"controller: expected a ControllerConfig, got {type(self.controller).__name__}")
        if self.probe_size is not None and (isinstance(self.probe_size, bool) or not isinstance(self.probe_size, int)
                                            or self.probe_size < 2):
            raise ValueError(f"probe_size: expected an int >= 2 or None, got {self.probe_size!r}")
        if self.probe_reuse and not self.controller.needs_probe:
            raise ValueError("probe_reuse: both controllers are off, so there is no probe to reuse")

    def split(self, num_generations: int) -> tuple[int, int]:
        """``(train rows, probe rows)`` per prompt; with ``probe_reuse`` both are among TRL's
        ``num_generations`` rows, else the probe is drawn beside them."""
        if not self.probe_reuse:
            return num_generations, self.probe_size or num_generations
        probe = self.probe_size or num_generations // 2
        if num_generations - probe < 2 or probe < 2:
            raise ValueError(f"probe_reuse: num_generations {num_generations} = train rows + probe_size {probe} "
                             "needs >= 2 of each; raise num_generations or change probe_size")
        return num_generations - probe, probe


class AGPOTrainer(AGPOGRPOTrainer):
    """``AGPOGRPOTrainer`` running the whole AGPO step (see the module docstring)."""

    def __init__(self, *args, agpo: AGPOTRLConfig | None = None, **kwargs):
        if kwargs.get("rollout_func") is not None:
            raise ValueError("rollout_func: AGPOTrainer brings its own (the AGPO probe and per-prompt temperature)")
        self.agpo = agpo if agpo is not None else AGPOTRLConfig()
        if not isinstance(self.agpo, AGPOTRLConfig):
            raise TypeError(f"agpo: expected an AGPOTRLConfig, got {type(self.agpo).__name__}")
        _check_args(kwargs.get("args", args[2] if len(args) > 2 else None))  # (model, reward_funcs, args)
        self.controller = AGPOController(self.agpo.controller)
        super().__init__(*args, rollout_func=_agpo_rollout, **kwargs)
        self.agpo_rows = self.agpo.split(self.num_generations)  # (train, probe) rows per prompt
        self._check_setup()
        if self.ref_model is not None:
            add_hidden_forward(self.ref_model)
        self._agpo_inputs = None      # the dataset rows of the batch being generated
        self._agpo_rows_tau = None    # [B] sampling temperature of the rows being scored
        self._agpo_pending = None     # (rows, tau, old logp) of the last batch, for its step KL
        self.agpo_tokens = {"probe": 0, "train": 0}
        self.agpo_last = {}

    def _check_setup(self) -> None:
        """One line naming the fix for a setup that cannot run AGPO."""
        if any(isinstance(cb, AGPOClipCallback) for cb in self.callback_handler.callbacks):
            raise ValueError("callbacks: AGPOClipCallback runs the clip alone; AGPOTrainer runs both controllers "
                             "itself: drop the callback")
        plain = dict(top_k=(self.top_k in (None, 0, -1)), min_p=self.min_p in (None, 0.0),
                     repetition_penalty=self.repetition_penalty in (None, 1.0))
        if not all(plain.values()):
            bad = ", ".join(k for k, ok in plain.items() if not ok)
            raise ValueError(f"{bad}: AGPO samples plain temperature (optionally top_p), the distribution its loss "
                             f"scores; leave {bad} at its default")
        if self.agpo_fallback:
            raise ValueError(f"AGPOTrainer: {self.agpo_fallback} needs TRL's own loss, which has one temperature "
                             "and one clip range; change that setting to run AGPO")
        if self.temperature != self.agpo.controller.tau_base:
            warnings.warn(f"GRPOConfig.temperature {self.temperature} is not used: AGPO samples the probe at "
                          f"tau_base {self.agpo.controller.tau_base} and each prompt at its own temperature",
                          UserWarning, stacklevel=3)

    # --- the generation batch ---------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        if not self.model.training:  # evaluation: samples at tau_base, no controller
            try:
                return super()._generate_and_score_completions(inputs)
            finally:
                self._agpo_rows_tau, self._agpo_rewards = None, None
        self._agpo_step_kl()
        self._agpo_inputs = inputs
        try:  # TRL's own: rollout (ours) -> rewards (stashed by _calculate_rewards) -> scoring
            batch = GRPOTrainer._generate_and_score_completions(self, inputs)
            tau = self._agpo_rows_tau.to(batch["completion_ids"].device)
        finally:
            self._agpo_inputs, self._agpo_rows_tau = None, None
        batch["temperature"] = tau
        rewards, _ = self._agpo_rewards
        self._agpo_rewards = None
        G, (Gt, _) = self.num_generations, self.agpo_rows
        # group-relative advantages over each prompt's rows (train and, with probe_reuse, probe: pooled)
        adv = self.controller.advantages(rewards.view(-1, G).float()).reshape(-1)
        batch["advantages"] = adv.to(batch["advantages"].device, batch["advantages"].dtype)
        at_one = self.controller.config.entropy_temperature == "one"  # the clip's entropy at temperature 1
        old = batch.get("old_per_token_logps")  # TRL scored it (off-policy batches), at the rows' temperatures
        if old is None or not at_one:
            old, entropy = self.policy_token_stats(batch, temperature=tau.view(-1, 1))
        if at_one:
            entropy = self.policy_token_stats(batch, temperature=1.0)[1]
        train = (torch.arange(tau.numel(), device=tau.device) % G) < Gt  # the train group's rows
        mask = batch["completion_mask"][train]
        ent = _global(self, _group_mean(entropy[train], mask, Gt).tolist())  # the paper: the train group's entropy
        eps = self.controller.clip_step(ent)
        mine = self._local_groups(len(ent))
        eps_rows = eps[mine].repeat_interleave(G).to(tau.device)
        batch["eps_low"], batch["eps_high"] = eps_rows, eps_rows.clone()
        self._agpo_pending = ({k: batch[k][train] for k in ("prompt_ids", "prompt_mask", "completion_ids",
                                                            "completion_mask")}, tau[train], old[train])
        self.agpo_last.update({"agpo/eps_mean": float(eps.mean()), "agpo/eps_min": float(eps.min()),
                               "agpo/eps_max": float(eps.max())})
        return batch

    def _local_groups(self, n_groups: int) -> slice:
        per = n_groups // self.accelerator.num_processes
        rank = self.accelerator.process_index
        return slice(rank * per, (rank + 1) * per)

    def _agpo_step_kl(self) -> None:
        """``update_step_kl`` with the last batch's per-group KL, once its update is done."""
        if self._agpo_pending is None:
            return
        rows, tau, old = self._agpo_pending
        new, _ = self.policy_token_stats(rows, temperature=tau.view(-1, 1))
        kl = _global(self, _group_mean(old - new, rows["completion_mask"], self.agpo_rows[0]).tolist())
        ctl = self.controller  # measured for every algorithm; only the clip controller feeds on it
        self.agpo_last["agpo/step_kl"] = ctl.update_step_kl(kl) if ctl.config.adaptive_clip else step_kl(kl)
        self._agpo_pending = None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        """TRL's scoring of a generation batch (old and reference log-probs), at each row's
        sampling temperature through the fused head; any other call is TRL's own."""
        tau = self._agpo_rows_tau
        if tau is None or input_ids.size(0) != tau.numel() or compute_aux_loss or any(
                v is not None for v in multimodal.values()):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                **multimodal)
        C = logits_to_keep
        step = batch_size or input_ids.size(0)
        logps, ents = [], []
        for s in range(0, input_ids.size(0), step):
            ids, am = input_ids[s:s + step], attention_mask[s:s + step]
            t = tau[s:s + step].to(ids.device).view(-1, 1)

            def head(hidden, weight, bias, ids=ids, t=t):
                return linear_logprobs(hidden[:, -C - 1:-1], weight, ids[:, -C:], bias=bias, temperature=t,
                                       impl=self.agpo_impl)

            with torch.no_grad(), self.accelerator.autocast():
                lp, ent = model(input_ids=ids, attention_mask=am, agpo_head_fn=head)
            logps.append(lp)
            ents.append(ent)
        return torch.cat(logps), (torch.cat(ents) if compute_entropy else None), None

    # --- logs and checkpoints ---------------------------------------------------------------
    def log(self, logs, *args, **kwargs):
        if self.model.training and self.agpo_last and "loss" in logs:  # the step logs, not the run summary
            logs = {**logs, **self.agpo_last, "agpo/probe_tokens": self.agpo_tokens["probe"],
                    "agpo/generated_tokens": self.agpo_tokens["probe"] + self.agpo_tokens["train"]}
        return super().log(logs, *args, **kwargs)

    def agpo_state(self) -> dict:
        """What a checkpoint needs to continue the controller exactly."""
        pending = None
        if self._agpo_pending is not None:
            rows, tau, old = self._agpo_pending
            pending = ({k: v.cpu() for k, v in rows.items()}, tau.cpu(), old.cpu())
        return {"controller": self.controller.state_dict(), "pending": pending, "tokens": dict(self.agpo_tokens)}

    def load_agpo_state(self, state: dict) -> None:
        self.controller.load_state_dict(state["controller"])
        self.agpo_tokens = {k: int(v) for k, v in state["tokens"].items()}
        pending = state["pending"]
        if pending is not None:
            dev = self.accelerator.device
            rows, tau, old = pending
            pending = ({k: v.to(dev) for k, v in rows.items()}, tau.to(dev), old.to(dev))
        self._agpo_pending = pending

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            torch.save(self.agpo_state(), os.path.join(folder, STATE_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, STATE_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"resume_from_checkpoint: {checkpoint} has no {STATE_FILE} (not an AGPOTrainer "
                                    "checkpoint); resume it with the trainer that wrote it")
        self.load_agpo_state(torch.load(path, map_location="cpu", weights_only=True))


def _check_args(args) -> None:
    """The GRPOConfig settings AGPO cannot run with, refused before TRL builds anything."""
    if args is None:
        return
    if getattr(args, "num_generations", 2) is not None and args.num_generations < 2:
        raise ValueError(f"num_generations: {args.num_generations}; AGPO's group statistics need >= 2 samples "
                         "per prompt")
    if getattr(args, "use_vllm", False):
        raise ValueError("use_vllm: TRL's vLLM generation takes one temperature per call, AGPO needs one per "
                         "prompt; set use_vllm=False (agpo's HF sampler), or run python -m agpo.train --rollout vllm")
    if getattr(args, "use_transformers_paged", False) or getattr(args, "use_transformers_continuous_batching", False):
        raise ValueError("continuous batching: takes one temperature per call; switch it off (AGPO samples with "
                         "agpo's HF sampler)")


def _global(trainer, values: list) -> list:
    """The step's per-group values of every process, in global group order."""
    if trainer.accelerator.num_processes == 1:
        return list(values)
    return list(gather_object(list(values)))


def _agpo_rollout(prompts: list, trainer: AGPOTrainer) -> dict:
    """TRL's ``rollout_func``: the probe, the controller's temperatures, the train group.
    In evaluation: ``num_generations_eval`` samples at ``tau_base``, no probe, no controller."""
    training = trainer.model.training
    G = trainer.num_generations if training else trainer.num_generations_eval
    if len(prompts) % G or any(prompts[i] != prompts[i - i % G] for i in range(len(prompts))):
        raise ValueError(f"rollout: expected each prompt {G} times in a row (TRL's repeat sampler), got "
                         f"{len(prompts)} prompts")
    cfg, ctl = trainer.agpo, trainer.controller
    P = len(prompts) // G
    prompt_ids, _, _ = trainer._tokenize_prompts(prompts[::G])
    ids, mask = left_padded(prompt_ids, trainer.processing_class.pad_token_id or 0)
    step = trainer.state.global_step
    rank = trainer.accelerator.process_index
    model = trainer.accelerator.unwrap_model(trainer.model)
    tok = trainer.processing_class
    sample = dict(max_new_tokens=trainer.max_completion_length, top_p=trainer.top_p, seed=cfg.seed, stop=cfg.stop)
    Gt, Gp = trainer.agpo_rows if training else (G, 0)
    with torch.no_grad():
        probe = None
        if training and ctl.config.needs_probe:
            probe = sample_encoded(model, tok, ids, mask, torch.full((P,), ctl.config.tau_base), group_size=Gp,
                                   stream=2 * step, row_offset=rank * P * Gp, **sample)
            rewards = _probe_rewards(trainer, probe, P, Gp)
            groups = [probe.texts[p * Gp:(p + 1) * Gp] for p in range(P)]
            all_rewards = _global(trainer, rewards.tolist())
            all_groups = _global(trainer, groups)
            kwargs = {} if cfg.extract == "default" else {"extract": cfg.extract}
            tau_all = ctl.probe_step(torch.tensor(all_rewards, dtype=torch.float32), all_groups, **kwargs)
            tau = tau_all[trainer._local_groups(len(all_groups))]
            trainer.agpo_tokens["probe"] += int(sum(_global(trainer, [probe.generated_tokens])))
            trainer.agpo_last.update({"agpo/tau_mean": float(tau_all.mean()), "agpo/tau_min": float(tau_all.min()),
                                      "agpo/tau_max": float(tau_all.max()), **ctl.metrics()})
        else:
            tau = torch.full((P,), ctl.config.tau_base)
        roll = sample_encoded(model, tok, ids, mask, tau, group_size=Gt, stream=2 * step + 1,
                              row_offset=rank * P * Gt, **sample)
    if training:
        trainer.agpo_tokens["train"] += int(sum(_global(trainer, [roll.generated_tokens])))
    # each prompt's rows: its train group, then (probe_reuse) its probe rows
    parts = [(roll, Gt)] + ([(probe, Gp)] if training and cfg.probe_reuse else [])

    def row(r_, i):  # (completion ids, engine log-probs, temperature) of row i, cut at its end
        n = int(r_.batch.completion_mask[i].sum())
        return r_.batch.completion_ids[i, :n].tolist(), r_.logprobs[i, :n].tolist(), r_.batch.temperature[i]
    completion_ids, logprobs, taus = zip(*[row(r_, p * g + i) for p in range(P) for r_, g in parts for i in range(g)])
    trainer._agpo_rows_tau = torch.stack(taus)
    return {"prompt_ids": [prompt_ids[r // G] for r in range(P * G)], "completion_ids": list(completion_ids),
            "logprobs": list(logprobs)}


def _probe_rewards(trainer: AGPOTrainer, probe, P: int, Gp: int) -> torch.Tensor:
    """``[P, Gp]`` rewards of the probe rows by the trainer's reward functions (weighted, as
    TRL sums them); a row no reward function scored is an error."""
    inputs = trainer._agpo_inputs
    G = trainer.num_generations
    if inputs is None:
        raise RuntimeError("rollout: the generation batch's dataset rows are unknown (call through train())")
    rows = [inputs[(r // Gp) * G] for r in range(P * Gp)]
    prompts = [row["prompt"] for row in rows]
    conversational = not isinstance(prompts[0], str)
    completions = [[{"role": "assistant", "content": t}] if conversational else t for t in probe.texts]
    n = probe.batch.completion_mask.sum(1).tolist()
    cids = [probe.batch.completion_ids[r, :n[r]].tolist() for r in range(P * Gp)]
    per_func = GRPOTrainer._calculate_rewards(trainer, rows, prompts, completions, cids)
    rank = trainer.accelerator.process_index
    per_func = per_func[rank * P * Gp:(rank + 1) * P * Gp].cpu()
    if bool(torch.isnan(per_func).all(dim=1).any()):
        raise ValueError("reward_funcs: every reward function returned None for a probe sample; AGPO's probe "
                         "statistics need a reward for each sample (return 0.0 instead of None)")
    rewards = (per_func * trainer.reward_weights.cpu()).nansum(dim=1)
    return rewards.view(P, Gp)


__all__ = ["AGPOTRLConfig", "AGPOTrainer", "STATE_FILE"]
