"""A real hostile peer (tests/security/hostile_peer.py, built from Nord's library) joins a real run on
127.0.0.1 — `nord-coordinator serve` and an honest `nord-node join` worker — and lies about state (#17).

Checks, for every lie at once (an unsealed round 0 of other weights, a seal by a key that is not the
run's authority, a real seal over other weights, a real seal with made-up metadata, a stale snapshot
behind a `behind=True` claim): the honest worker downloads each liar's snapshot at most once, adopts
none of them, names each liar once in its log, and keeps training on the authority's sealed weights.
Then: a worker pinned to the run's authority refuses a run config signed by another key, whether it
is pinned by `--authority` or by its state dir, and so does `nord-node pull --authority`; the same
state dir, restarted far behind the run and among the liars, still catches up from a verified snapshot.
"""

from __future__ import annotations

import json
import random
import re
import sys
import time
from pathlib import Path

import pytest
from procs import Procs, free_port, wait_for

from nord.checkpoint import read_metadata
from nord.identity import Identity
from nord.transport.peer import network_peer

pytestmark = [pytest.mark.p2p, pytest.mark.slow]

RUN = "attacked"
LIARS = ("unsealed", "forged-seal", "stolen-seal", "tampered-window", "stale")
HOSTILE = str(Path(__file__).with_name("hostile_peer.py"))
CATCH_UP_EVERY_S = 30.0  # node.catchup's pass interval: the window below covers at least one more pass


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_text(path: Path) -> None:
    rng = random.Random(0)
    words = "thou art the sun and moon of spring that walks upon green hills where rivers sing".split()
    path.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(300)) for _ in range(80)))


class Python(Procs):
    """Procs whose `start(name, *args)` runs `python <args>` (`-m module ...` or a script path)."""

    def start(self, name: str, *args: str):
        return super().start(name, sys.executable, *args)


class Run:
    """A coordinator and one honest worker pinned to its authority, plus whatever a test adds."""

    def __init__(self, tmp: Path, peers: Python) -> None:
        self.tmp, self.peers = tmp, peers
        self.data, self.coord = str(tmp / "data"), tmp / "coord"
        write_text(tmp / "text.txt")
        init = peers.start(
            "init", "-m", "coordinator", "init", "--run", RUN, "--model", "tiny",
            "--source", str(tmp / "text.txt"), "--vocab-size", "512", "--quorum", "1", "--deadline", "300",
            "--inner-steps", "2", "--batch-size", "2", "--seq-len", "32", "--data-dir", self.data,
            "--out", str(tmp / "run.json"),
        )  # fmt: skip
        assert init.wait(timeout=300) == 0, peers.log("init")
        self.coordinator = peers.start(
            "coord", "-m", "coordinator", "serve", "--run-config", str(tmp / "run.json"),
            "--state-dir", str(self.coord), "--data-dir", self.data, "--http", f"127.0.0.1:{free_port()}",
            "--local-only", "--val-batches", "1", "--max-loss-increase", "5",
        )  # fmt: skip
        self.maddr = wait_for(
            lambda: (
                (self.coord / "maddrs.txt").is_file() and (self.coord / "maddrs.txt").read_text().split()[0]
            ),
            600,  # generous: a loaded 2-core machine starts processes slowly
            "the coordinator's address",
        )
        self.fingerprint = Identity.load_or_create(self.coord / "identity.key").fingerprint

    def join(self, name: str, *extra: str, initial_peer: str | None = None):
        return self.peers.start(
            name, "-m", "node", "join", "--run", RUN, "--initial-peers", initial_peer or self.maddr,
            "--state-dir", str(self.tmp / name), "--data-dir", self.data, "--poll-s", "0.3",
            "--no-progress", "--compact-every", "2", "--local-only", "--device", "cpu", *extra,
        )  # fmt: skip

    def hostile(self, mode: str) -> Path:
        state = self.tmp / f"hostile-{mode}"
        self.peers.start(f"hostile-{mode}", HOSTILE, "--initial-peers", self.maddr, "--run", RUN,
                         "--mode", mode, "--state-dir", str(state))  # fmt: skip
        wait_for(lambda: (state / "maddrs.txt").is_file(), 600, f"the {mode} peer to start")
        return state

    def status(self, name: str) -> dict:
        return read_json(self.tmp / name / "status.json")

    def sealed_hash(self, checkpoint_round: int) -> str | None:
        """The coordinator's weights hash of checkpoint `checkpoint_round` (sealed in the round before)."""
        path = self.coord / "checkpoints" / f"{checkpoint_round}.safetensors"
        try:
            return read_metadata(path).get("weights_hash")
        except Exception:  # not written yet, or already rotated out
            return None


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attacked")
    with Python(tmp, env={"NORD_DATA_DIR": str(tmp / "data")}) as peers:
        yield Run(tmp, peers)


