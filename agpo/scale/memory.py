"""The memory plan: what one GPU holds in each phase of a run, from the model's config.json alone.

``ModelShape.from_config(config.json as a dict)`` counts the parameters exactly (embeddings,
per-layer q/k/v with Qwen2's biases, o, the gate/up/down MLP, the RMSNorm weights, the LM
head unless tied; ``tests/test_memory_plan.py`` holds the count against ``sum(p.numel())``
of real transformers models). ``plan_memory(shape, knobs)`` lays out, per GPU, the two
phases whose peaks matter:

- **rollout**: the trainer's resident state while the engine is awake (parameter shards,
  AdamW states, the KL reference; gradients are freed by ``zero_grad(set_to_none=True)``),
  then either HF ``generate``'s gathered model and KV cache, or the colocated vLLM engine's
  budget (``--vllm-gpu-memory-utilization`` of the device: its weights / tensor-parallel
  size, activations and graphs, and the KV cache that is left, in tokens against what the
  rollout needs and against one ``max_model_len`` request) and the weight sync's transient.
- **update**: parameter shards, gradients, AdamW states, the reference, FSDP2's gathered
  layers and root group, the activations of one micro-batch (with or without activation
  checkpointing), the fused head's scratch (its ``memory_budget`` plus O(N) vectors: no
  ``[N, V]`` logits exist) and the sleeping engine. The scoring passes (twice the tokens,
  no grad, one layer's internals at a time) never exceed it, so they have no row.

Every figure is bytes per GPU. Estimates that reading code cannot settle (vLLM's
activations and CUDA graphs, the CUDA context) are named constants below;
``bench/plan_check.py`` (a step of ``bench/gpu_suite.sh``) holds the update phase of a
scaled-down Qwen2 against ``torch.cuda.max_memory_allocated``. ``derive`` fills the
settings a user left unset (``None``: engine utilisation, tensor-parallel size,
``max_model_len``, activation checkpointing, micro-batch tokens) from the plan, and
``refusal`` says which flag to change when a plan does not fit. ``python -m agpo.plan``
prints the tables; ``agpo.learn.launch.resolve_defaults`` uses them at the start of a run.

Imports only ``agpo.errors`` and ``agpo.models`` (a preset's embedded config).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from agpo.errors import ConfigError

GiB = 2**30
MiB = 2**20
DEFAULT_DEVICE_GIB = 80.0
"""Device memory planned for when no GPU is visible (``--gpu-memory-gib``)."""
KERNEL_MEMORY_BUDGET = 256 * MiB
"""agpo_kernels' default scratch budget on a CPU and its floor on a GPU
(``agpo_kernels.chunks.DEFAULT_MEMORY_BUDGET``; a test holds them equal). On a GPU the
kernels default to room for max(1024, N/16) rows (``chunks.gpu_memory_budget``)."""
CUDA_RESERVED = 1.0 * GiB
"""CUDA context, NCCL buffers and allocator slack outside any tensor (estimate)."""
ENGINE_OVERHEAD = 1.5 * GiB
"""vLLM's activations, CUDA graphs and sampler buffers inside its budget (estimate)."""
ENGINE_ASLEEP = 1.0 * GiB
"""What a sleeping vLLM engine keeps (its context and pools; level 1 or 2; estimate)."""
DEFAULT_PROMPT_TOKENS = 1024
"""Longest prompt planned for when ``--max-prompt-tokens`` is unset."""
TP_SIZES = (1, 2, 4, 8)
MAX_UTILIZATION = 0.9
"""The highest engine utilisation ``derive`` picks."""
MIN_MICRO_BATCH = 256
MIN_UTILIZATION = 0.1
"""The lowest engine utilisation ``derive`` picks when there is room (vLLM's profiling and graphs)."""
MARGIN = 0.04
"""Share of the device ``derive`` leaves free when it picks a setting (fragmentation, estimates)."""


