"""Distributed building blocks for multi-GPU training (issue 7): torchrun + FSDP2 + DCP.

Everything here is plain PyTorch: ``torch.distributed`` for the process group and the
small collectives the trainer needs (metric averaging, broadcasting a rollout plan),
``torch.distributed.fsdp.fully_shard`` (FSDP2) for sharding, and
``torch.distributed.checkpoint`` (DCP) for sharded, resharding-on-load checkpoints.
Every function is also correct in a single process without a process group, where the
collectives are identities and the sharding helpers are no-ops or plain saves.

Order of calls in a trainer (all ranks run all of them, in the same order)::

    env = init_distributed()                                  # torchrun sets RANK/WORLD_SIZE
    model = build_model().to(env.device)                      # or meta-device init
    policy = Policy(model)                                    # root: whatever forward() runs
    layers = model.model.layers
    apply_activation_checkpointing(layers)                    # before sharding, in place
    shard_model(policy, list(layers), param_dtype=torch.bfloat16)
    optimizer = torch.optim.AdamW(policy.parameters(), ...)   # after sharding (DTensors)
    with unsharded(policy):                                   # rollout: one all-gather
        out = model.generate(...)
    loss = policy(batch)...; loss.backward(); optimizer.step()
    save_sharded(path, policy, optimizer, extra={...})        # collective
    export_hf(policy, model, tokenizer, out_dir, env)         # collective
    shutdown_distributed()
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from agpo.scale.dcp_safe import SafeLoadPlanner, check_folder, read_extra
from agpo.scale.lora import merged_state_for_export


# -- process group ---------------------------------------------------------------------------
@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank, world size, local rank and its device. ``launched``:
    started by torchrun with a process group, even of one rank (which then takes the
    sharded path too: FSDP2 mixed precision on a single GPU)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    launched: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.launched


def _pick_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def init_distributed(device: str = "auto", timeout_s: float = 600) -> DistEnv:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU), or run single-process.

    A process group is created when torchrun started this process (``RANK`` and
    ``MASTER_ADDR`` in the environment; ``torchrun --nproc_per_node 1`` included) or
    ``WORLD_SIZE`` > 1. ``device="cpu"`` forces gloo even where CUDA exists. ``timeout_s`` bounds every
    collective: a rank that dies or stops participating makes the others raise instead of
    hanging forever. Calling it again when the group already exists just returns the env.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    launched = "RANK" in os.environ and "MASTER_ADDR" in os.environ
    if (launched or world_size > 1) and str(device).startswith("cuda:"):
        raise ValueError(f"--device {device}: under torchrun each rank uses cuda:LOCAL_RANK; pass --device cuda "
                         f"(choose GPUs with CUDA_VISIBLE_DEVICES)")
    dev = _pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size <= 1 and not launched:
        return DistEnv(0, 1, 0, dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
        if dev.type == "cuda":
            kwargs["device_id"] = dev                  # eager NCCL init, bound to this GPU
        dist.init_process_group(**kwargs)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev, launched=True)


def shutdown_distributed() -> None:
    """Destroy the process group if there is one (call on every rank at exit)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active(env: DistEnv) -> bool:
    return env.distributed and dist.is_initialized()


def barrier(env: DistEnv) -> None:
    if _active(env):
        if env.device.type == "cuda":
            dist.barrier(device_ids=[env.device.index])
        else:
            dist.barrier()


def _all_reduce_dict(values: dict[str, float], env: DistEnv, mean: bool) -> dict[str, float]:
    keys = sorted(values)                               # the same order on every rank
    if not _active(env):
        return {k: float(values[k]) for k in keys}
    buf = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=env.device)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)          # one collective for the whole dict
    if mean:
        buf /= env.world_size
    return dict(zip(keys, buf.tolist()))


def all_reduce_sum(values: dict[str, float], env: DistEnv) -> dict[str, float]:
    """Sum of each entry over ranks (all ranks must pass the same keys)."""
    return _all_reduce_dict(values, env, mean=False)


def all_reduce_mean(values: dict[str, float], env: DistEnv) -> dict[str, float]:
    """Mean of each entry over ranks (all ranks must pass the same keys)."""
    return _all_reduce_dict(values, env, mean=True)


