"""The OR-Set of contributions: adds, authorised tombstones, and equivocation — no tensors.

An element is a contribution, identified by its content (`Envelope.contribution_id` = sha256 of peer key,
run, round and payload hash), so every add carries a unique tag and the set of adds is a grow-only set.
Its dot is (peer key, round): an honest peer contributes once per round, so two different elements on
one dot are equivocation. A removal is a signed tombstone naming one element id; it removes exactly the
element it observed, so a concurrent add of any other element survives it.

State = (adds, removals); join = union of both, hence commutative, associative and idempotent. Which
elements are *live* is a pure function of that state:

    live(e) = e ∈ adds  ∧  no authorised removal names e  ∧  |adds on dot(e)| = 1

A removal is authorised if it is signed by a run authority, or by the element's own peer. Any other
removal is rejected; a peer's removal of its own element is accepted only once the element is known
(anti-entropy sends elements before removals), so whether a removal counts never depends on order.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from nord.crdt.messages import Removal
from nord.errors import MergeError

log = logging.getLogger(__name__)

Dot = tuple[bytes, int]  # (peer key, round)


@dataclass(frozen=True, kw_only=True)
class Equivocation:
    """Evidence: one peer signed several different payloads for one round (envelope headers)."""

    peer_key: bytes
    round: int
    contributions: tuple[dict[str, Any], ...]  # header of each signed envelope (no payload)


def ids_hash(ids: Iterable[str]) -> str:
    """16-hex hash of a set of contribution ids (what anti-entropy digests compare)."""
    return hashlib.sha256("".join(sorted(ids)).encode()).hexdigest()[:16]


def envelope_header(envelope: Any) -> dict[str, Any]:
    """Everything the peer signed except the payload itself: enough to verify the signature later."""
    return {
        "contribution_id": envelope.contribution_id,
        "version": envelope.version,
        "names": envelope.names,
        "shapes": envelope.shapes,
        "run_id": envelope.run_id,
        "round": envelope.round,
        "base_hash": envelope.base_hash,
        "payload_hash": envelope.payload_hash,
        "signature": envelope.signature,
    }


class ContributionSet:
    """Adds, removals and the liveness rule of the module docstring."""

    def __init__(self, authorities: Iterable[bytes]) -> None:
        self.authorities = frozenset(authorities)
        self.envelopes: dict[str, Any] = {}
        self.dots: dict[Dot, set[str]] = {}
        self.by_round: dict[int, set[str]] = {}  # round -> ids held for it (admission counts these)
        self.removals: dict[str, Removal] = {}  # removal id -> removal (authorised or still inert)
        self._removed_by: dict[str, set[str]] = {}  # contribution id -> ids of removals naming it

    @staticmethod
    def dot(envelope: Any) -> Dot:
        return (bytes(envelope.peer_key), int(envelope.round))

    def add(self, envelope: Any) -> set[str]:
        """Insert an element; returns the ids whose liveness may have changed (empty for a duplicate)."""
        cid = envelope.contribution_id
        if cid in self.envelopes:
            return set()
        self.envelopes[cid] = envelope
        self.by_round.setdefault(int(envelope.round), set()).add(cid)
        on_dot = self.dots.setdefault(self.dot(envelope), set())
        on_dot.add(cid)
        if len(on_dot) == 2:
            peer = bytes(envelope.peer_key).hex()[:16]
            log.warning("equivocation: peer %s signed two payloads for round %d", peer, envelope.round)
        return set(on_dot)

    def _authorised(self, removal: Removal, envelope: Any | None) -> bool:
        if removal.signer in self.authorities:
            return True
        return envelope is not None and removal.signer == bytes(envelope.peer_key)

    def add_removal(self, removal: Removal) -> set[str]:
        """Insert a tombstone; returns the ids whose liveness may have changed. MergeError if unauthorised."""
        rid = removal.removal_id
        if rid in self.removals:
            return set()
        cid = removal.contribution_id
        envelope = self.envelopes.get(cid)
        if not self._authorised(removal, envelope):
            if envelope is None:
                raise MergeError(f"a non-authority removes unknown contribution {cid[:16]}: send it first")
            signer = removal.signer.hex()[:16]
            raise MergeError(f"removal of {cid[:16]} is signed by {signer}, not an authority nor its peer")
        self.removals[rid] = removal
        self._removed_by.setdefault(cid, set()).add(rid)
        return {cid}

    def _forget_removal(self, rid: str) -> None:
        removal = self.removals.pop(rid)
        named = self._removed_by[removal.contribution_id]
        named.discard(rid)
        if not named:
            del self._removed_by[removal.contribution_id]

    def removed(self, cid: str) -> bool:
        return bool(self._removed_by.get(cid))

    def equivocating(self, envelope: Any) -> bool:
        return len(self.dots.get(self.dot(envelope), ())) > 1

    def live(self, cid: str) -> bool:
        envelope = self.envelopes.get(cid)
        return envelope is not None and not self.removed(cid) and not self.equivocating(envelope)

    def equivocations(self) -> list[Equivocation]:
        return [
            Equivocation(
                peer_key=peer,
                round=rnd,
                contributions=tuple(envelope_header(self.envelopes[c]) for c in sorted(ids)),
            )
            for (peer, rnd), ids in sorted(self.dots.items())
            if len(ids) > 1
        ]

    def forget_removals_of(self, cids: Iterable[str]) -> None:
        """Drop removals naming these elements (they were sealed: a removal can no longer change them)."""
        for cid in cids:
            for rid in list(self._removed_by.get(cid, ())):
                self._forget_removal(rid)

    def discard(self, cids: Iterable[str]) -> None:
        """Forget elements (and their removals) that can never matter again (compacted or too old)."""
        for cid in cids:
            envelope = self.envelopes.pop(cid, None)
            if envelope is not None:
                for index, key in ((self.dots, self.dot(envelope)), (self.by_round, int(envelope.round))):
                    index[key].discard(cid)
                    if not index[key]:
                        del index[key]
            for rid in list(self._removed_by.get(cid, ())):
                self._forget_removal(rid)

    def digest_of_dots(self, rounds: range) -> dict[str, dict[str, str]]:
        """{peer hex: {round: 16-hex hash of the sorted ids on that dot}} for dots in `rounds`."""
        out: dict[str, dict[str, str]] = {}
        for (peer, rnd), ids in self.dots.items():
            if rnd in rounds:
                out.setdefault(peer.hex(), {})[str(rnd)] = ids_hash(ids)
        return out
