"""`Pool`: the open round's pooled contributions and their incremental sums (nord.crdt.replica).

The pool is the `max_contributions` smallest eligible ids, so it is a function of which contributions
are eligible, not of the order they arrived in. `sync` brings it in line for ids whose eligibility may
have changed and adds or subtracts their deltas from the int64 sums (with median-norm clipping the
sums are made at read time instead: a newcomer changes every scale).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from nord.crdt.accumulator import FixedPointAccumulator, SparseFixedPointAccumulator
from nord.crdt.config import MergeConfig
from nord.errors import MergeError


def admission_victim(cid: str, rnd: int, held: set[str], listed: set[str], cap: int) -> str | None:
    """Admission (nord.crdt.replica): None if round `rnd`, holding `held` unfolded ids, has room for `cid`,
    else the held id it evicts (the largest not `listed` by a seal); MergeError if the round is full of
    smaller or sealed ids. Seal-listed contributions are exempt from the cap."""
    if len(held) < cap or cid in listed:
        return None
    largest = max(held - listed, default=None)
    if largest is None or cid > largest:
        raise MergeError(f"round {rnd} is full ({cap} contributions, smaller ids)")
    return largest


def new_accumulator(
    spec: Mapping[str, tuple[int, ...]], merge: MergeConfig, sparse_sums: bool
) -> FixedPointAccumulator:
    cls = SparseFixedPointAccumulator if sparse_sums else FixedPointAccumulator
    return cls(spec, merge)


class Pool:
    """Pooled ids (`ids`) and their sums (`sums`) for one open round."""

    def __init__(self, spec: Mapping[str, tuple[int, ...]], merge: MergeConfig, sparse_sums: bool) -> None:
        self.merge, self.sparse_sums = merge, sparse_sums
        self.ids: set[str] = set()
        self.sums = new_accumulator(spec, merge, sparse_sums)
        self._candidates: set[str] = set()  # eligible ids; the pool is the smallest max_contributions
        self._capped = False

    def sync(
        self,
        cids: Iterable[str],
        eligible: Callable[[str], bool],
        delta_of: Callable[[str], Any],
        deltas: Mapping[str, Any] | None = None,
        drop: frozenset[str] = frozenset(),
    ) -> None:
        """Bring the pool in line with `eligible` for `cids` (those in `drop` are leaving the set).
        `deltas`: decoded deltas at hand; others come from `delta_of(id)` when the sums need them."""
        cids = set(cids)
        for cid in cids:
            (self._candidates.add if cid not in drop and eligible(cid) else self._candidates.discard)(cid)
        cap = self.merge.max_contributions
        capped = len(self._candidates) > cap
        target = set(heapq.nsmallest(cap, self._candidates)) if capped else self._candidates
        scope = self.ids | target if capped or self._capped else cids
        self._capped = capped
        leaving = sorted(c for c in scope if c in self.ids and c not in target)
        joining = sorted(c for c in scope if c in target and c not in self.ids)
        for cid, sign in [(c, -1) for c in leaving] + [(c, 1) for c in joining]:
            if not self.merge.median_norm_clip:
                delta = (deltas or {}).get(cid)
                if delta is None and (sign == 1 or not self.sparse_sums):  # sparse sums drop by key
                    delta = delta_of(cid)
                self.sums.add(delta, key=cid, sign=sign, checked=True)
            (self.ids.add if sign == 1 else self.ids.discard)(cid)
