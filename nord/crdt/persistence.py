"""Persistence and compaction of a `Replica`: snapshot + log (nord.crdt.log), restore, snapshots for peers.

Compaction folds the sealed chain into a new base snapshot and drops the folded payloads; it keeps only
what the open window still needs (contribution ids and dots folded in rounds a late duplicate could still
claim, and the base hashes of those rounds), so memory and disk stay bounded over a long run and the
weights are exactly those before compaction.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from nord.checkpoint import save_checkpoint
from nord.crdt.aggregate import Aggregate
from nord.crdt.base import Base
from nord.crdt.compaction import Compaction, CompactionView
from nord.crdt.config import MergeConfig
from nord.crdt.log import Store
from nord.crdt.messages import Removal, Seal, window_hash
from nord.crdt.pool import new_accumulator
from nord.errors import CodecError, MergeError

log = logging.getLogger(__name__)


def _contribution_id(envelope: Any) -> str:
    return envelope.contribution_id


@dataclasses.dataclass(frozen=True)
class SnapshotView:
    """A replica's sealed tip as of one moment (its tensors are never changed in place)."""

    round: int
    base_hash: str
    weights: Mapping[str, torch.Tensor]
    meta: Mapping[str, object]

    def write(self, path: str | Path) -> str:
        """Save it as a checkpoint for `Replica.from_snapshot`; its weights hash."""
        return save_checkpoint(path, self.weights, self.meta)