def test_an_honest_worker_adopts_no_state_no_authority_vouched_for(run):
    worker = run.join("honest", "--authority", run.fingerprint)
    wait_for(lambda: run.status("honest").get("open_round", 0) >= 2, 300, "the honest worker's round 2")
    liars = {mode: run.hostile(mode) for mode in LIARS}
    for mode, state in liars.items():
        wait_for(
            lambda s=state: read_json(s / "served.json").get("snapshot"), 300, f"a snapshot asked of {mode}"
        )
    started = run.status("honest")["open_round"]
    deadline = time.monotonic() + CATCH_UP_EVERY_S + 10  # one more catch-up pass at least, liars still lying
    wait_for(lambda: time.monotonic() > deadline and run.status("honest").get("open_round", 0) >= started + 2,
             300, "two more rounds of the honest worker")  # fmt: skip
    assert worker.poll() is None, run.peers.log("honest")

    served = {mode: read_json(state / "served.json") for mode, state in liars.items()}
    assert all(s["snapshot"] == 1 for s in served.values()), served  # each liar's state fetched once
    assert all(s["sync"] > 2 for s in served.values()), served  # ... although each kept saying `behind`

    def worker_and_coordinator():
        status = run.status("honest")
        sealed = run.sealed_hash(status.get("open_round", -1))
        return sealed and (status, sealed)

    status, sealed = wait_for(worker_and_coordinator, 120, "the coordinator's checkpoint of that round")
    assert status["sealed_weights_hash"] == sealed, status  # still on the authority's weights
    log = run.peers.log("honest", tail=200_000)
    adopted = set(re.findall(r"verified from (.+?) \(was", log))
    assert adopted <= {f"peer {run.fingerprint}"}, adopted  # if any, the authority's own state
    reasons = {
        "unsealed": "not the run's genesis weights",
        "forged-seal": "seal certifies",
        "stolen-seal": "seal certifies",
        "tampered-window": "not what its seal covers",
        "stale": "its sealed snapshot is",
    }
    for mode, state in liars.items():
        peer = network_peer((state / "maddrs.txt").read_text().split()[0].rsplit("/", 1)[1])
        lines = re.findall(rf"not trusting {re.escape(peer)}'s state.*", log)
        assert len(lines) == 1 and reasons[mode] in lines[0], (mode, lines)


def test_a_run_config_signed_by_another_key_is_refused(run):
    impostor = run.hostile("impostor")
    fake = (impostor / "maddrs.txt").read_text().split()[0]
    pinned = run.join(
        "pinned-by-flag", "--authority", run.fingerprint, "--max-rounds", "1", initial_peer=fake
    )
    assert pinned.wait(timeout=300) != 0
    assert f"not the pinned {run.fingerprint}" in run.peers.log("pinned-by-flag")
    assert not (run.tmp / "pinned-by-flag" / "replica").exists()

    # a state dir that joined the real run refuses the impostor without --authority
    first = run.join("pinned-by-state", "--max-rounds", "1")
    assert first.wait(timeout=300) == 0, run.peers.log("pinned-by-state")
    assert "on first use" in run.peers.log("pinned-by-state")
    replica_before = sorted(p.name for p in (run.tmp / "pinned-by-state" / "replica").iterdir())
    again = run.join("pinned-by-state", "--max-rounds", "1", initial_peer=fake)
    assert again.wait(timeout=300) != 0
    assert f"not the pinned {run.fingerprint}" in run.peers.log("pinned-by-state")
    assert sorted(p.name for p in (run.tmp / "pinned-by-state" / "replica").iterdir()) == replica_before

    # the same state dir, now far behind the coordinator's compaction point (the honest worker kept
    # sealing rounds) and among liars: it still catches up, from a verified snapshot, and trains
    behind = run.join("pinned-by-state", "--max-rounds", "1")
    assert behind.wait(timeout=400) == 0, run.peers.log("pinned-by-state")
    assert "verified from peer" in run.peers.log("pinned-by-state", tail=100_000)

    out = run.tmp / "pulled.safetensors"
    pull = run.peers.start("pull", "-m", "node", "pull", "--from", fake, "--run", RUN, "--out", str(out),
                           "--authority", run.fingerprint, "--local-only")  # fmt: skip
    assert pull.wait(timeout=300) != 0 and not out.exists()
    assert f"not the pinned {run.fingerprint}" in run.peers.log("pull")
