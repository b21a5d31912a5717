"""`Base`: the snapshot a replica's chain of seals starts from (immutable; compaction makes a new one).

A base at round R holds the weights the open round R builds on and, for the rounds a contribution could
still claim (>= R - max_staleness), what was folded before R: contribution ids (-> their round), dots
(peer, round) and the rounds' base hashes. That window is what a seal's `window_hash` covers, so a
replica started from a snapshot refuses duplicates exactly as one that saw every round.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from nord.checkpoint import weights_hash
from nord.crdt.messages import Seal
from nord.crdt.orset import ContributionSet, Dot
from nord.errors import MergeError

Window = tuple[dict[str, int], set[Dot], dict[int, str]]  # folded ids -> round, folded dots, round hashes


@dataclasses.dataclass(frozen=True)
class Base:
    weights: Mapping[str, torch.Tensor]  # never changed in place
    round: int
    hash: str  # weights_hash(weights)
    seal: Seal | None  # the seal that produced these weights (None: the run's start)
    folded: Mapping[str, int]
    dots: frozenset[Dot]
    hashes: Mapping[int, str]

    @classmethod
    def of(
        cls,
        weights: Mapping[str, torch.Tensor],
        round: int,
        seal: Seal | None = None,
        window: Window = ({}, set(), {}),
        hash: str | None = None,
    ) -> Base:
        folded, dots, hashes = window
        digest = weights_hash(weights) if hash is None else hash
        return cls(weights, round, digest, seal, dict(folded), frozenset(dots), dict(hashes))

    def hash_at(self, rnd: int, chain: Sequence[Seal]) -> str | None:
        """Base hash of round `rnd` on `chain` (the seals from this base on); None if unknown."""
        if rnd < self.round:
            return self.hashes.get(rnd)
        i = rnd - self.round
        if i > len(chain):
            return None
        return self.hash if i == 0 else chain[i - 1].weights_hash

    def folded_before(
        self, rnd: int, chain: Sequence[Seal], envelopes: Mapping[str, Any]
    ) -> tuple[dict[str, int], set[Dot]]:
        """Contributions (id -> their round) and dots folded by this base's window and chain seals < `rnd`."""
        ids, dots = dict(self.folded), set(self.dots)
        for seal in chain[: max(0, rnd - self.round)]:
            _add_folded(seal.contribution_ids, envelopes, ids, dots)
        return ids, dots

    def window(
        self,
        rnd: int,
        chain: Sequence[Seal],
        envelopes: Mapping[str, Any],
        staleness: int,
        folding: Iterable[str] = (),
    ) -> Window:
        """What a base at round `rnd` must remember (module docstring), `chain` holding the seals before
        `rnd` but the last, which folds `folding` (a seal being made or checked) when `chain` stops short."""
        ids, dots = self.folded_before(rnd, chain, envelopes)
        _add_folded(folding, envelopes, ids, dots)
        oldest = rnd - staleness
        hashes = {q: h for q in range(oldest, rnd) if (h := self.hash_at(q, chain)) is not None}
        return {c: q for c, q in ids.items() if q >= oldest}, {d for d in dots if d[1] >= oldest}, hashes

    def meta(self, run_id: str) -> dict[str, object]:
        """Checkpoint metadata of this base (read back by `Replica.from_snapshot`)."""
        return {
            "run_id": run_id,
            "seal": self.seal.to_bytes().hex() if self.seal is not None else "",
            "base_round": self.round,
            "folded": dict(self.folded),
            "folded_dots": sorted([p.hex(), r] for p, r in self.dots),
            "round_hashes": {str(k): v for k, v in self.hashes.items()},
        }


def checked_weights(
    spec: Mapping[str, tuple[int, ...]], weights: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Private float32 CPU copies of `weights`, which must match `spec` (MergeError otherwise)."""
    if set(weights) != set(spec):
        raise MergeError(f"base tensors do not match the spec: {sorted(set(weights) ^ set(spec))[:3]}")
    out = {}
    for name, shape in spec.items():
        t = weights[name]
        if tuple(t.shape) != shape:
            raise MergeError(f"base tensor {name!r} has shape {tuple(t.shape)}, spec says {shape}")
        out[name] = t.detach().to("cpu", torch.float32).contiguous().clone()
    return out


def _add_folded(
    ids: Iterable[str], envelopes: Mapping[str, Any], folded: dict[str, int], dots: set[Dot]
) -> None:
    for cid in ids:
        dot = ContributionSet.dot(envelopes[cid])
        folded[cid] = dot[1]
        dots.add(dot)
