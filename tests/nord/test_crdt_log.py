"""Replica persistence: reopen after restart, compaction, torn and corrupt log tails, kill -9."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from crdt_support import AUTHORITY, AUTHORITY_2, PEERS, SPEC, envelope, fingerprint, make_replica

from nord.crdt import MergeConfig, Replica
from nord.crdt.log import frame, read_log
from nord.errors import MergeError

KEYS = [AUTHORITY.public_key]


def reopen(path: Path) -> Replica:
    return Replica.open(path, spec=SPEC, merge=MergeConfig(), authorities=KEYS)


def run_two_rounds(r: Replica) -> None:
    for p in range(3):
        r.add(envelope(p, 0, r.base_hash))
    r.remove(envelope(2, 0, r.base_hash).contribution_id, reason="bad", identity=AUTHORITY)
    r.seal(AUTHORITY)
    for p in range(2):
        r.add(envelope(p, 1, r.base_hash))


def test_reopen_restores_the_same_state(tmp_path):
    r = make_replica(authorities=KEYS, log_dir=tmp_path / "rep")
    run_two_rounds(r)
    expected = fingerprint(r)
    r.close()
    again = reopen(tmp_path / "rep")
    assert fingerprint(again) == expected and again.round == 1
    again.add(envelope(3, 1, again.base_hash))
    expected = fingerprint(again)
    again.close()
    assert fingerprint(reopen(tmp_path / "rep")) == expected


def test_compaction_survives_restart_and_bounds_the_log(tmp_path):
    r = make_replica(authorities=KEYS, log_dir=tmp_path / "rep")
    run_two_rounds(r)
    before = fingerprint(r)
    log_before = (tmp_path / "rep" / "log-0.bin").stat().st_size
    r.compact()
    assert r.weights_hash() == before[-1]
    r.close()
    files = sorted(p.name for p in (tmp_path / "rep").iterdir())
    assert files == ["CURRENT", "log-1.bin", "snapshot-1.safetensors"]
    assert (tmp_path / "rep" / "log-1.bin").stat().st_size < log_before
    again = reopen(tmp_path / "rep")
    assert again.weights_hash() == before[-1] and again.base_round == 1
    assert not again.add(envelope(0, 0, make_replica().base_hash))  # folded before compaction: a duplicate


def test_a_replica_directory_is_never_created_twice(tmp_path):
    make_replica(authorities=KEYS, log_dir=tmp_path / "rep").close()
    with pytest.raises(MergeError, match="already holds a replica"):
        make_replica(authorities=KEYS, log_dir=tmp_path / "rep")
    with pytest.raises(MergeError, match="no replica"):
        reopen(tmp_path / "empty")


@pytest.mark.parametrize("damage", ["torn", "bitflip", "garbage"])
def test_corrupt_log_tail_is_cut_with_a_warning(tmp_path, caplog, damage):
    r = make_replica(authorities=KEYS, log_dir=tmp_path / "rep")
    first, second = envelope(0, 0, r.base_hash), envelope(1, 0, r.base_hash)
    r.add(first)
    r.add(second)
    r.close()
    path = tmp_path / "rep" / "log-0.bin"
    data = path.read_bytes()
    good = len(frame("add", first.to_bytes()))
    if damage == "torn":
        path.write_bytes(data[:-7])
    elif damage == "bitflip":
        path.write_bytes(data[:-20] + bytes([data[-20] ^ 0x40]) + data[-19:])
    else:
        path.write_bytes(data + b"\x05\x00\x00\x00junk!")
    with caplog.at_level(logging.WARNING, logger="nord.crdt.log"):
        again = reopen(tmp_path / "rep")
    assert any("tail" in rec.getMessage() for rec in caplog.records)
    assert again.has(first.contribution_id)
    assert again.has(second.contribution_id) == (damage == "garbage")
    assert path.stat().st_size == (len(data) if damage == "garbage" else good)
    again.add(second)  # appending after the cut works and survives
    again.close()
    assert reopen(tmp_path / "rep").has(second.contribution_id)


def test_read_log_stops_at_the_first_bad_frame(tmp_path):
    path = tmp_path / "log.bin"
    path.write_bytes(frame("add", b"one") + frame("nope", b"two") + frame("seal", b"three"))
    records, valid = read_log(path)
    assert records == [("add", b"one")] and valid == len(frame("add", b"one"))


CHILD = """
import sys
from crdt_support import AUTHORITY, envelope, make_replica
r = make_replica(authorities=[AUTHORITY.public_key], log_dir=sys.argv[1])
i = 0
while True:
    env = envelope(i % 6, r.round, r.base_hash, seed=i)
    r.add(env)
    print("ack", env.contribution_id, flush=True)
    i += 1
    if i % 6 == 0:
        print("sealed", r.seal(AUTHORITY).round, flush=True)
        r.compact(keep_rounds=1)  # a kill can land mid-compaction too
