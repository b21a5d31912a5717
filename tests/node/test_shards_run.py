"""A sharded run end to end on 127.0.0.1, each peer its own process: the tiny model in 3 parameter shards
(embedding/head, blocks 0-1, blocks 2-3), one shard per worker, three workers joining one after the other
take the least-covered shard each, two rounds.

Checks: the workers hold three different shards; every contribution names exactly its worker's shard
tensors; every seal folds one contribution of each worker; every replica ends on the same sealed weights,
which differ from the initial weights in every shard.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from pathlib import Path

import pytest
import test_p2p_run as e2e  # the Peers runner and status reader of the unsharded end-to-end test
import torch
from procs import alive, wait_for

import nord
from node.bootstrap import create_run
from node.state import StateDir
from nord.codec import decode_envelope
from nord.identity import Identity
from nord.model import NordLM, load_model
from nord.shards import ShardConfig, shard_params, shards_of_names

pytestmark = [pytest.mark.p2p, pytest.mark.slow, pytest.mark.timeout(600)]

RUN = "sharded"
ROUNDS = 2


def write_sharded_run(boot_dir: Path, text: Path, data: Path):
    """The run `nord-node bootstrap` would create, with shards.count 3 and one shard per worker."""
    state = StateDir(boot_dir)
    identity = Identity.load_or_create(state.identity_key)
    args = argparse.Namespace(
        run=RUN, data_source=str(text), recipe="tiny", inner_steps=4, batch_size=2, seq_len=32,
        quorum=3, deadline_s=600.0,  # quorum seals; the deadline only for a worker that never comes
    )  # fmt: skip
    run = dataclasses.replace(create_run(args, identity, data), shards=ShardConfig(count=3, per_worker=1))
    state.run_json.write_text(run.to_json())
    return run


def test_three_workers_on_different_shards_converge(tmp_path):
    text = tmp_path / "text"
    text.mkdir()
    for i, src in enumerate(sorted(Path(nord.__file__).parent.rglob("*.py"))):
        shutil.copy(src, text / f"{i:03d}_{src.stem}.txt")
    data = tmp_path / "data"
    boot_dir = tmp_path / "boot"
    run = write_sharded_run(boot_dir, text, data)
    peers = e2e.Peers(tmp_path)
    try:
        boot = peers.start(
            "boot", "bootstrap", "--run", RUN, "--state-dir", str(boot_dir), "--data-dir", str(data),
            "--local-only",
        )  # fmt: skip
        maddr = wait_for(
            lambda: (
                boot.poll() is not None
                or ((boot_dir / "maddrs.txt").is_file() and (boot_dir / "maddrs.txt").read_text().split()[0])
            ),
            300,
            "the bootstrap peer's address",
        )
        assert boot.poll() is None, (tmp_path / "boot.log").read_text()[-3000:]  # fail fast, with its error
        peers.record_daemon(boot)
        workers = {}
        for name in ("w0", "w1", "w2"):  # one after the other: each sees the others' presence records
            workers[name] = peers.start(
                name, "join", "--run", RUN, "--initial-peers", maddr, "--state-dir", str(tmp_path / name),
                "--data-dir", str(data), "--max-rounds", str(ROUNDS), "--poll-s", "0.3", "--no-progress",
                "--local-only",
            )  # fmt: skip
            peers.record_daemon(workers[name])
            wait_for(lambda n=name: e2e.read_status(tmp_path / n).get("shards"), 300, f"{name}'s shards")
        for name, proc in workers.items():
            code = proc.wait(timeout=400)
            assert code == 0, f"{name} exited with {code}:\n{(tmp_path / f'{name}.log').read_text()[-3000:]}"
        out = tmp_path / "pulled" / "model.safetensors"
        pull = peers.start("pull", "pull", "--from", maddr, "--run", RUN, "--out", str(out), "--local-only")
        assert pull.wait(timeout=300) == 0, (tmp_path / "pull.log").read_text()[-2000:]
    finally:
        peers.stop_all()

    statuses = {name: e2e.read_status(tmp_path / name) for name in workers}
    held = sorted(tuple(s["shards"]) for s in statuses.values())
    assert held == [(0,), (1,), (2,)], statuses
    with torch.device("meta"):
        spec = NordLM(run.model).param_spec()
    names_of = shard_params(spec, run.model, run.shards)
    for name in workers:
        (shard,) = statuses[name]["shards"]
        saved = StateDir(tmp_path / name).load_worker()
        envelope = decode_envelope(saved["envelope"], spec, run_id=RUN)
        assert list(envelope.names) == names_of[shard], name  # its shard's tensors, nothing frozen
        assert shards_of_names(envelope.names, run.model, run.shards) == {shard}

    boot_status = e2e.read_status(boot_dir)
    assert boot_status["open_round"] == ROUNDS
    for seal in boot_status["seals"]:
        assert len(seal["contributors"]) == 3 == len(set(seal["contributors"])), seal
    for name, status in statuses.items():
        assert status["open_round"] == ROUNDS, (name, status)
        assert status["sealed_weights_hash"] == boot_status["sealed_weights_hash"], name

    final, meta = load_model(out)
    assert meta["weights_hash"] == boot_status["sealed_weights_hash"]
    torch.manual_seed(run.train.seed)  # the bootstrap's initial weights
    initial = NordLM(run.model).state_dict()
    for shard, names in enumerate(names_of):
        assert any(not torch.equal(final.state_dict()[n], initial[n]) for n in names), f"shard {shard}"
    assert boot.returncode == 0, (tmp_path / "boot.log").read_text()[-3000:]
    e2e_daemons_gone(peers)


def e2e_daemons_gone(peers) -> None:
    deadline = time.monotonic() + 15
    survivors = {pid for pid in peers.daemons if alive(pid)}
    while survivors and time.monotonic() < deadline:
        time.sleep(0.2)
        survivors = {pid for pid in survivors if alive(pid)}
    assert survivors == set(), "p2pd processes outlived the test"
