"""Test-only: run verl 0.9.1's FSDP2 training engine on CPU processes (gloo), which verl
itself never does (it has no CPU platform and falls back to "nvidia"). ``use_cpu_platform()``
registers a ``cpu`` platform and selects it, and points verl's engine lookup at the
``("cuda", "nvidia")`` registrations, so the engine built is the one a GPU run gets
(agpo's subclass where the plugin is installed). What the engine's forward runs on is
plain CPU torch; nothing here touches verl's math.

Also: ``verl_config(*overrides)`` composes verl's own ``ppo_trainer`` config (AGPO's
defaults applied unless ``defaults=False``); ``tiny_qwen2(folder)`` writes a 2-layer Qwen2 (random init, fp32) to a folder, and
``engine(folder, ...)`` builds verl's engine on it with sdpa attention and fp32 mixed
precision (the defaults, flash-attention-2 and bf16 autocast, have no CPU path here)."""

from __future__ import annotations

import contextlib
import os
import types

import torch

ENV = {"VERL_PLATFORM": "cpu", "VERL_ENGINE_DEVICE": "cuda", "VERL_ENGINE_VENDOR": "nvidia"}


def _device_module():
    """torch.cpu with the few torch.cuda calls verl's engine makes, as no-ops."""
    mod = types.SimpleNamespace(**{k: getattr(torch.cpu, k) for k in dir(torch.cpu) if not k.startswith("_")})
    zero = lambda *a, **k: 0  # noqa: E731
    for name in ("memory_allocated", "memory_reserved", "max_memory_allocated", "max_memory_reserved"):
        setattr(mod, name, zero)
    for name in ("empty_cache", "reset_peak_memory_stats", "manual_seed", "manual_seed_all", "set_device",
                 "ipc_collect"):
        setattr(mod, name, lambda *a, **k: None)
    mod.mem_get_info = lambda *a, **k: (1 << 34, 1 << 35)
    mod.is_available = lambda: True
    mod.current_device = lambda: 0
    mod.device_count = lambda: 1
    return mod


def use_cpu_platform() -> None:
    """Register and select the CPU platform, then load agpo's plugin: call before anything
    imports verl. verl resolves its platform the first time a module asks (its loss and
    engine modules do on import), and ``import verl`` loads the plugins, so the platform
    goes in between: plugins off for ``import verl``, the platform, then the plugin."""
    os.environ.update(ENV, VERL_USE_EXTERNAL_PLUGINS="none")
    from verl.plugin.platform.platform_base import PlatformBase
    from verl.plugin.platform.platform_manager import PlatformRegistry

    @PlatformRegistry.register(platform="cpu")
    class PlatformCPU(PlatformBase):
        device_name = "cpu"
        vendor_name = "cpu"
        device_module = _device_module()

        def is_available(self):
            return True

        def is_platform_available(self, use_smi_check=False):
            return True

        def current_device(self):
            return "cpu"

        def device_count(self):
            return 1

        def set_device(self, device_index):
            return None

        def synchronize(self, device_index=None):
            return None

        def manual_seed(self, seed):
            torch.manual_seed(seed)

        def manual_seed_all(self, seed):
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings):
            return None

        def empty_cache(self):
            return None

        def get_device_capability(self, device_index=0):
            return None, None

        def communication_backend_name(self):
            return "gloo"

        def visible_devices_envvar(self):
            return "CUDA_VISIBLE_DEVICES"

        @contextlib.contextmanager
        def nvtx_range(self, msg):
            yield

        def profiler_start(self):
            return None

        def profiler_stop(self):
            return None

        def ray_resource_name(self):
            return "CPU"

        def ray_noset_envvars(self):
            return []

        def is_ipc_supported(self):
            return False

        def cudart(self):
            return None

    import agpo_kernels.integrations.verl as plugin

    plugin.check()


def tiny_qwen2(folder, *, vocab: int = 97, tie: bool = False, seed: int = 0) -> str:
    """A 2-layer Qwen2ForCausalLM (fp32, random init) saved to ``folder``; a vocabulary that
    is no multiple of any tile."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=144, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tie, bos_token_id=None, eos_token_id=0, pad_token_id=1)
    torch.manual_seed(seed)
    Qwen2ForCausalLM(cfg).save_pretrained(str(folder))
    return str(folder)


def engine(folder, *, agpo: bool, remove_padding: bool = True, dynamic_bsz: bool = False, verl_own: bool = False,
           lr: float = 1e-2):
    """verl's FSDP2 language-model engine on the model in ``folder``, initialised: the one
    verl's registry picks (agpo's subclass here), or with ``verl_own`` verl's own class.
    Never forward-only: verl offloads those to pinned host memory, which needs a GPU."""
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig
    from verl.workers.engine.base import EngineRegistry

    model = HFModelConfig(path=str(folder), load_tokenizer=False, use_remove_padding=remove_padding,
                          use_fused_kernels=agpo, enable_gradient_checkpointing=False,
                          fused_kernel_options={"impl_backend": "agpo" if agpo else "torch"},
                          override_config={"attn_implementation": "sdpa"})
    eng = FSDPEngineConfig(strategy="fsdp2", use_remove_padding=remove_padding, use_fused_kernels=agpo,
                           use_dynamic_bsz=dynamic_bsz, max_token_len_per_gpu=24, infer_max_token_len_per_gpu=24,
                           mixed_precision={"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"})
    opt = FSDPOptimizerConfig(lr=lr, weight_decay=0.0, clip_grad=1e6, lr_warmup_steps=0, total_training_steps=10)
    kw = dict(model_config=model, engine_config=eng, optimizer_config=opt, checkpoint_config=None)
    if verl_own:
        from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

        e = FSDPEngineWithLMHead(**kw)
    else:
        e = EngineRegistry.new(model_type="language_model", backend="fsdp2", **kw)
    e.initialize()
    return e


def verl_config(*overrides, defaults: bool = True):
    """verl 0.9.1's ``ppo_trainer`` config with Hydra ``overrides``, AGPO's defaults applied."""
    from hydra import compose, initialize_config_dir
    from verl.trainer import main_ppo

    from agpo.integrations.verl.checks import apply_defaults

    folder = os.path.join(os.path.dirname(os.path.abspath(main_ppo.__file__)), "config")
    with initialize_config_dir(config_dir=folder, version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=list(overrides))
    if defaults:
        apply_defaults(cfg)
    return cfg
