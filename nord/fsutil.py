"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Write to a temporary file in the same directory, flush and fsync it, rename it over the target,
then fsync the directory so the rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on clean exit fsync it and rename it onto `path`.

    On an exception the temporary file is removed and `path` is untouched. The file gets `mode`
    (mkstemp alone would leave it private to its owner, so a served checkpoint would be unreadable).

    Example:
        with atomic_path("model.safetensors") as tmp:
            safetensors.torch.save_file(tensors, tmp)
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, mode: int = 0o644) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path, mode=mode) as tmp:
        tmp.write_bytes(data)


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename or a new file in `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
