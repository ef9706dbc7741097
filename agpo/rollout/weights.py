"""The policy's weights as a stream of ``(checkpoint name, full tensor)`` pairs, for an
engine that holds its own copy (vLLM).

Names are those of the Hugging Face checkpoint (``model.layers.0.self_attn.q_proj.weight``),
which is what an engine's ``load_weights`` expects, whatever wraps the layers: activation
checkpointing's ``_checkpoint_wrapped_module.`` is stripped by the same helper the streamed
loading uses (``agpo.scale.distributed.checkpoint_name``). A tied LM head is sent under both
of its names: vLLM's in-place reload re-materialises every layer on its own, so an engine
started from dummy weights keeps a random head if only the embedding arrives (tested).
The stream is lazy and goes in module order, in the engine's ``dtype`` (the tensors are cast
before they are moved, not after):

- one device: the parameters themselves (no copy unless a cast is needed);
- FSDP2 shards: one all-gather per FSDP unit (a decoder layer; the root's embeddings, final
  norm and LM head), issued when the stream reaches the unit's first parameter. Each rank
  casts its local shards of the unit to ``dtype``, packs them (padded to FSDP's equal
  dim-0 chunks) into one byte buffer and all-gathers it; the unit's full tensors are cut
  out of the result and dropped once the consumer has moved past the unit's last
  parameter. So the transfer is ``dtype`` bytes (bf16: half of the fp32 master shards),
  the number of collectives is the number of units (a unit above ``BUCKET_BYTES`` in
  buckets: 48 layers + 3 for Qwen2.5-14B's root, 51 instead of one per parameter, 579),
  and a rank holds at most one unit's full tensors beyond its shards, each dropped after
  its last use (the largest transient at 14B: the LM head's gathered buffer and its copy,
  2 x 1.45 GiB in bf16). Collective: every rank must consume the whole stream, in order;
- peft LoRA: each adapted projection is sent **merged**, ``W0 + scaling * B @ A`` computed
  in fp32 (one layer at a time; the adapters are gathered in their own fp32) and cast to
  ``dtype``, with plain HF names; every other parameter (embeddings, norms, LM head: the
  frozen base) is sent too. See docs/rollout.md for why merged weights rather than the
  engine's LoRA adapters, and why the whole model every time.

``SyncStats`` counts what a stream did (collectives, bytes received per rank, tensors):
``policy_weights(..., stats=s)`` fills it as the stream is consumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from agpo.scale.distributed import checkpoint_name
from agpo.scale.lora import base_model


@dataclass
class SyncStats:
    """What one weight stream did on this rank."""

    collectives: int = 0
    """All-gathers issued (one per FSDP unit; 0 on one device)."""
    bytes: int = 0
    """Bytes this rank received from those all-gathers (its own share included, padding too)."""
    tensors: int = 0
    """``(name, tensor)`` pairs yielded."""
    sent_bytes: int = 0
    """Bytes of the yielded tensors (what the engine's loader copies in)."""


def _lora_classes() -> tuple[type, ...]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # peft not installed: no model can hold LoRA layers
        return ()
    return (LoraLayer,)


def _fsdp_units(base: nn.Module) -> list[nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return []
    return [m for m in base.modules() if isinstance(m, FSDPModule)]


def _is_dtensor(p: torch.Tensor) -> bool:
    return callable(getattr(p, "full_tensor", None)) and hasattr(p, "to_local")


def _shard_dim0(p) -> bool:
    from torch.distributed.tensor import Shard

    return p.dim() > 0 and tuple(p.placements) == (Shard(0),) and p.device_mesh.ndim == 1


def _gather_unit(params: list[torch.Tensor], wire: list[torch.dtype], stats: SyncStats) -> list[torch.Tensor]:
    """The full tensors of FSDP2 shards ``params`` (all on one 1-D mesh, ``Shard(0)``), each
    in its ``wire`` dtype, with one all-gather of one byte buffer."""
    mesh = params[0].device_mesh
    group = mesh.get_group()
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    pieces, layout = [], []
    for p, dt in zip(params, wire):
        d0 = p.shape[0]
        rest = p.numel() // d0 if d0 else 0
        chunk = -(-d0 // world)  # FSDP2 shards dim 0 as torch.chunk: ceil(d0 / world) rows per rank
        local = p.to_local().detach()
        rows = max(0, min(chunk, d0 - rank * chunk))
        if local.shape[0] != rows:
            raise RuntimeError(f"unexpected FSDP shard of {tuple(p.shape)}: {tuple(local.shape)} rows on rank {rank}")
        size = torch.empty((), dtype=dt).element_size()
        numel = -(-chunk * rest * size // 16) * 16 // size  # 16-byte pieces: every dtype view stays aligned
        padded = torch.zeros(numel, dtype=dt, device=local.device)
        padded[:local.numel()] = local.reshape(-1).to(dt)
        nbytes = padded.numel() * padded.element_size()
        pieces.append(padded.view(torch.uint8))
        layout.append((nbytes, chunk * rest * size, dt, tuple(p.shape)))
    send = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    del pieces
    recv = torch.empty(world * send.numel(), dtype=torch.uint8, device=send.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
    gather(recv, send, group=group)
    stats.collectives += 1
    stats.bytes += recv.numel()
    return unpack_gathered(recv.view(world, send.numel()), layout)


def unpack_gathered(per_rank: torch.Tensor, layout: list[tuple]) -> list[torch.Tensor]:
    """The full tensors from the gathered bytes ``per_rank [world, piece bytes]``; ``layout``
    holds ``(padded bytes, real bytes, dtype, shape)`` per tensor: each rank's piece of a
    tensor is its ``torch.chunk`` of rows (``real`` bytes, fewer rows on the last ranks)
    padded to 16 bytes, so the padding is cut from every rank's piece before the rows are
    laid end to end (rank-major)."""
    out, offset = [], 0
    for nbytes, real, dt, shape in layout:
        full = per_rank[:, offset:offset + real].reshape(-1).view(dt)
        out.append(full[:int(torch.Size(shape).numel())].view(shape))
        offset += nbytes
    return out


BUCKET_BYTES = 2**30
"""A unit whose tensors (in the wire dtype) exceed this is gathered in consecutive buckets of
at most this size (a bigger tensor alone): at 14B the root unit's embeddings and LM head,
1.45 GiB each in bf16, are two gathers, so a rank never holds a gathered buffer and its
copies of more than one of them (2.9 GiB); a decoder layer (0.55 GiB) is one."""


class _Units:
    """The full tensors of the FSDP units (or buckets of one) the stream is in: gathered on
    first use, each tensor dropped after its last use (the uses are counted up front)."""

    def __init__(self, base: nn.Module, uses: list[list[torch.Tensor]], wire_of, stats: SyncStats,
                 bucket_bytes: int = BUCKET_BYTES):
        self.stats, self.wire_of = stats, wire_of
        self.bucket_of: dict[int, int] = {}
        self.buckets: list[list[torch.Tensor]] = []
        owned: set[int] = set()
        groups = []
        for unit in reversed(_fsdp_units(base)):  # innermost first: a parameter belongs to its nearest unit
            mine = [p for p in unit.parameters() if id(p) not in owned and _is_dtensor(p) and _shard_dim0(p)]
            owned.update(id(p) for p in mine)
            groups.append(mine)
        rest = []  # the root's unit (outside ``base``): every other sharded parameter
        for p in base.parameters():
            if id(p) not in owned and _is_dtensor(p) and _shard_dim0(p):
                owned.add(id(p))
                rest.append(p)
        groups.append(rest)
        for group in groups:
            self._split(group, bucket_bytes)
        self.left: dict[int, int] = {}
        for item in uses:
            for p in item:
                self.left[id(p)] = self.left.get(id(p), 0) + 1
        self.full: dict[int, torch.Tensor] = {}

    def _split(self, params: list[torch.Tensor], bucket_bytes: int) -> None:
        bucket, size = [], 0
        for p in params:
            n = p.numel() * torch.empty((), dtype=self.wire_of(p)).element_size()
            if bucket and size + n > bucket_bytes:
                self._add(bucket)
                bucket, size = [], 0
            bucket.append(p)
            size += n
        self._add(bucket)

    def _add(self, params: list[torch.Tensor]) -> None:
        if params:
            for p in params:
                self.bucket_of[id(p)] = len(self.buckets)
            self.buckets.append(params)

    def get(self, p: torch.Tensor) -> torch.Tensor:
        """The whole of ``p`` in its wire dtype."""
        k = self.bucket_of.get(id(p))
        if k is None:
            if _is_dtensor(p):  # a DTensor FSDP did not lay out as Shard(0): gathered on its own
                self.stats.collectives += 1
                full = p.full_tensor().detach()
                self.stats.bytes += full.numel() * full.element_size()
                return full.to(self.wire_of(p))
            return p.detach().to(self.wire_of(p))
        if id(p) not in self.full:
            members = self.buckets[k]
            for q, t in zip(members, _gather_unit(members, [self.wire_of(q) for q in members], self.stats)):
                if self.left.get(id(q), 0) > 0:
                    self.full[id(q)] = t
        return self.full[id(p)]

    def done(self, item: list[torch.Tensor]) -> None:
        """``item``'s tensors have been consumed: drop those no later item needs."""
        for p in item:
            self.left[id(p)] -= 1
            if self.left[id(p)] == 0:
                self.full.pop(id(p), None)


def _plan(base: nn.Module):
    """``[(kind, name, module, params)]`` in module order: ``("lora", ...)`` for a peft LoRA
    layer (sent merged), ``("param", name, p, [p])`` for every other parameter."""
    lora = _lora_classes()
    items, skip = [], []
    for name, module in base.named_modules():
        if skip and (name == skip[-1] or name.startswith(skip[-1] + ".")):
            continue
        if lora and isinstance(module, lora):
            skip.append(name)
            params = [module.base_layer.weight]
            if getattr(module.base_layer, "bias", None) is not None:
                params.append(module.base_layer.bias)
            for a in _active(module):
                params += [module.lora_A[a].weight, module.lora_B[a].weight]
            items.append(("lora", checkpoint_name(name), module, params))
            continue
        for pname, p in module.named_parameters(recurse=False, remove_duplicate=False):
            full = f"{name}.{pname}" if name else pname
            items.append(("param", checkpoint_name(full), p, [p]))
    return items


def _active(layer: nn.Module) -> list[str]:
    if getattr(layer, "disable_adapters", False) or getattr(layer, "merged", False):
        return []
    return [a for a in getattr(layer, "active_adapters", []) if a in layer.lora_A]


def _merged(layer: nn.Module, name: str, get, dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """A peft LoRA layer as its merged base projection (weight, and bias if any)."""
    base = layer.base_layer
    w = get(base.weight)
    active = _active(layer)
    if active:
        if getattr(layer, "fan_in_fan_out", False):
            raise NotImplementedError(f"{name}: fan_in_fan_out LoRA layers")
        out_dtype = dtype or w.dtype
        w = w.float()
        for a in active:
            lora_a, lora_b = get(layer.lora_A[a].weight).float(), get(layer.lora_B[a].weight).float()
            w = w + layer.scaling[a] * (lora_b @ lora_a)
        w = w.to(out_dtype)
    yield f"{name}.weight", w
    if getattr(base, "bias", None) is not None:
        yield f"{name}.bias", get(base.bias)


@torch.no_grad()
def policy_weights(model: nn.Module, *, dtype: torch.dtype | None = None, stats: SyncStats | None = None,
                   bucket_bytes: int = BUCKET_BYTES) -> Iterator[tuple[str, torch.Tensor]]:
    """``(HF checkpoint name, full tensor)`` for every parameter of ``model`` (a plain HF
    causal LM or a peft model around one, possibly with activation-checkpointing wrappers
    and FSDP2 shards), LoRA merged in, floating-point tensors in ``dtype`` (None: as
    stored), FSDP2 shards gathered one unit at a time (a unit above ``bucket_bytes`` in
    buckets; see the module docstring). ``stats`` is filled as the stream is consumed."""
    base = base_model(model)
    stats = stats if stats is not None else SyncStats()
    items = _plan(base)
    adapters = {id(p) for kind, _, m, _ in items if kind == "lora"
                for a in _active(m) for p in (m.lora_A[a].weight, m.lora_B[a].weight)}

    def wire_of(p: torch.Tensor) -> torch.dtype:
        if dtype is None or not p.is_floating_point() or id(p) in adapters:
            return p.dtype  # adapters stay fp32 for the merge
        return dtype

    units = _Units(base, [params for *_, params in items], wire_of, stats, bucket_bytes)
    for kind, name, obj, params in items:
        pairs = _merged(obj, name, units.get, dtype) if kind == "lora" else [(name, units.get(obj))]
        for n, t in pairs:
            stats.tensors += 1
            stats.sent_bytes += t.numel() * t.element_size()
            yield n, t
        units.done(params)
