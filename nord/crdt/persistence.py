"""Persistence and compaction of a `Replica`: snapshot + log (nord.crdt.log), restore, snapshots for peers.

Compaction folds the sealed chain into a new base snapshot and drops the folded payloads; it keeps only
what the open window still needs (contribution ids and dots folded in rounds a late duplicate could still
claim, and the base hashes of those rounds), so memory and disk stay bounded over a long run and the
weights are exactly those before compaction.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from nord.checkpoint import save_checkpoint
from nord.crdt.config import MergeConfig
from nord.crdt.log import Store
from nord.crdt.messages import Removal, Seal, window_hash
from nord.crdt.orset import ContributionSet, Dot
from nord.errors import CodecError, MergeError

log = logging.getLogger(__name__)


class Persistence:
    """Log, snapshot, compaction and restore for `Replica` (a mixin over its state)."""

    def _persist(self, kind: str, data: bytes) -> None:
        if self._store is not None:
            self._store.append(kind, data)

    def _window(self, rnd: int) -> tuple[dict[str, int], set[Dot], dict[int, str]]:
        """What a base at round `rnd` must remember: ids and dots folded before it, and base hashes,
        for the rounds a contribution could still claim (>= rnd - max_staleness)."""
        return self._trimmed_window(rnd, *self._folded_before(rnd))

    def _window_after(self, rnd: int, ids: Sequence[str]) -> tuple[dict[str, int], set[Dot], dict[int, str]]:
        """The window of a base at round `rnd` + 1 once round `rnd` (on this chain) folds `ids`: what its
        seal's `window_hash` covers."""
        folded, dots = self._folded_before(rnd)
        for cid in ids:
            dot = ContributionSet.dot(self._set.envelopes[cid])
            folded[cid] = dot[1]
            dots.add(dot)
        return self._trimmed_window(rnd + 1, folded, dots)

    def _trimmed_window(
        self, rnd: int, ids: dict[str, int], dots: set[Dot]
    ) -> tuple[dict[str, int], set[Dot], dict[int, str]]:
        oldest = rnd - self.merge.max_staleness
        folded = {c: q for c, q in ids.items() if q >= oldest}
        dots = {d for d in dots if d[1] >= oldest}
        hashes = {q: h for q in range(oldest, rnd) if (h := self._hash_at(q)) is not None}
        return folded, dots, hashes

    def compact(self, keep_rounds: int = 0) -> None:
        """Fold sealed rounds into the base snapshot and drop their payloads (those rounds become final).

        Args:
            keep_rounds: the most recent sealed rounds to keep unfolded, so that a competing seal for
                them can still win (module docstring of nord.crdt.replica). Weights are unchanged.
        """
        if keep_rounds < 0:
            raise MergeError(f"keep_rounds must be >= 0, got {keep_rounds}")
        cut = max(0, len(self._chain) - keep_rounds)
        new_round, kept, tip = self._base_round + cut, self._chain[cut:], self._tip
        base = self._weights_at(new_round)
        folded, dots, hashes = self._window(new_round)
        if cut:
            self._base_seal = self._chain[cut - 1]
        gone = [c for seal in self._chain[:cut] for c in seal.contribution_ids]
        self._set.discard(gone)
        self._seals = {r: s for r, s in self._seals.items() if r >= new_round}
        self._verified = {s.seal_id for s in kept}
        self._reset_base(base, new_round, folded=folded, folded_dots=dots, hashes=hashes)
        self._chain, self._tip = kept, tip
        self._rebuild_pool()
        self._prune()
        self._norms = {c: n for c, n in self._norms.items() if c in self._set.envelopes}
        if self._store is not None:
            self._store.rewrite(self._base, self._snapshot_meta(), self._records())

    def _records(self) -> list[tuple[str, bytes]]:
        """The held state as log records, in an order that replays: round by round, seals then
        contributions (a seal waits for its contributions, and lets a listed one into a full round), and
        removals last."""
        records: list[tuple[str, bytes]] = []
        rounds = sorted({e.round for e in self._set.envelopes.values()} | set(self._seals))
        for rnd in rounds:
            held = sorted(
                (e for e in self._set.envelopes.values() if e.round == rnd), key=lambda e: e.contribution_id
            )
            records += [
                ("seal", s.to_bytes()) for s in sorted(self._seals.get(rnd, {}).values(), key=Seal.rank)
            ]
            records += [("add", e.to_bytes()) for e in held]
        return records + [("remove", r.to_bytes()) for r in self.removals()]

    def save_snapshot(self, path: str | Path) -> str:
        """Write the sealed tip (weights + the window a new replica needs) for a lagging peer; its hash."""
        folded, dots, hashes = self._window(self.round)
        meta = self._snapshot_meta(self.round, folded, dots, hashes, self.tip_seal)
        return save_checkpoint(path, self._tip, meta)

    def _snapshot_meta(
        self,
        base_round: int | None = None,
        folded: dict[str, int] | None = None,
        dots: set[Dot] | None = None,
        hashes: dict[int, str] | None = None,
        seal: Seal | None = None,
    ) -> dict[str, object]:
        seal = self._base_seal if base_round is None else seal
        return {
            "run_id": self.run_id,
            "seal": seal.to_bytes().hex() if seal is not None else "",
            "base_round": self._base_round if base_round is None else base_round,
            "folded": self._compacted_folded if folded is None else folded,
            "folded_dots": sorted([p.hex(), r] for p, r in (self._compacted_dots if dots is None else dots)),
            "round_hashes": {
                str(k): v for k, v in (self._compacted_hashes if hashes is None else hashes).items()
            },
        }

    @classmethod
    def from_snapshot(
        cls,
        tensors: Mapping[str, torch.Tensor],
        meta: Mapping[str, str],
        *,
        spec: Mapping[str, tuple[int, ...]],
        merge: MergeConfig,
        authorities: Sequence[bytes],
        genesis_hash: str | None,
        log_dir: str | Path | None = None,
        sparse_sums: bool = False,
    ) -> Any:
        """A replica starting at a snapshot (from `save_snapshot` via `load_checkpoint`, or compaction).

        Nothing in it is taken on the sender's word (MergeError otherwise): a round-0 snapshot must hold
        the run's genesis weights (`genesis_hash`, from the signed run config; None only for this
        replica's own directory) and no window; a later one must carry a seal by one of `authorities`
        for this run and the round before it whose weights hash is the snapshot's and whose window
        hash covers its metadata (folded contributions and dots, round hashes).
        """
        try:
            run_id = meta["run_id"]
            base_round = int(meta["base_round"])
            folded = {str(c): int(q) for c, q in json.loads(meta["folded"]).items()}
            dots = {(bytes.fromhex(p), int(r)) for p, r in json.loads(meta["folded_dots"])}
            hashes = {int(q): str(h) for q, h in json.loads(meta["round_hashes"]).items()}
            seal = Seal.from_bytes(bytes.fromhex(meta["seal"])) if meta.get("seal") else None
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            raise MergeError(f"snapshot metadata is missing or malformed ({e})") from None
        replica = cls(
            run_id=run_id,
            spec=spec,
            base=tensors,
            merge=merge,
            authorities=authorities,
            sparse_sums=sparse_sums,
        )
        if base_round < 0:
            raise MergeError(f"snapshot of round {base_round}: rounds start at 0")
        if base_round == 0:
            if seal is not None or folded or dots or hashes:
                raise MergeError("a round-0 snapshot carries a seal or folded contributions: it has none")
            if genesis_hash is not None and replica.base_hash != genesis_hash:
                raise MergeError(
                    f"round-0 snapshot weights {replica.base_hash[:16]}… are not the run's genesis "
                    f"weights {genesis_hash[:16]}…"
                )
        elif seal is None:
            raise MergeError(f"snapshot of round {base_round} carries no seal")
        elif not (
            seal.authority in replica.authorities
            and seal.run_id == run_id
            and seal.round == base_round - 1
            and seal.weights_hash == replica.base_hash
        ):
            raise MergeError("snapshot weights are not the ones its authority seal certifies")
        elif seal.window_hash != window_hash(folded, dots, hashes):
            raise MergeError(
                "snapshot metadata (folded contributions, round hashes) is not what its seal covers"
            )
        replica._base_seal = seal
        replica._reset_base(replica._base, base_round, folded=folded, folded_dots=dots, hashes=hashes)
        if log_dir is not None:
            store = Store(log_dir)
            store.create(replica._base, replica._snapshot_meta())
            replica._store = store
        return replica

    @classmethod
    def open(
        cls,
        log_dir: str | Path,
        *,
        spec: Mapping[str, tuple[int, ...]],
        merge: MergeConfig,
        authorities: Sequence[bytes],
        sparse_sums: bool = False,
    ) -> Any:
        """Restore a replica from its directory: the snapshot, then every record of the log in order."""
        from nord.codec import decode_envelope

        store = Store(log_dir)
        tensors, meta, records = store.load()
        replica = cls.from_snapshot(
            tensors,
            meta,
            spec=spec,
            merge=merge,
            authorities=authorities,
            genesis_hash=None,  # our own directory: its round-0 base was checked when it was created
            sparse_sums=sparse_sums,
        )
        for kind, data in records:
            try:
                if kind == "add":
                    replica.add(decode_envelope(data, replica.spec, run_id=replica.run_id))
                elif kind == "remove":
                    replica.apply_removal(Removal.from_bytes(data))
                else:
                    replica.apply_seal(Seal.from_bytes(data))
            except (CodecError, MergeError) as e:
                log.warning("%s: a logged %s record no longer applies: %s", log_dir, kind, e)
        replica._store = store
        return replica

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