class Persistence:
    """Log, snapshot, compaction and restore for `Replica` (a mixin). Owns `_store` and `_compaction`;
    it reads the replica only through its public methods (`base`, `seals`, `tip_weights`,
    `held_envelopes`, `held_seals`, `cached_norms`, `removals`) and changes it only through
    `reset_base` and `install_base`."""

    def _start_persistence(self, log_dir: str | Path | None) -> None:
        """Set up the log before anything is recorded: memory only (None) or a new directory."""
        self._store: Store | None = None
        self._compaction: Compaction | None = None  # begun, not yet finished (nord.crdt.compaction)
        self._logged_aggregates = 0  # aggregate records in the log since its snapshot
        if log_dir is not None:
            self._persist_to(log_dir)

    def _persist_to(self, log_dir: str | Path) -> None:
        """Start a new replica directory at the current base."""
        store = Store(log_dir)
        store.create(self.base.weights, self.base.meta(self.run_id))
        self._store = store

    def _persist(self, kind: str, data: bytes) -> None:
        if self._store is not None:
            self._store.append(kind, data)
            self._logged_aggregates += kind == "aggregate"

    def rounds_since_snapshot(self) -> int:
        """Sealed rounds held beyond the base snapshot: the chain's seals and the adopted aggregates the
        log holds (what `compact` folds away, bounding memory and disk)."""
        return len(self.seals()) + self._logged_aggregates

    def compact(self, keep_rounds: int = 0, *, lock: AbstractContextManager | None = None) -> bool:
        """Fold sealed rounds into the base snapshot and drop their payloads (those rounds become final).

        Args:
            keep_rounds: the most recent sealed rounds to keep unfolded, so that a competing seal for
                them can still win (module docstring of nord.crdt.replica). Weights are unchanged.
            lock: the lock that guards this replica, held only to copy the view and to commit
                (nord.crdt.compaction); the folding and writing run outside it. Without one, the
                caller serialises access.
        Returns:
            False if a better seal for a folded round won meanwhile (nothing changed; compact later).
        """
        guard = lock if lock is not None else contextlib.nullcontext()
        with guard:
            job = self.begin_compaction(keep_rounds)
        try:
            job.prepare()
        except BaseException:
            with guard:
                self.abandon_compaction(job)
            raise
        with guard:
            return self.finish_compaction(job)

    def begin_compaction(self, keep_rounds: int = 0) -> Compaction:
        """Phase 1 of `compact` (under the lock): copy what it reads and start tracking the log."""
        if keep_rounds < 0:
            raise MergeError(f"keep_rounds must be >= 0, got {keep_rounds}")
        if self._compaction is not None:
            raise MergeError("a compaction of this replica is already in progress")
        chain = self.seals()
        cut = max(0, len(chain) - keep_rounds)
        folded_seals = tuple(chain[:cut])
        gone = {c for seal in folded_seals for c in seal.contribution_ids}
        held = self.held_envelopes()
        view = CompactionView(
            run_id=self.run_id,
            base=self.base,
            folded_seals=folded_seals,
            envelopes={c: held[c] for c in gone},
            norms=self.cached_norms(gone),
            tip=self.tip_weights if cut == len(chain) else None,
            records=tuple(self._records(self.base.round + cut, gone)),
            staleness=self.merge.max_staleness,
        )
        self._compaction = Compaction(
            view=view,
            store=self._store,
            new_accumulator=functools.partial(new_accumulator, self.spec, self.merge, self.sparse_sums),
            merge=self.merge,
        )
        if self._store is not None:
            self._store.begin_rewrite()
        return self._compaction

    def abandon_compaction(self, job: Compaction) -> None:
        """Drop a compaction begun here (its staged files too); the replica is as it was."""
        if self._compaction is job:
            self._compaction = None
            if self._store is not None:
                self._store.abandon_rewrite()

    def finish_compaction(self, job: Compaction) -> bool:
        """Phase 3 of `compact` (under the lock): commit a prepared compaction if the chain still starts
        with the seals it folded; else drop it and return False."""
        if self._compaction is not job or job.new_base is None:
            raise MergeError("finish_compaction needs the prepared compaction begun on this replica")
        view = job.view
        cut = len(view.folded_seals)
        folded_ids = [s.seal_id for s in view.folded_seals]
        if self.base is not view.base or [s.seal_id for s in self.seals()[:cut]] != folded_ids:
            log.info("compaction dropped: the chain changed below round %d meanwhile", view.new_round)
            self.abandon_compaction(job)
            return False
        self._compaction = None
        if self._store is not None:
            self._store.finish_rewrite()
        self._logged_aggregates = 0
        self.install_base(job.new_base, set(view.envelopes))
        return True

    def _records(self, from_round: int, gone: set[str]) -> list[tuple[str, Any]]:
        """The held state but `gone` contributions and seals before `from_round`, as (kind, message) log
        records in an order that replays: round by round, seals then contributions (a seal waits for its
        contributions, and lets a listed one into a full round), and removals last."""
        records: list[tuple[str, Any]] = []
        held = [e for c, e in self.held_envelopes().items() if c not in gone]
        seals = [s for s in self.held_seals() if s.round >= from_round]  # by round, best first
        for rnd in sorted({e.round for e in held} | {s.round for s in seals}):
            records += [("seal", s) for s in seals if s.round == rnd]
            records += [("add", e) for e in sorted((e for e in held if e.round == rnd), key=_contribution_id)]
        return records + [("remove", r) for r in self.removals() if r.contribution_id not in gone]

    def snapshot_view(self) -> SnapshotView:
        """The sealed tip for a lagging peer: cheap, take it under the lock and `write` it outside."""
        window = self.base.window(self.round, self.seals(), self.held_envelopes(), self.merge.max_staleness)
        tip = Base.of(self.tip_weights, self.round, self.tip_seal, window, hash=self.base_hash)
        return SnapshotView(
            round=tip.round, base_hash=tip.hash, weights=tip.weights, meta=tip.meta(self.run_id)
        )

    def save_snapshot(self, path: str | Path) -> str:
        """Write the sealed tip (weights + the window a new replica needs) for a lagging peer; its hash."""
        return self.snapshot_view().write(path)

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
        replica.reset_base(Base.of(replica.base.weights, base_round, seal, (folded, dots, hashes)))
        if log_dir is not None:
            replica._persist_to(log_dir)
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
                elif kind == "aggregate":
                    replica.apply_aggregate(Aggregate.from_bytes(data, replica.spec))
                else:
                    replica.apply_seal(Seal.from_bytes(data))
            except (CodecError, MergeError) as e:
                log.warning("%s: a logged %s record no longer applies: %s", log_dir, kind, e)
        replica._store = store
        replica._logged_aggregates = sum(kind == "aggregate" for kind, _ in records)
        return replica

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
