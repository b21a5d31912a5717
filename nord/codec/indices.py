"""Coding the kept positions of one tensor; the encoder picks the shortest code per tensor.

    BITMAP   one bit per value, little-endian bit order:           ceil(n / 8) bytes
    OFFSETS  chunk-local offsets, w = bits(chunk - 1) each, MSB first: ceil(count · w / 8) bytes
             (12 bits for 4096-chunks; the chunk of each entry follows from the per-chunk counts)
    GAPS     LEB128 varints of (index − previous index − 1):         ≈ 1–2 bytes per index at 1.56%
    FULL     every index, nothing stored (density 1)
    SHARED   the mask seed only (one varint): every replica derives the positions (nord.codec.mask)
    RICE     Golomb-Rice code of the same gaps with parameter b: one byte b, then every gap's low b bits
             (MSB first, like OFFSETS), then every gap's high part q = gap >> b in unary (q zeros, a one)
    BLOCKS   whole aligned blocks of 2^e values (CodecConfig.block): one byte e, then the RICE code of the
             block numbers (index // 2^e of each block's first index)

At ~1.5% density gaps average 64, so most fit one varint byte: ≈ 9 bits per index against 12 for offsets;
the Rice code spends b + 1 + q bits, ≈ 7.5 bits at b = 5, within ~0.1 bit of the entropy of k random
positions per chunk (log2 C(4096, 64) / 64 ≈ 7.4); the two streams keep its decoder vectorized. A bitmap
only wins above ~1/8 density. Decoders check sizes before reading, reject padding bits and over-long
varints (one canonical code per index set and parameter), and return int64 numpy arrays.
"""

from __future__ import annotations

import numpy as np

from nord.errors import CodecError

BITMAP, OFFSETS, GAPS, FULL, SHARED, RICE, BLOCKS = 0, 1, 2, 3, 4, 5, 6
KIND_NAMES = {
    BITMAP: "bitmap",
    OFFSETS: "offsets",
    GAPS: "gaps",
    FULL: "full",
    SHARED: "shared",
    RICE: "rice",
    BLOCKS: "blocks",
}
MAX_VARINT_BYTES = 5  # gaps < 2^35
MAX_RICE_BITS = 16  # low bits per gap; _offsets_decode reads at most 17-bit fields
MAX_BLOCK_EXPONENT = 16  # blocks of at most 2^16 values (the largest chunk)


def offset_width(chunk: int) -> int:
    """Bits per chunk-local offset."""
    return max(1, (chunk - 1).bit_length())


