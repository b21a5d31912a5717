"""`MergeConfig`: how contributions are summed, clipped and applied (the `merge` section of RunConfig).

Fixed point: every dequantized value v is clipped to [-clip, clip] and stored as round(v·2^frac_bits) in
int64. With clip = 16 = 2^4 and frac_bits = 40 one term is at most 2^44 in magnitude, so a coordinate's
sum over N contributions stays below 2^63 for N <= 2^19 = 524,288 (`capacity`), and 2^44 <= 2^53 keeps
the float64 scaling exact. Float32 values with |v| >= 2^-16 convert without any rounding (their last
mantissa bit is >= 2^-40).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nord.errors import ConfigError

INT64_MAX = 2**63 - 1
MIN_CAPACITY = 10_000  # contributions per round that must fit without int64 overflow


@dataclass(frozen=True, kw_only=True)
class MergeConfig:
    """Outer update W = base + outer_lr · S/(C + damping); S, C: fixed-point sum and count per coordinate."""

    outer_lr: float = 1.0  # η: step on the sparse-aware mean pseudo-gradient
    # c0: S/(C + c0) damps coordinates few peers touched (one sender alone moves them by half its value);
    # 1.0 was best in `nord bench decentralized` at 1.56% density and stayed stable at 16 peers; 0 = S/C.
    damping: float = 1.0
    frac_bits: int = 40  # k: fixed-point fraction bits (resolution 2^-40 ≈ 9.1e-13)
    clip: float = 16.0  # |v| bound per value; with frac_bits bounds the int64 sum (see module doc)
    min_contributors: int = 1  # coordinates touched by fewer contributions keep their base value
    median_norm_clip: bool = False  # scale each contribution to at most the round's median L2 norm
    max_staleness: int = 2  # a round-q contribution may still be folded into rounds q .. q + max_staleness
    # Admission: a replica holds at most this many unfolded contributions per round and pools at most this
    # many per open round, in both cases those with the smallest ids, so the admitted set is a function of
    # the contributions seen, not of their arrival order. At most `capacity` (int64 safety).
    max_contributions: int = MIN_CAPACITY

    def __post_init__(self) -> None:
        for name in ("outer_lr", "clip", "damping"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"merge.{name} must be a number, got {value!r}")
        if not isinstance(self.median_norm_clip, bool):
            raise ConfigError(f"merge.median_norm_clip must be true or false, got {self.median_norm_clip!r}")
        if not (math.isfinite(self.outer_lr) and self.outer_lr > 0):
            raise ConfigError(f"merge.outer_lr must be a finite number > 0, got {self.outer_lr}")
        if not (
            isinstance(self.frac_bits, int)
            and not isinstance(self.frac_bits, bool)
            and 1 <= self.frac_bits <= 52
        ):
            raise ConfigError(f"merge.frac_bits must be an integer in 1..52, got {self.frac_bits}")
        if not (math.isfinite(self.damping) and self.damping >= 0):
            raise ConfigError(f"merge.damping must be a finite number >= 0, got {self.damping}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"merge.clip must be a finite number > 0, got {self.clip}")
        if self.clip * 2.0**self.frac_bits > 2.0**53:
            raise ConfigError(
                f"merge.clip · 2^frac_bits = {self.clip * 2.0**self.frac_bits:.3g} exceeds 2^53: "
                "lower clip or frac_bits so the fixed-point conversion stays exact"
            )
        if self.capacity < MIN_CAPACITY:
            raise ConfigError(
                f"merge.clip={self.clip} with frac_bits={self.frac_bits} fits only {self.capacity} "
                f"contributions in a round before int64 overflow (need >= {MIN_CAPACITY}): lower either"
            )
        if not (isinstance(self.min_contributors, int) and self.min_contributors >= 1):
            raise ConfigError(f"merge.min_contributors must be an integer >= 1, got {self.min_contributors}")
        if not (isinstance(self.max_staleness, int) and self.max_staleness >= 0):
            raise ConfigError(f"merge.max_staleness must be an integer >= 0, got {self.max_staleness}")
        if not (
            isinstance(self.max_contributions, int)
            and not isinstance(self.max_contributions, bool)
            and 1 <= self.max_contributions <= self.capacity
        ):
            raise ConfigError(
                f"merge.max_contributions must be an integer in 1..{self.capacity}, "
                f"got {self.max_contributions}"
            )

    @property
    def max_term(self) -> int:
        """Largest magnitude of one fixed-point term, round(clip · 2^frac_bits)."""
        return math.ceil(self.clip * 2.0**self.frac_bits)

    @property
    def capacity(self) -> int:
        """Contributions one round can sum without any coordinate overflowing int64."""
        return INT64_MAX // self.max_term
