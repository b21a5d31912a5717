"""End to end on 127.0.0.1, each peer its own process: the real coordinator (`nord-coordinator serve`,
its `Authority` validating and sealing) and three workers (one in client mode) train the tiny model for
three rounds; one worker is SIGKILLed mid-round and restarted. The workers follow the seals in the
three ways there are (`--adopt`): auto (the default: here, few contributions, it fetches them), from
each round's aggregate (the one killed), and by gathering every contribution (the client-mode one).

Checks: every replica ends on the same sealed weights hash; every round's seal folds exactly one
contribution from each of the three workers (nothing lost, nothing counted twice); the aggregate worker
adopted seals from aggregates; no p2pd outlives the test. Also: `nord-node bootstrap` (the small
authority other tests use) compacts after every seal.
"""

from __future__ import annotations

import collections
import json
import random
import threading
from pathlib import Path

import pytest
import torch
from procs import Procs, free_port, wait_for

from coordinator.history import History
from node.bootstrap import RECENT_SEALS, seal_open_round
from node.state import StateDir
from nord.checkpoint import weights_hash
from nord.crdt import Replica
from nord.crdt.config import MergeConfig
from nord.identity import Identity
from nord.model import load_model

RUN = "e2e"
ROUNDS = 3


def read_status(state_dir: Path) -> dict:
    try:
        return json.loads((state_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}


class Peers(Procs):
    """`nord-node` processes of a test (`start`), and every p2pd they start (`record_daemon`)."""

    def start(self, name: str, *args: str, module: str | None = "node"):
        return super().start(name, *args, module=module)

    def stop_all(self) -> None:
        self.stop()


def test_bootstrap_compacts_after_every_seal_and_lists_only_recent_seals(tmp_path):
    authority = Identity.from_private_bytes(bytes([7]) * 32)
    replica = Replica(
        run_id="compact",
        spec={"w": (4, 4)},
        base={"w": torch.zeros(4, 4)},
        merge=MergeConfig(),
        authorities=[authority.public_key],
        log_dir=tmp_path / "replica",
    )
    state, recent = StateDir(tmp_path), collections.deque(maxlen=RECENT_SEALS)
    for _ in range(RECENT_SEALS + 2):
        seal = seal_open_round(replica, authority, threading.RLock(), state, recent)
    assert replica.base_round == seal.round  # every older round folded into the snapshot
    assert len(replica.seals()) == 1
    assert [s["round"] for s in read_status(tmp_path)["seals"]] == list(range(2, RECENT_SEALS + 2))
    assert len(list((tmp_path / "replica").glob("snapshot-*"))) == 1
    replica.close()


def write_text(path: Path) -> None:
    rng = random.Random(0)
    words = "thou art the sun and moon of spring that walks upon green hills where rivers sing".split()
    path.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(300)) for _ in range(80)))


@pytest.mark.p2p
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_three_workers_converge_and_a_killed_worker_catches_up(tmp_path):
    write_text(tmp_path / "text.txt")
    data, coord = str(tmp_path / "data"), tmp_path / "coord"
    with Peers(tmp_path, env={"NORD_DATA_DIR": data}) as peers:
        init = peers.start(
            "init", "init", "--run", RUN, "--model", "tiny", "--source", str(tmp_path / "text.txt"),
            "--vocab-size", "512", "--quorum", "3", "--deadline", "300", "--inner-steps", "4",
            "--batch-size", "2", "--seq-len", "32", "--data-dir", data, "--out", str(tmp_path / "run.json"),
            module="coordinator",
        )  # fmt: skip
        assert init.wait(timeout=300) == 0, peers.log("init")
        coordinator = peers.start(
            "coord", "serve", "--run-config", str(tmp_path / "run.json"), "--state-dir", str(coord),
            "--data-dir", data, "--http", f"127.0.0.1:{free_port()}", "--local-only", "--val-batches", "1",
            "--max-loss-increase", "5",
            module="coordinator",
        )  # fmt: skip
        maddr = wait_for(
            lambda: (coord / "maddrs.txt").is_file() and (coord / "maddrs.txt").read_text().split()[0],
            180,
            "the coordinator's address",
        )
        peers.record_daemon(coordinator)

        def join(name: str, rounds: int, *extra: str):
            return peers.start(
                name, "join", "--run", RUN, "--initial-peers", maddr, "--state-dir", str(tmp_path / name),
                "--data-dir", data, "--max-rounds", str(rounds), "--poll-s", "0.3", "--no-progress",
                "--compact-every", "2", "--local-only", "--device", "cpu", *extra,
            )  # fmt: skip

        workers = {
            "w0": join("w0", ROUNDS),
            "w1": join("w1", ROUNDS, "--adopt", "aggregate"),
            "w2": join("w2", ROUNDS, "--client-mode", "--adopt", "contributions"),
        }
        for proc in workers.values():
            peers.record_daemon(proc)

        # SIGKILL w1 while it is in round 1 (training or waiting for the seal), then restart it.
        wait_for(lambda: read_status(tmp_path / "w1").get("round") == 1, 300, "w1 to reach round 1")
        workers["w1"].kill()
        workers["w1"].wait()
        workers["w1"] = join("w1", ROUNDS - 1, "--adopt", "aggregate")
        peers.record_daemon(workers["w1"])

        for name, proc in workers.items():
            code = proc.wait(timeout=400)
            assert code == 0, f"{name} exited with {code}:\n{peers.log(name)}"
        w1_log = peers.log("w1", tail=1 << 20)
        assert "seal from " in w1_log and "'s aggregate (" in w1_log, w1_log[-3000:]

        # anyone can pull the sealed weights over P2P as a model file `nord generate` reads
        out = tmp_path / "pulled" / "model.safetensors"
        pull = peers.start("pull", "pull", "--from", maddr, "--run", RUN, "--out", str(out), "--local-only")
        assert pull.wait(timeout=180) == 0, peers.log("pull")
        peers.stop()
        assert coordinator.returncode == 0, peers.log("coord")
        peers.assert_daemons_gone()

    history = History.open(coord / "history.sqlite")
    try:
        sealed = [r for r in history.rounds() if r["weights_hash"]]
        contributions = history.contributions()
    finally:
        history.close()
    assert [r["round"] for r in sealed] == list(range(ROUNDS))
    worker_keys = {Identity.load_or_create(tmp_path / n / "identity.key").public_hex for n in workers}
    for r in sealed:
        folded = [c["peer"] for c in contributions if c["sealed_in"] == r["round"]]
        assert sorted(folded) == sorted(worker_keys), (r["round"], folded)
    final = sealed[-1]["weights_hash"]
    for name in workers:
        status = read_status(tmp_path / name)
        assert status["open_round"] == ROUNDS, (name, status)
        assert status["sealed_weights_hash"] == final, name
    model, meta = load_model(out)
    assert meta["weights_hash"] == final == weights_hash(model.state_dict())
    assert (out.parent / "tokenizer.json").is_file() and meta["tokenizer_path"].endswith("tokenizer.json")
