"""Adopting a seal from its aggregate (nord.crdt.aggregate, #19 deliver 5).

A replica that holds none of a round's contributions adopts the authority's seal from the aggregate that
a replica holding them built: the same weights bit for bit, the same window (so it refuses the folded
contributions' duplicates later), the state survives a restart from its log, and whatever does not give
the seal's hashes is refused with nothing changed.
"""

from __future__ import annotations

import dataclasses
import zlib

import pytest
import torch
from crdt_support import AUTHORITY, SPEC, STRANGER, envelope, make_replica

from nord.crdt import Replica
from nord.crdt.aggregate import Aggregate
from nord.crdt.messages import Seal
from nord.errors import MergeError

KEYS = [AUTHORITY.public_key]


def sealed_hub(rounds: int = 1, peers: int = 3) -> Replica:
    """The authority's replica after `rounds` sealed rounds of `peers` contributions each."""
    hub = make_replica(authorities=KEYS)
    for rnd in range(rounds):
        for p in range(peers):
            hub.add(envelope(p, rnd, hub.base_hash))
        hub.seal(AUTHORITY)
    return hub


def aggregate_of(replica: Replica) -> Aggregate:
    parts = replica.aggregate_parts()
    assert parts is not None
    return Aggregate.build(*parts)


def test_a_replica_without_the_contributions_adopts_the_seal_bit_for_bit(tmp_path):
    hub = sealed_hub(rounds=1)
    wire = aggregate_of(hub).to_bytes()
    follower = make_replica(authorities=KEYS, log_dir=tmp_path / "f")
    assert follower.apply_aggregate(Aggregate.from_bytes(wire, SPEC))
    assert follower.round == hub.round == 1
    assert follower.base_hash == hub.base_hash
    assert follower.sealed(0) == hub.sealed(0) == hub.seals()[0]
    assert follower.contributions() == []  # it never held them
    # The window came along: a contribution the seal folded is refused as already folded.
    assert not follower.add(envelope(0, 0, hub.seals()[0].prev_hash))
    assert not follower.apply_aggregate(Aggregate.from_bytes(wire, SPEC))  # that round is sealed here
    # The next round goes on as usual, and the state survives a restart from the log.
    follower.add(envelope(4, 1, follower.base_hash))
    assert follower.rounds_since_snapshot() == 1
    follower.close()
    again = Replica.open(tmp_path / "f", spec=SPEC, merge=hub.merge, authorities=KEYS)
    assert (again.round, again.base_hash, again.pool()) == (1, hub.base_hash, follower.pool())
    assert again.rounds_since_snapshot() == 1
    again.compact()
    assert again.rounds_since_snapshot() == 0
    reopened = Replica.open(tmp_path / "f", spec=SPEC, merge=hub.merge, authorities=KEYS)
    assert reopened.base_hash == hub.base_hash


def test_aggregates_chain_and_a_follower_can_serve_the_next_one():
    hub = sealed_hub(rounds=1)
    follower = make_replica(authorities=KEYS)
    follower.apply_aggregate(aggregate_of(hub))
    for p in range(3):
        hub.add(envelope(p, 1, hub.base_hash))
    hub.seal(AUTHORITY)
    second = aggregate_of(hub)
    assert follower.apply_aggregate(second)
    assert follower.base_hash == hub.base_hash
    # The follower knows the weights before its tip: it builds the same aggregate for others.
    late = make_replica(authorities=KEYS)
    late.apply_aggregate(aggregate_of(sealed_hub(rounds=1)))
    assert late.apply_aggregate(aggregate_of(follower))
    assert late.base_hash == hub.base_hash


def test_a_replica_holding_some_contributions_adopts_and_drops_them():
    hub = sealed_hub(rounds=0)
    follower = make_replica(authorities=KEYS)
    for p in range(3):
        env = envelope(p, 0, hub.base_hash)
        hub.add(env)
        if p == 0:
            follower.add(env)
    seal = hub.seal(AUTHORITY)
    follower.apply_seal(seal)  # held, but waiting for contributions 1 and 2
    assert follower.round == 0 and follower.waiting_seals() == [seal]
    assert follower.apply_aggregate(aggregate_of(hub))
    assert (follower.round, follower.base_hash, follower.contributions()) == (1, hub.base_hash, [])
    assert follower.waiting_seals() == []


