"""The authority on a real replica of a small spiking model, real signed envelopes, a real corpus.

Validation scores each contribution on held-out batches; bad ones are removed with a signed removal and
the reason is recorded; repeat offenders are banned; rounds seal on quorum or deadline; a restart from
the replica's log and the history resumes the same rounds, checkpoints and hashes.
"""

from __future__ import annotations

import random
import sys
import textwrap
import threading
import time

import pytest
import torch
from lock_probe import probe_lock_during
from procs import Procs, wait_for

import nord.crdt.log
from coordinator.authority import Authority
from coordinator.history import History
from coordinator.server import seal_bytes
from coordinator.validate import ValidationConfig, Validator
from nord.checkpoint import load_checkpoint
from nord.checks import MAX_REASON_CHARS
from nord.codec import DeltaEncoder
from nord.config import RoundConfig, RunConfig, TrainConfig
from nord.crdt import Replica, Seal
from nord.data import DataConfig, prepare
from nord.errors import MergeError
from nord.gossip import Gossip
from nord.gossip.wire import PUSH_TIMEOUT_S
from nord.identity import Identity
from nord.model import ModelConfig, NordLM
from nord.transport import Transport, TransportConfig

AUTHORITY = Identity.from_private_bytes(bytes([1]) * 32)
WORKERS = [Identity.from_private_bytes(bytes([20 + i]) * 32) for i in range(4)]
MODEL = ModelConfig(
    vocab_size=512, d_model=32, n_layers=2, d_mlp=64, n_memory_slots=8, chunk_size=16, max_seq_len=32
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = "the king and queen of spring walk over green hills while rivers sing to stars".split()
    text = "\n\n".join(" ".join(rng.choice(words) for _ in range(400)) for _ in range(60))
    (root / "text.txt").write_text(text)
    return prepare(DataConfig(source=str(root / "text.txt"), vocab_size=512), root / "data", progress=False)


class Clock:
    def __init__(self):
        self.now = 1_000.0

    def __call__(self):
        return self.now


def make_run(quorum=2, deadline_s=60.0, keep=3):
    return RunConfig(
        run_id="auth-test",
        model=MODEL,
        data=DataConfig(vocab_size=512),
        train=TrainConfig(inner_steps=1, batch_size=2, seq_len=32),
        rounds=RoundConfig(quorum=quorum, deadline_s=deadline_s, keep_checkpoints=keep),
        authorities=(AUTHORITY.public_hex,),
    )


def open_replica(run, path):
    spec = {k: tuple(v) for k, v in NordLM(run.model).param_spec().items()}
    if (path / "replica").exists():
        return Replica.open(path / "replica", spec=spec, merge=run.merge, authorities=[AUTHORITY.public_key])
    torch.manual_seed(run.train.seed)
    base = {n: p.detach() for n, p in NordLM(run.model).named_parameters()}
    return Replica(
        run_id=run.run_id,
        spec=spec,
        base=base,
        merge=run.merge,
        authorities=[AUTHORITY.public_key],
        log_dir=path / "replica",
    )


def make_authority(run, corpus, path, clock, validation=None, replica=None, **kw):
    validation = validation or ValidationConfig(batches=1, batch_size=2)
    replica = replica or open_replica(run, path)
    kw.setdefault("lock", threading.RLock())
    history = History.open(path / "history.sqlite")
    authority = Authority(
        run=run,
        replica=replica,
        identity=AUTHORITY,
        history=history,
        validator=Validator(run, corpus, validation),
        checkpoint_dir=path / "checkpoints",
        validation=validation,
        clock=clock,
        **kw,
    )
    authority.start()
    return authority


def contribute(authority, worker, scale, seed=0, *, on=None):
    """A signed contribution of `worker`: a random delta of `scale` for the open round, or for `on`
    (round, base hash)."""
    replica = authority.replica
    rnd, base_hash = on or (replica.round, replica.base_hash)
    g = torch.Generator().manual_seed(seed)
    delta = {n: torch.randn(s, generator=g) * scale for n, s in replica.spec.items()}
    env = DeltaEncoder(authority.run.codec, replica.spec).encode(
        delta, run_id=replica.run_id, round=rnd, base_hash=base_hash, identity=WORKERS[worker]
    )
    replica.add(env)
    return env.contribution_id


def close(authority):
    authority.close()
    authority.replica.close()
    authority.history.close()


def test_quorum_seals_round_and_saves_checkpoint(corpus, tmp_path):
    auth = make_authority(make_run(quorum=2), corpus, tmp_path, Clock())
    assert auth.history.checkpoint(0) is not None  # round 0's seeded init is the first checkpoint
    contribute(auth, 0, 1e-4, seed=1)
    assert auth.step() is None  # one of two
    contribute(auth, 1, 1e-4, seed=2)
    seal = auth.step()
    assert seal is not None and seal.round == 0 and len(seal.contribution_ids) == 2
    ckpt = auth.history.checkpoint(1)
    tensors, _ = load_checkpoint(tmp_path / "checkpoints" / ckpt["file"])
    assert ckpt["weights_hash"] == seal.weights_hash == auth.replica.base_hash
    assert torch.equal(
        tensors["embed.weight"], auth.replica.weights(include_open_round=False)["embed.weight"]
    )
    metrics = auth.history.metrics()[0]
    assert metrics["val_loss"] > 0 and "firing_rate/layers.0" in metrics
    assert auth.history.rounds()[0]["accepted"] == 2 and auth.history.tokens_seen() == 2 * 64
    close(auth)


def test_each_checkpoint_keeps_its_seal_after_the_replica_compacts_it_away(corpus, tmp_path):
    auth = make_authority(make_run(quorum=1), corpus, tmp_path, Clock())
    assert seal_bytes(tmp_path / "checkpoints", 0) is None  # the initial weights: nothing sealed them
    seals = []
    for rnd in range(3):
        contribute(auth, rnd, 1e-4, seed=rnd + 1)
        seals.append(auth.step())
    assert all(s is not None for s in seals)
    assert seals[0].round not in {s.round for s in auth.replica.seals()}  # compacted out of the replica
    for checkpoint in (1, 2, 3):
        served = Seal.from_bytes(seal_bytes(tmp_path / "checkpoints", checkpoint))
        assert served.round == checkpoint - 1
        assert served.weights_hash == auth.history.checkpoint(checkpoint)["weights_hash"]
    close(auth)


def test_a_handler_takes_the_gossip_lock_while_the_replica_compacts(corpus, tmp_path, monkeypatch):
    """Compaction folds and writes the replica's next generation outside the gossip lock: a peer's
    handler needing it is served while the new snapshot is being written."""
    lock = threading.RLock()
    auth = make_authority(make_run(quorum=1), corpus, tmp_path, Clock(), lock=lock)
    served = probe_lock_during(monkeypatch, nord.crdt.log, "save_checkpoint", lock)
    for rnd in range(2):  # the second compaction folds round 0 into a new base
        contribute(auth, rnd, 1e-4, seed=rnd + 1)
        assert auth.step() is not None
    assert auth.replica.base_round == 1
    assert served == [True, True], "a handler waited for the gossip lock until the compaction finished"
    close(auth)


def test_deadline_seals_with_one_contribution(corpus, tmp_path):
    clock = Clock()
    auth = make_authority(make_run(quorum=3, deadline_s=60.0), corpus, tmp_path, clock)
    contribute(auth, 0, 1e-4)
    clock.now += 59
    assert auth.step() is None
    clock.now += 2
    seal = auth.step()
    assert seal is not None and auth.history.rounds()[0]["seal_reason"] == "deadline"
    close(auth)


def test_absurd_norm_is_removed_with_reason_and_round_seals_without_it(corpus, tmp_path):
    auth = make_authority(make_run(quorum=1), corpus, tmp_path, Clock())
    bad = contribute(auth, 0, 100.0)
    assert auth.step() is None  # the only contribution was rejected: nothing to seal
    row = auth.history.contribution(bad)
    assert row["status"] == "rejected" and "norm" in row["reason"]
    assert bad not in auth.replica.pool() and auth.replica.removals()[0].contribution_id == bad
    assert auth.history.revocations()[0]["reason"] == row["reason"]
    good = contribute(auth, 1, 1e-4)
    seal = auth.step()
    assert seal.contribution_ids == (good,) or list(seal.contribution_ids) == [good]
    close(auth)


def test_loss_increase_is_rejected_and_repeat_offender_banned(corpus, tmp_path):
    validation = ValidationConfig(
        batches=1, batch_size=2, max_relative_norm=1e9, max_loss_increase=0.05, ban_after=2
    )
    auth = make_authority(make_run(quorum=1), corpus, tmp_path, Clock(), validation=validation)
    offender = WORKERS[2].public_key.hex()
    for rnd in range(2):
        bad = contribute(auth, 2, 3.0, seed=rnd)
        contribute(auth, 0, 1e-4, seed=10 + rnd)
        seal = auth.step()
        assert seal.round == rnd and bad not in seal.contribution_ids
        row = auth.history.contribution(bad)
        assert row["status"] == "rejected" and "loss rose" in row["reason"]
        assert row["loss_after"] > row["loss_before"] + 0.05
    assert auth.history.is_banned(offender) and "2 contributions rejected" in auth.history.bans()[0]["reason"]
    late = contribute(auth, 2, 1e-4, seed=5)  # harmless now, but the peer is banned
    auth.step()
    assert auth.history.contribution(late)["reason"] == "peer is banned" and late not in auth.replica.pool()
    close(auth)


def test_equivocation_is_rejected_never_left_pending_and_counts_toward_a_ban(corpus, tmp_path):
    validation = ValidationConfig(batches=1, batch_size=2, ban_after=3)
    auth = make_authority(make_run(quorum=2), corpus, tmp_path, Clock(), validation=validation)
    cheater = WORKERS[2].public_key.hex()
    first = contribute(auth, 2, 1e-4, seed=1)
    assert auth.step() is None and auth.history.contribution(first)["status"] == "accepted"
    second = contribute(auth, 2, 1e-4, seed=2)  # another payload signed for the same round
    auth.step()
    for cid in (first, second):
        row = auth.history.contribution(cid)
        assert row["status"] == "rejected" and row["reason"].startswith("equivocation"), row
    assert auth.history.rejections(cheater) == 2 and not auth.history.is_banned(cheater)

    honest = [contribute(auth, 0, 1e-4, seed=3), contribute(auth, 1, 1e-4, seed=4)]
    assert sorted(auth.step().contribution_ids) == sorted(honest)
    sealed = contribute(auth, 2, 1e-4, seed=5)  # round 1: sealed with one honest peer's
    contribute(auth, 0, 1e-4, seed=6)
    round1 = (auth.replica.round, auth.replica.base_hash)
    assert sealed in auth.step().contribution_ids
    late = contribute(auth, 2, 1e-4, seed=7, on=round1)  # a second one for round 1, after its seal
    auth.step()
    assert auth.history.contribution(late)["status"] == "rejected"
    assert auth.history.contribution(sealed)["status"] == "accepted"  # the seal stands
    assert auth.history.is_banned(cheater)
    close(auth)


def test_banned_and_non_allowlisted_peers_are_removed_on_arrival(corpus, tmp_path):
    allow = frozenset({WORKERS[0].public_key.hex(), WORKERS[1].public_key.hex()})
    auth = make_authority(make_run(quorum=3), corpus, tmp_path, Clock(), allowlist=allow)
    auth.ban(WORKERS[1].public_key.hex(), reason="admin says so", by="admin")
    stranger = contribute(auth, 3, 1e-4)
    banned = contribute(auth, 1, 1e-4)
    ok = contribute(auth, 0, 1e-4)
    auth.step()
    assert "allowlist" in auth.history.contribution(stranger)["reason"]
    assert auth.history.contribution(banned)["reason"] == "peer is banned"
    assert auth.replica.pool() == [ok]
    close(auth)


def test_a_ban_with_the_longest_reason_still_removes_the_pending_contributions(corpus, tmp_path):
    auth = make_authority(make_run(quorum=3), corpus, tmp_path, Clock())
    pending = contribute(auth, 1, 1e-4)
    auth.step()
    assert auth.replica.pool() == [pending]
    reason = "x" * MAX_REASON_CHARS  # valid for the ban, too long once "peer banned: " is prefixed
    auth.ban(WORKERS[1].public_key.hex(), reason=reason, by="admin")
    assert auth.replica.pool() == []
    assert auth.history.contribution(pending)["reason"].startswith("peer banned")
    close(auth)


def test_admin_revoke_removes_an_open_contribution_but_not_a_sealed_one(corpus, tmp_path):
    auth = make_authority(make_run(quorum=2), corpus, tmp_path, Clock())
    a = contribute(auth, 0, 1e-4, seed=1)
    auth.step()
    auth.revoke(a, reason="operator: duplicate data", by="admin")
    assert auth.replica.pool() == [] and auth.history.revocations()[0]["by"] == "admin"
    contribute(auth, 1, 1e-4, seed=2)
    contribute(auth, 2, 1e-4, seed=3)
    seal = auth.step()
    with pytest.raises(MergeError, match="already sealed"):
        auth.revoke(seal.contribution_ids[0], reason="too late", by="admin")
    close(auth)


def test_restart_resumes_same_rounds_checkpoints_and_hashes(corpus, tmp_path):
    run = make_run(quorum=1, keep=2)
    clock = Clock()
    auth = make_authority(run, corpus, tmp_path, clock)
    for r in range(4):
        contribute(auth, r % 2, 1e-4, seed=r)
        assert auth.step().round == r
    contribute(auth, 0, 1e-4, seed=99)  # pending in the open round when the process dies
    before = (auth.history.rounds(), auth.history.checkpoints(), auth.replica.base_hash, auth.replica.pool())
    assert [c["round"] for c in before[1]] == [3, 4]  # keep_checkpoints=2
    close(auth)  # as after kill -9: nothing beyond what was already durable
    again = make_authority(run, corpus, tmp_path, clock)
    assert again.replica.round == 4 and again.replica.base_hash == before[2]
    assert again.replica.pool() == before[3]
    assert (again.history.rounds(), again.history.checkpoints()) == before[:2]
    assert again.step().round == 4
    close(again)


def test_seal_missing_from_history_is_recovered_from_the_replica_log(corpus, tmp_path):
    run = make_run(quorum=1)
    auth = make_authority(run, corpus, tmp_path, Clock())
    contribute(auth, 0, 1e-4)
    seal = auth.replica.seal(AUTHORITY)  # sealed on the replica, then the process died before recording
    close(auth)
    again = make_authority(run, corpus, tmp_path, Clock())
    again.step()
    row = again.history.rounds()[0]
    assert row["weights_hash"] == seal.weights_hash and row["seal_reason"] == "recovered"
    assert again.history.checkpoint(1)["weights_hash"] == seal.weights_hash
    close(again)


STALLING_PEER = textwrap.dedent(
    """
    import sys, time
    from nord.transport import Transport, TransportConfig
    run_id, bootstrap = sys.argv[1], sys.argv[2]
    transport = Transport.start(TransportConfig(initial_peers=(bootstrap,), local_only=True))
    def take_and_stall(peer, body):
        print("push" + "-taken", flush=True)  # spelled apart: the log also echoes this script
        time.sleep(3600)  # reads the push, never answers
    transport.add_handler("push", take_and_stall, max_request_bytes=1 << 30)
    record = {"role": "worker", "client_mode": False}
    transport.store_record(f"nord/{run_id}/peers", transport.peer_id, record, 600)
    print("stall" + "-ready", flush=True)
    time.sleep(3600)
    """
)
SEAL_BUDGET_S = 20.0  # one step of this model takes well under a second; generous for a loaded machine


@pytest.mark.p2p
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_peer_that_takes_a_push_and_never_answers_does_not_delay_sealing(corpus, tmp_path):
    assert PUSH_TIMEOUT_S >= 1.5 * SEAL_BUDGET_S  # else the old, blocking publish would pass too
    run = make_run(quorum=1)
    replica = open_replica(run, tmp_path)
    transport = Transport.start(TransportConfig(local_only=True))
    gossip = Gossip(transport, replica, run.to_json(), role="coordinator")
    gossip.serve()
    auth = make_authority(
        run, corpus, tmp_path, time.time, replica=replica, lock=gossip.lock,
        publish_seal=gossip.publish_seal, publish_removal=gossip.publish_removal,
    )  # fmt: skip
    stop = threading.Event()

    def serve_loop():  # as `nord-coordinator serve` does
        while not stop.is_set():
            auth.step()
            time.sleep(0.1)

    loop = threading.Thread(target=serve_loop, daemon=True)
    try:
        with Procs(tmp_path) as procs:
            procs.start(
                "stall", sys.executable, "-c", STALLING_PEER, run.run_id, transport.visible_maddrs()[0]
            )
            wait_for(lambda: "stall-ready" in procs.log("stall"), 120, "the stalling peer")
            wait_for(gossip.reachable_peers, 60, "the stalling peer's presence record")
            loop.start()
            with gossip.lock:  # as a worker's push is taken
                contribute(auth, 0, 1e-4, seed=1)
            wait_for(lambda: "push-taken" in procs.log("stall"), 60, "round 0's seal pushed to the peer")

            stalled_at = time.monotonic()
            with gossip.lock:
                contribute(auth, 1, 1e-4, seed=2)
            wait_for(lambda: auth.replica.round >= 2, 2 * PUSH_TIMEOUT_S, "round 1 sealed")
            waited = time.monotonic() - stalled_at
            assert waited < SEAL_BUDGET_S, f"round 1 sealed {waited:.1f} s after the stall began"
            recorded = lambda: (auth.history.round(1) or {}).get("weights_hash")  # noqa: E731
            wait_for(recorded, 60, "round 1's seal in the history (recorded after the checkpoint)")
            assert recorded() == auth.replica.base_hash
    finally:
        stop.set()
        if loop.is_alive():
            loop.join(timeout=2 * PUSH_TIMEOUT_S)
        gossip.close()
        transport.shutdown()
        close(auth)
