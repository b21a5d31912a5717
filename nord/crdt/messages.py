"""Signed messages replicas exchange besides contributions: removals, seals, and anti-entropy deltas.

Each signed message is msgpack `[tag, version, *fields, signature]`; the signature is ed25519 over the
msgpack of everything before it, so a message cannot be replayed as another kind or another run. The
message id is the hex sha256 of its full bytes (content-addressed, like contribution ids).

Seal version 2 adds `window_hash`: the hash of what a replica starting at the sealed weights must know
besides them (contributions and dots folded in the rounds a late duplicate could still claim, and those
rounds' base hashes; see `window_hash`), so a snapshot's metadata is vouched for by the same signature as
its weights.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgpack

from nord.checks import MAX_REASON_CHARS, is_count, is_hex64, is_key_bytes, is_reason, is_run_id
from nord.errors import MergeError

VERSION = 1
SEAL_VERSION = 2
REMOVAL_TAG = "nord.removal"
SEAL_TAG = "nord.seal"
DELTA_TAG = "nord.delta"


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack_list(data: bytes, tag: str, n_fields: int, version: int = VERSION) -> list[Any]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MergeError(f"{tag}: expected bytes, got {type(data).__name__}")
    try:
        raw = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise MergeError(f"{tag}: not valid msgpack ({type(e).__name__})") from None
    if not isinstance(raw, list) or len(raw) != n_fields or raw[0] != tag:
        raise MergeError(f"not a {tag} message")
    if raw[1] != version:
        raise MergeError(f"{tag}: unsupported version {raw[1]!r} (expected {version})")
    return raw


def _check(cond: bool, tag: str, what: str) -> None:
    if not cond:
        raise MergeError(f"{tag}: {what}")


def window_hash(folded: Mapping[str, int], dots: set[tuple[bytes, int]], hashes: Mapping[int, str]) -> str:
    """Hex sha256 of a replica window (canonical JSON): contribution id -> its round, folded dots
    (peer key, round), and round -> base hash."""
    body = {
        "folded": sorted([c, int(q)] for c, q in folded.items()),
        "dots": sorted([p.hex(), int(r)] for p, r in dots),
        "hashes": sorted([int(q), h] for q, h in hashes.items()),
    }
    return hashlib.sha256(json.dumps(body, separators=(",", ":")).encode()).hexdigest()


def _verify(tag: str, key: bytes, body: bytes, signature: bytes) -> None:
    from nord.identity import verify_signature

    if not verify_signature(key, body, signature):
        raise MergeError(f"{tag}: bad signature")


@dataclass(frozen=True, kw_only=True)
class Removal:
    """A signed tombstone: `signer` revokes the contribution `contribution_id` of run `run_id`."""

    run_id: str
    contribution_id: str
    reason: str
    signer: bytes
    signature: bytes

    def _body(self) -> list[Any]:
        return [REMOVAL_TAG, VERSION, self.run_id, self.contribution_id, self.reason, self.signer]

    @classmethod
    def create(cls, *, run_id: str, contribution_id: str, reason: str, identity: Any) -> Removal:
        """Sign a removal; MergeError if the reason is blank or over MAX_REASON_CHARS (it is signed, and
        recorded elsewhere, in full: never cut here)."""
        if not is_reason(reason):
            raise MergeError(f"a removal's reason must be 1-{MAX_REASON_CHARS} characters, got {len(reason)}")
        body = _pack([REMOVAL_TAG, VERSION, run_id, contribution_id, reason, identity.public_key])
        return cls(
            run_id=run_id,
            contribution_id=contribution_id,
            reason=reason,
            signer=identity.public_key,
            signature=identity.sign(body),
        )

    def to_bytes(self) -> bytes:
        return _pack([*self._body(), self.signature])

    @property
    def removal_id(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @classmethod
    def from_bytes(cls, data: bytes) -> Removal:
        """Parse and check the signature (who may remove what is the replica's decision)."""
        raw = _unpack_list(data, REMOVAL_TAG, 7)
        _, _, run_id, cid, reason, signer, signature = raw
        _check(is_run_id(run_id), REMOVAL_TAG, "bad run id")
        _check(is_hex64(cid), REMOVAL_TAG, "contribution id is not 64 hex digits")
        _check(is_reason(reason), REMOVAL_TAG, f"reason is not 1-{MAX_REASON_CHARS} characters")
        _check(
            is_key_bytes(signer) and isinstance(signature, bytes), REMOVAL_TAG, "bad signer key or signature"
        )
        removal = cls(run_id=run_id, contribution_id=cid, reason=reason, signer=signer, signature=signature)
        _verify(REMOVAL_TAG, signer, _pack(removal._body()), signature)
        return removal


@dataclass(frozen=True, kw_only=True)
class Seal:
    """An authority's signed statement that round `round`, built on `prev_hash`, folds exactly
    `contribution_ids` (sorted) and yields weights whose `weights_hash` is given, after which the
    replica window (module docstring) hashes to `window_hash`."""

    run_id: str
    round: int
    prev_hash: str
    contribution_ids: tuple[str, ...]
    weights_hash: str
    window_hash: str
    authority: bytes
    signature: bytes

    def _body(self) -> list[Any]:
        return [
            SEAL_TAG,
            SEAL_VERSION,
            self.run_id,
            self.round,
            self.prev_hash,
            list(self.contribution_ids),
            self.weights_hash,
            self.window_hash,
            self.authority,
        ]

    @classmethod
    def create(
        cls,
        *,
        run_id: str,
        round: int,
        prev_hash: str,
        contribution_ids: list[str],
        weights_hash: str,
        window_hash: str,
        identity: Any,
    ) -> Seal:
        ids = tuple(sorted(contribution_ids))
        unsigned = cls(
            run_id=run_id,
            round=round,
            prev_hash=prev_hash,
            contribution_ids=ids,
            weights_hash=weights_hash,
            window_hash=window_hash,
            authority=identity.public_key,
            signature=b"",
        )
        signature = identity.sign(_pack(unsigned._body()))
        return cls(**{**unsigned.__dict__, "signature": signature})

    def to_bytes(self) -> bytes:
        return _pack([*self._body(), self.signature])

    @property
    def seal_id(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def rank(self) -> tuple[int, str]:
        """Competing seals of one round: the smaller rank wins (most contributions, then lowest id)."""
        return (-len(self.contribution_ids), self.seal_id)

    @classmethod
    def from_bytes(cls, data: bytes) -> Seal:
        """Parse and check the signature (whether the key is an authority is the replica's decision)."""
        raw = _unpack_list(data, SEAL_TAG, 10, SEAL_VERSION)
        _, _, run_id, rnd, prev_hash, ids, weights_hash, window, authority, signature = raw
        _check(is_run_id(run_id), SEAL_TAG, "bad run id")
        _check(is_count(rnd), SEAL_TAG, "round is not a non-negative integer")
        hashes_ok = is_hex64(prev_hash) and is_hex64(weights_hash) and is_hex64(window)
        _check(hashes_ok, SEAL_TAG, "hashes are not 64 hex digits")
        _check(isinstance(ids, list) and all(is_hex64(i) for i in ids), SEAL_TAG, "bad contribution ids")
        _check(ids == sorted(set(ids)), SEAL_TAG, "contribution ids are not sorted and unique")
        _check(
            is_key_bytes(authority) and isinstance(signature, bytes), SEAL_TAG, "bad authority or signature"
        )
        seal = cls(
            run_id=run_id,
            round=rnd,
            prev_hash=prev_hash,
            contribution_ids=tuple(ids),
            weights_hash=weights_hash,
            window_hash=window,
            authority=authority,
            signature=signature,
        )
        _verify(SEAL_TAG, authority, _pack(seal._body()), signature)
        return seal


@dataclass(frozen=True, kw_only=True)
class Delta:
    """What one replica sends another in anti-entropy: encoded envelopes, removals and seals it lacks."""

    envelopes: tuple[bytes, ...] = ()
    removals: tuple[Removal, ...] = ()
    seals: tuple[Seal, ...] = ()

    def __len__(self) -> int:
        return len(self.envelopes) + len(self.removals) + len(self.seals)

    def to_bytes(self) -> bytes:
        return _pack(
            [
                DELTA_TAG,
                VERSION,
                list(self.envelopes),
                [r.to_bytes() for r in self.removals],
                [s.to_bytes() for s in self.seals],
            ]
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Delta:
        _, _, envelopes, removals, seals = _unpack_list(data, DELTA_TAG, 5)
        for part in (envelopes, removals, seals):
            ok = isinstance(part, list) and all(isinstance(x, bytes) for x in part)
            _check(ok, DELTA_TAG, "bad item list")
        return cls(
            envelopes=tuple(envelopes),
            removals=tuple(Removal.from_bytes(r) for r in removals),
            seals=tuple(Seal.from_bytes(s) for s in seals),
        )