def broadcast_object(obj: Any, env: DistEnv, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (pickled)."""
    if not _active(env):
        return obj
    box = [obj if env.rank == src else None]
    dist.broadcast_object_list(box, src=src, device=env.device if env.device.type == "cuda" else None)
    return box[0]


def gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not _active(env):
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


# -- sharding --------------------------------------------------------------------------------
def _fsdp():
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    return FSDPModule, MixedPrecisionPolicy, fully_shard


def is_sharded(module: nn.Module) -> bool:
    FSDPModule = _fsdp()[0]
    return any(isinstance(m, FSDPModule) for m in module.modules())


def shard_model(root: nn.Module, layers: list[nn.Module], *, param_dtype: torch.dtype | None = None,
                reduce_dtype: torch.dtype | None = torch.float32, master_dtype: torch.dtype | None = None,
                reshard_after_forward: bool = True, mesh=None) -> nn.Module:
    """FSDP2: ``fully_shard`` every decoder layer, then ``root`` (in place; returns root).

    ``root`` is the module whose ``forward`` the trainer calls (e.g. ``agpo.learn.policy.Policy``
    wrapping the HF model): its pre-forward hook all-gathers everything not inside a layer
    -- embeddings, final norm, LM head -- so code in its forward may read
    ``model.lm_head.weight`` directly. Tied embeddings (one Parameter for embed_tokens and
    lm_head) work because both names fall into the root's group; this is why the root must
    be wrapped last and why no layer may own them.

    Mixed precision only when ``param_dtype`` is given: the sharded parameters stay in
    their storage dtype (fp32 master weights for training), are all-gathered and computed
    in ``param_dtype`` (bf16 on GPUs), and gradients are reduce-scattered in
    ``reduce_dtype``. ``master_dtype`` (e.g. fp32 for a model loaded in bf16) casts the
    parameters one layer at a time just before that layer is sharded, so a rank never holds
    more than the loaded model plus one layer in the master dtype (a 14B model: 27.5 GiB of
    bf16 host memory per rank instead of 55 GiB of fp32); the shards then hold exactly the
    loaded values. Call :func:`apply_activation_checkpointing` before this, and create
    the optimizer after it (its parameters are the sharded DTensors). Gradients are
    averaged over ranks (see the trainer's loss scaling). ``mesh``: a 1-D device mesh over
    the ranks (default: the accelerator's, so pass :func:`device_mesh` for ranks on CPU on
    a machine with a GPU).
    """
    _, MixedPrecisionPolicy, fully_shard = _fsdp()
    kwargs: dict[str, Any] = {}
    if mesh is not None:
        kwargs["mesh"] = mesh
    root_kwargs = dict(kwargs)
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
        # the root's inputs stay as given: the loss's fp32 old/ref log-probs, advantages,
        # clip ranges and temperatures must not be rounded to param_dtype
        root_kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype,
                                                        cast_forward_inputs=False)
    for layer in layers:
        _cast_unsharded(layer, master_dtype)
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **kwargs)
        layer._agpo_reshard_after_forward = reshard_after_forward
    # The root is only resharded after backward: its params are needed again right away.
    _cast_unsharded(root, master_dtype)
    fully_shard(root, reshard_after_forward=False, **root_kwargs)
    root._agpo_reshard_after_forward = False
    return root


def device_mesh(env: DistEnv):
    """The 1-D mesh over all ranks on ``env``'s device type (FSDP's default mesh follows
    the accelerator even when the ranks run on CPU)."""
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(env.device.type, (env.world_size,))


def _cast_unsharded(module: nn.Module, dtype: torch.dtype | None) -> None:
    """Floating-point parameters of ``module`` not yet sharded (not DTensors) to ``dtype``,
    in place (a tied parameter is one object: cast once)."""
    if dtype is None:
        return
    from torch.distributed.tensor import DTensor
    for p in module.parameters():
        if p.is_floating_point() and p.dtype != dtype and not isinstance(p, DTensor):
            p.data = p.data.to(dtype)


CHECKPOINT_WRAPPER_PREFIX = "_checkpoint_wrapped_module."
"""What ``CheckpointWrapper`` (activation checkpointing) inserts into the names its parent
module reports (``named_modules``/``named_parameters`` of the model around it; the
wrapper's own ``state_dict`` strips it, the parent's ``named_*`` do not)."""


def checkpoint_name(name: str) -> str:
    """The Hugging Face checkpoint name of a parameter or module name of a model that may
    carry activation-checkpointing wrappers (``model.layers.0._checkpoint_wrapped_module.
    mlp.up_proj.weight`` -> ``model.layers.0.mlp.up_proj.weight``). The one place names are
    made canonical: the streamed loading (``agpo.scale.loading``) and the weight sync to a
    rollout engine (``agpo.rollout.weights``) both use it."""
    return name.replace(CHECKPOINT_WRAPPER_PREFIX, "")


def apply_activation_checkpointing(layers: nn.ModuleList) -> nn.ModuleList:
    """Non-reentrant activation checkpointing of each decoder layer, in place.

    Each ``layers[i]`` is replaced by a ``CheckpointWrapper`` around it (so do this before
    :func:`shard_model` and pass the wrapped layers to it: FSDP's hooks then sit outside
    the checkpointed region and the recomputation in backward re-uses the all-gathered
    parameters). State-dict keys are unchanged (the wrapper strips its prefix); names from
    the parent's ``named_modules``/``named_parameters`` are not: :func:`checkpoint_name`.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        checkpoint_wrapper,
    )
    for i, layer in enumerate(layers):
        if type(layer).__name__ != "CheckpointWrapper":
            layers[i] = checkpoint_wrapper(layer, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    return layers


@contextlib.contextmanager
def unsharded(root: nn.Module) -> Iterator[nn.Module]:
    """All parameters gathered once for a whole rollout; resharded on exit.

    Inside, ``model.generate`` runs on plain (unsharded) parameters: each FSDP module is
    all-gathered once on entry and told not to reshard after forward, so decoding N tokens
    costs one all-gather per FSDP group instead of one per layer per token. Costs the full
    (``param_dtype``) model in memory for the duration. Collective: all ranks must enter
    and leave together (and run the same number of forward calls inside if anything there
    can still communicate). A no-op for an unsharded model.
    """
    FSDPModule = _fsdp()[0]
    mods = [m for m in root.modules() if isinstance(m, FSDPModule)]
    if not mods:
        yield root
        return
    if not isinstance(root, FSDPModule):
        raise ValueError("unsharded(root) needs the FSDP root module (the one shard_model wrapped last)")
    # Make ``root`` the FSDP root even if no forward has run through it yet: otherwise the
    # first layer to run forward inside generate() would be taken as the root.
    root._get_fsdp_state()._lazy_init()
    try:
        for m in mods:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        yield root
    finally:
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(getattr(m, "_agpo_reshard_after_forward", m is not root),
                                        recurse=False)


def reshard_all(root: nn.Module) -> None:
    """Put every FSDP module of ``root`` back in the sharded state (a no-op where it is).

    The root is not resharded after its forward; after a no-grad forward (rollout
    scoring) no backward follows to do it, so its parameters stay gathered until then.
    Local: no communication.
    """
    FSDPModule = _fsdp()[0]
    for m in root.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


# -- checkpoints -----------------------------------------------------------------------------
def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if _is_dist() else 0


def _swap_into_place(tmp: Path, path: Path) -> None:
    """Rank 0: replace ``path`` by the complete ``tmp`` (a directory) as atomically as a
    rename allows; an existing ``path`` is kept until the new one is in place."""
    old = path.with_name(path.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)


def on_rank0(fn):
    """``fn()`` run on rank 0, its result (or its exception, raised) on every rank: a
    rank-0-only read or write that fails must not leave the other ranks waiting at the
    next collective. Collective under a process group."""
    result, err = None, None
    if _rank() == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - raised on every rank below
            err = e
            try:
                pickle.dumps(e)
            except Exception:  # noqa: BLE001
                err = RuntimeError(f"{type(e).__name__}: {e}")
    if _is_dist():
        box = [(result, err)]
        dist.broadcast_object_list(box, src=0)
        if _rank() != 0:
            result, err = box[0]
    if err is not None:
        raise err
    return result


def _fresh_tmp(path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")

    def make():
        if tmp.exists():
            shutil.rmtree(tmp)                          # a crashed earlier attempt
        tmp.mkdir(parents=True)
    on_rank0(make)
    return tmp


def _sd_options(trainable_only: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(ignore_frozen_params=trainable_only, strict=not trainable_only)


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns on every save/load without a process group; one process is a supported
    case here (a laptop run, a resume at world size 1), so keep the console clean."""
    with warnings.catch_warnings():
        if not _is_dist():
            warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled")
        yield


def _model_state(model: nn.Module, msd: dict, trainable_only: bool) -> dict:
    """``msd`` without frozen parameters when ``trainable_only`` (DCP's option keeps a
    frozen parameter tied to another name, e.g. a tied LM head, under that name)."""
    if not trainable_only:
        return msd
    frozen = {n for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    return {k: v for k, v in msd.items() if k not in frozen}


def save_sharded(path, model: nn.Module, optimizer: torch.optim.Optimizer | None, *,
                 extra: dict | None = None, trainable_only: bool = False) -> None:
    """Sharded checkpoint (DCP) of model + optimizer, plus ``extra`` (picklable, from rank 0).

    Collective. Written to ``<path>.tmp`` and renamed to ``path`` by rank 0 once every rank
    has finished, so ``path`` is always a complete checkpoint. Needs a filesystem shared by
    all ranks. Loadable at any world size (:func:`load_sharded`). ``trainable_only``: leave
    out frozen parameters (a LoRA run's base weights, which the run can rebuild).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
    )

    path = Path(path)
    reshard_all(model)
    tmp = _fresh_tmp(path)
    opts = _sd_options(trainable_only)
    if optimizer is not None:
        msd, osd = get_state_dict(model, optimizer, options=opts)
        state = {"model": _model_state(model, msd, trainable_only), "optim": osd}
    else:
        state = {"model": _model_state(model, get_model_state_dict(model, options=opts), trainable_only)}
    with _single_process_quiet():
        dcp.save(state, checkpoint_id=str(tmp))           # a failure on any rank raises on all
    meta = {"extra": extra, "world_size": dist.get_world_size() if _is_dist() else 1}
    on_rank0(lambda: torch.save(meta, tmp / "extra.pt"))
    on_rank0(lambda: _swap_into_place(tmp, path))


def load_sharded(path, model: nn.Module, optimizer: torch.optim.Optimizer | None, *,
                 trainable_only: bool = False) -> dict | None:
    """Load a :func:`save_sharded` checkpoint into ``model`` / ``optimizer`` in place (any
    world size: DCP reshards on load). Collective. Returns the saved ``extra``.
    ``trainable_only`` as it was saved with (frozen parameters keep their values). The
    folder is untrusted: read through ``agpo.scale.dcp_safe`` (ValueError naming a bad file)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    path = Path(path)
    check_folder(path)
    reshard_all(model)
    opts = _sd_options(trainable_only)
    if optimizer is not None:
        msd, osd = get_state_dict(model, optimizer, options=opts)    # also materialises empty Adam state
        state = {"model": _model_state(model, msd, trainable_only), "optim": osd}
    else:
        state = {"model": _model_state(model, get_model_state_dict(model, options=opts), trainable_only)}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(path), planner=SafeLoadPlanner())
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=opts)
    else:
        set_model_state_dict(model, state["model"], options=opts)
    return on_rank0(lambda: read_extra(path / "extra.pt"))["extra"]


def _base_hf_model(hf_model: nn.Module) -> nn.Module:
    get_base = getattr(hf_model, "get_base_model", None)   # a peft model
    return get_base() if callable(get_base) else hf_model


def full_state_dict(root: nn.Module, hf_model: nn.Module) -> dict[str, torch.Tensor]:
    """Full, CPU state dict of ``hf_model`` (keyed as in the HF model) gathered from a
    possibly sharded ``root`` that contains it. Collective; rank 0 gets the tensors, the
    other ranks an empty dict."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    reshard_all(root)
    sd = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    base = _base_hf_model(hf_model)
    prefix = next((name for name, m in root.named_modules() if m is base), None)
    if prefix is None:
        raise ValueError("hf_model is not a submodule of the given root")
    prefix = prefix + "." if prefix else ""
    out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    for alias in _tied_aliases(base):
        out.pop(alias, None)                            # tied: HF re-ties it on load
    return out


def _tied_aliases(module: nn.Module) -> list[str]:
    """Names of parameters that are the same tensor as an earlier-named one (tied
    embeddings): a gathered state dict holds them as separate copies."""
    first: dict[int, str] = {}
    aliases = []
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases.append(name)
        else:
            first[id(p)] = name
    return aliases


def _set_config_dtype(config_json: Path, dtype: torch.dtype) -> None:
    import json
    conf = json.loads(config_json.read_text())
    conf["dtype"] = str(dtype).removeprefix("torch.")
    config_json.write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")


def export_hf(model_or_root: nn.Module, hf_model: nn.Module, tokenizer, path, env: DistEnv, *,
              dtype: torch.dtype | None = None) -> None:
    """Write a standard HF checkpoint (safetensors + config + tokenizer) of the current
    weights to ``path``, loadable by ``AutoModelForCausalLM.from_pretrained(path)``.

    Collective: every rank takes part in gathering the full state dict (on CPU); rank 0
    writes it to ``<path>.tmp`` and renames. LoRA adapters (a peft ``hf_model``) are
    merged into the base weights; the exported model is the plain base architecture.
    ``dtype``: cast floating-point weights to it (fp32 master weights exported in bf16).
    """
    sd = full_state_dict(model_or_root, hf_model)
    path = Path(path)
    if env.is_main:
        if any(".lora_" in k for k in sd):
            sd = merged_state_for_export(hf_model, sd)
        if dtype is not None:
            for k, v in sd.items():                    # one tensor at a time: no second full copy
                if v.is_floating_point():
                    sd[k] = v.to(dtype)
        base = _base_hf_model(hf_model)
        tmp = path.with_name(path.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        base.save_pretrained(str(tmp), state_dict=sd)
        if dtype is not None:                           # transformers records the live (master) dtype
            _set_config_dtype(tmp / "config.json", dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        _swap_into_place(tmp, path)
    barrier(env)