def test_what_does_not_give_the_seals_hashes_is_refused_and_changes_nothing():
    hub = sealed_hub(rounds=1)
    good = aggregate_of(hub)
    follower = make_replica(authorities=KEYS)
    before = (follower.round, follower.base_hash)
    name = sorted(good.tensors)[0]
    other = sealed_hub(rounds=1, peers=2)  # another round-0 seal by the same authority: other weights
    swapped = {**good.tensors, name: aggregate_of(other).tensors[name]}
    forged_weights = dataclasses.replace(good, tensors=swapped)
    with pytest.raises(MergeError, match="does not give the weights"):
        follower.apply_aggregate(forged_weights)
    folded, dots, hashes = good.window
    with pytest.raises(MergeError, match="window is not what its seal covers"):
        follower.apply_aggregate(dataclasses.replace(good, window=({}, dots, hashes)))
    stranger_seal = Seal.create(
        run_id=good.seal.run_id,
        round=0,
        prev_hash=good.seal.prev_hash,
        contribution_ids=list(good.seal.contribution_ids),
        weights_hash=good.seal.weights_hash,
        window_hash=good.seal.window_hash,
        identity=STRANGER,
    )
    with pytest.raises(MergeError, match="not an authority"):
        follower.apply_aggregate(dataclasses.replace(good, seal=stranger_seal))
    with pytest.raises(MergeError, match="does not build on"):
        follower.apply_aggregate(aggregate_of(sealed_hub(rounds=2)))  # round 1's: we are at round 0
    assert (follower.round, follower.base_hash) == before


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda raw: raw[:-3], "not valid msgpack|not a nord.aggregate"),
        (lambda raw: raw.replace(b"nord.aggregate", b"nord.aggregatf"), "not a nord.aggregate"),
    ],
)
def test_malformed_bytes_get_one_line_errors(mangle, message):
    wire = aggregate_of(sealed_hub(rounds=1)).to_bytes()
    with pytest.raises(MergeError, match=message):
        Aggregate.from_bytes(mangle(wire), SPEC)


def test_sizes_and_bombs_are_bounded():
    good = aggregate_of(sealed_hub(rounds=1))
    name = sorted(good.tensors)[0]
    bitmap, planes = good.tensors[name]
    bomb = zlib.compress(b"\0" * (1 << 24))  # 16 MiB of zeros in a few kB: more than the tensor holds
    with pytest.raises(MergeError, match="does not decode to its size"):
        dataclasses.replace(good, tensors={name: (bitmap, bomb)}).apply(make_replica().tip_weights)
    with pytest.raises(MergeError, match="unknown or repeated tensor"):
        Aggregate.from_bytes(dataclasses.replace(good, tensors={"nope": (bitmap, planes)}).to_bytes(), SPEC)
    huge = dataclasses.replace(good, tensors={name: (bitmap, b"x" * (5 * 40 * 1000))})
    with pytest.raises(MergeError, match="larger than its size allows"):
        Aggregate.from_bytes(huge.to_bytes(), SPEC)


def test_every_changed_coordinate_is_carried_exactly():
    before = {name: torch.randn(*shape) for name, shape in SPEC.items()}
    after = {name: t.clone() for name, t in before.items()}
    after["block.bias"][3] = -0.0 if before["block.bias"][3] == 0 else -before["block.bias"][3]
    after["head.weight"].add_(1e-7)
    agg = Aggregate.build(sealed_hub(rounds=1).seals()[0], ({}, set(), {}), before, after)
    assert set(agg.tensors) == {"block.bias", "head.weight"}  # embed.weight did not change
    rebuilt = agg.apply(before)
    for name in SPEC:
        assert torch.equal(rebuilt[name].view(torch.int32), after[name].view(torch.int32))


def test_folded_contributions_are_not_sent_again_to_a_replica_that_dropped_them():
    """Digests mark folded dots: a worker still holding its sealed contribution does not push it again
    (every anti-entropy pass did, to a coordinator that had compacted it away)."""
    hub = make_replica(authorities=KEYS)
    worker, own = make_replica(authorities=KEYS), make_replica(authorities=KEYS)
    for p in range(3):
        env = envelope(p, 0, hub.base_hash)
        hub.add(env)
        worker.add(env)
    own.add(env)  # a worker that holds only its own contribution
    seal = hub.seal(AUTHORITY)
    hub.compact()  # the hub drops the folded payloads
    assert own.missing(hub.digest()) == [env.contribution_id]  # no seal yet: it cannot tell which was folded
    own.apply_seal(seal)  # waits for the others' contributions, but names its own
    assert own.round == 0 and own.missing(hub.digest()) == []
    worker.apply_seal(seal)
    assert worker.delta_for(hub.digest()).envelopes == ()
    # One round behind the hub's compaction point is not "behind": the base's seal travels instead.
    late = make_replica(authorities=KEYS)
    assert not hub.needs_snapshot(late.digest())
    assert hub.delta_for(late.digest()).seals == (seal,)
