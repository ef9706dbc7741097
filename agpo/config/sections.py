"""The run configuration's sections: keyword-only dataclasses, one per concern, each field
with its docstring (the ``--help`` text of its flag) and checks in ``__post_init__``, and
``TrainConfig``, which holds them and round-trips through YAML.

Defaults are those of the embedded run (the tiny preset on the ``a+b=`` task, learning on
a 2-core CPU in minutes); ``agpo.learn.launch.resolve_defaults`` fills what depends on the model (warm-up,
completion length, micro-batch size).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from agpo.algo.controllers import ControllerConfig
from agpo.algo.recipes import apply_recipe
from agpo.errors import ConfigError
from agpo.models import DTYPES, apply_preset_defaults
from agpo.runtime.guard import GuardConfig
from agpo.tasks.data import DataConfig

ALGOS = ("agpo", "grpo")
SCHEDULES = ("constant", "linear", "cosine")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
SCORE_TEMPERATURES = ("sample", "one")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
ROLLOUT_ENGINES = ("hf", "vllm", "auto")
IMPLS = ("auto", "triton", "torch", "reference")
KL_ESTIMATORS = ("k1", "k2", "k3")
TIS_MODES = ("off", "token", "seq")
VLLM_HEAD_DTYPES = ("auto", "float32", "model")


def _positive(obj, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        v = getattr(obj, name)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (
                v == 0 and not allow_zero):
            raise ConfigError(f"--{name.replace('_', '-')}: must be {'>= 0' if allow_zero else '> 0'}, got {v!r}")


@dataclass(kw_only=True)
class ModelConfig:
    """Which model, on what device and in what precision."""

    model: str = "tiny"
    """A preset (tiny, smollm2-135m, qwen0.5b, qwen1.5b, qwen7b, qwen14b, llama3-8b, gemma2-9b), a local folder or a hub id."""
    dtype: str | None = None
    """float32, bfloat16 or float16 (None: float32 on CPU, the preset's dtype on GPU)."""
    attn: str | None = None
    """Attention implementation (None: flash-attn when installed, else SDPA)."""
    device: str = "auto"
    """cpu, cuda, cuda:N or auto (CUDA when available)."""
    gradient_checkpointing: bool | None = None
    """Recompute decoder activations in the backward pass (saves memory on large models). None: on
    when the memory plan's update would not fit without it (agpo.scale.memory; off on CPU)."""
    liger: bool | None = None
    """Liger-Kernel's fused RMSNorm, RoPE and SwiGLU in the decoder (never its loss; agpo.scale.liger).
    None: on when the run is on CUDA, liger-kernel is installed and knows the model's family."""
    lora_rank: int = 0
    """LoRA adapters of this rank on the attention and MLP projections (0: full fine-tuning)."""
    lora_alpha: float | None = None
    """LoRA scaling numerator (None: the rank, i.e. scaling 1)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch's input."""
    fp32_master: bool = True
    """Under torchrun on GPUs, full fine-tuning: keep fp32 weights and optimiser state (sharded;
    loaded in --dtype and upcast layer by layer while sharding) and compute in --dtype,
    reducing gradients in fp32 (FSDP2 mixed precision)."""

    def __post_init__(self) -> None:
        if not str(self.model).strip():
            raise ConfigError("--model: empty; give a preset, a local folder or a hub id")
        if self.dtype is not None:
            if not isinstance(self.dtype, str) or self.dtype.lower() not in DTYPES + tuple(DTYPE_ALIASES):
                raise ConfigError(f"--dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        _positive(self, "lora_rank", "lora_dropout", allow_zero=True)
        _positive(self, "lora_alpha")
        if isinstance(self.lora_rank, float) or self.lora_dropout >= 1:
            raise ConfigError(f"--lora-rank / --lora-dropout: expected an int rank >= 0 and a dropout in [0, 1), "
                              f"got {self.lora_rank!r}, {self.lora_dropout!r}")


@dataclass(kw_only=True)
class RolloutConfig:
    """How prompts are sampled each step."""

    prompts_per_step: int = 16
    """Prompts (groups) per training step."""
    group_size: int = 8
    """Samples per prompt (G) of the train group (and of the probe group unless --probe-size)."""
    probe_size: int | None = None
    """Samples per prompt of AGPO's probe group (None: --group-size, as the paper)."""
    probe_reuse: bool | None = None
    """Train on the probe samples too (AGPO): they are on-policy samples at tau_base, so each
    prompt's step learns from G + probe-size samples with one advantage baseline over them.
    None: on wherever there is a probe (AGPO), except under the paper recipes, whose probe
    trains nothing as the authors' does; --no-probe-reuse for that design."""
    probe_filter: bool = False
    """Skip the train group of a prompt whose probe rewards are all equal (AGPO): its train
    group would most likely be all-equal too, with zero advantage. The skipped share is
    logged as probe/skipped_frac; every rank keeps at least one prompt."""
    filter_groups: bool = False
    """Drop the train groups whose rewards are all equal (advantage 0 on every row) and sample
    rounds of --prompts-per-step fresh prompts until the step has that many groups whose
    rewards differ, then train on the first that many (DAPO's dynamic sampling, any
    algorithm; with AGPO each round has its probe). The dropped groups' tokens count against
    --token-budget. agpo.learn.refill."""
    filter_rounds: int = 4
    """--filter-groups: at most this many sampling rounds per step (the first included); a step
    that ends short trains on the groups it found (filter/groups, filter/rounds)."""
    clip_from_train: bool = False
    """No probe group: the adaptive clip reads the train group's own statistics (reward
    dispersion and skew, vote entropy), measured after it is sampled, and every sample is
    drawn at tau_base (so the temperature controller must be off: --no-adaptive-temp, or
    --algo grpo --adaptive-clip)."""
    max_new_tokens: int | None = None
    """Completion cap (None: the preset's)."""
    top_p: float = 1.0
    """Nucleus sampling for rollouts (1.0: plain temperature sampling, as the loss assumes)."""
    generation_batch_size: int = 0
    """Rows per ``generate`` call (0: all groups of a phase in one call); also the held-out
    evaluation's batch (0: 64 problems)."""
    reward: str = "correct"
    """Reward function name (agpo.tasks.rewards.REWARDS) or module:function."""
    engine: str = "auto"
    """Rollout engine (flag --rollout): hf (transformers generate on the policy), vllm (a colocated
    vLLM engine, weights synced after each optimiser step) or auto (vllm when importable and the
    policy is on CUDA, else hf). docs/rollout.md."""
    vllm_gpu_memory_utilization: float | None = None
    """Fraction of each GPU the colocated vLLM engine may take (weights + KV cache). None: what the
    memory plan leaves beside the trainer's resident state (agpo.scale.memory; 0.3 on CPU)."""
    vllm_tensor_parallel_size: int | None = None
    """Ranks per vLLM engine (tensor parallel; must divide the world size). None: the smallest that
    gives the KV cache the whole rollout in the memory plan (1 on CPU)."""
    vllm_max_model_len: int | None = None
    """vLLM's max_model_len (None: --max-prompt-tokens + --max-new-tokens, within the model's positions)."""
    max_prompt_tokens: int | None = None
    """Longest prompt in tokens the memory plan and vLLM's max_model_len allow for (None: 1024).
    Prompts are not cut to it: with --rollout vllm a longer one must still fit --vllm-max-model-len."""
    vllm_sleep_level: int = 2
    """vLLM sleep mode between rollouts and update: 0 off, 1 offload weights + free KV cache, 2 free
    both (weights are re-synced anyway). CUDA only; the CPU backend ignores it."""
    vllm_kv_cache_gib: float | None = None
    """vLLM KV-cache size in GiB (None: --vllm-gpu-memory-utilization decides on GPUs; 1 GiB on CPU)."""
    vllm_enforce_eager: bool | None = None
    """vLLM without CUDA graphs / compilation (None: eager on CPU, graphs on GPU)."""
    vllm_head_dtype: str = "auto"
    """Precision of the vLLM engine's LM head (its logits, hence its log-probs): float32 (hidden
    states and head weight cast up, fp32 logits, as the trainer's fused head computes them;
    vLLM's hf_overrides head_dtype), model (the engine's --dtype, e.g. bf16 logits) or auto
    (float32 where the installed vLLM supports it, else the engine's dtype with a warning).
    No effect when the engine runs in float32. docs/rollout.md."""

    def __post_init__(self) -> None:
        _positive(self, "prompts_per_step", "group_size", "max_new_tokens", "vllm_tensor_parallel_size",
                  "vllm_kv_cache_gib", "vllm_max_model_len", "max_prompt_tokens")
        _positive(self, "generation_batch_size", allow_zero=True)
        if self.engine not in ROLLOUT_ENGINES:
            raise ConfigError(f"--rollout: expected hf, vllm or auto, got {self.engine!r}")
        if self.vllm_gpu_memory_utilization is not None and not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ConfigError(f"--vllm-gpu-memory-utilization: must lie in (0, 1], got {self.vllm_gpu_memory_utilization}")
        if self.vllm_sleep_level not in (0, 1, 2):
            raise ConfigError(f"--vllm-sleep-level: expected 0, 1 or 2, got {self.vllm_sleep_level}")
        if self.vllm_head_dtype not in VLLM_HEAD_DTYPES:
            raise ConfigError(f"--vllm-head-dtype: expected auto, float32 or model, got {self.vllm_head_dtype!r} "
                              "(auto: float32 where vLLM supports it; model: the engine's --dtype)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p: must lie in (0, 1], got {self.top_p}")
        if self.group_size < 2:
            raise ConfigError(f"--group-size: group-relative advantages need at least 2 samples, got {self.group_size}")
        _positive(self, "probe_size", "filter_rounds")
        if not isinstance(self.filter_rounds, int):
            raise ConfigError(f"--filter-rounds: expected a whole number of rounds >= 1, got {self.filter_rounds!r}")
        if self.filter_groups and self.probe_filter:
            raise ConfigError("--filter-groups with --probe-filter: two filters of the same groups; --filter-groups "
                              "judges each train group by its own rewards and refills the batch: drop --probe-filter")
        if self.probe_size is not None and self.probe_size < 2:
            raise ConfigError(f"--probe-size: the probe's reward spread needs at least 2 samples, got {self.probe_size}")


@dataclass(kw_only=True)
class OptimConfig:
    """Optimiser, schedule and micro-batching of the update phase."""

    lr: float = 1e-4
    """Peak AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.99
    """AdamW beta2."""
    warmup_ratio: float = 0.0
    """Fraction of optimiser steps spent in linear LR warm-up."""
    schedule: str = "constant"
    """LR after warm-up: constant, linear (to min_lr_ratio) or cosine (to min_lr_ratio)."""
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of the peak (linear and cosine)."""
    grad_clip: float = 1.0
    """Max global gradient norm (0: no clipping)."""
    update_epochs: int = 2
    """Passes over a step's rollouts, one optimiser step each (the paper's code: 4)."""
    micro_batch_tokens: int | None = None
    """Tokens per forward/backward micro-batch (None: the preset's): real prompt + completion
    tokens when packing, padded positions otherwise (scoring passes take twice as many)."""
    packing: bool | None = None
    """Pack each micro-batch's sequences into one row with restarting positions (no padding is
    computed: agpo.learn.packing); --no-packing runs padded rows. None: packed where the attention
    is varlen (flash-attn), padded with SDPA or eager attention, whose block-diagonal mask
    over a packed row costs the square of the whole row's length (measured slower than
    padding on a CPU: bench/results/cpu-2026-12-01-training.md)."""

    def __post_init__(self) -> None:
        _positive(self, "lr", "update_epochs", "micro_batch_tokens")
        _positive(self, "weight_decay", "grad_clip", "warmup_ratio", allow_zero=True)
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"--schedule: expected one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"--warmup-ratio: must lie in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"--min-lr-ratio: must lie in [0, 1], got {self.min_lr_ratio}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: must lie in [0, 1), got {getattr(self, name)}")


@dataclass(kw_only=True)
class LossConfig:
    """The policy loss (docs/algorithm.md#the-policy-loss); eps comes from the clip controller."""

    beta: float = 0.0
    """Weight of the KL to the reference policy (the paper: 0.03; 0 needs no reference model)."""
    kl_estimator: str = "k3"
    """k1, k2 or k3."""
    kl_clamp: float | None = None
    """Bound c on each token's KL, clamped to [-c, c] with no gradient where it binds (None: unbounded;
    verl's k3 and OpenRLHF use 10)."""
    entropy_coef: float = 0.0
    """Entropy bonus weight."""
    loss_agg: str = "token-mean"
    """token-mean, seq-mean-token-mean or seq-mean-token-sum-norm (Dr. GRPO)."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1 for negative advantages (None: off)."""
    eps_high_offset: float = 0.0
    """eps_high = eps + offset (DAPO's clip-higher; 0: symmetric)."""
    impl: str = "auto"
    """Fused-loss implementation: auto, triton, torch or reference."""
    memory_budget: int | None = None
    """Bytes of scratch the fused head may use per call (None: its default)."""
    score_temperature: str = "sample"
    """Temperature of the old, new and reference log-probs and of the loss: 'sample' (each row's
    sampling temperature: the policy that sampled it, docs/algorithm.md#the-policy-loss) or 'one' (the untempered
    policy, as the paper's code scores)."""
    tis: str | None = None
    """Truncated importance sampling of the rollout engine's samples: off, token or seq (None: token
    with --rollout vllm, off with hf). Weight min(pi_old / pi_engine, --tis-cap) on the surrogate."""
    tis_cap: float = 2.0
    """Cap of the truncated importance weight."""

    def __post_init__(self) -> None:
        if self.score_temperature not in SCORE_TEMPERATURES:
            raise ConfigError(f"--score-temperature: expected sample or one, got {self.score_temperature!r}")
        _positive(self, "beta", "entropy_coef", "eps_high_offset", allow_zero=True)
        _positive(self, "memory_budget", "tis_cap", "kl_clamp")
        if self.tis not in (None, *TIS_MODES):
            raise ConfigError(f"--tis: expected off, token or seq, got {self.tis!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ConfigError(f"--kl-estimator: expected k1, k2 or k3, got {self.kl_estimator!r}")
        if self.loss_agg not in LOSS_AGGS:
            raise ConfigError(f"--loss-agg: expected one of {', '.join(LOSS_AGGS)}, got {self.loss_agg!r}")
        if self.dual_clip is not None and not self.dual_clip > 1:
            raise ConfigError(f"--dual-clip: must be > 1, got {self.dual_clip}")
        if self.impl not in IMPLS:
            raise ConfigError(f"--impl: expected auto, triton, torch or reference, got {self.impl!r}")


@dataclass(kw_only=True)
class WarmupConfig:
    """Supervised warm-up on the train split before RL (so rewards are not all zero)."""

    sft_steps: int | None = None
    """Most warm-up optimiser steps (None: 1500 for the tiny preset on its embedded task, else 0)."""
    sft_target_loss: float | None = None
    """Stop the warm-up once the mean answer-token loss of its last 20 steps is at most this
    (None: 0.5 for the tiny preset on its embedded task, about 50% held-out accuracy for
    every seed; 0: run all --sft-steps)."""
    sft_batch_size: int = 64
    """Problems per warm-up step."""
    sft_lr: float = 1e-3
    """Warm-up learning rate (AdamW, constant)."""

    def __post_init__(self) -> None:
        _positive(self, "sft_steps", "sft_target_loss", allow_zero=True)
        _positive(self, "sft_batch_size", "sft_lr")


@dataclass(kw_only=True)
class RunConfig:
    """Length of the run, output, checkpoints and evaluation."""

    algo: str = "agpo"
    """agpo (both controllers) or grpo (fixed eps and tau, no probe group)."""
    recipe: str = "default"
    """Defaults to start from: default (the project's), paper (the authors' released code:
    agpo.algo.recipes) or paper-example (paper with their example configs' G=2, one epoch,
    one prompt per step, tau in [0.6, 1.3], LoRA dropout 0.05); values set in --config or on
    the command line win over the recipe."""
    steps: int = 100
    """Training steps (each: probe, rollouts, score, update)."""
    token_budget: int | None = None
    """Generated tokens (probe included) to stop at, to compare methods at equal cost: the run
    ends at the step boundary nearest the budget (within half a step of its own size), and
    the learning-rate schedule (warm-up, decay) runs over the budget instead of --steps,
    which stays a cap."""
    seed: int = 0
    """Seed of model init, data order and sampling."""
    out_dir: str | None = None
    """Run directory: config.yaml, metrics.jsonl, events.jsonl, checkpoints/, final/, summary.json
    (None: runs/ALGO, e.g. runs/agpo or runs/grpo). A directory that holds an earlier run is
    refused unless --resume or --overwrite is given."""
    overwrite: bool = False
    """Start afresh in an --out-dir that holds an earlier run, replacing it: once the model has
    loaded, the earlier run's files (config.yaml, metrics, events, checkpoints/, final/, reference/,
    summary.json) are deleted, other files stay. Without it such a directory is refused."""
    save_every: int = 0
    """Checkpoint every k steps (0: only at the end)."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept (older ones are deleted once a newer one is written)."""
    resume: str | None = None
    """auto (latest complete checkpoint in out_dir, if any) or a checkpoint directory."""
    stop_after: int | None = None
    """Leave after this step, with a checkpoint (split a run into jobs; resume with --resume auto)."""
    eval_size: int = 400
    """Held-out problems evaluated before and after RL (0: no evaluation)."""
    eval_every: int = 0
    """Also evaluate every k steps (0: only before and after)."""
    dump_groups: bool = False
    """Write groups.jsonl to the run directory: per step and prompt, the train and probe pass
    counts, the statistics the controllers read (sigma, k, E), tau and eps."""
    eval_max_new_tokens: int | None = None
    """Completion cap of the held-out evaluation (None: --max-new-tokens, the rollouts' cap)."""
    progress: bool = True
    """Show a progress bar."""
    tensorboard: bool = False
    """Also write TensorBoard scalars to out_dir/tensorboard (needs the tensorboard package:
    pip install "agpo[tensorboard]")."""
    dist_timeout: float = 1800.0
    """Seconds any collective may wait under torchrun: a rank that died or hangs makes the others
    exit with an error after this long (long enough for the slowest rank's rollout phase)."""

    def __post_init__(self) -> None:
        if self.algo not in ALGOS:
            raise ConfigError(f"--algo: expected agpo or grpo, got {self.algo!r}")
        if self.out_dir is None:  # one directory per algorithm, stable for --resume auto
            self.out_dir = f"runs/{self.algo}"
        elif not str(self.out_dir).strip():
            raise ConfigError("--out-dir: empty; give a directory (or leave it out: runs/ALGO)")
        _positive(self, "steps", "token_budget", "stop_after")
        _positive(self, "save_every", "eval_size", "eval_every", "seed", allow_zero=True)
        _positive(self, "eval_max_new_tokens")
        _positive(self, "dist_timeout")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"--keep-checkpoints: must be >= 1, got {self.keep_checkpoints}")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "rollout": RolloutConfig, "optim": OptimConfig,
            "loss": LossConfig, "controller": ControllerConfig, "warmup": WarmupConfig, "run": RunConfig,
            "guard": GuardConfig}


