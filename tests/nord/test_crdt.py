"""Replica convergence: join laws, any delivery order, seals, removals, equivocation, compaction."""

from __future__ import annotations

import random

import pytest
import torch
from crdt_support import (
    AUTHORITY,
    AUTHORITY_2,
    PEERS,
    RUN,
    SPEC,
    STRANGER,
    envelope,
    fingerprint,
    make_replica,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nord.checkpoint import weights_hash
from nord.codec.envelope import signing_message
from nord.crdt import Delta, MergeConfig, Removal, Seal
from nord.errors import MergeError
from nord.identity import verify_signature

FAST = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def history(seed: int, rounds: int = 3) -> list[tuple[str, object]]:
    """Messages of a run driven by one authority: contributions, removals and seals over `rounds` rounds.

    Some contributions arrive late (roll over), some are revoked, one peer equivocates.
    """
    rng = random.Random(seed)
    hub = make_replica()
    messages: list[tuple[str, object]] = []
    late: list = []
    for rnd in range(rounds):
        for env in late:
            if hub.add(env):
                messages.append(("add", env))
        late = []
        for peer in rng.sample(range(len(PEERS)), rng.randint(1, 4)):
            env = envelope(peer, rnd, hub.base_hash, seed=rng.randrange(3))
            if rng.random() < 0.25:
                late.append(env)  # reaches the authority only after the seal: rolls into the next round
                messages.append(("add", env))
                continue
            hub.add(env)
            messages.append(("add", env))
            if rng.random() < 0.2:
                removal = hub.remove(env.contribution_id, reason="poisoned", identity=AUTHORITY)
                messages.append(("remove", removal))
        if rng.random() < 0.3:
            twin = envelope(5, rnd, hub.base_hash, seed=100 + rnd)
            other = envelope(5, rnd, hub.base_hash, seed=200 + rnd)
            messages += [("add", twin), ("add", other)]
            hub.add(twin)
        messages.append(("seal", hub.seal(AUTHORITY)))
    return messages


def deliver(replica, messages) -> None:
    """Apply messages as gossip would: each may be rejected for now (too far ahead) and retried later."""
    replica.join(
        Delta(
            envelopes=tuple(m.to_bytes() for kind, m in messages if kind == "add"),
            removals=tuple(m for kind, m in messages if kind == "remove"),
            seals=tuple(m for kind, m in messages if kind == "seal"),
        )
    )


def replica_with(messages):
    r = make_replica()
    for kind, m in messages:
        try:
            {"add": r.add, "remove": r.apply_removal, "seal": r.apply_seal}[kind](m)
        except MergeError:
            pass  # e.g. ahead of this replica's round: anti-entropy brings it again later
    return r


def sync(replicas) -> None:
    """Pairwise anti-entropy until nothing changes."""
    for _ in range(10):
        changed = sum(a.join(b) for a in replicas for b in replicas if a is not b)
        if not changed:
            return
    raise AssertionError("anti-entropy did not quiesce")


@FAST
@given(seed=st.integers(0, 10_000), data=st.data())
def test_any_delivery_order_with_duplicates_gives_identical_weights(seed, data):
    messages = history(seed)
    orders = [data.draw(st.permutations(messages + messages[: len(messages) // 3])) for _ in range(3)]
    replicas = [make_replica(sparse_sums=i == 2) for i in range(len(orders))]  # dense and sparse sums agree
    for replica, order in zip(replicas, orders, strict=True):
        for start in range(0, len(order), 4):  # arrives in batches, each batch in its own order
            deliver(replica, order[start : start + 4])
    sync(replicas)
    prints = {fingerprint(r) for r in replicas}
    assert len(prints) == 1
    assert replicas[0].round == 3


@FAST
@given(seed=st.integers(0, 10_000), data=st.data())
def test_join_is_commutative_associative_and_idempotent(seed, data):
    messages = history(seed, rounds=2)
    subsets = [data.draw(st.lists(st.sampled_from(messages), max_size=len(messages))) for _ in range(3)]

    def joined(*parts):
        first = replica_with(parts[0])
        for other in parts[1:]:
            first.join(replica_with(other))
        return fingerprint(first)

    a, b, c = subsets
    assert joined(a, b) == joined(b, a)
    left = replica_with(a)
    left.join(replica_with(b))
    left.join(replica_with(c))
    right_bc = replica_with(b)
    right_bc.join(replica_with(c))
    right = replica_with(a)
    right.join(right_bc)
    assert fingerprint(left) == fingerprint(right)
    same = replica_with(a)
    before = fingerprint(same)
    assert same.join(replica_with(a)) == 0
    assert fingerprint(same) == before


def test_partitions_that_heal_converge_to_one_chain_and_weights():
    rng = random.Random(7)
    hub, *others = replicas = [make_replica() for _ in range(5)]
    for rnd in range(3):
        for peer in range(4):
            env = envelope(peer, rnd, hub.base_hash, seed=rnd)
            for r in rng.sample(replicas, 2):  # each worker reaches two random replicas
                if r.round == rnd:
                    r.add(env)
        left, right = replicas[:3], replicas[3:]
        sync(left)  # partition: gossip only inside each side
        sync(right)
        hub.seal(AUTHORITY)
        sync(left)
    sync(replicas)  # heal
    assert len({fingerprint(r) for r in replicas}) == 1
    assert all(r.round == 3 for r in replicas)


@pytest.mark.parametrize("damping", [0.0, 1.0, 2.5], ids=["plain-mean", "damped-1", "damped-2.5"])
def test_weights_are_base_plus_lr_times_damped_sparse_mean(damping):
    merge = MergeConfig(outer_lr=0.5, damping=damping)
    r = make_replica(merge)
    envs = [envelope(p, 0, r.base_hash) for p in range(3)]
    for e in envs:
        r.add(e)
    expected = {}
    for name, shape in SPEC.items():
        total = torch.zeros(torch.Size(shape).numel(), dtype=torch.float64)
        count = torch.zeros_like(total)
        for e in envs:
            sparse = e.delta()[name]
            total[sparse.indices] += sparse.values.double()
            count[sparse.indices] += 1
        mean = torch.where(count > 0, total / (count + damping), torch.zeros_like(total))
        expected[name] = (r.weights(include_open_round=False)[name].double().reshape(-1) + 0.5 * mean).float()
    got = r.weights()
    for name in SPEC:
        torch.testing.assert_close(got[name].reshape(-1), expected[name], rtol=0, atol=1e-6)
    untouched = r.weights(include_open_round=False)
    assert weights_hash(untouched) == r.base_hash


def test_remove_subtracts_exactly_and_concurrent_add_survives():
    r = make_replica()
    a, b = envelope(0, 0, r.base_hash), envelope(1, 0, r.base_hash)
    r.add(a)
    only_a = r.weights_hash()
    r.add(b)
    r.remove(b.contribution_id, reason="test", identity=AUTHORITY)
    assert r.weights_hash() == only_a  # bit-exact: the int64 terms were subtracted
    other = make_replica()
    other.add(a)
    c = envelope(2, 0, other.base_hash)
    other.add(c)  # concurrent with the removal of b elsewhere
    r.join(other)
    other.join(r)
    assert fingerprint(r) == fingerprint(other)
    assert set(r.pool()) == {a.contribution_id, c.contribution_id}
    assert not r.add(b)  # re-adding a removed element changes nothing
    assert b.contribution_id not in r.pool()


def test_removal_needs_an_authority_or_the_contributor():
    r = make_replica()
    a = envelope(0, 0, r.base_hash)
    r.add(a)
    with pytest.raises(MergeError, match="not an authority"):
        r.remove(a.contribution_id, reason="grief", identity=STRANGER)
    with pytest.raises(MergeError, match="not an authority"):
        r.remove(a.contribution_id, reason="grief", identity=PEERS[1])
    assert a.contribution_id in r.pool()
    r.remove(a.contribution_id, reason="my mistake", identity=PEERS[0])
    assert r.pool() == []
    unknown = "ab" * 32
    with pytest.raises(MergeError, match="unknown contribution"):
        r.remove(unknown, reason="x", identity=PEERS[0])


def test_tampered_removal_and_seal_bytes_are_rejected():
    r = make_replica()
    r.add(envelope(0, 0, r.base_hash))
    removal = Removal.create(run_id=RUN, contribution_id="cd" * 32, reason="x", identity=AUTHORITY)
    raw = bytearray(removal.to_bytes())
    raw[-70] ^= 1
    with pytest.raises(MergeError):
        Removal.from_bytes(bytes(raw))
    seal = r.seal(AUTHORITY)
    assert Seal.from_bytes(seal.to_bytes()) == seal
    raw = bytearray(seal.to_bytes())
    raw[40] ^= 1
    with pytest.raises(MergeError):
        Seal.from_bytes(bytes(raw))
    with pytest.raises(MergeError):
        Seal.from_bytes(b"\x93garbage")


def test_seal_is_verified_by_recomputation():
    hub, follower = make_replica(), make_replica()
    envs = [envelope(p, 0, hub.base_hash) for p in range(3)]
    for e in envs:
        hub.add(e)
        follower.add(e)
    honest = hub.seal(AUTHORITY)
    forged = Seal.create(
        run_id=RUN,
        round=0,
        prev_hash=honest.prev_hash,
        contribution_ids=list(honest.contribution_ids),
        weights_hash="0" * 64,
        window_hash=honest.window_hash,
        identity=AUTHORITY,
    )
    with pytest.raises(MergeError, match="forged"):
        follower.apply_seal(forged)
    stranger = Seal.create(
        run_id=RUN,
        round=0,
        prev_hash=honest.prev_hash,
        contribution_ids=list(honest.contribution_ids),
        weights_hash=honest.weights_hash,
        window_hash=honest.window_hash,
        identity=STRANGER,
    )
    with pytest.raises(MergeError, match="not an authority"):
        follower.apply_seal(stranger)
    assert follower.round == 0
    assert follower.apply_seal(honest)
    assert follower.round == 1 and follower.base_hash == hub.base_hash == honest.weights_hash
    assert follower.weights_hash() == hub.weights_hash()


def test_seal_waits_for_missing_contributions_then_applies():
    hub, late = make_replica(), make_replica()
    envs = [envelope(p, 0, hub.base_hash) for p in range(3)]
    for e in envs:
        hub.add(e)
    seal = hub.seal(AUTHORITY)
    late.add(envs[0])
    assert late.apply_seal(seal) is False and late.round == 0
    late.add(envs[1])
    late.add(envs[2])
    assert late.round == 1 and late.base_hash == hub.base_hash


def test_late_contribution_rolls_into_the_next_round_until_too_old():
    merge = MergeConfig(max_staleness=1)
    hub = make_replica(merge)
    early, late = envelope(0, 0, hub.base_hash), envelope(1, 0, hub.base_hash)
    hub.add(early)
    hub.seal(AUTHORITY)
    assert hub.add(late)  # round 0 contribution, round 1 open: rolls over
    assert hub.pool() == [late.contribution_id]
    seal1 = hub.seal(AUTHORITY)
    assert seal1.contribution_ids == (late.contribution_id,)
    too_old = envelope(2, 0, make_replica().base_hash)
    with pytest.raises(MergeError, match="too old"):
        hub.add(too_old)


def test_contribution_on_a_wrong_base_or_run_is_rejected():
    r = make_replica()
    with pytest.raises(MergeError, match="built on base"):
        r.add(envelope(0, 0, "f" * 64))
    with pytest.raises(MergeError, match="too far ahead"):
        r.add(envelope(0, 9, r.base_hash))
    other = make_replica()
    other.run_id = "other-run"
    with pytest.raises(MergeError, match="run"):
        other.add(envelope(0, 0, r.base_hash))


def test_equivocation_excludes_both_payloads_on_every_replica():
    a, b, c = make_replica(), make_replica(), make_replica()
    one, two = envelope(3, 0, a.base_hash, seed=1), envelope(3, 0, a.base_hash, seed=2)
    honest = envelope(0, 0, a.base_hash)
    a.add(one), a.add(two), a.add(honest)
    b.add(honest), b.add(two), b.add(one)
    c.add(one), c.add(honest)
    assert one.contribution_id in c.pool()
    c.join(b)
    for r in (a, b, c):
        assert r.pool() == [honest.contribution_id]
        (evidence,) = r.equivocations()
        assert evidence.peer_key == PEERS[3].public_key and evidence.round == 0
        named = {h["contribution_id"] for h in evidence.contributions}
        assert named == {one.contribution_id, two.contribution_id}
        for h in evidence.contributions:  # the evidence proves itself: the peer's signature checks out
            fields = (h["version"], h["run_id"], h["round"], h["base_hash"], evidence.peer_key)
            message = signing_message(*fields, h["names"], h["shapes"], h["payload_hash"])
            assert verify_signature(evidence.peer_key, message, h["signature"])
    assert len({fingerprint(r) for r in (a, b, c)}) == 1


def test_a_second_payload_on_a_folded_dot_reaches_the_replicas_that_folded_the_first():
    """Either join order holds the same set: the equivocator's second payload, never foldable once its
    dot is sealed, is sent to a replica whose digest marks the dot folded (found by hypothesis)."""
    hub = make_replica()
    first, second = envelope(5, 0, hub.base_hash, seed=1), envelope(5, 0, hub.base_hash, seed=2)
    hub.add(first)
    seal = hub.seal(AUTHORITY)
    sealed, saw_second = replica_with([("add", first), ("seal", seal)]), replica_with([("add", second)])
    assert sealed.missing(saw_second.digest()) == [first.contribution_id]
    assert saw_second.missing(sealed.digest()) == [second.contribution_id]
    assert saw_second.join(sealed) == 2 and sealed.join(saw_second) == 1
    assert fingerprint(sealed) == fingerprint(saw_second)
    assert sealed.pool() == [] and len(sealed.equivocations()) == 1
    assert sealed.missing(saw_second.digest()) == saw_second.missing(sealed.digest()) == []
    sealed.compact()  # the folded payload is gone: the second is still not sent again, nor the first
    assert saw_second.missing(sealed.digest()) == []


def test_competing_seals_resolve_to_the_one_with_most_contributions():
    a, b = make_replica(), make_replica()
    envs = [envelope(p, 0, a.base_hash) for p in range(3)]
    for e in envs[:2]:
        a.add(e)
    small = a.seal(AUTHORITY)  # an authority that saw two contributions
    for e in envs:
        b.add(e)
    big = b.seal(AUTHORITY_2)  # another that saw three
    a.join(b)
    b.join(a)
    assert a.seals() == b.seals() == [big]
    assert fingerprint(a) == fingerprint(b)
    assert small.rank() > big.rank()


def test_compaction_keeps_weights_and_drops_payloads():
    messages = history(3, rounds=4)
    full, compacted = make_replica(), make_replica()
    deliver(full, messages)
    deliver(compacted, messages[: len(messages) // 2])
    compacted.compact()
    deliver(compacted, messages)
    compacted.compact()
    assert compacted.weights_hash() == full.weights_hash()
    assert compacted.base_hash == full.base_hash and compacted.round == full.round == 4
    assert compacted.seals() == [] and compacted.base_round == 4
    assert len(compacted.contributions()) < len(full.contributions())
    late = make_replica()
    deliver(late, messages[:3])
    assert compacted.needs_snapshot(late.digest())


@pytest.mark.parametrize("option", ["median_norm_clip", "min_contributors"])
def test_robust_options_stay_order_independent(option):
    options = {"median_norm_clip": {"median_norm_clip": True}, "min_contributors": {"min_contributors": 2}}
    merge = MergeConfig(**options[option])
    plain = make_replica()
    envs = [envelope(p, 0, plain.base_hash, scale=0.01 * (p + 1)) for p in range(5)]
    hashes = set()
    for order in (envs, envs[::-1], envs[2:] + envs[:2]):
        r = make_replica(merge)
        for e in order:
            r.add(e)
        hashes.add(r.weights_hash())
        seal = r.seal(AUTHORITY)
    for e in envs:
        plain.add(e)
    assert len(hashes) == 1
    assert plain.weights_hash() not in hashes  # the option changed the update
    follower = make_replica(merge)
    for e in envs:
        follower.add(e)
    assert follower.apply_seal(seal)


@pytest.mark.parametrize(
    "digest",
    [None, [], {"round": "3"}, {"round": -1}, {"adds": {"ab": {"0": 5}}}, {"adds": []}, {"seals": [1]}],
    ids=["none", "list", "round-str", "round-neg", "hash-int", "adds-list", "seal-int"],
)
def test_malformed_remote_digest_is_a_merge_error(digest):
    r = make_replica()
    r.add(envelope(0, 0, r.base_hash))
    for method in (r.missing, r.delta_for, r.needs_snapshot):
        with pytest.raises(MergeError, match="digest"):
            method(digest)


def test_delta_round_trips_through_bytes():
    hub = make_replica()
    hub.add(envelope(0, 0, hub.base_hash))
    hub.remove(envelope(0, 0, hub.base_hash).contribution_id, reason="x", identity=AUTHORITY)
    hub.add(envelope(1, 0, hub.base_hash))
    hub.seal(AUTHORITY)
    fresh = make_replica()
    delta = hub.delta_for(fresh.digest())
    assert len(delta.envelopes) == 2 and len(delta.seals) == 1
    assert Delta.from_bytes(delta.to_bytes()) == delta
    fresh.join(Delta.from_bytes(delta.to_bytes()))
    assert fingerprint(fresh) == fingerprint(hub)
    assert hub.missing(fresh.digest()) == [] and len(hub.delta_for(fresh.digest())) == 0


def test_compaction_can_keep_recent_rounds_open_to_a_better_seal():
    a, b = make_replica(), make_replica()
    envs = [envelope(p, 0, a.base_hash) for p in range(3)]
    for e in envs[:2]:
        a.add(e)
    a.seal(AUTHORITY)
    a.add(envelope(4, 1, a.base_hash))
    a.seal(AUTHORITY)
    before = a.weights_hash()
    a.compact(keep_rounds=2)
    assert a.weights_hash() == before and a.base_round == 0 and len(a.seals()) == 2
    a.compact(keep_rounds=1)
    assert a.weights_hash() == before and a.base_round == 1 and len(a.seals()) == 1
    for e in envs:
        b.add(e)
    b.seal(AUTHORITY_2)
    a.compact(keep_rounds=0)
    a.join(b)  # b's better seal for round 0 comes too late: round 0 is final on `a`
    assert a.base_round == 2 and a.weights_hash(include_open_round=False) == before
    assert a.pool() == [envs[2].contribution_id]  # its third contribution rolls into round 2 instead
