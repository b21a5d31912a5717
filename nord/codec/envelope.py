"""The signed envelope a worker publishes: who, for which run, round and base, which tensors, and the
payload (nord.codec.payload).

Wire format: one msgpack array, canonically encoded (decoders reject any other encoding):

    [version, run_id, round, base_hash, peer_key, names, shapes, payload, payload_hash, signature]

payload_hash = sha256(payload); signature = ed25519(peer_key) over
msgpack(["nord-delta", version, run_id, round, base_hash, peer_key, names, shapes, payload_hash]).
contribution_id = sha256 over the 8-byte-length-prefixed peer_key, run_id, round (8 bytes, big-endian)
and payload_hash: the same delta from the same peer for the same round has one id.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from itertools import pairwise
from typing import Any

import msgpack

from nord.checks import is_hex64, is_key_bytes, is_run_id
from nord.codec.config import CodecConfig
from nord.codec.payload import SparseTensor, dequantize_entry, parse_payload, unpack_strict
from nord.errors import CodecError
from nord.identity import SIGNATURE_BYTES, Identity, verify_signature

FORMAT_VERSION = 1
ENVELOPE_FIELDS = 10
MAX_ROUND = 2**63 - 1
_SIGNING_DOMAIN = "nord-delta"


@dataclass(frozen=True, kw_only=True)
class Envelope:
    """One signed contribution. Build with `DeltaEncoder.encode`, or `decode_envelope` from bytes."""

    version: int
    run_id: str
    round: int
    base_hash: str  # weights_hash of the checkpoint the delta was trained from
    peer_key: bytes  # 32-byte ed25519 public key of the sender
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    payload: bytes
    payload_hash: bytes  # sha256(payload)
    signature: bytes

    @property
    def contribution_id(self) -> str:
        """Hex sha256 of peer key, run id, round and payload hash (length-prefixed)."""
        h = hashlib.sha256()
        for field in (self.peer_key, self.run_id.encode(), self.round.to_bytes(8, "big"), self.payload_hash):
            h.update(len(field).to_bytes(8, "big"))
            h.update(field)
        return h.hexdigest()

    def signing_message(self) -> bytes:
        return signing_message(
            self.version,
            self.run_id,
            self.round,
            self.base_hash,
            self.peer_key,
            self.names,
            self.shapes,
            self.payload_hash,
        )

    def to_bytes(self) -> bytes:
        return self._wire

    @property
    def nbytes(self) -> int:
        """Size on the wire."""
        return len(self._wire)

    def delta(self) -> dict[str, SparseTensor]:
        """name -> SparseTensor on CPU, dequantized deterministically (cached; do not modify in place)."""
        return dict(self._delta)

    @cached_property
    def _wire(self) -> bytes:
        fields = [
            self.version,
            self.run_id,
            self.round,
            self.base_hash,
            self.peer_key,
            list(self.names),
            [list(s) for s in self.shapes],
            self.payload,
            self.payload_hash,
            self.signature,
        ]
        return msgpack.packb(fields, use_bin_type=True)

    @cached_property
    def _delta(self) -> dict[str, SparseTensor]:
        mask_key = (self.run_id, self.round)  # shared masks derive their positions from these
        blocksize, entries = parse_payload(self.payload, self.names, self.shapes, mask_key)  # not kept
        return {name: dequantize_entry(entry, blocksize) for name, entry in entries.items()}


def signing_message(
    version: int,
    run_id: str,
    round: int,
    base_hash: str,
    peer_key: bytes,
    names: tuple[str, ...],
    shapes: tuple[tuple[int, ...], ...],
    payload_hash: bytes,
) -> bytes:
    """The canonical bytes a peer signs: every header field and the payload hash."""
    fields = [
        _SIGNING_DOMAIN,
        version,
        run_id,
        round,
        base_hash,
        peer_key,
        list(names),
        [list(s) for s in shapes],
        payload_hash,
    ]
    return msgpack.packb(fields, use_bin_type=True)


def seal_envelope(
    *,
    run_id: str,
    round: int,
    base_hash: str,
    names: tuple[str, ...],
    shapes: tuple[tuple[int, ...], ...],
    payload: bytes,
    identity: Identity,
) -> Envelope:
    """Hash and sign a payload into an Envelope (header fields checked as a decoder would)."""
    payload_hash = hashlib.sha256(payload).digest()
    _check_types(
        run_id, round, base_hash, identity.public_key, names, shapes, payload, payload_hash, bytes(64)
    )
    message = signing_message(
        FORMAT_VERSION, run_id, round, base_hash, identity.public_key, names, shapes, payload_hash
    )
    return Envelope(
        version=FORMAT_VERSION,
        run_id=run_id,
        round=round,
        base_hash=base_hash,
        peer_key=identity.public_key,
        names=names,
        shapes=shapes,
        payload=payload,
        payload_hash=payload_hash,
        signature=identity.sign(message),
    )


def decode_envelope(
    data: bytes,
    spec: Mapping[str, tuple[int, ...]],
    *,
    run_id: str | None = None,
    max_bytes: int | None = None,
) -> Envelope:
    """Parse and fully validate an envelope (header, tensors vs `spec`, hash, signature, payload).

    Args:
        data: the bytes received.
        spec: this run's trainable tensors, name -> shape, in the model's order.
        run_id: if given, the envelope must be for this run.
        max_bytes: size cap (default `CodecConfig().max_payload_bytes`), checked before parsing.
    Returns:
        The Envelope; its `delta()` is ready (already parsed).
    Raises:
        CodecError, and nothing else, for anything malformed; nothing is kept from a rejected envelope.
    """
    cap = CodecConfig().max_payload_bytes if max_bytes is None else max_bytes
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"envelope must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) > cap:
        raise CodecError(f"envelope is {len(data)} bytes, over the cap of {cap}")
    raw = unpack_strict(data, cap, "envelope")
    if not isinstance(raw, tuple) or not raw:
        raise CodecError("envelope must be a non-empty msgpack array")
    if raw[0] != FORMAT_VERSION or not isinstance(raw[0], int) or isinstance(raw[0], bool):
        shown = raw[0] if isinstance(raw[0], int) else f"of type {type(raw[0]).__name__}"
        raise CodecError(f"unknown envelope version {shown} (expected {FORMAT_VERSION})")
    if len(raw) != ENVELOPE_FIELDS:
        raise CodecError(f"envelope has {len(raw)} fields, expected {ENVELOPE_FIELDS}")
    version, env_run, round_, base_hash, peer_key, names, shapes, payload, payload_hash, signature = raw
    _check_types(env_run, round_, base_hash, peer_key, names, shapes, payload, payload_hash, signature)
    if run_id is not None and env_run != run_id:
        raise CodecError(f"envelope is for run {env_run!r}, not {run_id!r}")
    _check_tensors(names, shapes, spec)
    env = Envelope(
        version=version,
        run_id=env_run,
        round=round_,
        base_hash=base_hash,
        peer_key=peer_key,
        names=names,
        shapes=shapes,
        payload=payload,
        payload_hash=payload_hash,
        signature=signature,
    )
    if env.to_bytes() != data:
        raise CodecError("envelope is not canonically encoded")
    if hashlib.sha256(payload).digest() != payload_hash:
        raise CodecError("payload hash does not match the payload")
    if not verify_signature(peer_key, env.signing_message(), signature):
        raise CodecError(f"bad signature from peer {peer_key.hex()[:16]}")
    env._delta  # noqa: B018 - parse and dequantize now, so that a bad payload is rejected here
    return env


def _check_types(
    run_id: Any,
    round_: Any,
    base_hash: Any,
    peer_key: Any,
    names: Any,
    shapes: Any,
    payload: Any,
    payload_hash: Any,
    signature: Any,
) -> None:
    def need(ok: bool, field: str, what: str) -> None:
        if not ok:
            raise CodecError(f"envelope field {field!r} must be {what}")

    need(is_run_id(run_id), "run_id", "a valid run id")
    need(
        isinstance(round_, int) and not isinstance(round_, bool) and 0 <= round_ <= MAX_ROUND,
        "round",
        "an integer in [0, 2^63)",
    )
    need(is_hex64(base_hash), "base_hash", "64 lowercase hex")
    need(is_key_bytes(peer_key), "peer_key", "32 bytes")
    need(isinstance(names, tuple) and all(isinstance(n, str) for n in names), "names", "an array of strings")
    need(
        isinstance(shapes, tuple)
        and all(isinstance(s, tuple) and all(_is_dim(d) for d in s) for s in shapes),
        "shapes",
        "an array of integer arrays",
    )
    need(isinstance(payload, bytes), "payload", "binary")
    need(isinstance(payload_hash, bytes) and len(payload_hash) == 32, "payload_hash", "32 bytes")
    need(isinstance(signature, bytes) and len(signature) == SIGNATURE_BYTES, "signature", "64 bytes")


def _is_dim(d: Any) -> bool:
    return isinstance(d, int) and not isinstance(d, bool) and d >= 0


def _check_tensors(
    names: tuple[str, ...], shapes: tuple[tuple[int, ...], ...], spec: Mapping[str, Any]
) -> None:
    if not names:
        raise CodecError("envelope carries no tensors")
    if len(names) != len(shapes):
        raise CodecError(f"envelope has {len(names)} tensor names but {len(shapes)} shapes")
    order = {name: i for i, name in enumerate(spec)}
    for name, shape in zip(names, shapes, strict=True):
        if name not in order:
            raise CodecError(f"tensor {name!r} is not in this run's model")
        if shape != tuple(spec[name]):
            raise CodecError(f"tensor {name!r} has shape {list(shape)}, the model's is {list(spec[name])}")
    positions = [order[name] for name in names]
    if any(b <= a for a, b in pairwise(positions)):
        raise CodecError("tensor names repeat or do not follow the model's order")
