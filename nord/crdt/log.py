"""Durable replica state: the latest snapshot plus an append-only log of what was accepted since.

Layout of a replica directory (generation g):
    CURRENT                  JSON {"format_version": 1, "generation": g}, replaced atomically
    snapshot-g.safetensors   base weights at the compaction point + metadata (nord.checkpoint)
    log-g.bin                records appended since that snapshot

A record is framed as  u32 length | u32 crc32(payload) | payload  (little-endian), payload = msgpack
[kind, bytes]. `append` fsyncs before it returns, so anything a replica acknowledged survives kill -9.
On reopen, a frame that is truncated or fails its checksum ends the log: it and everything after it is
cut off (with a warning) and never used. Compaction writes generation g+1 beside g (snapshot, then
log, then CURRENT); a crash at any step leaves CURRENT on a complete generation.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path

import msgpack
import torch

from nord.checkpoint import load_checkpoint, save_checkpoint
from nord.errors import CheckpointError, MergeError
from nord.fsutil import atomic_path, atomic_write_bytes, fsync_dir

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
HEADER = struct.Struct("<II")
MAX_RECORD_BYTES = 1 << 31
KINDS = ("add", "remove", "seal")


def frame(kind: str, data: bytes) -> bytes:
    payload = msgpack.packb([kind, data], use_bin_type=True)
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def read_log(path: Path) -> tuple[list[tuple[str, bytes]], int]:
    """Records of a log file and the byte length of its valid prefix (the rest is a torn/corrupt tail)."""
    data = path.read_bytes() if path.exists() else b""
    records: list[tuple[str, bytes]] = []
    pos = 0
    while pos < len(data):
        if pos + HEADER.size > len(data):
            break
        length, crc = HEADER.unpack_from(data, pos)
        payload = data[pos + HEADER.size : pos + HEADER.size + length]
        if length > MAX_RECORD_BYTES or len(payload) != length or zlib.crc32(payload) != crc:
            break
        try:
            kind, body = msgpack.unpackb(payload, raw=False)
        except Exception:  # a checksum-valid but undecodable record is corruption too
            break
        if kind not in KINDS or not isinstance(body, bytes):
            break
        records.append((kind, body))
        pos += HEADER.size + length
    return records, pos


class Store:
    """Snapshot + append-only log of one replica directory."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.generation = -1
        self._file = None

    @property
    def exists(self) -> bool:
        return (self.directory / "CURRENT").exists()

    def _snapshot(self, g: int) -> Path:
        return self.directory / f"snapshot-{g}.safetensors"

    def _log(self, g: int) -> Path:
        return self.directory / f"log-{g}.bin"

    def create(self, base: Mapping[str, torch.Tensor], meta: Mapping[str, object]) -> None:
        if self.exists:
            raise MergeError(f"{self.directory} already holds a replica: open it with Replica.open")
        self.rewrite(base, meta, [])

    def rewrite(
        self, base: Mapping[str, torch.Tensor], meta: Mapping[str, object], records: list[tuple[str, bytes]]
    ) -> None:
        """Start generation g+1 with this snapshot and these records; then drop generation g."""
        old, new = self.generation, self.generation + 1
        save_checkpoint(self._snapshot(new), base, dict(meta))
        with atomic_path(self._log(new)) as tmp:
            tmp.write_bytes(b"".join(frame(kind, data) for kind, data in records))
        current = {"format_version": FORMAT_VERSION, "generation": new}
        atomic_write_bytes(self.directory / "CURRENT", json.dumps(current).encode())
        self.close()
        self.generation = new
        if old >= 0:
            self._snapshot(old).unlink(missing_ok=True)
            self._log(old).unlink(missing_ok=True)
            fsync_dir(self.directory)

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, str], list[tuple[str, bytes]]]:
        """(snapshot tensors, snapshot metadata, valid log records); cuts a corrupt log tail."""
        try:
            current = json.loads((self.directory / "CURRENT").read_text())
            generation = int(current["generation"])
            version = current["format_version"]
        except FileNotFoundError:
            raise MergeError(f"{self.directory} holds no replica (no CURRENT file)") from None
        except (ValueError, KeyError, TypeError):
            raise MergeError(f"{self.directory}/CURRENT is corrupt") from None
        if version != FORMAT_VERSION:
            raise MergeError(f"{self.directory}: unsupported replica format {version!r}")
        try:
            tensors, meta = load_checkpoint(self._snapshot(generation))
        except CheckpointError as e:
            raise MergeError(f"replica snapshot unusable: {e}") from None
        path = self._log(generation)
        records, valid = read_log(path)
        size = path.stat().st_size if path.exists() else 0
        if valid < size:
            cut = size - valid
            log.warning("%s: cut a torn or corrupt tail (%d bytes) after %d records", path, cut, len(records))
            with open(path, "r+b") as f:
                f.truncate(valid)
                os.fsync(f.fileno())
        self.generation = generation
        return tensors, meta, records

    def append(self, kind: str, data: bytes) -> None:
        """Append one record and fsync: when this returns the record survives a crash."""
        if self._file is None:
            self._file = open(self._log(self.generation), "ab")  # noqa: SIM115 - kept open across appends
        start = self._file.tell()
        try:
            self._file.write(frame(kind, data))
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError:
            self._file.truncate(start)  # never leave a torn record in front of later ones
            raise

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
