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
scaled-down Qwen2 against ``torch.cuda.max_memory_allocated``. What a run does with a plan
(the settings it leaves unset, the refusal, the tables) is ``agpo.scale.sizing``.

Imports only ``agpo.models`` (a preset's embedded config) and, for the fused head's scratch,
``agpo_kernels.chunks``.
"""

from __future__ import annotations

import json
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


def item_bytes(phase: Phase, prefix: str) -> float:
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
        if awake and plan.update.peak - item_bytes(plan.update, "vLLM engine") + ENGINE_ASLEEP <= dev:
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