# -- the model ------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a decoder-only transformer's config.json."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    max_positions: int | None
    dtype: str | None
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool

    @classmethod
    def from_config(cls, d: dict) -> ModelShape:
        d = dict(d.get("text_config") or d) if "hidden_size" not in d else d
        try:
            hidden, layers, heads = int(d["hidden_size"]), int(d["num_hidden_layers"]), int(d["num_attention_heads"])
            intermediate, vocab = int(d["intermediate_size"]), int(d["vocab_size"])
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"config.json: missing or bad {e} (needs hidden_size, intermediate_size, "
                              "num_hidden_layers, num_attention_heads, vocab_size)") from None
        kind = str(d.get("model_type", ""))
        attention_bias = bool(d.get("attention_bias", False))
        qwen2 = kind in ("qwen2", "qwen2_moe")  # q/k/v carry biases, o does not
        return cls(model_type=kind, hidden=hidden, intermediate=intermediate, layers=layers, heads=heads,
                   kv_heads=int(d.get("num_key_value_heads") or heads),
                   head_dim=int(d.get("head_dim") or hidden // heads), vocab=vocab,
                   tied=bool(d.get("tie_word_embeddings", kind not in ("qwen2", "llama", "mistral"))),
                   max_positions=d.get("max_position_embeddings"), dtype=d.get("torch_dtype") or d.get("dtype"),
                   qkv_bias=qwen2 or attention_bias, o_bias=attention_bias and not qwen2,
                   mlp_bias=bool(d.get("mlp_bias", False)))

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def attention_parameters(self) -> int:
        D, q, kv = self.hidden, self.q_width, self.kv_width
        return (D * q + 2 * D * kv + q * D + (q + 2 * kv if self.qkv_bias else 0) + (D if self.o_bias else 0))

    def mlp_parameters(self) -> int:
        D, I = self.hidden, self.intermediate
        return 3 * D * I + ((2 * I + D) if self.mlp_bias else 0)

    def layer_parameters(self) -> int:
        """One decoder layer: attention, MLP and its two RMSNorm weights."""
        return self.attention_parameters() + self.mlp_parameters() + 2 * self.hidden

    def embedding_parameters(self) -> int:
        return self.vocab * self.hidden

    def head_parameters(self) -> int:
        """The LM head's own weight (0 when tied to the embeddings)."""
        return 0 if self.tied else self.vocab * self.hidden

    def root_parameters(self) -> int:
        """FSDP's root group: embeddings, final norm, LM head."""
        return self.embedding_parameters() + self.hidden + self.head_parameters()

    def parameters(self) -> int:
        return self.layers * self.layer_parameters() + self.root_parameters()

    def largest_parameter(self) -> int:
        return max(self.embedding_parameters(), self.hidden * self.intermediate)

    def lora_parameters(self, rank: int) -> int:
        """Adapters of ``rank`` on q, k, v, o, gate, up and down (agpo.scale.lora.DEFAULT_TARGETS)."""
        D, I, q, kv = self.hidden, self.intermediate, self.q_width, self.kv_width
        per_layer = rank * ((D + q) + 2 * (D + kv) + (q + D) + 2 * (D + I) + (I + D))
        return self.layers * per_layer

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        """K and V of every layer for one token (the whole model, no tensor parallelism)."""
        return 2 * self.layers * self.kv_width * dtype_bytes

    def saved_per_token(self) -> int:
        """Elements autograd keeps inside one decoder layer per token: norm inputs and outputs,
        the two residual sums, o's and down's outputs (8D), q and the attention output (2q),
        k and v (2kv), gate, up, their activation and product (4I); flash / SDPA keep O(T)
        statistics, no T x T scores."""
        return 8 * self.hidden + 2 * self.q_width + 2 * self.kv_width + 4 * self.intermediate


# -- where a model's config.json is --------------------------------------------------------
def tiny_config() -> dict:
    """The tiny preset's config (agpo.models.build_tiny_model), without building it."""
    from agpo.models import CHAR_VOCAB

    return {"model_type": "qwen2", "vocab_size": len(CHAR_VOCAB), "hidden_size": 192, "num_hidden_layers": 3,
            "num_attention_heads": 6, "num_key_value_heads": 2, "intermediate_size": 512,
            "max_position_embeddings": 128, "tie_word_embeddings": True, "torch_dtype": "float32"}


def model_config(model: str) -> dict | None:
    """``--model``'s config.json as a dict, without loading weights or going online: a folder's
    config.json, a preset's embedded config (``agpo.models.PRESET_CONFIGS``), or the copy in the
    Hugging Face cache. None when none of them has it (a hub id never downloaded, a .gguf)."""
    from agpo.models import PRESET_CONFIGS, PRESETS

    name = str(model).strip()
    if name == "tiny":
        return tiny_config()
    path = Path(os.path.expanduser(name))
    if (path / "config.json").is_file():
        return _read_json(path / "config.json")
    if name in PRESET_CONFIGS:
        return dict(PRESET_CONFIGS[name])
    preset = PRESETS.get(name)
    hf_id = preset.hf_id if preset else (name if name.count("/") == 1 and not path.exists() else None)
    if hf_id:
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(hf_id, "config.json")
        except Exception:  # noqa: BLE001 - no cache, a malformed id: no plan, not an error
            found = None
        if isinstance(found, str) and Path(found).is_file():
            return _read_json(Path(found))
    return None


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return d


# -- the settings a plan depends on ----------------------------------------------------------
@dataclass
class Knobs:
    """The run's memory-relevant settings (``knobs_from_config``); None: unset (``derive`` fills it)."""

    world: int = 1
    nproc_per_node: int = 1
    sharded: bool = False
    """FSDP2 over the ranks (torchrun, one rank included)."""
    device_bytes: float = DEFAULT_DEVICE_GIB * GiB
    compute_bytes: int = 2
    fp32_master: bool = True
    lora_rank: int = 0
    beta: float = 0.0
    checkpointing: bool | None = None
    micro_batch_tokens: int | None = None
    default_micro_batch: int = 8192
    max_new_tokens: int = 512
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS
    group_size: int = 8
    prompts_per_step: int = 16
    generation_batch_size: int = 0
    engine: str = "hf"
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    tp: int | None = None
    sleep_level: int = 2
    memory_budget: int | None = None
    """The fused head's scratch (None: the kernels' GPU default for the micro-batch)."""
    algo: str = "agpo"

    @property
    def master_bytes(self) -> int:
        """Bytes of one stored (trainable) parameter: fp32 masters on sharded GPU full fine-tuning."""
        return 4 if (self.sharded and self.fp32_master and not self.lora_rank) else self.compute_bytes

    @property
    def seq_len(self) -> int:
        return self.prompt_tokens + self.max_new_tokens

    def rows_per_rank(self) -> int:
        """Sequences one rank generates in one phase (the probe and the train phase are as large)."""
        return max(1, self.prompts_per_step // max(self.world, 1)) * self.group_size


def knobs_from_config(cfg, *, world: int = 1, nproc_per_node: int | None = None, sharded: bool | None = None,
                      device_gib: float = DEFAULT_DEVICE_GIB) -> Knobs:
    """``Knobs`` of a ``TrainConfig`` (its unset memory settings stay None) for ``world``
    ranks on GPUs of ``device_gib``."""
    from agpo.models import PRESETS, resolve_dtype

    m, r, o, lo = cfg.model, cfg.rollout, cfg.optim, cfg.loss
    preset = PRESETS.get(m.model)
    compute = resolve_dtype(m.dtype, "cuda", preset)
    new = r.max_new_tokens if r.max_new_tokens is not None else (preset.max_new_tokens if preset else 512)
    return Knobs(world=world, nproc_per_node=nproc_per_node or world, sharded=world > 1 if sharded is None else sharded,
                 device_bytes=device_gib * GiB, compute_bytes=compute.itemsize, fp32_master=m.fp32_master,
                 lora_rank=m.lora_rank, beta=lo.beta, checkpointing=m.gradient_checkpointing,
                 micro_batch_tokens=o.micro_batch_tokens,
                 default_micro_batch=preset.micro_batch_tokens if preset else 8192, max_new_tokens=new,
                 prompt_tokens=r.max_prompt_tokens or DEFAULT_PROMPT_TOKENS, group_size=r.group_size,
                 prompts_per_step=r.prompts_per_step, generation_batch_size=r.generation_batch_size,
                 engine=r.engine, gpu_memory_utilization=r.vllm_gpu_memory_utilization,
                 max_model_len=r.vllm_max_model_len, tp=r.vllm_tensor_parallel_size, sleep_level=r.vllm_sleep_level,
                 memory_budget=lo.memory_budget, algo=cfg.run.algo)


def head_scratch(tokens: int, vocab: int, hidden: int, device_bytes: float) -> int:
    """The fused head's default chunk scratch on a GPU for a micro-batch of ``tokens``."""
    from agpo_kernels.chunks import gpu_memory_budget

    return gpu_memory_budget(tokens, vocab, hidden, int(device_bytes))


# -- the plan --------------------------------------------------------------------------------
@dataclass
class Item:
    name: str
    bytes: float
    note: str = ""
    after: bool = False
    """Only once the activations are freed (the optimiser step): not part of the main peak."""


@dataclass
class Phase:
    name: str
    items: list[Item] = field(default_factory=list)

    def add(self, name: str, nbytes: float, note: str = "", after: bool = False) -> None:
        self.items.append(Item(name, float(nbytes), note, after))

    @property
    def peak(self) -> float:
        main = sum(i.bytes for i in self.items if not i.after)
        resident = sum(i.bytes for i in self.items if i.note.startswith("resident"))
        later = resident + sum(i.bytes for i in self.items if i.after)
        return max(main, later)


@dataclass
class Problem:
    message: str
    flag: str
    """The flag to change (with the value the plan suggests, when it has one)."""


@dataclass
class Plan:
    shape: ModelShape
    knobs: Knobs
    rollout: Phase
    update: Phase
    kv: dict
    problems: list[Problem]
    derived: dict = field(default_factory=dict)
    """Settings ``derive`` filled: name -> (value, why)."""

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def phases(self) -> list[Phase]:
        return [self.rollout, self.update]


def _activations(shape: ModelShape, n: int, cb: int, checkpointing: bool) -> tuple[float, str]:
    per_layer = shape.saved_per_token() * cb
    if checkpointing:  # each layer's input kept; one layer's internals (and their grads) recomputed at a time
        return (n * shape.layers * shape.hidden * cb + 2 * n * per_layer,
                f"{n} tokens x ({shape.layers} layer inputs x {shape.hidden * cb} B + 2 x {per_layer // 1024} KiB "
                "for the layer being recomputed)")
    return ((shape.layers + 1) * n * per_layer,
            f"{n} tokens x {shape.layers} layers x {per_layer // 1024} KiB, + one layer's grads")


def plan_memory(shape: ModelShape, k: Knobs) -> Plan:
    """The per-GPU plan of ``shape`` under ``k`` (unset settings must be filled: ``derive``)."""
    P, W, cb, mb = shape.parameters(), (k.world if k.sharded else 1), k.compute_bytes, k.master_bytes
    ckpt = bool(k.checkpointing)
    n = int(k.micro_batch_tokens or k.default_micro_batch)
    tp = int(k.tp or 1)
    per = f" / {W}" if W > 1 else ""

    resident = []  # (name, bytes, note): what the trainer holds across phases
    if k.lora_rank:
        A = shape.lora_parameters(k.lora_rank)
        resident.append(("frozen base", P * cb / W, f"resident: {P / 1e9:.2f} B x {cb} B{per}"))
        resident.append(("LoRA adapters (fp32)", A * 4 / W, f"resident: {A / 1e6:.1f} M x 4 B{per}"))
        trainable, tb = A, 4
    else:
        resident.append(("parameters" + (" (fp32 master shards)" if mb == 4 and W > 1 else ""), P * mb / W,
                         f"resident: {P / 1e9:.2f} B x {mb} B{per}"))
        trainable, tb = P, mb
    adam = ("AdamW m, v", 2 * trainable * tb / W, f"resident: 2 x {trainable / 1e9:.3f} B x {tb} B{per}")
    ref = None
    if k.beta > 0 and not k.lora_rank:
        ref = ("KL reference (frozen)", P * cb / W, f"resident: {P / 1e9:.2f} B x {cb} B{per}")

    # rollout ---------------------------------------------------------------------------------
    ro = Phase("rollout")
    for it in resident:
        ro.add(*it)
    ro.add(*adam)
    if ref:
        ro.add(*ref)
    ro.add("gradients", 0, "freed by zero_grad(set_to_none=True)")
    kv: dict = {}
    rows = k.rows_per_rank()
    if k.engine == "vllm":
        util = float(k.gpu_memory_utilization or 0)
        budget = util * k.device_bytes
        weights = P * cb / tp
        kv_bytes = max(0.0, budget - weights - ENGINE_OVERHEAD)
        heads = shape.kv_heads // tp if shape.kv_heads >= tp else 1  # vLLM replicates KV heads below TP
        kv_tok = shape.kv_bytes_per_token(cb) * heads // shape.kv_heads
        engine_rows = rows * tp  # a TP group samples the union of its ranks' requests
        kv.update(bytes_per_token=kv_tok, tokens=int(kv_bytes // kv_tok), needed=engine_rows * k.seq_len,
                  rows=engine_rows, max_model_len=k.max_model_len, budget=budget)
        ro.add(f"vLLM weights ({'bf16' if cb == 2 else f'{cb} B'} / TP {tp})", weights,
               f"{P / 1e9:.2f} B x {cb} B / {tp}")
        ro.add("vLLM activations, graphs, sampler", ENGINE_OVERHEAD, "estimate")
        ro.add("vLLM KV cache", kv_bytes,
               f"util {util:.2f} x {k.device_bytes / GiB:.0f} GiB - weights - activations: {kv['tokens']:,} tokens "
               f"at {kv_tok // 1024} KiB; the rollout needs {kv['needed']:,} ({engine_rows} x {k.seq_len})")
        if k.sharded:
            unit = max(shape.layer_parameters(), shape.root_parameters())
            sync = max(shape.largest_parameter() * mb, unit * cb)
            ro.add("weight sync transient", sync, "the largest gathered tensor or FSDP unit")
    else:
        if k.sharded:
            ro.add("gathered model for generate", P * cb, f"{P / 1e9:.2f} B x {cb} B (unsharded once per phase)")
        gen_rows = k.generation_batch_size or rows
        kv_tok = shape.kv_bytes_per_token(cb)
        kv.update(bytes_per_token=kv_tok, tokens=gen_rows * k.seq_len, needed=rows * k.seq_len, rows=rows)
        ro.add("HF KV cache", gen_rows * k.seq_len * kv_tok,
               f"{gen_rows} rows x {k.seq_len} tokens x {kv_tok // 1024} KiB")
        ro.add("sampling logits", 3 * gen_rows * shape.vocab * 4, f"3 x {gen_rows} x {shape.vocab} fp32")
    ro.add("CUDA context, NCCL, allocator slack", CUDA_RESERVED, "estimate")

    # update ----------------------------------------------------------------------------------
    up = Phase("update")
    for it in resident:
        up.add(*it)
    up.add("gradients", trainable * tb / W, f"resident: {trainable / 1e9:.3f} B x {tb} B{per}")
    up.add(*adam)
    if ref:
        up.add(*ref)
    if k.sharded:
        up.add("gathered layers in flight (current + prefetch)", 2 * shape.layer_parameters() * cb,
               f"2 x {shape.layer_parameters() / 1e6:.1f} M x {cb} B")
        up.add("gathered root group (embeddings, norm, head)", shape.root_parameters() * cb,
               f"{shape.root_parameters() / 1e6:.1f} M x {cb} B")
        if not k.lora_rank:
            up.add("one layer's unsharded grads + fp32 reduce-scatter", shape.layer_parameters() * (cb + 4),
                   f"{shape.layer_parameters() / 1e6:.1f} M x ({cb} + 4) B")
            up.add("unsharded root grads before their reduce-scatter", shape.root_parameters() * cb,
                   f"{shape.root_parameters() / 1e6:.1f} M x {cb} B")
    act, note = _activations(shape, n, cb, ckpt)
    up.add("activations" + (" (checkpointed)" if ckpt else " (no checkpointing)"), act, note)
    scratch = k.memory_budget or head_scratch(n, shape.vocab, shape.hidden, k.device_bytes)
    up.add("fused head scratch", scratch + n * (shape.hidden * cb + 32),
           f"memory_budget {scratch // MiB} MiB + {n} x (dh {shape.hidden * cb} B + 32 B); no [N, V] logits")
    if k.engine == "vllm":
        asleep = ENGINE_ASLEEP if k.sleep_level else float(k.gpu_memory_utilization or 0) * k.device_bytes
        up.add("vLLM engine " + ("asleep" if k.sleep_level else "awake (--vllm-sleep-level 0)"), asleep,
               "estimate" if k.sleep_level else "its whole budget")
    up.add("CUDA context, NCCL, allocator slack", CUDA_RESERVED, "estimate")
    up.add("AdamW foreach temporaries (in step())", trainable * tb / W, "after the backward frees activations",
           after=True)

    plan = Plan(shape=shape, knobs=k, rollout=ro, update=up, kv=kv, problems=[])
    plan.problems = _problems(plan)
    return plan


def _item_bytes(phase: Phase, prefix: str) -> float:
    return sum(i.bytes for i in phase.items if i.name.startswith(prefix))


def _problems(plan: Plan) -> list[Problem]:
    s, k, out = plan.shape, plan.knobs, []
    dev = k.device_bytes
    gib = lambda b: f"{b / GiB:.1f} GiB"
    tp = int(k.tp or 1)
    resident = sum(i.bytes for i in plan.update.items if i.note.startswith("resident"))
    if resident > dev:
        more = "--lora-rank 64" if not k.lora_rank else "--nproc-per-node / --nnodes (more GPUs)"
        out.append(Problem(f"the trainer's state alone is {gib(resident)} per GPU, over the {gib(dev)} device", more))
    elif plan.update.peak > dev:
        awake = k.engine == "vllm" and not k.sleep_level
        if awake and plan.update.peak - _item_bytes(plan.update, "vLLM engine") + ENGINE_ASLEEP <= dev:
            out.append(Problem(f"the update needs {gib(plan.update.peak)} per GPU with the engine awake",
                               "--vllm-sleep-level 2"))
        elif not k.checkpointing:
            out.append(Problem(f"the update needs {gib(plan.update.peak)} per GPU without activation checkpointing",
                               "--gradient-checkpointing"))
        else:
            out.append(Problem(f"the update needs {gib(plan.update.peak)} per GPU at "
                               f"{k.micro_batch_tokens} tokens per micro-batch", "--micro-batch-tokens (smaller)"))
    if k.engine == "vllm":
        budget = plan.kv["budget"]
        weights = s.parameters() * k.compute_bytes / tp
        if k.world % tp or tp > max(k.nproc_per_node, 1) or s.heads % tp:
            out.append(Problem(f"tensor-parallel size {tp} must divide the world size {k.world} and the "
                               f"{s.heads} attention heads, within one node of {k.nproc_per_node}",
                               "--vllm-tensor-parallel-size"))
        if budget < weights + ENGINE_OVERHEAD:
            out.append(Problem(f"the engine's budget {gib(budget)} cannot hold its weights {gib(weights)} + "
                               f"{gib(ENGINE_OVERHEAD)} of activations", "--vllm-gpu-memory-utilization (larger) "
                               "or --vllm-tensor-parallel-size (larger)"))
        elif k.max_model_len and plan.kv["tokens"] < k.max_model_len:
            out.append(Problem(f"the KV cache holds {plan.kv['tokens']:,} tokens, less than one max_model_len "
                               f"{k.max_model_len} request (vLLM refuses to start)",
                               "--vllm-max-model-len (smaller) or --vllm-gpu-memory-utilization (larger)"))
        if s.max_positions and k.max_model_len and k.max_model_len > s.max_positions:
            out.append(Problem(f"max_model_len {k.max_model_len} exceeds the model's {s.max_positions} positions",
                               "--vllm-max-model-len or --max-new-tokens / --max-prompt-tokens"))
    if plan.rollout.peak > dev:
        flag = ("--vllm-gpu-memory-utilization (smaller)" if k.engine == "vllm" else
                "--generation-batch-size (fewer rows per generate call)")
        out.append(Problem(f"the rollout needs {gib(plan.rollout.peak)} per GPU", flag))
    return out


# -- settings left unset ----------------------------------------------------------------------
def _fixed(k: Knobs, **kw) -> Knobs:
    return dataclasses.replace(k, **kw)


def derive(shape: ModelShape, k: Knobs, *, on_gpu: bool = True) -> Plan:
    """Fill ``k``'s unset settings and plan: ``max_model_len`` = prompt cap + ``--max-new-tokens``
    (within the model's positions); micro-batch tokens: the preset's, halved until the update
    fits; activation checkpointing: on when the update would not fit without it; tensor-parallel
    size: the smallest that gives the engine KV room for the whole rollout (else the one giving
    most); engine utilisation: what it needs for that (``_utilization``), within what the
    trainer's resident state and the sync leave. Without a
    GPU (``on_gpu=False``) the old defaults stand (checkpointing off, utilisation 0.3, TP 1)."""
    derived: dict = {}
    if k.max_model_len is None:
        v = k.seq_len if not shape.max_positions else min(k.seq_len, int(shape.max_positions))
        k = _fixed(k, max_model_len=v)
        derived["vllm_max_model_len"] = (v, f"--max-prompt-tokens {k.prompt_tokens} + --max-new-tokens "
                                            f"{k.max_new_tokens}" + (" (capped by the model's positions)"
                                                                     if v < k.seq_len else ""))
    if not on_gpu:
        fills = dict(checkpointing=False, gpu_memory_utilization=0.3, tp=1, micro_batch_tokens=k.default_micro_batch)
        for name, v in fills.items():
            if getattr(k, name) is None:
                k = _fixed(k, **{name: v})
                derived[_FIELD[name]] = (v, "default (no GPU: no plan)")
        plan = plan_memory(shape, k)
        plan.derived = derived
        return plan
    # the update phase depends on the engine only through its sleeping (or, at level 0, awake) budget
    probe = _fixed(k, tp=k.tp or 1, gpu_memory_utilization=k.gpu_memory_utilization or 0.0)
    dev = k.device_bytes * (1 - MARGIN)  # what the derived settings may plan for
    mb_unset, ck_unset = k.micro_batch_tokens is None, k.checkpointing is None
    n = k.micro_batch_tokens or k.default_micro_batch
    if ck_unset:
        off = plan_memory(shape, _fixed(probe, checkpointing=False, micro_batch_tokens=n)).update.peak
        k = _fixed(k, checkpointing=off > dev)
        derived["gradient_checkpointing"] = (k.checkpointing, f"the update needs {off / GiB:.1f} GiB without it at "
                                                              f"{n} tokens" + (" (fits)" if off <= dev else ""))
    if mb_unset:
        def peak(tokens):
            return plan_memory(shape, _fixed(probe, checkpointing=k.checkpointing, micro_batch_tokens=tokens)).update.peak
        if peak(MIN_MICRO_BATCH) <= dev:  # else no micro-batch fits: the state is the problem, keep the preset's
            while n > MIN_MICRO_BATCH and peak(n) > dev:
                n //= 2
        k = _fixed(k, micro_batch_tokens=n)
        derived["micro_batch_tokens"] = (n, "the preset's" if n == k.default_micro_batch else
                                         f"halved from {k.default_micro_batch} until the update fits")
    if k.engine == "vllm":
        engine_unset = {"tp": k.tp is None, "util": k.gpu_memory_utilization is None}
        choices = [t for t in TP_SIZES if t <= max(k.nproc_per_node, 1) and k.world % t == 0 and shape.heads % t == 0]
        if k.tp is not None:
            choices = [k.tp]
        best = None
        for t in choices or [1]:
            kt = _fixed(k, tp=t, gpu_memory_utilization=k.gpu_memory_utilization or _utilization(shape, k, t))
            p = plan_memory(shape, kt)
            full = p.kv["tokens"] >= p.kv["needed"]
            score = (p.fits, full, p.kv["tokens"] / max(p.kv["needed"], 1))
            if best is None or (not (best[0][0] and best[0][1]) and score > best[0]):
                best = (score, kt)
            if p.fits and full:
                break
        k = best[1]
        if engine_unset["tp"]:
            derived["vllm_tensor_parallel_size"] = (k.tp, "the smallest that gives the KV cache the whole rollout"
                                                    if best[0][1] else "the one giving the KV cache most room")
        if engine_unset["util"]:
            derived["vllm_gpu_memory_utilization"] = (k.gpu_memory_utilization,
                                                      "weights + KV for the rollout phase and 25% more, within "
                                                      "what the trainer's resident state and the sync leave")
    for name, v in (("tp", 1), ("gpu_memory_utilization", 0.3)):
        if getattr(k, name) is None:  # the HF engine: not used
            k = _fixed(k, **{name: v})
    plan = plan_memory(shape, k)
    plan.derived = derived
    return plan


_FIELD = {"checkpointing": "gradient_checkpointing", "gpu_memory_utilization": "vllm_gpu_memory_utilization",
          "tp": "vllm_tensor_parallel_size", "micro_batch_tokens": "micro_batch_tokens"}


def _utilization(shape: ModelShape, k: Knobs, tp: int) -> float:
    """The engine's share of the device: what it needs (weights, activations, and KV room for the
    whole rollout phase and a quarter more, at least one ``max_model_len`` request; never below
    ``MIN_UTILIZATION``), within what the rollout phase leaves beside the trainer (and, with sleep
    off, beside the update) less ``MARGIN``; in steps of 0.01, at most ``MAX_UTILIZATION``."""
    probe = plan_memory(shape, _fixed(k, tp=tp, gpu_memory_utilization=0.0))
    engine_rows = ("vLLM weights", "vLLM activations", "vLLM KV cache")
    other = sum(i.bytes for i in probe.rollout.items if not i.name.startswith(engine_rows))
    if k.sleep_level == 0:
        other = max(other, probe.update.peak)
    free = math.floor(((k.device_bytes - other) / k.device_bytes - MARGIN) * 100) / 100
    kv = probe.kv
    need = (_item_bytes(probe.rollout, "vLLM weights") + ENGINE_OVERHEAD
            + 1.25 * kv["bytes_per_token"] * max(kv["needed"], k.max_model_len or 0))
    want = max(MIN_UTILIZATION, math.ceil(need / k.device_bytes * 100) / 100)
    return max(0.01, min(MAX_UTILIZATION, free, want))


def apply_derived(cfg, plan: Plan) -> None:
    """Write the plan's derived settings into ``cfg`` (so config.yaml records them)."""
    sections = {"gradient_checkpointing": cfg.model, "micro_batch_tokens": cfg.optim}
    for name, (value, _) in plan.derived.items():
        setattr(sections.get(name, cfg.rollout), name, value)


def refusal(plan: Plan) -> ConfigError | None:
    """The error a run that does not fit ends with (exit 2), naming the flags to change; None when it fits."""
    if plan.fits:
        return None
    why = "; ".join(f"{p.message} (change {p.flag})" for p in plan.problems)
    return ConfigError(f"memory plan: this run does not fit {plan.knobs.device_bytes / GiB:.0f} GiB GPUs: {why}. "
                       f"`python -m agpo.plan` with the same flags prints the whole plan")


# -- tables ------------------------------------------------------------------------------------
def table(plan: Plan, *, markdown: bool = False) -> str:
    """The plan as text (or Markdown): one table per phase, the KV cache, derived settings, the verdict."""
    s, k = plan.shape, plan.knobs
    lines = []
    head = (f"{s.model_type or 'model'}: P = {s.parameters():,} parameters ({s.parameters() / 1e9:.2f} B); "
            f"{k.world} GPU(s) x {k.device_bytes / GiB:.0f} GiB; "
            f"{'LoRA rank ' + str(k.lora_rank) if k.lora_rank else 'full fine-tuning'}"
            f"{', FSDP2' if k.sharded else ''}; rollout {k.engine}"
            + (f" (TP {k.tp}, utilisation {k.gpu_memory_utilization:.2f}, max_model_len {k.max_model_len})"
               if k.engine == "vllm" else "")
            + f"; checkpointing {'on' if k.checkpointing else 'off'}; {k.micro_batch_tokens} tokens per micro-batch")
    lines.append(head)
    for ph in plan.phases:
        lines.append("")
        if markdown:
            lines += [f"| {ph.name} | per GPU | how |", "|---|---|---|"]
            for i in ph.items:
                lines.append(f"| {i.name} | {i.bytes / GiB:.2f} GiB | {i.note} |")
            lines.append(f"| **{ph.name} peak** | **{ph.peak / GiB:.1f} GiB** | of {k.device_bytes / GiB:.0f} GiB |")
        else:
            lines.append(f"{ph.name} phase, per GPU:")
            for i in ph.items:
                lines.append(f"  {i.name:<52} {i.bytes / GiB:8.2f} GiB  {i.note}")
            lines.append(f"  {'peak':<52} {ph.peak / GiB:8.2f} GiB  of {k.device_bytes / GiB:.0f} GiB")
    kv = plan.kv
    lines.append("")
    lines.append(f"KV cache: {kv['bytes_per_token'] / 1024:.0f} KiB per token per GPU; holds {kv['tokens']:,} tokens; "
                 f"a rollout phase's {kv['rows']} sequences of {k.seq_len} need {kv['needed']:,}"
                 + ("" if kv["tokens"] >= kv["needed"] else
                    f" ({kv['tokens'] / max(kv['needed'], 1):.0%} at once: generated in turns)"))
    for name, (v, why) in plan.derived.items():
        flag = name.replace("_", "-")
        shown = (f"--{flag}" if v else f"--no-{flag}") if isinstance(v, bool) else f"--{flag} {v}"
        lines.append(f"auto: {shown} ({why})")
    if plan.fits:
        lines.append(f"FITS: rollout {plan.rollout.peak / GiB:.1f} GiB, update {plan.update.peak / GiB:.1f} GiB "
                     f"of {k.device_bytes / GiB:.0f} GiB per GPU")
    else:
        lines.append("DOES NOT FIT:")
        lines += [f"  - {p.message}: change {p.flag}" for p in plan.problems]
    return "\n".join(lines)


# -- a run's unset settings ----------------------------------------------------------------------
def _launch() -> tuple[int, int, bool]:
    """World size, ranks per node and whether torchrun started this process (its environment)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launched = "RANK" in os.environ and "MASTER_ADDR" in os.environ
    return world, int(os.environ.get("LOCAL_WORLD_SIZE", str(world))), launched or world > 1


def _device_gib(device: str) -> float:
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index
        index = int(os.environ.get("LOCAL_RANK", "0")) if index is None else index
        return torch.cuda.get_device_properties(index).total_memory / GiB
    return DEFAULT_DEVICE_GIB


def resolve(cfg, *, world: int | None = None, nproc_per_node: int | None = None, sharded: bool | None = None,
            device_gib: float | None = None, on_gpu: bool | None = None) -> Plan | None:
    """Fill ``cfg``'s unset memory settings (``--max-prompt-tokens``, ``--vllm-max-model-len``,
    ``--micro-batch-tokens``, ``--gradient-checkpointing``, ``--vllm-tensor-parallel-size``,
    ``--vllm-gpu-memory-utilization``) from the plan of its model, in place, and return the plan;
    None when the model's config.json cannot be had without loading it (the old defaults are
    filled instead). World size, ranks per node and device memory default to torchrun's
    environment and the visible GPU; ``on_gpu`` to ``cfg.model.device`` being CUDA."""
    from agpo.models import PRESETS

    w, nproc, launched = _launch()
    world = world or w
    nproc_per_node = nproc_per_node or min(nproc, world)
    sharded = launched if sharded is None else sharded
    on_gpu = str(cfg.model.device).startswith("cuda") if on_gpu is None else on_gpu
    device_gib = device_gib or (_device_gib(cfg.model.device) if on_gpu else DEFAULT_DEVICE_GIB)
    r = cfg.rollout
    if r.max_prompt_tokens is None:
        r.max_prompt_tokens = DEFAULT_PROMPT_TOKENS
    raw = model_config(cfg.model.model)
    if raw is None:
        preset = PRESETS.get(cfg.model.model)
        fills = [(cfg.optim, "micro_batch_tokens", preset.micro_batch_tokens if preset else 8192),
                 (cfg.model, "gradient_checkpointing", False), (r, "vllm_tensor_parallel_size", 1),
                 (r, "vllm_gpu_memory_utilization", 0.3),
                 (r, "vllm_max_model_len", r.max_prompt_tokens + (r.max_new_tokens or 512))]
        for section, name, v in fills:
            if getattr(section, name) is None:
                setattr(section, name, v)
        return None
    knobs = knobs_from_config(cfg, world=world, nproc_per_node=nproc_per_node, sharded=sharded, device_gib=device_gib)
    plan = derive(ModelShape.from_config(raw), knobs, on_gpu=on_gpu)
    apply_derived(cfg, plan)
    return plan


def summary(plan: Plan) -> str:
    """One line for the run log: the phases' peaks and what was derived."""
    k = plan.knobs
    line = (f"agpo: memory plan per GPU: rollout {plan.rollout.peak / GiB:.1f} GiB, update {plan.update.peak / GiB:.1f} "
            f"GiB of {k.device_bytes / GiB:.0f} GiB (python -m agpo.plan prints the tables)")
    if plan.derived:
        line += "; derived: " + ", ".join(f"{n.replace('_', '-')} {v}" for n, (v, _) in plan.derived.items())
    return line
