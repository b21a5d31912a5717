"""Shared masks: kept positions every replica derives from (run, round, tensor, seed), so none travel.

With `CodecConfig(mask="shared")` every peer keeps the same k positions of each chunk in a round (a
random-k mask), and the envelope carries only the mask seed (one varint) instead of ≈ 9 bits per kept
value: the values and scales are all that travel. Error feedback is unchanged (the residual keeps
whatever the mask left out), and since all peers send the same coordinates, each sent coordinate is
averaged over every contribution.

The mask is a pure function of its inputs, computed with integer arithmetic only (sha256, then
splitmix64 in wrapping uint64), so it is bit-identical on every machine and numpy version:

    base      = first 8 bytes (big-endian) of sha256("nord-mask", run_id, round, tensor name, seed)
    key(p)    = splitmix64(base + (p + 1) · 0x9E3779B97F4A7C15), p the flat position
    chunk c   keeps the k positions with the smallest (key(p) with its low 16 bits replaced by p − c·chunk)

(the offset in the low bits makes every key in a chunk distinct, so "the k smallest" has one answer).
"""

from __future__ import annotations

import hashlib

import numpy as np

from nord.errors import CodecError

_DOMAIN = b"nord-mask"
_GOLDEN, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_OFFSET_BITS = 16  # chunk-local offsets (chunks hold at most 2^16 values)
MAX_SEED = 2**32 - 1


def mask_base(run_id: str, round: int, name: str, seed: int) -> int:
    """The 64-bit stream start of one (run, round, tensor, seed)."""
    h = hashlib.sha256()
    for field in (_DOMAIN, run_id.encode(), round.to_bytes(8, "big"), name.encode(), seed.to_bytes(8, "big")):
        h.update(len(field).to_bytes(8, "big"))
        h.update(field)
    return int.from_bytes(h.digest()[:8], "big")


def _keys(base: int, start: int, count: int) -> np.ndarray:
    """splitmix64 outputs for positions start..start+count−1 (uint64, wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = np.arange(start + 1, start + count + 1, dtype=np.uint64) * np.uint64(_GOLDEN) + np.uint64(base)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_MIX1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_MIX2)
        return z ^ (z >> np.uint64(31))


def _smallest_offsets(keys: np.ndarray, chunk_len: int, k: int) -> np.ndarray:
    """Sorted offsets of the k smallest keys in each row of `keys` (rows of chunk_len)."""
    low = np.uint64((1 << _OFFSET_BITS) - 1)
    tagged = (keys.reshape(-1, chunk_len) & ~low) | np.arange(chunk_len, dtype=np.uint64)
    if k < chunk_len:
        tagged = np.partition(tagged, k - 1, axis=1)[:, :k]
    return np.sort((tagged & low).astype(np.int64), axis=1)


def shared_mask(base: int, numel: int, chunk: int, k: int, k_last: int) -> np.ndarray:
    """Sorted flat int64 positions: k per full chunk of `chunk`, k_last in the last partial chunk."""
    if not 1 <= chunk <= 1 << _OFFSET_BITS:
        raise CodecError(f"shared mask chunk {chunk} is outside [1, {1 << _OFFSET_BITS}]")
    full = numel - numel % chunk
    parts = []
    rows_per_block = max(1, (1 << 20) // chunk)  # bounds the temporaries to ~8 MB per block
    for first_row in range(0, full // chunk, rows_per_block):
        rows = min(rows_per_block, full // chunk - first_row)
        keys = _keys(base, first_row * chunk, rows * chunk)
        starts = (np.arange(first_row, first_row + rows, dtype=np.int64) * chunk)[:, None]
        parts.append((_smallest_offsets(keys, chunk, k) + starts).reshape(-1))
    if numel > full:
        parts.append(_smallest_offsets(_keys(base, full, numel - full), numel - full, k_last)[0] + full)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
