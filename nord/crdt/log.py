"""Durable replica state: the latest snapshot plus an append-only log of what was accepted since.

Layout of a replica directory (generation g):
    CURRENT                  JSON {"format_version": 1, "generation": g}, replaced atomically
    snapshot-g.safetensors   base weights at the compaction point + metadata (nord.checkpoint)
    log-g.bin                records appended since that snapshot

A record is framed as  u32 length | u32 crc32(payload) | payload  (little-endian), payload = msgpack
[kind, bytes]. `append` fsyncs before it returns, so anything a replica acknowledged survives kill -9.
On reopen, a frame that is truncated or fails its checksum ends the log: it and everything after it is
cut off (with a warning) and never used. Compaction writes generation g+1 beside g (snapshot, then
log, then CURRENT); a crash at any step leaves CURRENT on a complete generation. It does so in two
steps, so that the slow one runs while records are still appended to g: `stage` writes g+1's snapshot
and log from a copy of the state; `finish_rewrite` appends to g+1 what g received since
`begin_rewrite`, then makes g+1 current. Files of other generations (a crash before CURRENT moved) and
temporary files are removed when the directory is loaded.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import zlib
from collections.abc import Iterable, Mapping
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
KINDS = ("add", "remove", "seal", "aggregate")


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
        self._since: list[tuple[str, bytes]] | None = None  # appended since begin_rewrite

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
        self.begin_rewrite()
        self.stage(base, meta, records)
        self.finish_rewrite()

    def begin_rewrite(self) -> None:
        """Keep a copy of every record appended from now on, for `finish_rewrite`."""
        if self._since is not None:
            raise MergeError(f"{self.directory}: a rewrite is already in progress")
        self._since = []

    def stage(
        self,
        base: Mapping[str, torch.Tensor],
        meta: Mapping[str, object],
        records: Iterable[tuple[str, bytes]],
    ) -> None:
        """Write generation g+1 (snapshot, log; fsynced) beside g, which stays current. Thread-safe
        against `append` (another file)."""
        new = self.generation + 1
        save_checkpoint(self._snapshot(new), base, dict(meta))
        with atomic_path(self._log(new)) as tmp, open(tmp, "wb") as f:
            for kind, data in records:
                f.write(frame(kind, data))

    def finish_rewrite(self) -> None:
        """Append to the staged generation what was appended since `begin_rewrite`, make it current and
        drop the old one. On an error the old generation stays current and the staged one is removed."""
        old, new = self.generation, self.generation + 1
        since, self._since = self._since or [], None
        try:
            if since:
                with open(self._log(new), "ab") as f:
                    f.write(b"".join(frame(kind, data) for kind, data in since))
                    f.flush()
                    os.fsync(f.fileno())
            current = {"format_version": FORMAT_VERSION, "generation": new}
            atomic_write_bytes(self.directory / "CURRENT", json.dumps(current).encode())
        except BaseException:
            self.abandon_rewrite()
            raise
        self.close()
        self.generation = new
        if old >= 0:
            self._snapshot(old).unlink(missing_ok=True)
            self._log(old).unlink(missing_ok=True)
            fsync_dir(self.directory)

    def abandon_rewrite(self) -> None:
        """Forget a staged generation (the current one is untouched)."""
        self._since = None
        self._snapshot(self.generation + 1).unlink(missing_ok=True)
        self._log(self.generation + 1).unlink(missing_ok=True)

    def _remove_leftovers(self) -> None:
        """Files of other generations and temporary files: what a crash mid-compaction leaves."""
        keep = {"CURRENT", self._snapshot(self.generation).name, self._log(self.generation).name}
        for path in self.directory.iterdir():
            if path.name not in keep and path.name.lstrip(".").startswith(("snapshot-", "log-", "CURRENT.")):
                log.info("%s: removing %s, left by an unfinished compaction", self.directory, path.name)
                path.unlink(missing_ok=True)

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
        self._remove_leftovers()
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
        if self._since is not None:
            self._since.append((kind, data))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