"""


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [7, 23])
def test_kill_9_keeps_every_acknowledged_contribution(tmp_path, kill_after):
    path = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path / "rep")], stdout=subprocess.PIPE, text=True, env=env
    )
    acked, sealed = [], -1
    try:
        for line in child.stdout:
            kind, value = line.split()
            if kind == "ack":
                acked.append(value)
            else:
                sealed = int(value)
            if len(acked) >= kill_after:
                break
        os.kill(child.pid, signal.SIGKILL)  # mid-way through its next add, fsync or seal
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    r = reopen(tmp_path / "rep")
    assert all(r.has(cid) for cid in acked)
    assert r.round >= sealed + 1
    r.close()
    assert fingerprint(reopen(tmp_path / "rep")) == fingerprint(r)  # the cut log replays the same way


def test_compaction_keeping_rounds_replays_from_its_log(tmp_path):
    r = make_replica(authorities=KEYS, log_dir=tmp_path / "rep")
    run_two_rounds(r)
    r.seal(AUTHORITY)
    r.add(envelope(3, 2, r.base_hash))
    r.compact(keep_rounds=1)
    expected = fingerprint(r)
    r.close()
    again = reopen(tmp_path / "rep")
    assert fingerprint(again) == expected and again.base_round == 1 and again.round == 2


def test_a_peer_behind_the_compaction_point_catches_up_from_a_snapshot(tmp_path):
    from nord.checkpoint import load_checkpoint

    hub = make_replica(authorities=KEYS)
    late_twin = envelope(0, 0, hub.base_hash)
    run_two_rounds(hub)
    hub.seal(AUTHORITY)
    hub.compact()
    behind = make_replica(authorities=KEYS)
    assert hub.needs_snapshot(behind.digest())
    hub.save_snapshot(tmp_path / "snap.safetensors")
    tensors, meta = load_checkpoint(tmp_path / "snap.safetensors")
    fresh = Replica.from_snapshot(
        tensors,
        meta,
        spec=SPEC,
        merge=MergeConfig(),
        authorities=KEYS,
        genesis_hash=None,
        log_dir=tmp_path / "r",
    )
    assert fresh.round == hub.round == 2 and fresh.base_hash == hub.base_hash
    assert not fresh.add(late_twin)  # folded before the snapshot: still recognised as a duplicate
    hub.add(envelope(4, 2, hub.base_hash))
    fresh.join(hub)
    assert fingerprint(fresh) == fingerprint(hub)
    fresh.close()
    assert fingerprint(reopen(tmp_path / "r")) == fingerprint(hub)


def test_a_snapshot_must_match_its_authority_seal(tmp_path):
    from nord.checkpoint import load_checkpoint

    hub = make_replica(authorities=KEYS)
    run_two_rounds(hub)
    hub.save_snapshot(tmp_path / "snap.safetensors")
    tensors, meta = load_checkpoint(tmp_path / "snap.safetensors")
    assert (
        Replica.from_snapshot(
            tensors, meta, spec=SPEC, merge=MergeConfig(), authorities=KEYS, genesis_hash=None
        ).round
        == 1
    )
    tampered = {name: t.clone() for name, t in tensors.items()}
    tampered["block.bias"][0] += 1.0
    with pytest.raises(MergeError, match="seal certifies"):
        Replica.from_snapshot(
            tampered, meta, spec=SPEC, merge=MergeConfig(), authorities=KEYS, genesis_hash=None
        )
    with pytest.raises(MergeError, match="no seal"):
        Replica.from_snapshot(
            tensors, {**meta, "seal": ""}, spec=SPEC, merge=MergeConfig(), authorities=KEYS, genesis_hash=None
        )
    with pytest.raises(MergeError, match="seal certifies"):  # a seal from a key this run does not trust
        Replica.from_snapshot(
            tensors,
            meta,
            spec=SPEC,
            merge=MergeConfig(),
            authorities=[PEERS[0].public_key],
            genesis_hash=None,
        )
    with pytest.raises(MergeError, match="malformed"):
        Replica.from_snapshot(
            tensors,
            {**meta, "folded": "[1"},
            spec=SPEC,
            merge=MergeConfig(),
            authorities=KEYS,
            genesis_hash=None,
        )


def sealed_twice(path: Path) -> Replica:
    """A replica on disk with rounds 0 and 1 sealed and a contribution open in round 2."""
    r = make_replica(authorities=[AUTHORITY.public_key, AUTHORITY_2.public_key], log_dir=path)
    run_two_rounds(r)
    r.seal(AUTHORITY)
    r.add(envelope(3, 2, r.base_hash))
    return r


def reopen_both(path: Path) -> Replica:
    return Replica.open(
        path, spec=SPEC, merge=MergeConfig(), authorities=[AUTHORITY.public_key, AUTHORITY_2.public_key]
    )


def test_what_is_logged_while_a_compaction_prepares_is_in_the_new_generation(tmp_path):
    """Compaction folds and writes outside the replica's lock: what peers add meanwhile must survive."""
    r = sealed_twice(tmp_path / "rep")
    job = r.begin_compaction(keep_rounds=1)
    job.prepare()  # a handler that takes the lock now adds and removes (here: in between, same thread)
    late = envelope(4, 2, r.base_hash)
    r.add(late)
    r.remove(envelope(3, 2, r.base_hash).contribution_id, reason="bad", identity=AUTHORITY)
    assert r.finish_compaction(job)
    expected = fingerprint(r)
    assert r.base_round == 1 and r.has(late.contribution_id)
    r.close()
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == [
        "CURRENT",
        "log-1.bin",
        "snapshot-1.safetensors",
    ]
    again = reopen_both(tmp_path / "rep")
    assert fingerprint(again) == expected and again.base_round == 1


