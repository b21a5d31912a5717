"""`Aggregate`: a sealed round as the exact change of the weights, so a replica can adopt a seal without
holding the contributions it lists.

A replica that holds every listed contribution recomputes the seal (nord.crdt.chain). With N volunteers
that means downloading N contributions a round (docs/scaling.md, limit 1). An aggregate carries instead,
per tensor, which coordinates the round changed and the XOR of their float32 bits before and after, so
the new weights are rebuilt bit for bit from the old ones; the seal's `weights_hash` (signed by the
authority) vouches for the result and its `window_hash` for the window that comes with it (which
contributions and dots the round folded: what refuses their duplicates later). Nothing in an aggregate
is taken on the sender's word, so any peer that adopted it can serve it.

Wire format (msgpack): [tag, version, seal, folded [[cid, round]], dots [[peer key, round]],
hashes [[round, hash]], tensors [[name, zlib(changed-coordinate bitmap), zlib(XOR bytes, byte-planar)]]].
Byte-planar: the XOR words' most significant bytes first, then the next ones: a small update leaves the
high bytes zero, which compresses. Sizes: about 2.9 bytes per changed coordinate plus the bitmap;
a round that changes every coordinate costs about 3 bytes per parameter whatever the number of
contributions (bench/aggregate.py; the fit is nord.protocol.aggregate_bytes_estimate).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import msgpack
import numpy as np
import torch

from nord.checks import is_count, is_hex64, is_key_bytes
from nord.crdt.base import Window
from nord.crdt.messages import Seal
from nord.errors import MergeError

AGGREGATE_TAG = "nord.aggregate"
AGGREGATE_VERSION = 1
ZLIB_LEVEL = 6


@dataclass(frozen=True)
class Aggregate:
    """Round `seal.round`'s change of the weights (compressed, per tensor) and the window after it."""

    seal: Seal
    window: Window
    tensors: Mapping[str, tuple[bytes, bytes]]  # name -> (zlib bitmap, zlib planar XOR); changed only

    @classmethod
    def build(
        cls,
        seal: Seal,
        window: Window,
        before: Mapping[str, torch.Tensor],
        after: Mapping[str, torch.Tensor],
    ) -> Aggregate:
        """The aggregate that takes `before` to `after` (float32 CPU tensors of the same names/shapes)."""
        tensors = {}
        for name in sorted(after):
            old = _bits(before[name])
            xor = old ^ _bits(after[name])
            changed = xor != 0
            if not changed.any():
                continue
            planes = xor[changed].astype(">u4").view(np.uint8).reshape(-1, 4).T
            tensors[name] = (
                zlib.compress(np.packbits(changed).tobytes(), ZLIB_LEVEL),
                zlib.compress(planes.tobytes(), ZLIB_LEVEL),
            )
        return cls(seal, window, tensors)

    def apply(self, before: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weights after the round: fresh float32 tensors (the unchanged ones shared with `before`).
        MergeError if a tensor is unknown or its data does not decode to its size."""
        unknown = set(self.tensors) - set(before)
        if unknown:
            raise MergeError(f"aggregate names unknown tensor {sorted(unknown)[0]!r}")
        out = dict(before)
        for name, (bitmap_z, planes_z) in self.tensors.items():
            old = before[name]
            numel = old.numel()
            bitmap = np.frombuffer(_inflate(bitmap_z, (numel + 7) // 8, name), dtype=np.uint8)
            changed = np.unpackbits(bitmap, count=numel).astype(bool)
            n = int(changed.sum())
            if n == 0:
                raise MergeError(f"aggregate tensor {name!r} lists no changed coordinate")
            planes = np.frombuffer(_inflate(planes_z, 4 * n, name), dtype=np.uint8).reshape(4, n)
            bits = _bits(old).copy()
            bits[changed] ^= np.ascontiguousarray(planes.T).view(">u4").reshape(-1).astype(np.uint32)
            out[name] = torch.from_numpy(bits.view(np.float32)).reshape(old.shape)
        return out

    def to_bytes(self) -> bytes:
        folded, dots, hashes = self.window
        return msgpack.packb(
            [
                AGGREGATE_TAG,
                AGGREGATE_VERSION,
                self.seal.to_bytes(),
                sorted([c, int(q)] for c, q in folded.items()),
                sorted([p, int(r)] for p, r in dots),
                sorted([int(q), h] for q, h in hashes.items()),
                [[name, a, b] for name, (a, b) in sorted(self.tensors.items())],
            ],
            use_bin_type=True,
        )

    @classmethod
    def from_bytes(cls, data: bytes, spec: Mapping[str, tuple[int, ...]]) -> Aggregate:
        """Parse and check the structure and the seal's signature (MergeError): tensors must be in `spec`
        and their compressed parts no larger than the uncompressed sizes allow. Whether it is the
        authority's round and gives the sealed weights is the replica's decision (`apply_aggregate`)."""
        tag = AGGREGATE_TAG
        try:
            raw = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True)
        except Exception as e:  # msgpack raises several unrelated types on garbage
            raise MergeError(f"{tag}: not valid msgpack ({type(e).__name__})") from None
        if not isinstance(raw, list) or len(raw) != 7 or raw[0] != tag:
            raise MergeError(f"not a {tag} message")
        if raw[1] != AGGREGATE_VERSION:
            raise MergeError(f"{tag}: unsupported version {raw[1]!r} (expected {AGGREGATE_VERSION})")
        _, _, seal_bytes, folded, dots, hashes, tensors = raw
        if not isinstance(seal_bytes, bytes):
            raise MergeError(f"{tag}: the seal is not bytes")
        seal = Seal.from_bytes(seal_bytes)
        window = (_folded(folded), _dots(dots), _hashes(hashes))
        if not isinstance(tensors, list):
            raise MergeError(f"{tag}: tensors is not a list")
        parts: dict[str, tuple[bytes, bytes]] = {}
        for item in tensors:
            if not (isinstance(item, list) and len(item) == 3):
                raise MergeError(f"{tag}: malformed tensor entry")
            name, bitmap_z, planes_z = item
            if not (isinstance(name, str) and isinstance(bitmap_z, bytes) and isinstance(planes_z, bytes)):
                raise MergeError(f"{tag}: malformed tensor entry")
            if name not in spec or name in parts:
                raise MergeError(f"{tag}: unknown or repeated tensor {name!r}")
            numel = math.prod(spec[name])
            if len(bitmap_z) > _bound((numel + 7) // 8) or len(planes_z) > _bound(4 * numel):
                raise MergeError(f"{tag}: tensor {name!r} is larger than its size allows")
            parts[name] = (bitmap_z, planes_z)
        return cls(seal, window, parts)


def aggregate_max_bytes(spec: Mapping[str, tuple[int, ...]], window_bytes: int) -> int:
    """The most a well-formed aggregate for `spec` can take (every tensor at its bounds, plus the seal and
    a window of at most `window_bytes`): a reply past it is cut by the transport."""
    sizes = (math.prod(shape) for shape in spec.values())
    return window_bytes + sum(_bound((n + 7) // 8) + _bound(4 * n) + 256 for n in sizes)


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).contiguous().reshape(-1).numpy().view(np.uint32)


def _bound(n: int) -> int:
    """The most zlib can take to store `n` bytes (stored blocks and headers)."""
    return n + n // 1000 + 64


def _inflate(data: bytes, size: int, name: str) -> bytes:
    """Exactly `size` bytes from zlib `data`, never more in memory (MergeError otherwise)."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, size)
    except zlib.error:
        raise MergeError(f"aggregate tensor {name!r} is not valid zlib data") from None
    if len(out) != size or d.unconsumed_tail or not d.eof:
        raise MergeError(f"aggregate tensor {name!r} does not decode to its size")
    return out


def _folded(items: object) -> dict[str, int]:
    ok = isinstance(items, list) and all(
        isinstance(x, list) and len(x) == 2 and is_hex64(x[0]) and is_count(x[1]) for x in items
    )
    if not ok:
        raise MergeError(f"{AGGREGATE_TAG}: malformed folded contributions")
    return {c: int(q) for c, q in items}


def _dots(items: object) -> set[tuple[bytes, int]]:
    ok = isinstance(items, list) and all(
        isinstance(x, list) and len(x) == 2 and is_key_bytes(x[0]) and is_count(x[1]) for x in items
    )
    if not ok:
        raise MergeError(f"{AGGREGATE_TAG}: malformed folded dots")
    return {(bytes(p), int(r)) for p, r in items}


def _hashes(items: object) -> dict[int, str]:
    ok = isinstance(items, list) and all(
        isinstance(x, list) and len(x) == 2 and is_count(x[0]) and is_hex64(x[1]) for x in items
    )
    if not ok:
        raise MergeError(f"{AGGREGATE_TAG}: malformed round hashes")
    return {int(q): h for q, h in items}
