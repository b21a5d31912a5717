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
from collections.abc import Callable, Mapping
from typing import Any

import torch

from nord.crdt.accumulator import FixedPointAccumulator, contribution_norm, median_scales
from nord.crdt.base import Base
from nord.crdt.config import MergeConfig
from nord.crdt.log import Store
from nord.crdt.messages import Seal


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


@dataclasses.dataclass(frozen=True)
class CompactionView:
    """What compaction reads, copied under the replica's lock (all of it immutable or private copies)."""

    run_id: str
    base: Base
    folded_seals: tuple[Seal, ...]  # the chain's first seals: folded into the new base
    envelopes: Mapping[str, Any]  # the contributions they list
    norms: Mapping[str, float]  # cached clipped norms of those (median_norm_clip)
    tip: Mapping[str, torch.Tensor] | None  # the chain's tip weights, if every seal is folded
    records: tuple[tuple[str, Any], ...]  # (kind, message) log records of what stays held
    staleness: int

    @property
    def new_round(self) -> int:
        return self.base.round + len(self.folded_seals)


@dataclasses.dataclass
class Compaction:
    """A compaction in progress: `prepare` makes the new base (outside the lock)."""

    view: CompactionView
    store: Store | None
    new_accumulator: Callable[[], FixedPointAccumulator]
    merge: MergeConfig
    new_base: Base | None = None

    def prepare(self) -> None:
        """Fold, hash and write the next generation; touches nothing the replica's lock guards."""
        view = self.view
        weights = view.base.weights
        if view.tip is not None:
            weights = view.tip
        else:
            for seal in view.folded_seals:
                envelopes = {c: view.envelopes[c] for c in seal.contribution_ids}
                weights = fold_envelopes(weights, envelopes, self.new_accumulator(), self.merge, self._norm)
        window = view.base.window(view.new_round, view.folded_seals, view.envelopes, view.staleness)
        seal = view.folded_seals[-1] if view.folded_seals else view.base.seal
        base = Base.of(dict(weights), view.new_round, seal, window)
        if self.store is not None:
            records = ((kind, message.to_bytes()) for kind, message in view.records)
            self.store.stage(base.weights, base.meta(view.run_id), records)
        self.new_base = base

    def _norm(self, cid: str) -> float:
        if cid in self.view.norms:
            return self.view.norms[cid]
        return contribution_norm(self.view.envelopes[cid].delta(), self.merge)
