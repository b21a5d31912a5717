"""Checkpoints: atomic writes, a value-only hash, and clean errors for damaged files."""

import os

import pytest
import torch

from nord.checkpoint import load_checkpoint, read_metadata, save_checkpoint, weights_hash
from nord.errors import CheckpointError
from nord.fsutil import atomic_path


def tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(3, 5, generator=g), "b": torch.arange(7, dtype=torch.int64)}


def test_save_load_round_trip_keeps_values_metadata_and_hash(tmp_path):
    path = tmp_path / "ck.safetensors"
    digest = save_checkpoint(path, tensors(), {"round": 3, "config": {"d": 4}, "name": "x"})
    loaded, meta = load_checkpoint(path)
    assert digest == weights_hash(loaded) == meta["weights_hash"]
    assert all(torch.equal(loaded[k], v) for k, v in tensors().items())
    assert meta["round"] == "3" and meta["name"] == "x" and meta["config"] == '{"d": 4}'
    assert [p.name for p in tmp_path.iterdir()] == ["ck.safetensors"]  # no temp file left


def test_hash_depends_on_values_not_insertion_order():
    t = tensors()
    assert weights_hash(t) == weights_hash(dict(reversed(list(t.items()))))
    t2 = tensors()
    t2["a.weight"][0, 0] += 1e-6
    assert weights_hash(t2) != weights_hash(t)


def test_truncated_and_garbage_files_raise_checkpoint_error(tmp_path):
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, tensors())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        read_metadata(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")


def test_flipped_tensor_byte_is_caught_by_the_hash(tmp_path):
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, tensors())
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor's bytes
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(path)


def test_failed_write_leaves_previous_file_intact(tmp_path):
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, tensors(0))
    before = path.read_bytes()
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_bytes(b"half a file")
        raise RuntimeError("crash mid-write")
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ck.safetensors"]
