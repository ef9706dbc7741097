"""Reading a ``torch.distributed.checkpoint`` (DCP) folder as untrusted input.

DCP (torch 2.11 to 2.13) reads a folder's ``.metadata`` with plain ``pickle.load`` and the
non-tensor values of a state dict (optimiser hyper-parameters and the like, stored as
BYTE_IO items) with ``torch.load(weights_only=False)``: a crafted checkpoint would run
arbitrary code when loaded. Here, before DCP touches a folder:

- ``read_metadata(folder)`` unpickles ``.metadata`` with an allow-list: DCP's own metadata
  classes, ``torch.Size``, dtypes, layouts, memory formats and paths; anything else (a
  function, ``os.system``, a class from another module) is refused;
- ``check_folder(folder)`` also checks that every storage file the metadata names exists
  and is long enough for the items placed in it (a truncated or missing shard is named);
- ``SafeLoadPlanner`` (pass it to ``dcp.load``) reads every BYTE_IO item with
  ``torch.load(weights_only=True)`` first, so DCP's own unrestricted read only ever sees
  data that is plain values and tensors.

Errors are ``ValueError`` naming the file.
"""

from __future__ import annotations

import io
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

METADATA_FILE = ".metadata"
_DCP_MODULES = ("torch.distributed.checkpoint.metadata",  # and where older torch kept TensorProperties:
                "torch.distributed._shard.sharded_tensor.metadata")
_ALLOWED = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
            ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
            ("pathlib", "Path"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
            ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if "." not in name:
            if (module, name) == ("collections", "OrderedDict"):
                return OrderedDict
            if module == "torch":
                obj = getattr(torch, name, None)
                if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                    return obj
            if (module, name) in _ALLOWED or module in _DCP_MODULES:
                obj = super().find_class(module, name)
                if (module, name) in _ALLOWED or (isinstance(obj, type) and obj.__module__ == module):
                    return obj
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


def read_metadata(folder: str | os.PathLike):
    """The DCP ``Metadata`` of ``folder``, unpickled with the allow-list."""
    path = Path(folder) / METADATA_FILE
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        meta = _MetadataUnpickler(io.BytesIO(data)).load()
    except Exception as e:  # noqa: BLE001 - truncated, corrupt or refused
        raise ValueError(f"{path}: truncated, corrupt or not a DCP metadata file ({type(e).__name__}: {e})") from None
    if type(meta).__name__ != "Metadata" or not isinstance(getattr(meta, "storage_data", None), dict):
        raise ValueError(f"{path}: not a DCP metadata file (holds a {type(meta).__name__})")
    return meta


def check_folder(folder: str | os.PathLike):
    """``read_metadata`` plus: every storage file exists and holds its items' bytes."""
    folder = Path(folder)
    meta = read_metadata(folder)
    need: dict[str, int] = {}
    for info in meta.storage_data.values():
        rel = str(getattr(info, "relative_path", ""))
        if not rel or os.path.isabs(rel) or ".." in Path(rel).parts:
            raise ValueError(f"{folder / METADATA_FILE}: storage file name {rel!r} points outside the checkpoint")
        need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
    for rel, size in sorted(need.items()):
        path = folder / rel
        if not path.is_file():
            raise ValueError(f"{path}: missing (the checkpoint's metadata places data in it)")
        have = path.stat().st_size
        if have < size:
            raise ValueError(f"{path}: truncated ({have} of at least {size} bytes)")
    return meta


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` whose non-tensor items must load with ``weights_only=True``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"checkpoint item {read_item.dest_index.fqn!r}: refused by torch.load(weights_only=True) "
                             f"({type(e).__name__}: {str(e)[:200]})") from None
        value.seek(0)
        super().load_bytes(read_item, value)


def read_extra(file: str | os.PathLike) -> dict:
    """``agpo.scale.distributed.save_sharded``'s ``extra.pt``, loaded with ``weights_only=True``."""
    try:
        meta = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, corrupt or holding more than plain values
        raise ValueError(f"{file}: truncated, corrupt or not loadable with weights_only=True "
                         f"({type(e).__name__}: {str(e)[:300]})") from None
    if not isinstance(meta, dict) or "extra" not in meta:
        raise ValueError(f"{file}: not an agpo checkpoint's extra.pt")
    return meta
