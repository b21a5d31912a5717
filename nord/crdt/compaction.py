"""Two-phase compaction of a `Replica`: the slow part runs on a copy, outside the caller's lock.

`Replica.begin_compaction` (under the lock that guards the replica; cheap) copies a `CompactionView`:
references to the immutable things compaction reads — the base weights, the seals to fold and their
contributions, the log records of what stays — and starts keeping the log records appended from then on.
`Compaction.prepare` (outside the lock) folds the seals into the new base weights, hashes them, computes
the window the new base must remember, and writes + fsyncs the next generation of the replica directory
beside the current one (nord.crdt.log). `Replica.finish_compaction` (under the lock) checks that the
chain still starts with the folded seals (a better seal for one of those rounds may have won
meanwhile: then the staged generation is dropped and nothing changes), appends the records logged since
the view to the new generation, makes it current and swaps the new base in.

A crash at any point leaves a loadable directory: before CURRENT moves, the old generation (which
received every record) is current; after, the new one holds the view's records plus those since.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from nord.checkpoint import weights_hash
from nord.crdt.accumulator import FixedPointAccumulator, contribution_norm, median_scales
from nord.crdt.config import MergeConfig
from nord.crdt.log import Store
from nord.crdt.messages import Seal
from nord.crdt.orset import ContributionSet, Dot

Window = tuple[dict[str, int], set[Dot], dict[int, str]]


def fold_envelopes(
    prev: Mapping[str, torch.Tensor],
    envelopes: Mapping[str, Any],
    accumulator: FixedPointAccumulator,
    merge: MergeConfig,
    norm: Callable[[str], float],
) -> dict[str, torch.Tensor]:
    """prev + η·S/C over exactly `envelopes` (median-norm scales, from `norm(id)`, taken over this set)."""
    scales = median_scales({c: norm(c) for c in envelopes}) if merge.median_norm_clip else {}
    for cid in sorted(envelopes):
        accumulator.add(envelopes[cid].delta(), key=cid, scale=scales.get(cid, 1.0), checked=True)
    return accumulator.apply_update(prev)


def chain_hash_at(
    rnd: int, *, base_round: int, base_hash: str, chain: Sequence[Seal], compacted_hashes: Mapping[int, str]
) -> str | None:
    """Base hash of round `rnd` on a chain starting at `base_round` (None if unknown)."""
    if rnd < base_round:
        return compacted_hashes.get(rnd)
    i = rnd - base_round
    if i > len(chain):
        return None
    return base_hash if i == 0 else chain[i - 1].weights_hash


def folded_by(
    seals: Sequence[Seal], envelopes: Mapping[str, Any], ids: dict[str, int], dots: set[Dot]
) -> tuple[dict[str, int], set[Dot]]:
    """`ids` (id -> round) and `dots` plus the contributions `seals` fold (updated in place)."""
    for seal in seals:
        for cid in seal.contribution_ids:
            dot = ContributionSet.dot(envelopes[cid])
            ids[cid] = dot[1]
            dots.add(dot)
    return ids, dots


def trimmed_window(
    rnd: int, ids: Mapping[str, int], dots: set[Dot], staleness: int, hash_at: Callable[[int], str | None]
) -> Window:
    """What a base at round `rnd` must remember of what was folded before it: ids, dots and base hashes
    of the rounds a contribution could still claim (>= rnd - staleness)."""
    oldest = rnd - staleness
    folded = {c: q for c, q in ids.items() if q >= oldest}
    kept_dots = {d for d in dots if d[1] >= oldest}
    hashes = {q: h for q in range(oldest, rnd) if (h := hash_at(q)) is not None}
    return folded, kept_dots, hashes


@dataclasses.dataclass(frozen=True)
class CompactionView:
    """What compaction reads, copied under the replica's lock (all of it immutable or private copies)."""

    base: Mapping[str, torch.Tensor]
    base_round: int
    base_hash: str
    compacted: Window  # the current base's folded ids, dots and round hashes
    folded_seals: tuple[Seal, ...]  # the chain's first seals: folded into the new base
    envelopes: Mapping[str, Any]  # the contributions they list
    norms: Mapping[str, float]  # cached clipped norms of those (median_norm_clip)
    tip: Mapping[str, torch.Tensor] | None  # the chain's tip weights, if every seal is folded
    records: tuple[tuple[str, Any], ...]  # (kind, message) log records of what stays held
    staleness: int

    @property
    def new_round(self) -> int:
        return self.base_round + len(self.folded_seals)


@dataclasses.dataclass
class Compaction:
    """A compaction in progress: `prepare` fills in the new base (outside the lock)."""

    view: CompactionView
    store: Store | None
    new_accumulator: Callable[[], FixedPointAccumulator]
    merge: MergeConfig
    snapshot_meta: Callable[[int, Window, Seal | None], dict[str, object]]
    weights: dict[str, torch.Tensor] | None = None
    weights_hash: str = ""
    window: Window = ({}, set(), {})
    prepared: bool = False

    @property
    def base_seal(self) -> Seal | None:
        return self.view.folded_seals[-1] if self.view.folded_seals else None

    def prepare(self) -> None:
        """Fold, hash and write the next generation; touches nothing the replica's lock guards."""
        view = self.view
        weights = view.base
        if view.tip is not None:
            weights = view.tip
        else:
            for seal in view.folded_seals:
                envelopes = {c: view.envelopes[c] for c in seal.contribution_ids}
                weights = fold_envelopes(weights, envelopes, self.new_accumulator(), self.merge, self._norm)
        self.weights = dict(weights)
        self.weights_hash = weights_hash(self.weights)
        ids, dots, hashes = view.compacted
        ids, dots = folded_by(view.folded_seals, view.envelopes, dict(ids), set(dots))
        self.window = trimmed_window(view.new_round, ids, dots, view.staleness, self._hash_at)
        if self.store is not None:
            meta = self.snapshot_meta(view.new_round, self.window, self.base_seal)
            self.store.stage(self.weights, meta, ((kind, m.to_bytes()) for kind, m in view.records))
        self.prepared = True

    def _norm(self, cid: str) -> float:
        if cid in self.view.norms:
            return self.view.norms[cid]
        return contribution_norm(self.view.envelopes[cid].delta(), self.merge)

    def _hash_at(self, rnd: int) -> str | None:
        view = self.view
        return chain_hash_at(
            rnd,
            base_round=view.base_round,
            base_hash=view.base_hash,
            chain=view.folded_seals,
            compacted_hashes=view.compacted[2],
        )
