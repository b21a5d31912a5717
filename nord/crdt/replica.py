"""`Replica`: one peer's copy of a run — the contribution OR-Set, the chain of sealed rounds, the weights.

Rounds. The replica holds a base snapshot at round R0 (the compaction point) and a chain of seals for
rounds R0, R0+1, ...; the open round is R = R0 + len(chain) and `base_hash` is the weights hash the open
round builds on. A contribution for round q was trained on the sealed weights of round q (its
`base_hash` must match) and may be folded into any round h with q <= h <= q + max_staleness that has not
folded it or another contribution of its dot already: a contribution that misses seal q rolls into round
q+1's update, and so on, until it is too old.

Open-round update (the pool). pool(R) = {live contributions e : R − max_staleness <= e.round <= R,
e.base_hash = base of e.round, e and its dot not folded}. It is a pure function of (OR-Set state,
chain), so replicas with the same contributions, removals and seals hold the same pool, the same int64
sums, and the same weights = base + η·S/C bit for bit (see accumulator.py).

Admission. Per round q a replica holds at most `merge.max_contributions` unfolded contributions, and the
pool holds at most that many: in both cases the smallest contribution ids (a newcomer with a smaller id
evicts the largest held one; contributions a held seal lists are exempt). The admitted sets are thus a
function of the contributions seen, not of the order they arrived in.

Seals. A replica accepts an authority's seal only by recomputing it, and follows the best verified
seal of each round, rolling back when a better one arrives (nord.crdt.chain). Rounds are final once
compacted. A replica that does not hold a seal's contributions may adopt it from its `Aggregate` (the
exact change of the weights, checked against the seal's hashes): that round becomes its new base, final
like a compacted one (nord.crdt.aggregate).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from nord.checkpoint import weights_hash
from nord.crdt.accumulator import contribution_norm
from nord.crdt.aggregate import Aggregate
from nord.crdt.antientropy import AntiEntropy
from nord.crdt.base import Base, Window, checked_weights
from nord.crdt.chain import better_seal, check_signer, recompute
from nord.crdt.compaction import fold_envelopes
from nord.crdt.config import MergeConfig
from nord.crdt.messages import Removal, Seal, window_hash
from nord.crdt.orset import ContributionSet, Dot, Equivocation
from nord.crdt.persistence import Persistence
from nord.crdt.pool import Pool, admission_victim, new_accumulator
from nord.errors import ConfigError, MergeError
from nord.protocol import admission_error

log = logging.getLogger(__name__)

Weights = Mapping[str, torch.Tensor]


class Replica(AntiEntropy, Persistence):
    """A replica of one run's state. See the module docstring for the rules it implements."""

    def __init__(
        self,
        *,
        run_id: str,
        spec: Mapping[str, tuple[int, ...]],
        base: Mapping[str, torch.Tensor],
        merge: MergeConfig,
        authorities: Sequence[bytes],
        base_round: int = 0,
        log_dir: str | Path | None = None,
        sparse_sums: bool = False,
    ) -> None:
        """Args beyond the run's settings:
        log_dir: a new directory to persist to (None: memory only); reopen with `Replica.open`.
        sparse_sums: hold the open round's sums per contribution (16 B per nonzero) instead of dense
            (12 B per parameter): less memory while few contributions are pooled; same bits.
        """
        self.run_id = run_id
        self.sparse_sums = sparse_sums
        self.spec = {name: tuple(int(d) for d in shape) for name, shape in spec.items()}
        self.merge = merge
        self.authorities = frozenset(bytes(a) for a in authorities)
        if any(len(a) != 32 for a in self.authorities):
            raise ConfigError("authority keys must be 32-byte ed25519 public keys")
        self._set = ContributionSet(self.authorities)
        self._seals: dict[int, dict[str, Seal]] = {}  # round -> seal id -> seal (signature checked)
        self._verified: set[str] = set()  # seal ids whose recomputation matched
        self._norms: dict[str, float] = {}  # contribution id -> clipped L2 norm (median_norm_clip only)
        self._last_verified: tuple[str, dict[str, torch.Tensor]] | None = None
        self.reset_base(Base.of(checked_weights(self.spec, base), base_round))
        self._start_persistence(log_dir)

    # ----------------------------------------------------------------------------------------- state
    def reset_base(self, base: Base) -> None:
        """Start over at `base` with an empty chain (a new replica, or one restored from a snapshot)."""
        self._base = base
        self._chain: list[Seal] = []
        self._tip = base.weights
        self._prev_tip: tuple[str, Mapping[str, torch.Tensor]] | None = None  # tip seal id, weights before it
        self._rebuild_pool()

    @property
    def round(self) -> int:
        """The open round."""
        return self._base.round + len(self._chain)

    @property
    def base_round(self) -> int:
        return self._base.round

    @property
    def tip_seal(self) -> Seal | None:
        """The seal whose weights the open round builds on (None before the first seal of the run)."""
        return self._chain[-1] if self._chain else self._base.seal

    @property
    def base_hash(self) -> str:
        """Hash of the sealed weights the open round builds on (what contributions must name)."""
        return self._chain[-1].weights_hash if self._chain else self._base.hash

    def _hash_at(self, rnd: int) -> str | None:
        """Base hash of round `rnd` on this replica's chain (None if unknown)."""
        return self._base.hash_at(rnd, self._chain)

    def _folded_before(self, rnd: int) -> tuple[dict[str, int], set[Dot]]:
        """Contributions (id -> their round) and dots folded by compacted rounds and chain seals < `rnd`."""
        return self._base.folded_before(rnd, self._chain, self._set.envelopes)

    def _foldable(self, cid: str, rnd: int, folded: Mapping[str, int], dots: set[Dot]) -> bool:
        """Whether contribution `cid` may be folded into round `rnd` (liveness aside)."""
        env = self._set.envelopes.get(cid)
        return (
            env is not None
            and rnd - self.merge.max_staleness <= env.round <= rnd
            and env.base_hash == self._hash_at(env.round)
            and cid not in folded
            and ContributionSet.dot(env) not in dots
        )

    def _rebuild_pool(self) -> None:
        self._folded_ids, self._folded_dots = self._folded_before(self.round)
        self._pool = Pool(self.spec, self.merge, self.sparse_sums)
        self._sync(self._set.envelopes)

    def _eligible(self, cid: str) -> bool:
        return self._set.live(cid) and self._foldable(cid, self.round, self._folded_ids, self._folded_dots)

    def _sync(
        self, cids: Iterable[str], deltas: Mapping[str, Any] | None = None, drop: frozenset[str] = frozenset()
    ) -> None:
        """Bring the pool in line with `_eligible` for `cids` (those in `drop` are leaving the set)."""
        self._pool.sync(cids, self._eligible, lambda cid: self._set.envelopes[cid].delta(), deltas, drop)

    # ----------------------------------------------------------------------------------- mutations
    def add(self, envelope: Any) -> bool:
        """Add a decoded, signature-checked contribution. False if already held or already folded.

        Raises MergeError if it belongs to another run, is too old or too far ahead, was built on a
        base this replica does not have for its round, or the round is full.
        """
        if envelope.run_id != self.run_id:
            raise MergeError(f"contribution is for run {envelope.run_id!r}, this replica is {self.run_id!r}")
        cid, q, r, s = envelope.contribution_id, int(envelope.round), self.round, self.merge.max_staleness
        if cid in self._set.envelopes or cid in self._folded_ids:
            return False
        refused = admission_error(
            round=q,
            base_hash=envelope.base_hash,
            open_round=r,
            base_at_round=self._hash_at(q) if q <= r else None,
            max_staleness=s,
        )
        if refused:
            raise MergeError(refused)
        evict = self._room_for(cid, q)  # raises if the round is full of smaller ids
        delta = envelope.delta()
        self._pool.sums.check(delta)  # every held contribution passed this: later sums skip it
        if self.merge.median_norm_clip:
            self._norms[cid] = contribution_norm(delta, self.merge)
        self._persist("add", envelope.to_bytes())
        # Hold a copy without the decoded-delta cache (12 bytes per nonzero); it is decoded again only
        # when a sum must be rebuilt (a roll-over, a seal listing another set, median clipping).
        if evict is not None:
            self._evict(evict)
        self._sync(self._set.add(dataclasses.replace(envelope)), {cid: delta})
        if cid in self._listed():
            self._settle()
        return True

    def _listed(self) -> set[str]:
        """Contribution ids named by held seals."""
        return {c for seals in self._seals.values() for seal in seals.values() for c in seal.contribution_ids}

    def _room_for(self, cid: str, q: int) -> str | None:
        """None if round `q` has room for `cid`, else the id it evicts (pool.admission_victim)."""
        if len(self._set.by_round.get(q, ())) < self.merge.max_contributions:
            return None  # the common case: no need to list what seals name
        held = self._set.by_round[q] - self._folded_ids.keys()
        return admission_victim(cid, q, held, self._listed(), self.merge.max_contributions)

    def _evict(self, cid: str) -> None:
        """Forget a held contribution that admission displaced (offered again, it is refused)."""
        dot = ContributionSet.dot(self._set.envelopes[cid])
        self._sync([cid], drop=frozenset([cid]))
        self._set.discard([cid])
        self._norms.pop(cid, None)
        self._sync(self._set.dots.get(dot, ()))  # a dot mate may no longer be equivocating

    def remove(self, contribution_id: str, *, reason: str, identity: Any) -> Removal:
        """Sign, apply and return a removal (for gossip). Authorities may remove anything, peers their own."""
        removal = Removal.create(
            run_id=self.run_id, contribution_id=contribution_id, reason=reason, identity=identity
        )
        self.apply_removal(removal)
        return removal

    def apply_removal(self, removal: Removal) -> bool:
        """Apply a signed removal; False if already held or if it names an already sealed contribution."""
        if removal.run_id != self.run_id:
            raise MergeError(f"removal is for run {removal.run_id!r}, this replica is {self.run_id!r}")
        if removal.removal_id in self._set.removals or removal.contribution_id in self._folded_ids:
            return False
        changed = self._set.add_removal(removal)  # raises if unauthorised
        self._persist("remove", removal.to_bytes())
        self._sync(changed)
        return True

    def apply_seal(self, seal: Seal) -> bool:
        """Accept an authority's seal. True if it is new and now heads its round on this replica's chain.

        A seal whose contributions are not all known yet is kept and applied when they arrive (False);
        so is one that loses to a competing seal (it may still win when more contributions arrive).
        Raises MergeError if it is not from an authority, is for another run, or is forged: its listed
        contributions are not foldable at its round or recomputation gives another weights hash.
        """
        check_signer(seal, self.run_id, self.authorities)
        if seal.round < self._base.round:
            log.info("ignoring seal for round %d: compacted here at %d", seal.round, self._base.round)
            return False
        sid = seal.seal_id
        if sid in self._seals.get(seal.round, {}):
            return False
        if len(seal.contribution_ids) > self.merge.max_contributions:
            raise MergeError(f"seal lists {len(seal.contribution_ids)} contributions, over max_contributions")
        if self._ready(seal) and seal.prev_hash == self._hash_at(seal.round) and sid not in self._verified:
            self._verify(seal)  # raises if forged
        self._seals.setdefault(seal.round, {})[sid] = seal
        self._persist("seal", seal.to_bytes())
        self._settle()
        return self._on_chain(sid)

    def _ready(self, seal: Seal) -> bool:
        """Whether every contribution `seal` lists is held."""
        return all(c in self._set.envelopes for c in seal.contribution_ids)

    def _on_chain(self, sid: str) -> bool:
        return any(s.seal_id == sid for s in self._chain)

    def seal(self, identity: Any) -> Seal:
        """As an authority: seal the open round with the current pool; apply it here and return it."""
        if identity.public_key not in self.authorities:
            raise MergeError("only a run authority can seal a round")
        weights = self.weights()
        ids = sorted(self._pool.ids)
        seal = Seal.create(
            run_id=self.run_id,
            round=self.round,
            prev_hash=self.base_hash,
            contribution_ids=ids,
            weights_hash=weights_hash(weights),
            window_hash=window_hash(*self._window_after(self.round, ids)),
            identity=identity,
        )
        self._verified.add(seal.seal_id)  # computed here from the same pool
        self._last_verified = (seal.seal_id, weights)
        self.apply_seal(seal)
        return seal

    # ----------------------------------------------------------------------------- seals and chain
    def _fold(self, prev: Mapping[str, torch.Tensor], cids: Sequence[str]) -> dict[str, torch.Tensor]:
        """prev + η·S/C over exactly `cids` (median-norm scales taken over this set)."""
        if not self.merge.median_norm_clip and set(cids) == self._pool.ids and prev is self._tip:
            return self._pool.sums.apply_update(prev)
        envelopes = {c: self._set.envelopes[c] for c in cids}
        sums = new_accumulator(self.spec, self.merge, self.sparse_sums)
        return fold_envelopes(prev, envelopes, sums, self.merge, self._norm)

    def _norm(self, cid: str) -> float:
        if cid not in self._norms:
            self._norms[cid] = contribution_norm(self._set.envelopes[cid].delta(), self.merge)
        return self._norms[cid]

    def _weights_at(self, rnd: int) -> dict[str, torch.Tensor]:
        """Sealed weights that round `rnd` builds on (replays the chain from the base if not the tip)."""
        if rnd == self.round:
            return self._tip
        weights = self._base.weights
        for seal in self._chain[: rnd - self._base.round]:
            weights = self._fold(weights, seal.contribution_ids)
        return weights

    def _window_after(self, rnd: int, ids: Sequence[str]) -> Window:
        """The window of a base at round `rnd` + 1 once round `rnd` (on this chain) folds `ids`: what its
        seal's `window_hash` covers."""
        chain = self._chain[: rnd - self._base.round]
        return self._base.window(rnd + 1, chain, self._set.envelopes, self.merge.max_staleness, ids)

    def _verify(self, seal: Seal) -> dict[str, torch.Tensor]:
        """Recompute `seal` on this chain (nord.crdt.chain.recompute): its weights, or MergeError."""
        if self._last_verified is not None and self._last_verified[0] == seal.seal_id:
            return self._last_verified[1]
        folded, dots = self._folded_before(seal.round)
        weights = recompute(
            seal,
            self._weights_at(seal.round),
            envelopes=self._set.envelopes,
            foldable=lambda cid: self._foldable(cid, seal.round, folded, dots),
            fold=self._fold,
            window=lambda: self._window_after(seal.round, seal.contribution_ids),
        )
        self._verified.add(seal.seal_id)
        self._last_verified = (seal.seal_id, weights)
        return weights

    def _settle(self) -> None:
        """Make the chain the best verified seal at each round, starting from the base (nord.crdt.chain)."""
        changed = False
        rnd = self._base.round
        while True:
            current = self._chain[rnd - self._base.round] if rnd < self.round else None
            prev_hash = self._hash_at(rnd)
            better = better_seal(
                self._seals.get(rnd, {}), prev_hash, current, ready=self._ready, verify=self._verify
            )
            if better is not None:
                if current is not None:
                    log.warning("round %d: switching to the better seal %s", rnd, better[0].seal_id[:16])
                # Appending at the tip, the tip's weights are the ones the new seal built on.
                self._prev_tip = (better[0].seal_id, self._tip) if current is None else None
                del self._chain[rnd - self._base.round :]
                self._chain.append(better[0])
                current, self._tip = better
                changed = True
            if current is None:
                break
            rnd += 1
        self._last_verified = None
        if changed:
            self._rebuild_pool()
            self._set.forget_removals_of(self._folded_ids)
            self._prune()

    def apply_aggregate(self, aggregate: Aggregate) -> bool:
        """Adopt the seal of the open round from its aggregate, without its contributions: the sealed
        weights become the base (final, like a compacted round). False if that round is already sealed
        here. MergeError if the seal is not an authority's, does not build on this replica's sealed
        weights, or the aggregate does not give the weights and window its seal certifies."""
        seal = aggregate.seal
        check_signer(seal, self.run_id, self.authorities)
        if seal.round < self.round:
            return False
        if seal.round > self.round or seal.prev_hash != self.base_hash:
            raise MergeError(
                f"aggregate of round {seal.round} does not build on this replica's round {self.round}"
            )
        if len(seal.contribution_ids) > self.merge.max_contributions:
            raise MergeError(f"seal lists {len(seal.contribution_ids)} contributions, over max_contributions")
        if window_hash(*aggregate.window) != seal.window_hash:
            raise MergeError(f"aggregate of round {seal.round}: its window is not what its seal covers")
        weights = aggregate.apply(self._tip)
        if weights_hash(weights) != seal.weights_hash:
            raise MergeError(f"aggregate of round {seal.round} does not give the weights its seal certifies")
        self._persist("aggregate", aggregate.to_bytes())
        folded = {c for s in [*self._chain, seal] for c in s.contribution_ids}
        prev, self._tip = self._tip, weights
        self._pool = Pool(self.spec, self.merge, self.sparse_sums)  # the open round moves on: rebuilt below
        self.install_base(
            Base.of(weights, seal.round + 1, seal, aggregate.window, hash=seal.weights_hash),
            folded & self._set.envelopes.keys(),
        )
        self._prev_tip = (seal.seal_id, prev)
        self._rebuild_pool()
        self._set.forget_removals_of(self._folded_ids)
        self._settle()
        return True

    def aggregate_parts(self) -> tuple[Seal, Window, Weights, Weights] | None:
        """What `Aggregate.build` needs for the tip seal (seal, window after it, weights before and after),
        or None if this replica does not know the weights before it. Cheap (references to tensors never
        changed in place): take it under the lock, build outside."""
        seal = self.tip_seal
        if seal is None or self._prev_tip is None or self._prev_tip[0] != seal.seal_id:
            return None
        window = self._base.window(self.round, self._chain, self._set.envelopes, self.merge.max_staleness)
        return seal, window, self._prev_tip[1], self._tip

    def waiting_seals(self) -> list[Seal]:
        """Seals held for the open round, not applied (their contributions are missing); best first."""
        return sorted(self._seals.get(self.round, {}).values(), key=Seal.rank)

    def sealed(self, rnd: int) -> Seal | None:
        """The seal that sealed round `rnd` on this replica (on the chain, or the base's); None if unknown."""
        if self._base.seal is not None and self._base.seal.round == rnd:
            return self._base.seal
        return next((s for s in self._chain if s.round == rnd), None)

    def install_base(self, base: Base, gone: set[str]) -> None:
        """Make `base` (this chain's first seals folded: compaction) the base and drop the payloads of the
        `gone` contributions it folded. The pool stays: they were folded, so never pooled, and a dot mate
        that stops equivocating is still ineligible (its dot stays in the window while it could be
        pooled); `_sync` confirms it for the mates."""
        self._chain = self._chain[base.round - self._base.round :]
        self._base = base
        self._seals = {r: s for r, s in self._seals.items() if r >= base.round}
        self._verified = {s.seal_id for s in self._chain}
        dots = {ContributionSet.dot(self._set.envelopes[cid]) for cid in gone}
        mates = {c for dot in dots for c in self._set.dots.get(dot, ())}
        self._set.discard(gone)
        self._folded_ids, self._folded_dots = self._folded_before(self.round)
        self._sync(mates, drop=frozenset(gone))
        self._prune()
        self._norms = {c: n for c, n in self._norms.items() if c in self._set.envelopes}

    def _prune(self) -> None:
        """Forget contributions that are too old to be folded ever again (not those folded on the chain)."""
        oldest = self.round - self.merge.max_staleness
        stale = [c for c, e in self._set.envelopes.items() if e.round < oldest and c not in self._folded_ids]
        self._set.discard(stale)
        for cid in stale:
            self._norms.pop(cid, None)

    # ------------------------------------------------------------------------------------- reading
    @property
    def base(self) -> Base:
        """The base snapshot (the compaction point) the chain of seals starts from."""
        return self._base

    @property
    def tip_weights(self) -> Mapping[str, torch.Tensor]:
        """The sealed weights the open round builds on (shared, never changed in place: do not change)."""
        return self._tip

    def held_envelopes(self) -> Mapping[str, Any]:
        """Every held contribution by id (a read-only view)."""
        return MappingProxyType(self._set.envelopes)

    def cached_norms(self, ids: Iterable[str]) -> dict[str, float]:
        """The clipped norms already computed for those of `ids` that have one (median_norm_clip only)."""
        return {c: self._norms[c] for c in ids if c in self._norms}

    def has(self, contribution_id: str) -> bool:
        return contribution_id in self._set.envelopes or contribution_id in self._folded_ids

    def is_folded(self, contribution_id: str) -> bool:
        """Whether a sealed round (on the chain or compacted, within the window) folded this contribution."""
        return contribution_id in self._folded_ids

    def contributions(self, round: int | None = None) -> list[tuple[str, Any]]:
        """Held contributions (folded, pooled, waiting or removed), sorted by id."""
        return sorted((c, e) for c, e in self._set.envelopes.items() if round is None or e.round == round)

    def pool(self) -> list[str]:
        """Ids summed into the open round's update, sorted."""
        return sorted(self._pool.ids)

    def removals(self) -> list[Removal]:
        return sorted(self._set.removals.values(), key=lambda r: r.removal_id)

    def held_seals(self) -> list[Seal]:
        """Every seal held (on the chain or competing) from the base round on, by round, best first."""
        return [s for rnd in sorted(self._seals) for s in sorted(self._seals[rnd].values(), key=Seal.rank)]

    def envelope(self, contribution_id: str) -> Any:
        """A held contribution (KeyError if not held)."""
        return self._set.envelopes[contribution_id]

    def folded_dots(self) -> frozenset[Dot]:
        """Dots (peer, round) the sealed rounds folded, as far back as a duplicate could still claim."""
        return frozenset(self._folded_dots)

    def on_dot(self, peer_key: bytes, rnd: int) -> list[str]:
        """Ids of the contributions held that `peer_key` signed for round `rnd` (two: equivocation)."""
        return sorted(self._set.dots.get((peer_key, rnd), ()))

    def dot_digest(self, rounds: range) -> dict[str, dict[str, str]]:
        """{peer hex: {round: hash of the ids held on that dot}} for `rounds` (anti-entropy digests)."""
        return self._set.digest_of_dots(rounds)

    def seals(self) -> list[Seal]:
        """The chain of seals since the base round, oldest first."""
        return list(self._chain)

    def equivocations(self) -> list[Equivocation]:
        return self._set.equivocations()

    def stats(self) -> dict[str, int]:
        """Sizes for dashboards and benchmarks."""
        return {
            "round": self.round,
            "base_round": self._base.round,
            "held": len(self._set.envelopes),
            "pool": len(self._pool.ids),
            "removals": len(self._set.removals),
            "equivocations": len(self._set.equivocations()),
            "accumulator_bytes": self._pool.sums.nbytes(),
            "payload_bytes": sum(len(e.payload) for e in self._set.envelopes.values()),
        }

    def weights(self, include_open_round: bool = True) -> dict[str, torch.Tensor]:
        """Sealed weights, plus η·S/C of the open round's pool (a fresh dict of float32 CPU tensors)."""
        if not include_open_round:
            return {k: v.clone() for k, v in self._tip.items()}
        return self._fold(self._tip, sorted(self._pool.ids))

    def weights_hash(self, include_open_round: bool = True) -> str:
        return weights_hash(self.weights(include_open_round))
