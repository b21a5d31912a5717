"""`Replica.from_snapshot` adopts only state an authority vouches for (#17, deliver 1).

Round 0 must be the run's genesis weights (the hash its signed config records) and carry nothing else;
a later snapshot must carry an authority's seal of its round whose weights hash is the snapshot's and
whose window hash covers its metadata (folded contributions, their dots, round hashes).
"""

from __future__ import annotations

import json

import pytest
from crdt_support import AUTHORITY, PEERS, SPEC, base_weights, envelope, make_replica

from nord.checkpoint import load_checkpoint
from nord.crdt import MergeConfig, Replica
from nord.errors import MergeError

KEYS = [AUTHORITY.public_key]


def snapshot(replica: Replica, tmp_path, name: str = "snap") -> tuple[dict, dict]:
    replica.save_snapshot(tmp_path / f"{name}.safetensors")
    tensors, meta = load_checkpoint(tmp_path / f"{name}.safetensors")
    return tensors, {k: v for k, v in meta.items() if k not in ("format_version", "weights_hash")}


def adopt(tensors, meta, genesis_hash: str | None):
    return Replica.from_snapshot(
        tensors, meta, spec=SPEC, merge=MergeConfig(), authorities=KEYS, genesis_hash=genesis_hash
    )


def sealed_twice(tmp_path) -> Replica:
    """A replica two sealed rounds in (with contributions), compacted: its snapshot has a window."""
    hub = make_replica(authorities=KEYS)
    for rnd in range(2):
        for p in range(2):
            hub.add(envelope(p, rnd, hub.base_hash))
        hub.seal(AUTHORITY)
    hub.compact()
    return hub


def test_round_zero_must_be_the_genesis_weights(tmp_path):
    genesis = make_replica(authorities=KEYS)
    tensors, meta = snapshot(genesis, tmp_path)
    assert adopt(tensors, meta, genesis.base_hash).base_hash == genesis.base_hash
    other = {name: t + 1.0 for name, t in base_weights().items()}
    forged = Replica(run_id=genesis.run_id, spec=SPEC, base=other, merge=MergeConfig(), authorities=KEYS)
    tensors, meta = snapshot(forged, tmp_path, "forged")
    with pytest.raises(MergeError, match="not the run's genesis weights"):
        adopt(tensors, meta, genesis.base_hash)  # the old code took any unsealed round 0


def test_round_zero_carries_no_seal_nor_window(tmp_path):
    genesis = make_replica(authorities=KEYS)
    tensors, meta = snapshot(genesis, tmp_path)
    with pytest.raises(MergeError, match="round-0 snapshot carries"):
        adopt(tensors, {**meta, "folded": json.dumps({"a" * 64: 0})}, genesis.base_hash)


def test_a_later_snapshot_needs_its_authority_seal_over_weights_and_metadata(tmp_path):
    hub = sealed_twice(tmp_path)
    tensors, meta = snapshot(hub, tmp_path)
    fresh = adopt(tensors, meta, None)
    assert (fresh.round, fresh.base_hash) == (hub.round, hub.base_hash)
    assert not fresh.add(envelope(0, 1, hub._hash_at(1)))  # folded before the snapshot: a duplicate

    folded = json.loads(meta["folded"])
    assert folded, "the snapshot's window lists the contributions folded in round 1"
    for tampered in (
        {**meta, "folded": json.dumps({**folded, "f" * 64: 1})},  # censors a contribution to come
        {**meta, "folded": json.dumps({})},  # lets a folded contribution be folded again
        {**meta, "folded_dots": json.dumps([[PEERS[5].public_key.hex(), 2]])},  # censors a peer's round
        {**meta, "round_hashes": json.dumps({"1": "0" * 64})},
    ):
        with pytest.raises(MergeError, match="not what its seal covers"):
            adopt(tensors, tampered, None)
    other = {name: t + 1.0 for name, t in tensors.items()}
    with pytest.raises(MergeError, match="seal certifies"):
        adopt(other, meta, None)
    with pytest.raises(MergeError, match="no seal"):
        adopt(tensors, {**meta, "seal": ""}, None)


def test_a_snapshot_that_lies_about_its_round_is_refused(tmp_path):
    hub = sealed_twice(tmp_path)
    tensors, meta = snapshot(hub, tmp_path)
    for rnd in ("1", "5", "0"):
        with pytest.raises(MergeError):
            adopt(tensors, {**meta, "base_round": rnd}, hub._hash_at(0))


def test_the_window_a_seal_covers_is_checked_when_the_seal_is_applied(tmp_path):
    """A seal whose window hash does not recompute is forged, even with the right weights."""
    from nord.crdt import Seal

    hub, follower = make_replica(authorities=KEYS), make_replica(authorities=KEYS)
    env = envelope(0, 0, hub.base_hash)
    hub.add(env)
    follower.add(env)
    honest = hub.seal(AUTHORITY)
    lying = Seal.create(
        run_id=honest.run_id,
        round=0,
        prev_hash=honest.prev_hash,
        contribution_ids=list(honest.contribution_ids),
        weights_hash=honest.weights_hash,
        window_hash="0" * 64,
        identity=AUTHORITY,
    )
    with pytest.raises(MergeError, match="window hash"):
        follower.apply_seal(lying)
    assert follower.apply_seal(honest) and follower.base_hash == hub.base_hash


def test_a_compacted_replica_reopens_from_its_own_snapshot(tmp_path):
    hub = make_replica(authorities=KEYS, log_dir=tmp_path / "r")
    for rnd in range(3):
        hub.add(envelope(rnd % 2, rnd, hub.base_hash))
        hub.seal(AUTHORITY)
        hub.compact()
    state = (hub.round, hub.base_hash)
    hub.close()
    again = Replica.open(tmp_path / "r", spec=SPEC, merge=MergeConfig(), authorities=KEYS)
    assert (again.round, again.base_hash) == state
    again.close()
