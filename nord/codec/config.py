"""`CodecConfig`: how a worker compresses its pseudo-gradient (a section of `RunConfig`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from nord.errors import ConfigError
from nord.nf4 import BNB_BLOCKSIZES

MAX_CHUNK = 1 << 16  # chunk-local offsets fit in 16 bits


@dataclass(frozen=True, kw_only=True)
class CodecConfig:
    """Top-k per chunk, NF4 values, error feedback.

    Defaults follow SparseLoCo: the 64 largest of every 4096 values (1.56%) per round.
    """

    chunk_size: int = 4096  # values per top-k chunk; a smaller tensor is one chunk
    density: float = 64 / 4096  # kept fraction per chunk (k = ceil(density * chunk), at least 1)
    blocksize: int = 64  # NF4 values per absmax scale
    ef_decay: float = 1.0  # residual multiplier before it is added to the next delta (1 = keep all)
    max_payload_bytes: int = 64 * 2**20  # decoders reject larger envelopes

    def __post_init__(self) -> None:
        if not 1 <= self.chunk_size <= MAX_CHUNK:
            raise ConfigError(f"codec.chunk_size must be in [1, {MAX_CHUNK}], got {self.chunk_size}")
        if not 0 < self.density <= 1:
            raise ConfigError(f"codec.density must be in (0, 1], got {self.density}")
        if self.blocksize not in BNB_BLOCKSIZES:
            raise ConfigError(f"codec.blocksize must be one of {BNB_BLOCKSIZES}, got {self.blocksize}")
        if not 0 <= self.ef_decay <= 1:
            raise ConfigError(f"codec.ef_decay must be in [0, 1], got {self.ef_decay}")
        if self.max_payload_bytes < 1024:
            raise ConfigError(f"codec.max_payload_bytes must be >= 1024, got {self.max_payload_bytes}")

    def keep(self, chunk_len: int) -> int:
        """Values kept from a chunk of `chunk_len` values."""
        return min(chunk_len, max(1, math.ceil(self.density * chunk_len - 1e-9)))