def encode_indices(indices: np.ndarray, numel: int, chunk: int, block: int = 1) -> tuple[int, bytes]:
    """(kind, bytes) of the shortest code for sorted `indices` of a tensor with `numel` values; with
    `block` > 1 the indices are whole aligned blocks of `block` values (a power of 2) and travel as such."""
    count = len(indices)
    if count == numel:
        return FULL, b""
    if block > 1:
        starts = indices[::block] // block
        block_gaps = np.diff(starts, prepend=-1) - 1
        return BLOCKS, bytes([block.bit_length() - 1]) + _rice_encode(
            block_gaps, _best_rice_bits(block_gaps)[0]
        )
    gaps = np.diff(indices, prepend=-1) - 1
    gap_bytes = _varint_lengths(gaps)
    width = offset_width(chunk)
    rice_bits, rice_size = _best_rice_bits(gaps)
    sizes = {
        BITMAP: -(-numel // 8), OFFSETS: -(-count * width // 8), GAPS: int(gap_bytes.sum()), RICE: rice_size
    }  # fmt: skip
    kind = min(sizes, key=lambda k: (sizes[k], k))
    if kind == BITMAP:
        mask = np.zeros(numel, dtype=np.uint8)
        mask[indices] = 1
        return BITMAP, np.packbits(mask, bitorder="little").tobytes()
    if kind == OFFSETS:
        return OFFSETS, _pack_fields(indices % chunk, width)
    if kind == RICE:
        return RICE, _rice_encode(gaps, rice_bits)
    return GAPS, _varint_encode(gaps, gap_bytes)


def decode_indices(kind: int, data: bytes, counts: np.ndarray, numel: int, chunk: int) -> np.ndarray:
    """Sorted int64 indices from `data`; `counts[c]` entries lie in chunk c. Raises CodecError."""
    count = int(counts.sum())
    if kind == FULL:
        if data or count != numel:
            raise CodecError("'full' index code must be empty and cover every value")
        return np.arange(numel, dtype=np.int64)
    if kind == BITMAP:
        indices = _bitmap_decode(data, numel)
    elif kind == OFFSETS:
        chunk_starts = np.repeat(np.arange(len(counts), dtype=np.int64) * chunk, counts)
        offsets = _offsets_decode(data, count, offset_width(chunk))
        chunk_lens = np.minimum(chunk, numel - chunk_starts)
        if np.any(offsets >= chunk_lens):
            raise CodecError("index offset outside its chunk")
        indices = chunk_starts + offsets
    elif kind == GAPS:
        indices = _gaps_decode(data, count)
    elif kind == RICE:
        indices = _rice_decode(data, count, numel)
    elif kind == BLOCKS:
        indices = _blocks_decode(data, count, numel)
    else:
        raise CodecError(f"unknown index code {kind}")
    if len(indices) != count:
        raise CodecError(f"index count {len(indices)} does not match the {count} values")
    if count > 1 and np.any(np.diff(indices) <= 0):
        raise CodecError("indices are not strictly increasing")
    if count and (indices[0] < 0 or indices[-1] >= numel):
        raise CodecError(f"index {int(indices[-1])} out of range for {numel} values")
    if kind != OFFSETS and not np.array_equal(np.bincount(indices // chunk, minlength=len(counts)), counts):
        raise CodecError("indices per chunk do not match the chunk counts")
    return indices


def encode_seed(seed: int) -> bytes:
    """A SHARED code: the mask seed as one LEB128 varint."""
    value = np.array([seed], dtype=np.int64)
    return _varint_encode(value, _varint_lengths(value))


def decode_seed(data: bytes, max_seed: int) -> int:
    """The mask seed of a SHARED code: exactly one minimal varint, at most `max_seed`."""
    try:
        seed = int(_gaps_decode(data, 1)[0])
    except CodecError:
        seed = -1
    if not 0 <= seed <= max_seed:
        raise CodecError(f"shared mask seed must be one varint in [0, {max_seed}]")
    return seed


def _bitmap_decode(data: bytes, numel: int) -> np.ndarray:
    if len(data) != -(-numel // 8):
        raise CodecError(f"bitmap is {len(data)} bytes, expected {-(-numel // 8)}")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    if bits[numel:].any():
        raise CodecError("bitmap has padding bits set")
    return np.flatnonzero(bits[:numel]).astype(np.int64)


def _offsets_decode(data: bytes, count: int, width: int) -> np.ndarray:
    total_bits = count * width
    if len(data) != -(-total_bits // 8):
        raise CodecError(f"offsets are {len(data)} bytes, expected {-(-total_bits // 8)}")
    raw = np.frombuffer(data, dtype=np.uint8)
    if total_bits % 8 and raw[-1] & ((1 << (8 - total_bits % 8)) - 1):
        raise CodecError("offsets have padding bits set")
    padded = np.concatenate([raw, np.zeros(2, dtype=np.uint8)]).astype(np.uint32)
    bit_pos = np.arange(count, dtype=np.int64) * width
    first = bit_pos >> 3
    window = (padded[first] << 16) | (padded[first + 1] << 8) | padded[first + 2]  # 24 bits >= width + 7
    shift = (24 - width - (bit_pos & 7)).astype(np.uint32)
    return ((window >> shift) & ((1 << width) - 1)).astype(np.int64)


def _varint_lengths(values: np.ndarray) -> np.ndarray:
    lengths = np.ones(len(values), dtype=np.int64)
    for j in range(1, MAX_VARINT_BYTES):
        lengths += values >= (1 << (7 * j))
    return lengths


def _varint_encode(values: np.ndarray, lengths: np.ndarray) -> bytes:
    if np.any(values >= 1 << (7 * MAX_VARINT_BYTES)):
        raise CodecError("tensor too large for gap coding")
    out = np.empty(int(lengths.sum()), dtype=np.uint8)
    starts = np.cumsum(lengths) - lengths
    for j in range(int(lengths.max(initial=1))):
        has = lengths > j
        more = (lengths[has] > j + 1).astype(np.int64) << 7
        out[starts[has] + j] = ((values[has] >> (7 * j)) & 0x7F) | more
    return out.tobytes()


def _gaps_decode(data: bytes, count: int) -> np.ndarray:
    raw = np.frombuffer(data, dtype=np.uint8)
    if len(raw) < count or len(raw) > count * MAX_VARINT_BYTES:
        raise CodecError(f"gap code is {len(raw)} bytes, impossible for {count} indices")
    last = np.flatnonzero(raw < 0x80)  # the final byte of each varint
    if len(last) != count or last[-1] != len(raw) - 1:
        raise CodecError(f"gap code holds {len(last)} complete varints, expected {count}")
    starts = np.concatenate([[0], last[:-1] + 1])
    lengths = last - starts + 1
    if lengths.max() > MAX_VARINT_BYTES:
        raise CodecError("gap varint longer than 5 bytes")
    if np.any((lengths > 1) & (raw[last] == 0)):
        raise CodecError("gap varint is not minimally encoded")
    position = np.arange(len(raw), dtype=np.int64) - np.repeat(starts, lengths)
    gaps = np.add.reduceat((raw & 0x7F).astype(np.int64) << (7 * position), starts)
    return np.cumsum(gaps + 1) - 1


def _best_rice_bits(gaps: np.ndarray) -> tuple[int, int]:
    """(b, bytes) of the shortest Rice code of `gaps`:
    1 + ceil(count · b / 8) + ceil((Σ (gap >> b) + count) / 8) bytes."""
    count = len(gaps)
    sizes = [
        (1 + -(-count * b // 8) + -(-(int((gaps >> b).sum()) + count) // 8), b)
        for b in range(MAX_RICE_BITS + 1)
    ]
    size, b = min(sizes)
    return b, size


def _pack_fields(values: np.ndarray, width: int) -> bytes:
    """`values` as `width`-bit fields, MSB first, zero-padded to a whole byte (what _offsets_decode reads)."""
    bits = (values[:, None] >> np.arange(width - 1, -1, -1)) & 1  # (count, width)
    return np.packbits(bits.astype(np.uint8).reshape(-1)).tobytes()


def _rice_encode(gaps: np.ndarray, b: int) -> bytes:
    ends = np.cumsum((gaps >> b) + 1) - 1  # position of each gap's terminating one in the unary stream
    unary = np.zeros(int(ends[-1]) + 1 if len(ends) else 0, dtype=np.uint8)
    unary[ends] = 1
    return bytes([b]) + _pack_fields(gaps & ((1 << b) - 1), b) + np.packbits(unary).tobytes()


def _rice_decode(data: bytes, count: int, numel: int) -> np.ndarray:
    if not data or data[0] > MAX_RICE_BITS:
        raise CodecError(f"rice code must start with its parameter in [0, {MAX_RICE_BITS}]")
    b = data[0]
    low_len = -(-count * b // 8)
    # the high parts sum to at most numel (indices < numel), so a longer unary stream is invalid: reject it
    # before unpacking, which costs 8 bytes of memory per byte
    unary_len = len(data) - 1 - low_len
    if unary_len < 0 or unary_len > -(-(numel + count) // 8):
        raise CodecError(f"rice code is {len(data)} bytes, impossible for {count} indices of {numel}")
    low = _offsets_decode(data[1 : 1 + low_len], count, b) if b else np.zeros(count, dtype=np.int64)
    unary = np.unpackbits(np.frombuffer(data, dtype=np.uint8, offset=1 + low_len))
    ends = np.flatnonzero(unary)
    if len(ends) != count:
        raise CodecError(f"rice code holds {len(ends)} gaps, expected {count}")
    if count and unary_len != int(ends[-1]) // 8 + 1:
        raise CodecError("rice code has padding after its last gap")
    high = np.diff(ends, prepend=-1) - 1
    return np.cumsum(((high << b) | low) + 1) - 1


def _blocks_decode(data: bytes, count: int, numel: int) -> np.ndarray:
    if not data or data[0] > MAX_BLOCK_EXPONENT:
        raise CodecError(f"block code must start with its block exponent in [0, {MAX_BLOCK_EXPONENT}]")
    block = 1 << data[0]
    if count % block or numel % block:
        raise CodecError(f"blocks of {block} do not divide {count} indices of {numel} values")
    starts = _rice_decode(data[1:], count // block, numel // block)
    return (starts[:, None] * block + np.arange(block)).reshape(-1)
