"""The signed payload: per tensor, which values were kept and their NF4 (or 2-bit) codes and scales.

msgpack layout (arrays only, so one value has one encoding):

    payload = [blocksize, [entry for each envelope tensor, in order]]          NF4 values
            | [blocksize, [entry ...], 2]                                       2-bit values
    entry   = [chunk, k, k_last, index_kind, index_bytes, codes, scales_fp16]

The tensor's n values are split into ⌊n/chunk⌋ chunks of `chunk` values keeping k each, plus a last
partial chunk of n mod chunk values keeping k_last (0 if there is none). The kept values, in index
order, are NF4-quantized in blocks of `blocksize` with one fp16 absmax per block; their dequantized value
is NF4_TABLE[code] · float32(scale) (see nord.nf4), computed the same way on every replica. A payload
with a third field 2 holds 2-bit codes instead, TABLE2[code] · float32(scale) (nord.codec.twobit); the
default NF4 layout has no third field, so each payload has one encoding.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgpack
import numpy as np
import torch

from nord.codec.config import MAX_CHUNK
from nord.codec.indices import SHARED, decode_indices, decode_seed
from nord.codec.mask import MAX_SEED, mask_base, shared_mask
from nord.codec.twobit import dequantize_2bit
from nord.errors import CodecError
from nord.nf4 import BNB_BLOCKSIZES, ZERO_CODE, dequantize_nf4

ENTRY_FIELDS = 7
FP16_MAX = 65504.0


class SparseTensor(NamedTuple):
    """What one contribution adds to one tensor: values at flat positions."""

    indices: torch.Tensor  # (count,) int64, flat, strictly increasing
    values: torch.Tensor  # (count,) float32, dequantized


class TensorEntry(NamedTuple):
    """One tensor's parsed payload entry (validated)."""

    indices: np.ndarray  # (count,) int64
    codes: bytes  # ceil(count · bits / 8) packed NF4 (bits = 4) or 2-bit codes
    scales: np.ndarray  # (ceil(count / blocksize),) float16
    bits: int  # 4 or 2


def chunk_counts(numel: int, chunk: int, k: int, k_last: int) -> np.ndarray:
    """Kept values per chunk."""
    counts = np.full(numel // chunk, k, dtype=np.int64)
    return np.append(counts, k_last) if numel % chunk else counts


def pack_payload(blocksize: int, entries: list[list[Any]], value_bits: int = 4) -> bytes:
    return msgpack.packb([blocksize, entries] + ([value_bits] if value_bits != 4 else []), use_bin_type=True)


def unpack_strict(data: bytes, max_bytes: int, what: str) -> Any:
    """msgpack → Python values with every length bounded; only arrays, ints, str and bin accepted later."""
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            use_list=False,
            strict_map_key=True,
            max_bin_len=max_bytes,
            max_str_len=4096,
            max_array_len=1 << 20,
            max_map_len=0,
            max_ext_len=0,
        )
    except msgpack.ExtraData:
        raise CodecError(f"trailing garbage after the {what}") from None
    except Exception as e:  # msgpack raises ValueError, TypeError, UnpackException... on bad bytes
        detail = " ".join(str(e).split())[:80]
        raise CodecError(f"{what} is not valid msgpack ({type(e).__name__}: {detail})") from None


def parse_payload(
    payload: bytes,
    names: tuple[str, ...],
    shapes: tuple[tuple[int, ...], ...],
    mask_key: tuple[str, int] | None = None,
) -> tuple[int, dict[str, TensorEntry]]:
    """Validate a payload against its envelope's tensors; return (blocksize, name -> entry).

    `mask_key` is the envelope's (run_id, round), from which SHARED index codes derive their positions
    (without it a SHARED code is rejected)."""
    raw = unpack_strict(payload, len(payload), "payload")
    if not (isinstance(raw, tuple) and len(raw) in (2, 3) and _is_int(raw[0]) and isinstance(raw[1], tuple)):
        raise CodecError("payload must be [blocksize, entries] or [blocksize, entries, 2]")
    blocksize, raw_entries, bits = (*raw, 4) if len(raw) == 2 else raw
    if len(raw) == 3 and not (_is_int(bits) and bits == 2):
        raise CodecError(f"payload value bits must be 2 when given (NF4 has no field), got {bits!r}")
    if blocksize not in BNB_BLOCKSIZES:
        raise CodecError(f"payload blocksize {blocksize} is not one of {BNB_BLOCKSIZES}")
    if len(raw_entries) != len(names):
        raise CodecError(f"payload has {len(raw_entries)} tensor entries for {len(names)} tensors")
    entries = {}
    for name, shape, entry in zip(names, shapes, raw_entries, strict=True):
        try:
            numel = int(np.prod(shape, dtype=np.int64))
            entries[name] = _parse_entry(
                entry, numel, blocksize, bits, None if mask_key is None else (*mask_key, name)
            )
        except CodecError as e:
            raise CodecError(f"tensor {name!r}: {e}") from None
    return blocksize, entries


