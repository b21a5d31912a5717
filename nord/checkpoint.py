"""Checkpoints: safetensors files written atomically, with string metadata and a content hash.

The weights hash is what seals and replicas compare: sha256 over every tensor's name, dtype, shape and
raw little-endian bytes, in sorted name order — so it depends on the values only, not on the file layout
or metadata.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nord.errors import CheckpointError
from nord.fsutil import atomic_path

FORMAT_VERSION = "1"


def weights_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """Hex sha256 of the tensors' names, dtypes, shapes and bytes, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checkpoint(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, object] | None = None
) -> str:
    """Save `tensors` atomically to `path`; return their `weights_hash`.

    Args:
        tensors: name -> tensor (moved to CPU and made contiguous; shared storage is copied).
        metadata: JSON-serialisable values, stored as strings under `nord.<key>` (dicts as JSON).
    """
    cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    digest = weights_hash(cpu)
    meta = {"nord.format_version": FORMAT_VERSION, "nord.weights_hash": digest}
    for key, value in (metadata or {}).items():
        meta[f"nord.{key}"] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    with atomic_path(path) as tmp:
        save_file(cpu, str(tmp), metadata=meta)
    return digest


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `nord.*` metadata of a checkpoint (keys without the prefix), without loading tensors."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{p} is not a readable safetensors checkpoint ({e})") from None
    return {k.removeprefix("nord."): v for k, v in raw.items() if k.startswith("nord.")}


def load_checkpoint(
    path: str | os.PathLike, *, verify: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a checkpoint; return (tensors, metadata without the `nord.` prefix).

    Raises CheckpointError for a missing, truncated or corrupt file, an unknown format version, or
    (with `verify`) tensors whose hash does not match the recorded one.
    """
    meta = read_metadata(path)
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: unsupported checkpoint format version {version!r} (expected {FORMAT_VERSION})"
        )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated ({e})") from None
    if verify and weights_hash(tensors) != meta.get("weights_hash"):
        raise CheckpointError(
            f"{path}: weights do not match the hash recorded in the file (corrupt checkpoint)"
        )
    return tensors, meta
