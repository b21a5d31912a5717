"""Named model recipes: one function per size, looked up by `get_config(name, vocab_size=None)`.

Parameter counts (tied embeddings; measured by tests/nord/test_model.py):
    tiny      ~1.0M   vocab 2048,  D 128,  4 layers   — tests
    small     ~13M    vocab 8192,  D 384,  6 layers   — CPU demo
    base      ~146M   vocab 32768, D 768,  18 layers
    nord-1b   ~1.088B vocab 32768, D 2048, 22 layers  — the Project Nord size; 6% of it is the embedding
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from nord.errors import ConfigError
from nord.model import ModelConfig


def tiny() -> ModelConfig:
    return ModelConfig(
        vocab_size=2048, d_model=128, n_layers=4, d_mlp=512, n_memory_slots=32, chunk_size=32, max_seq_len=64
    )


def small() -> ModelConfig:
    return ModelConfig(
        vocab_size=8192, d_model=384, n_layers=6, d_mlp=1536, n_memory_slots=64, max_seq_len=256
    )


def base() -> ModelConfig:
    return ModelConfig(
        vocab_size=32768, d_model=768, n_layers=18, d_mlp=3072, n_memory_slots=128, max_seq_len=512
    )


def nord_1b() -> ModelConfig:
    # d_mlp 8000 (not 4·D) puts the total at 1.088B with 22 layers and a 32k vocabulary.
    return ModelConfig(
        vocab_size=32768, d_model=2048, n_layers=22, d_mlp=8000, n_memory_slots=256, max_seq_len=1024
    )


RECIPES: dict[str, Callable[[], ModelConfig]] = {
    "tiny": tiny,
    "small": small,
    "base": base,
    "nord-1b": nord_1b,
}


def get_config(name: str, vocab_size: int | None = None) -> ModelConfig:
    """The recipe `name`, with its vocabulary replaced by `vocab_size` (the tokenizer's) if given."""
    if name not in RECIPES:
        raise ConfigError(f"unknown model recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    cfg = RECIPES[name]()
    return cfg if vocab_size is None else dataclasses.replace(cfg, vocab_size=vocab_size)
