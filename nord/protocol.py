"""The protocol's pure decisions, shared by the real peers and by the simulator (`nord simulate`).

`nord.gossip.Gossip` (over hivemind), `coordinator.authority.Authority` and `nord.sim` call these same
functions, so the simulation decides whom to sync with, which holder to fetch from, how to split a
reply, what a replica admits and when a round is sealed exactly as the real swarm does. Nothing here
does I/O, holds a lock or reads a clock: callers pass the time and their random generator.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Collection, Mapping, Sequence

ADOPT = ("auto", "aggregate", "contributions")  # how a peer adopts seals (nord.gossip.aggregates)
# The size of an aggregate (nord.crdt.aggregate), fitted to real ones of `small` (bench/aggregate.py,
# within 5.5% at 1 to 300 contributions; docs/simulation.md): used by workers and the simulator alike.
AGGREGATE_BYTES_FIXED = 3047.0  # the seal, msgpack framing
AGGREGATE_BYTES_PER_CONTRIBUTION = 170.1  # its id and dot in the window
AGGREGATE_BITMAP_PER_ENTROPY_BYTE = 1.708  # zlib's changed-coordinate bitmap against its entropy
AGGREGATE_BYTES_PER_CHANGED = 2.897  # zlib'd byte-planar XOR of a changed float32


def aggregate_bytes_estimate(numel: int, changed: float, contributions: int) -> float:
    """Expected wire size of the aggregate of a round folding `contributions` contributions that change
    a share `changed` of `numel` parameters together (the bitmap costs about its entropy)."""
    u = min(max(changed, 0.0), 1.0)
    return (
        AGGREGATE_BYTES_FIXED
        + AGGREGATE_BYTES_PER_CONTRIBUTION * contributions
        + AGGREGATE_BITMAP_PER_ENTROPY_BYTE * numel * binary_entropy(u) / 8
        + AGGREGATE_BYTES_PER_CHANGED * numel * u
    )


def binary_entropy(p: float) -> float:
    """Bits of information per coordinate of a bitmap with a share `p` of ones."""
    return 0.0 if p <= 0.0 or p >= 1.0 else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def adopt_by_contributions(
    missing: int, contribution_bytes: float, listed: int, density: float, numel: int
) -> bool:
    """With adopt="auto": whether fetching a seal's `missing` contributions (`contribution_bytes` each)
    is fewer bytes than its aggregate (`listed` contributions of `density` over `numel` parameters, at
    independent coordinates: real ones overlap, so this overestimates the aggregate a little)."""
    changed = 1.0 - (1.0 - min(max(density, 0.0), 1.0)) ** listed
    return missing * contribution_bytes < aggregate_bytes_estimate(numel, changed, listed)


def reachable(peers: Mapping[str, bool], backoff: Mapping[str, float], now: float) -> list[str]:
    """Peers others can dial (client_mode False) whose last failure's backoff ended by `now`, sorted.

    Args:
        peers: peer id -> whether it runs in client mode (nobody can dial those).
        backoff: peer id -> time until which it is skipped after a failed request.
    """
    return sorted(p for p, client in peers.items() if not client and backoff.get(p, 0.0) <= now)


def sync_partners(candidates: Sequence[str], fanout: int, rng: random.Random) -> list[str]:
    """Up to `fanout` distinct peers drawn uniformly from `candidates` for one anti-entropy pass."""
    return rng.sample(list(candidates), min(fanout, len(candidates)))


def next_fetch(
    remaining: Mapping[str, Collection[str]], tried: Collection[str]
) -> tuple[str, list[str]] | None:
    """The holder of most of what we lack (not tried yet) and the sorted ids to ask it for; None if none.

    Args:
        remaining: contribution id we lack -> peers announced as holding it.
        tried: holders already asked, failing or undialable (client mode).
    """
    counts = Counter(h for holders in remaining.values() for h in holders if h not in tried)
    if not counts:
        return None
    holder = counts.most_common(1)[0][0]
    return holder, sorted(cid for cid, holders in remaining.items() if holder in holders)


def budgeted_count(sizes: Sequence[int], budget: int) -> int:
    """How many items (in order) fit in `budget` bytes; always at least one when there is one."""
    used = 0
    for i, size in enumerate(sizes):
        if i and used + size > budget:
            return i
        used += size
    return len(sizes)


def admission_error(
    *,
    round: int,
    base_hash: str,
    open_round: int,
    base_at_round: str | None,
    max_staleness: int,
    pooled: int = 0,
    capacity: int | None = None,
) -> str | None:
    """Why a replica at `open_round` refuses a new round-`round` contribution (None: it admits it).

    `base_hash` is the base the contribution names, `base_at_round` the one this replica has for that
    round (checked only for rounds not ahead of the open one); `pooled` is the open round's pool size.
    `Replica` passes no `capacity`: it caps rounds by contribution id (order-free, nord.crdt.replica).
    """
    q, r, s = round, open_round, max_staleness
    if q < r - s:
        return f"contribution for round {q} is too old: open round is {r}, max staleness {s}"
    if q > r + s:
        return f"contribution for round {q} is too far ahead of open round {r}; retry later"
    if q <= r and base_hash != base_at_round:
        return f"contribution for round {q} was built on base {base_hash[:16]}, not this run's"
    if capacity is not None and pooled >= capacity:
        return f"round {r} is full ({capacity} contributions)"
    return None


def seal_reason(
    *, pooled: int, all_accepted: bool, age_s: float, quorum: int, deadline_s: float
) -> str | None:
    """Whether the authority seals the open round now: "quorum", "deadline" or None (not yet).

    A round is sealed only when every pooled contribution is scored and accepted and there is at least
    one: at `quorum` of them, or once the round is `deadline_s` old.
    """
    if not all_accepted or not pooled:
        return None
    if pooled >= quorum:
        return "quorum"
    return "deadline" if age_s >= deadline_s else None
