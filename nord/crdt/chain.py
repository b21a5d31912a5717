"""Seal checks and chain selection for `Replica` (nord.crdt.replica), as functions of what they are given.

An authority signs (round, prev_hash, sorted contribution ids, weights_hash, window_hash). A replica
accepts a seal only by recomputing it: the listed contributions must be known and foldable at that
round, folding exactly them into the previous weights must give `weights_hash`, and the window a
replica based on those weights must remember (`Base.window`) must hash to `window_hash`.
The seal is authoritative over its list (removals and equivocation govern only the open pool and what
an honest authority lists). Competing seals for one round: the one with the most contributions wins,
then the lowest seal id; a replica that learns of a better verified seal rolls back to that round and
replays. Rounds are final once compacted.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

import torch

from nord.checkpoint import weights_hash
from nord.crdt.base import Window
from nord.crdt.messages import Seal, window_hash
from nord.crdt.orset import ContributionSet
from nord.errors import MergeError

log = logging.getLogger(__name__)

Weights = dict[str, torch.Tensor]


def check_signer(seal: Seal, run_id: str, authorities: frozenset[bytes]) -> None:
    """MergeError unless `seal` is for run `run_id` and signed by one of its `authorities`."""
    if seal.run_id != run_id:
        raise MergeError(f"seal is for run {seal.run_id!r}, this replica is {run_id!r}")
    if seal.authority not in authorities:
        raise MergeError(f"seal signed by {seal.authority.hex()[:16]}, not an authority of this run")


def recompute(
    seal: Seal,
    prev: Mapping[str, torch.Tensor],
    *,
    envelopes: Mapping[str, Any],
    foldable: Callable[[str], bool],
    fold: Callable[[Mapping[str, torch.Tensor], Sequence[str]], Weights],
    window: Callable[[], Window],
) -> Weights:
    """The weights `seal` certifies, folded on `prev`; MergeError if a listed contribution is not
    `foldable` in its round, two are one peer's for one round, or a hash does not recompute. `window`
    gives the window after the seal's round (asked only once the weights match)."""
    bad = [c for c in seal.contribution_ids if not foldable(c)]
    if bad:
        raise MergeError(f"seal for round {seal.round} lists {bad[0][:16]}, not foldable in that round")
    peers = [ContributionSet.dot(envelopes[c]) for c in seal.contribution_ids]
    if len(set(peers)) != len(peers):
        raise MergeError(f"seal for round {seal.round} folds two contributions of one peer and round")
    weights = fold(prev, seal.contribution_ids)
    if weights_hash(weights) != seal.weights_hash:
        raise MergeError(f"seal for round {seal.round} is forged: its weights hash does not recompute")
    if window_hash(*window()) != seal.window_hash:
        raise MergeError(f"seal for round {seal.round} is forged: its window hash does not recompute")
    return weights


def better_seal(
    held: MutableMapping[str, Seal],
    prev_hash: str | None,
    current: Seal | None,
    *,
    ready: Callable[[Seal], bool],
    verify: Callable[[Seal], Weights],
) -> tuple[Seal, Weights] | None:
    """The best seal of one round's `held` (seal id -> seal) that builds on `prev_hash`, outranks
    `current`, has all its contributions (`ready`) and verifies, with its weights; None if there is
    none. Seals that fail `verify` (MergeError) are dropped from `held`."""
    for seal in sorted((s for s in held.values() if s.prev_hash == prev_hash), key=Seal.rank):
        if current is not None and seal.rank() >= current.rank():
            return None
        if not ready(seal):
            continue  # still waiting for its contributions
        try:
            return seal, verify(seal)
        except MergeError as e:
            log.warning("dropping seal %s: %s", seal.seal_id[:16], e)
            del held[seal.seal_id]
    return None