@dataclass(kw_only=True)
class TrainConfig:
    """Everything one run needs; ``to_dict``/``from_dict`` round-trip through YAML."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Model and device."""
    data: DataConfig = field(default_factory=DataConfig)
    """Task (the train split is read for training, the test split for evaluation)."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Sampling."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Policy loss."""
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    """AGPO controllers."""
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    """Supervised warm-up."""
    run: RunConfig = field(default_factory=RunConfig)
    """Run length, output, checkpoints."""
    guard: GuardConfig = field(default_factory=GuardConfig)
    """Untrusted completions and non-finite steps (agpo.runtime.guard, docs/operations.md)."""

    def __post_init__(self) -> None:
        r = self.rollout
        used = [f for f, on in (("--probe-size", r.probe_size is not None), ("--probe-reuse", r.probe_reuse is True),
                                ("--probe-filter", r.probe_filter)) if on]
        if used and not self.controller.needs_probe:
            raise ConfigError(f"{', '.join(used)}: GRPO draws no probe group; use --algo agpo (or switch a "
                              "controller on)")
        if r.clip_from_train:
            if used:
                raise ConfigError(f"--clip-from-train draws no probe group, so {', '.join(used)} has nothing to act "
                                  "on: drop one of them")
            if self.controller.adaptive_temp or not self.controller.adaptive_clip:
                raise ConfigError("--clip-from-train: the clip reads the train group's statistics, and the "
                                  "temperature would need them before that group is sampled: use --adaptive-clip "
                                  "with --no-adaptive-temp (e.g. --algo grpo --adaptive-clip --clip-from-train)")

    @property
    def draws_probe(self) -> bool:
        """Whether a step samples a probe group: a controller is on, and the clip does not read
        the train group instead (``--clip-from-train``)."""
        return self.controller.needs_probe and not self.rollout.clip_from_train

    @property
    def reuses_probe(self) -> bool:
        """Whether the step trains on its probe's samples: ``--probe-reuse`` as given, else
        wherever there is a probe (the paper recipes give False)."""
        if self.rollout.probe_reuse is not None:
            return self.rollout.probe_reuse
        return self.draws_probe

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Build from a nested mapping; a ``run.recipe``, then the model preset's defaults, fill the
        fields ``d`` leaves unset."""
        if not isinstance(d, dict):
            raise ConfigError(f"config: expected a mapping of sections, got {type(d).__name__}")
        unknown = set(d) - set(SECTIONS)
        if unknown:
            raise ConfigError(f"config: unknown sections {sorted(unknown)}; expected {sorted(SECTIONS)}")
        d = apply_recipe({k: dict(v or {}) if isinstance(v, dict) else v for k, v in d.items()})
        d = apply_preset_defaults(d)  # then the model preset's (agpo.models.PRESET_DEFAULTS)
        parts = {}
        for name, kind in SECTIONS.items():
            values = d.get(name) or {}
            names = {f.name for f in fields(kind)}
            bad = set(values) - names
            if bad:
                raise ConfigError(f"config [{name}]: unknown keys {sorted(bad)}; known: {sorted(names)}")
            try:
                parts[name] = kind(**values)
            except ConfigError:
                raise
            except (TypeError, ValueError) as e:
                raise ConfigError(f"config [{name}]: {e}") from e
        return cls(**parts)


def load_yaml(path: str | Path) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"--config {path}: cannot read it as YAML ({e})") from e
    if not isinstance(d, dict):
        raise ConfigError(f"--config {path}: expected a mapping of sections ({', '.join(SECTIONS)})")
    return d
