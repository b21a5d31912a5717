"""The prepared corpus: its config, the tokenizer and token streams built once and cached, and batches.

Per split, each document's blocks of that split are concatenated, encoded, and followed by the
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
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nord.data.sources import load_documents, source_identity
from nord.data.split import split_documents
from nord.errors import ConfigError, DataError
from nord.fsutil import fsync_dir

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
EOT = "<|endoftext|>"
MIN_VOCAB = 256 + 1  # the byte alphabet plus <|endoftext|>
MAX_VOCAB = 65536 * 4


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
    name, identity = source_identity(cfg.source)
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
