"""`CodecConfig`: how a worker compresses its pseudo-gradient (a section of `RunConfig`).

Density warm-up (Deep Gradient Compression's sparsity warm-up): round r < warmup_rounds keeps

    d(r) = w · (density / w)^(r / warmup_rounds),   w = max(warmup_density, density)

a geometric decay from warmup_density to density, so the large early pseudo-gradients are sent on time
instead of trickling out of the error-feedback residual; from round warmup_rounds on d(r) = density.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nord.codec.mask import MAX_SEED
from nord.errors import ConfigError
from nord.nf4 import BNB_BLOCKSIZES

MAX_CHUNK = 1 << 16  # chunk-local offsets fit in 16 bits
MASKS = ("topk", "shared")
VALUE_BITS = (4, 2)  # NF4 (nord.nf4) or sign + one magnitude bit (nord.codec.twobit)


@dataclass(frozen=True, kw_only=True)
class CodecConfig:
    """Top-k per chunk, NF4 values, error feedback.

    Defaults follow SparseLoCo: the 64 largest of every 4096 values (1.56%) per round, after a density
    warm-up from 25% over the first 8 rounds (module doc).
    """

    chunk_size: int = 4096  # values per top-k chunk; a smaller tensor is one chunk
    density: float = 64 / 4096  # kept fraction per chunk (k = ceil(density * chunk), at least 1)
    blocksize: int = 64  # values per absmax scale
    value_bits: int = 4  # 4: NF4 codes; 2: nord.codec.twobit (half the value bytes, coarser)
    ef_decay: float = 1.0  # residual multiplier before it is added to the next delta (1 = keep all)
    # Density warm-up 25% → 1.56% over the first 8 rounds: in `nord bench decentralized` (K = 4, 24 rounds,
    # 3 seeds) it was +2.4% vs dense fp32 averaging at 64× fewer bytes (no warm-up: +5.4% at 146×); the
    # warm-up's bytes are paid once, so a long run tends to 146×. 0 = no warm-up.
    warmup_rounds: int = 8  # rounds of density warm-up, counted from the run's round 0
    warmup_density: float = 0.25  # density of round 0 when warmup_rounds > 0 (never below density)
    max_payload_bytes: int = 64 * 2**20  # decoders reject larger envelopes
    # Which positions a round keeps: "topk" (the largest |values| per chunk; their indices travel) or
    # "shared" (a random-k mask every replica derives from run, round, tensor and mask_seed; only the
    # values travel: nord.codec.mask).
    mask: str = "topk"
    mask_seed: int = 0  # seed of the shared masks, in [0, 2^32)
    # Top-k over blocks of this many neighbouring values (by their summed squares) instead of single
    # values: a block's position costs about as many bits as one value's, so indices cost ~1/block as
    # much per value. A tensor whose size or chunk it does not divide keeps single values.
    block: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.chunk_size <= MAX_CHUNK:
            raise ConfigError(f"codec.chunk_size must be in [1, {MAX_CHUNK}], got {self.chunk_size}")
        if not 0 < self.density <= 1:
            raise ConfigError(f"codec.density must be in (0, 1], got {self.density}")
        if self.blocksize not in BNB_BLOCKSIZES:
            raise ConfigError(f"codec.blocksize must be one of {BNB_BLOCKSIZES}, got {self.blocksize}")
        if isinstance(self.value_bits, bool) or self.value_bits not in VALUE_BITS:
            raise ConfigError(f"codec.value_bits must be one of {VALUE_BITS}, got {self.value_bits!r}")
        if not 0 <= self.ef_decay <= 1:
            raise ConfigError(f"codec.ef_decay must be in [0, 1], got {self.ef_decay}")
        if isinstance(self.warmup_rounds, bool) or not (
            isinstance(self.warmup_rounds, int) and self.warmup_rounds >= 0
        ):
            raise ConfigError(f"codec.warmup_rounds must be an integer >= 0, got {self.warmup_rounds!r}")
        if not 0 < self.warmup_density <= 1:
            raise ConfigError(f"codec.warmup_density must be in (0, 1], got {self.warmup_density}")
        if self.mask not in MASKS:
            raise ConfigError(f"codec.mask must be one of {MASKS}, got {self.mask!r}")
        if isinstance(self.mask_seed, bool) or not (
            isinstance(self.mask_seed, int) and 0 <= self.mask_seed <= MAX_SEED
        ):
            raise ConfigError(
                f"codec.mask_seed must be an integer in [0, {MAX_SEED}], got {self.mask_seed!r}"
            )
        if (
            isinstance(self.block, bool)
            or not (isinstance(self.block, int) and self.block >= 1 and self.block & (self.block - 1) == 0)
            or self.block > self.chunk_size
        ):
            raise ConfigError(f"codec.block must be a power of 2 <= chunk_size, got {self.block!r}")
        if self.block > 1 and self.mask != "topk":
            raise ConfigError("codec.block applies to mask='topk' only")
        if self.max_payload_bytes < 1024:
            raise ConfigError(f"codec.max_payload_bytes must be >= 1024, got {self.max_payload_bytes}")

    def keep(self, chunk_len: int, density: float | None = None, block: int = 1) -> int:
        """Values kept from a chunk of `chunk_len` values at `density` (default: the final density), a
        whole number of `block`s (which divides chunk_len)."""
        d = self.density if density is None else density
        blocks = chunk_len // block
        return block * min(blocks, max(1, math.ceil(d * blocks - 1e-9)))


def density_for_round(cfg: CodecConfig, round: int) -> float:
    """Kept fraction per chunk in round `round` (the warm-up schedule in the module doc).

    Total on purpose: a round outside [0, warmup_rounds) gets `density`, and the encoder leaves rejecting
    an invalid round to the envelope's own header check (one error message for it).
    """
    if not (isinstance(round, int) and 0 <= round < cfg.warmup_rounds):
        return cfg.density
    start = max(cfg.warmup_density, cfg.density)  # a warm-up never sends less than the final density
    return start * (cfg.density / start) ** (round / cfg.warmup_rounds)