def test_a_crash_before_the_commit_reopens_the_old_generation_with_everything(tmp_path):
    r = sealed_twice(tmp_path / "rep")
    job = r.begin_compaction(keep_rounds=0)
    job.prepare()
    late = envelope(4, 2, r.base_hash)
    r.add(late)
    expected = fingerprint(r)
    r.close()  # the process dies here: the next generation is written, CURRENT still names the old one
    assert (tmp_path / "rep" / "snapshot-1.safetensors").exists()
    again = reopen_both(tmp_path / "rep")
    assert fingerprint(again) == expected and again.base_round == 0
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == [
        "CURRENT",
        "log-0.bin",
        "snapshot-0.safetensors",
    ]
    assert again.compact(keep_rounds=0) and again.base_round == 2
    assert fingerprint(again) == fingerprint(reopen_both(tmp_path / "rep"))


def test_a_compaction_is_dropped_when_a_better_seal_wins_a_folded_round_meanwhile(tmp_path):
    r = make_replica(authorities=[AUTHORITY.public_key, AUTHORITY_2.public_key], log_dir=tmp_path / "rep")
    better = make_replica()
    envs = [envelope(p, 0, r.base_hash) for p in range(3)]
    for e in envs[:2]:
        r.add(e)
    r.seal(AUTHORITY)
    job = r.begin_compaction(keep_rounds=0)
    job.prepare()
    for e in envs:
        better.add(e)
    better.seal(AUTHORITY_2)
    r.join(better)  # round 0 switches to the seal with three contributions
    assert not r.finish_compaction(job)
    assert r.base_round == 0 and fingerprint(r) == fingerprint(better)
    assert r.compact(keep_rounds=0) and r.base_round == 1 and fingerprint(r)[-1] == fingerprint(better)[-1]
    r.close()
    assert reopen_both(tmp_path / "rep").weights_hash() == better.weights_hash()
