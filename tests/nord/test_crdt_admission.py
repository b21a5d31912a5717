"""Admission is a function of the set of messages, not of their order (#17, deliver 4).

A flood of contributions larger than `merge.max_contributions`, an equivocating pair and an authority's
removal reach replicas in random orders: every replica holds the same contributions, pools the same
ones (the smallest ids) and computes the same weights, bit for bit.
"""

from __future__ import annotations

import functools

import pytest
from crdt_support import AUTHORITY, CODEC, RUN, SPEC, make_replica
from hypothesis import given, settings
from hypothesis import strategies as st

from nord.codec import DeltaEncoder
from nord.crdt import MergeConfig, Removal
from nord.errors import MergeError
from nord.identity import Identity

CAP = 5
MERGE = MergeConfig(max_contributions=CAP)
FLOOD = [Identity.from_private_bytes(bytes([40 + i]) * 32) for i in range(12)]


@functools.cache
def flood_messages() -> tuple:
    """12 peers' round-0 contributions, a second (equivocating) one of peer 0, and a removal of one."""
    import torch

    base_hash = make_replica(MERGE).base_hash

    def envelope(identity: Identity, seed: int):
        g = torch.Generator().manual_seed(seed)
        delta = {name: torch.randn(*shape, generator=g) * 0.01 for name, shape in SPEC.items()}
        encoder = DeltaEncoder(CODEC, SPEC)
        return encoder.encode(delta, run_id=RUN, round=0, base_hash=base_hash, identity=identity)

    adds = [envelope(identity, i) for i, identity in enumerate(FLOOD)]
    adds.append(envelope(FLOOD[0], 100))  # peer 0 signs a second payload for round 0
    smallest = sorted(e.contribution_id for e in adds)
    removal = Removal.create(run_id=RUN, contribution_id=smallest[1], reason="test", identity=AUTHORITY)
    return (*adds, removal)


def deliver(order: list[int]):
    replica = make_replica(MERGE)
    messages = flood_messages()
    for i in order:
        message = messages[i]
        try:
            if isinstance(message, Removal):
                replica.apply_removal(message)
            else:
                replica.add(message)
        except MergeError as e:
            assert "is full" in str(e)
    return replica


def state(replica) -> tuple:
    return (
        tuple(cid for cid, _ in replica.contributions()),
        tuple(replica.pool()),
        replica.weights_hash(),
    )


@settings(max_examples=30, deadline=None)
@given(st.permutations(range(len(flood_messages()))))
def test_a_flood_in_any_order_admits_the_same_contributions(order):
    in_order = deliver(list(range(len(flood_messages()))))
    assert state(deliver(order)) == state(in_order)


def test_the_admitted_contributions_are_the_smallest_ids():
    replica = deliver(list(range(len(flood_messages()))))
    adds = [m for m in flood_messages() if not isinstance(m, Removal)]
    held = sorted(e.contribution_id for e in adds)[:CAP]
    assert [cid for cid, _ in replica.contributions()] == held
    removed = flood_messages()[-1].contribution_id
    peer0 = {e.contribution_id for e in adds if e.peer_key == FLOOD[0].public_key}
    equivocating = peer0 if peer0 <= set(held) else set()  # only two held payloads on one dot count
    assert replica.pool() == [c for c in held if c != removed and c not in equivocating]
    late = max(held)  # a held one offered again is a duplicate; a larger one is refused
    assert not replica.add(next(e for e in adds if e.contribution_id == late))
    larger = next(e for e in adds if e.contribution_id > late)
    with pytest.raises(MergeError, match="is full"):
        replica.add(larger)


def test_a_contribution_a_seal_lists_is_admitted_into_a_full_round():
    """Seals are authoritative: the authority saw other contributions than this replica, sealed the ones
    it had; they are admitted here even though this replica's round is full of smaller ids."""
    adds = sorted((m for m in flood_messages()[:-2]), key=lambda e: e.contribution_id)  # no equivocation
    hub = make_replica(MERGE)
    for e in adds[-CAP:]:
        hub.add(e)
    seal = hub.seal(AUTHORITY)
    follower = make_replica(MERGE)
    for e in adds[:CAP]:
        follower.add(e)
    with pytest.raises(MergeError, match="is full"):
        follower.add(adds[-1])
    assert not follower.apply_seal(seal)  # kept until its contributions arrive
    for e in adds[-CAP:]:
        follower.add(e)
    assert follower.round == 1 and follower.base_hash == seal.weights_hash


def test_max_contributions_is_checked():
    from nord.errors import ConfigError

    for bad in (0, True, 2**40, "5"):
        with pytest.raises(ConfigError, match="max_contributions"):
            MergeConfig(max_contributions=bad)


def test_a_compacted_log_replays_a_listed_contribution_beyond_the_cap(tmp_path):
    """After compaction the log is rewritten; the seal goes first so its over-cap contribution replays."""
    from nord.crdt import Replica

    adds = sorted((m for m in flood_messages()[:-2]), key=lambda e: e.contribution_id)
    hub = make_replica(MERGE)
    for e in adds[-CAP:]:
        hub.add(e)
    seal = hub.seal(AUTHORITY)
    follower = make_replica(MERGE, log_dir=tmp_path / "r")
    for e in adds[:CAP]:
        follower.add(e)
    follower.apply_seal(seal)
    for e in adds[-CAP:]:
        follower.add(e)
    follower.compact(keep_rounds=1)  # the chain keeps round 0: its seal and contributions are rewritten
    expected = state(follower)
    follower.close()
    again = Replica.open(tmp_path / "r", spec=SPEC, merge=MERGE, authorities=[AUTHORITY.public_key])
    assert state(again) == expected and again.round == 1
    again.close()
