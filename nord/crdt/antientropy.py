"""Anti-entropy: replicas exchange small digests, then only what the other lacks (delta-state CRDT).

A digest lists, per dot (peer, round) in the useful window, a 64-bit hash of the sorted ids held on that
dot, or for a dot the sealed rounds folded FOLDED (its folded payload may be gone: compaction,
aggregates) followed by the hash of the dot's other, unfolded ids if any (an equivocator's second
payload: never foldable, but held like any element, so replicas agree on what they hold and the
authority sees the equivocation), plus the id prefixes of held removals and seals. `missing` compares
these, so an equivocating second payload is sent whether its dot is open or folded, and a folded
payload is not sent again to a peer that folded it.
`join` applies a `Delta` until nothing more applies: contributions
first (removals may name them, seals need them), then removals and seals, then again whatever was
rejected only for being ahead of the round.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from nord.checks import is_count
from nord.crdt.messages import Delta
from nord.crdt.orset import ids_hash
from nord.errors import CodecError, MergeError

log = logging.getLogger(__name__)

FOLDED = "folded"  # a digest's mark for a dot already folded by a sealed round


def folded_mark(unfolded: list[str]) -> str:
    """A folded dot's digest entry: FOLDED, then the hash of the ids on it that were not folded."""
    return f"{FOLDED}:{ids_hash(unfolded)}" if unfolded else FOLDED


def _checked_digest(remote: Any) -> dict[str, Any]:
    """A remote digest with the expected shape (it comes from the network), else MergeError."""

    def is_str_list(x: Any) -> bool:
        return isinstance(x, (list, tuple)) and all(isinstance(i, str) for i in x)

    adds = remote.get("adds", {}) if isinstance(remote, Mapping) else None
    ok = (
        isinstance(remote, Mapping)
        and is_count(remote.get("round", 0))
        and is_count(remote.get("base_round", 0))
        and isinstance(adds, Mapping)
        and all(
            isinstance(peer, str)
            and isinstance(rounds, Mapping)
            and all(isinstance(r, str) and isinstance(h, str) for r, h in rounds.items())
            for peer, rounds in adds.items()
        )
        and is_str_list(remote.get("removals", []))
        and is_str_list(remote.get("seals", []))
    )
    if not ok:
        raise MergeError("malformed anti-entropy digest")
    return dict(remote)


class AntiEntropy:
    """Digest, missing, delta_for and join for `Replica`, over its public interface only: `run_id`,
    `spec`, `merge`, `round`, `base_round`, `base_hash`, `dot_digest`, `on_dot`, `envelope`,
    `removals`, `base`, `folded_dots`, `is_folded`, `held_seals`, `add`, `apply_removal` and `apply_seal`."""

    def digest(self) -> dict[str, Any]:
        """Small summary for anti-entropy: per-dot id hashes, removal and seal id prefixes."""
        window = self.merge.max_staleness
        rounds = range(self.base_round - window, self.round + window + 1)
        adds = self.dot_digest(rounds)
        for peer, rnd in self.folded_dots():
            if rnd in rounds:
                adds.setdefault(peer.hex(), {})[str(rnd)] = folded_mark(self._unfolded_on_dot(peer, rnd))
        return {
            "run_id": self.run_id,
            "round": self.round,
            "base_round": self.base_round,
            "base_hash": self.base_hash,
            "adds": adds,
            "removals": sorted(r.removal_id[:16] for r in self.removals()),
            "seals": sorted(s.seal_id[:16] for s in self.held_seals()),
        }

    def missing(self, remote_digest: Mapping[str, Any]) -> list[str]:
        """Contribution ids this replica holds that the remote lacks and could accept now."""
        remote_digest = _checked_digest(remote_digest)
        remote_round = int(remote_digest.get("round", 0))
        window = self.merge.max_staleness
        remote_adds = remote_digest.get("adds", {})
        out, listed = [], None
        for peer_hex, rounds in self.dot_digest(
            range(remote_round - window, remote_round + window + 1)
        ).items():
            for rnd, h in rounds.items():
                theirs = remote_adds.get(peer_hex, {}).get(rnd)
                if theirs == h:
                    continue
                ids = self.on_dot(bytes.fromhex(peer_hex), int(rnd))
                if theirs is not None and theirs.startswith(FOLDED):
                    # Theirs folded one of the dot's ids: not one a held seal lists (ours if we hold
                    # that seal, even unapplied); they lack ours if their other ids differ.
                    listed = listed if listed is not None else self._listed_by_held_seals()
                    ids = [c for c in ids if not self.is_folded(c) and c not in listed]
                    if theirs == folded_mark(ids):
                        continue
                out.extend(ids)
        return sorted(out)

    def _listed_by_held_seals(self) -> set[str]:
        return {c for seal in self.held_seals() for c in seal.contribution_ids}

    def _unfolded_on_dot(self, peer_key: bytes, rnd: int) -> list[str]:
        return [c for c in self.on_dot(peer_key, rnd) if not self.is_folded(c)]

    def delta_for(self, remote_digest: Mapping[str, Any]) -> Delta:
        """Everything the remote lacks: envelopes (by `missing`), removals and seals."""
        remote_digest = _checked_digest(remote_digest)
        have_removals = set(remote_digest.get("removals", ()))
        have_seals = set(remote_digest.get("seals", ()))
        remote_base = int(remote_digest.get("base_round", 0))
        # The base's seal too: a replica one round behind it adopts it (from its aggregate, or its
        # contributions from peers that hold them) instead of a snapshot (`needs_snapshot`).
        seals = [self.base.seal, *self.held_seals()] if self.base.seal is not None else self.held_seals()
        return Delta(
            envelopes=tuple(self.envelope(c).to_bytes() for c in self.missing(remote_digest)),
            removals=tuple(r for r in self.removals() if r.removal_id[:16] not in have_removals),
            seals=tuple(s for s in seals if s.round >= remote_base and s.seal_id[:16] not in have_seals),
        )

    def needs_snapshot(self, remote_digest: Mapping[str, Any]) -> bool:
        """True if the remote is behind this replica's compaction point by more than the base's seal
        (which `delta_for` sends): send it a snapshot instead."""
        remote_digest = _checked_digest(remote_digest)
        return int(remote_digest.get("round", 0)) < self.base_round - 1

    def join(self, other: Any) -> int:
        """Apply what `other` (a Replica or a Delta) has and this replica lacks; how many items were new.

        Items this replica rejects are logged and skipped, so one bad item cannot block the rest.
        """
        from nord.codec import decode_envelope

        delta = other if isinstance(other, Delta) else other.delta_for(self.digest())
        pending: list[tuple[Callable[[Any], bool], Any]] = []
        for data in delta.envelopes:
            try:
                pending.append((self.add, decode_envelope(data, self.spec, run_id=self.run_id)))
            except CodecError as e:
                log.warning("join: rejected a contribution: %s", e)
        pending += [(self.apply_removal, r) for r in delta.removals] + [
            (self.apply_seal, s) for s in delta.seals
        ]
        accepted = 0
        while pending:
            retry, errors = [], []
            for apply, item in pending:
                try:
                    accepted += bool(apply(item))
                except MergeError as e:
                    retry.append((apply, item))
                    errors.append(e)
            if len(retry) == len(pending) or not retry:
                for e in errors:
                    log.warning("join: rejected an item: %s", e)
                break
            pending = retry
        return accepted