def _parse_entry(
    entry: Any, numel: int, blocksize: int, bits: int, mask_key: tuple[str, int, str] | None
) -> TensorEntry:
    if not (isinstance(entry, tuple) and len(entry) == ENTRY_FIELDS):
        raise CodecError(f"entry must be an array of {ENTRY_FIELDS} fields")
    chunk, k, k_last, kind, index_bytes, codes, scale_bytes = entry
    if not all(_is_int(v) for v in (chunk, k, k_last, kind)):
        raise CodecError("chunk, k, k_last and index kind must be integers")
    if not all(isinstance(v, bytes) for v in (index_bytes, codes, scale_bytes)):
        raise CodecError("indices, codes and scales must be binary")
    if not 1 <= chunk <= min(numel, MAX_CHUNK):
        raise CodecError(f"chunk {chunk} invalid for {numel} values")
    last_len = numel % chunk
    if not 1 <= k <= chunk or not (k_last == 0 if last_len == 0 else 1 <= k_last <= last_len):
        raise CodecError(f"kept counts k={k}, k_last={k_last} invalid for chunks of {chunk}")
    count = (numel // chunk) * k + k_last  # sizes are checked before anything is allocated
    n_scales = -(-count // blocksize)
    if len(codes) != -(-count * bits // 8):
        raise CodecError(f"{len(codes)} code bytes do not match {count} values")
    if bits == 4 and count % 2 and codes[-1] & 0x0F != ZERO_CODE:
        raise CodecError(f"code padding nibble is not {ZERO_CODE} (the code of 0.0)")
    if bits == 2 and count % 4 and codes[-1] & ((1 << (8 - 2 * (count % 4))) - 1):
        raise CodecError("2-bit code padding bits are not 0")
    if len(scale_bytes) != 2 * n_scales:
        raise CodecError(f"{len(scale_bytes)} scale bytes do not match {n_scales} blocks")
    scales = np.frombuffer(scale_bytes, dtype="<f2")
    if not np.isfinite(scales).all():
        raise CodecError("scale is NaN or infinite")
    if np.any(scales.view("<u2") & 0x8000):
        raise CodecError("scale is negative")
    if kind != SHARED:
        indices = decode_indices(kind, index_bytes, chunk_counts(numel, chunk, k, k_last), numel, chunk)
    elif mask_key is None:
        raise CodecError("a shared-mask code needs the envelope's run id and round")
    else:
        base = mask_base(*mask_key, seed=decode_seed(index_bytes, MAX_SEED))
        indices = shared_mask(base, numel, chunk, k, k_last)
    return TensorEntry(indices=indices, codes=codes, scales=scales, bits=bits)


def dequantize_entry(entry: TensorEntry, blocksize: int) -> SparseTensor:
    """Dequantize; entries whose value is exactly 0 carry nothing and are dropped (they would still
    count as a contributor in a per-coordinate mean)."""
    packed = np.frombuffer(entry.codes, dtype=np.uint8)
    dequantize = dequantize_2bit if entry.bits == 2 else dequantize_nf4
    values = dequantize(packed, entry.scales.astype(np.float32), len(entry.indices), blocksize)
    keep = values != 0  # numpy: torch's boolean indexing is ~10x slower on a busy CPU
    return SparseTensor(indices=torch.from_numpy(entry.indices[keep]), values=torch.from_numpy(values[keep]))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
