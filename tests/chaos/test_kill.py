"""Chaos on 127.0.0.1: the real coordinator (`nord-coordinator serve`, its `Authority`) and two workers,
SIGKILLed at random moments (training, sending, sealing, writing a checkpoint: wherever the kill lands)
and restarted on the same state dirs and ports.

Phase 1 kills and restarts at random (seeded: NORD_CHAOS_SEED) while rounds go on; phase 2 stops both
workers cleanly and runs each for one more round, so that every replica must end on one sealed round.
Checks: every contribution a worker saw acknowledged (pushed to at least one peer) is in the coordinator's
history exactly once and sealed into exactly one round; no round folds two contributions of one peer;
every replica (on disk) ends on the coordinator's last sealed weights; no worker, coordinator or p2pd is left.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
import urllib.request
from pathlib import Path

import pytest
from procs import Procs, free_port, wait_for

from coordinator.history import History
from node.session import replica_settings
from nord.config import RunConfig
from nord.crdt import Replica

pytestmark = [pytest.mark.p2p, pytest.mark.slow, pytest.mark.timeout(1200)]

RUN = "chaos"
WORKERS = ("w0", "w1")
KILLS = 3
SEED = int(os.environ.get("NORD_CHAOS_SEED", "0"))
SENT = re.compile(r"(?:re-)?sent contribution ([0-9a-f]{12}) for round (\d+) \(\d+ bytes\) to (\d+) peer")


class Swarm(Procs):
    """The coordinator and the workers; each restarts on its own state dir (and the coordinator on its
    own ports, so the workers' bootstrap address stays valid)."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp, env={"NORD_DATA_DIR": str(tmp / "data")})
        self.tmp = tmp
        self.http, self.p2p = free_port(), free_port()
        self.running: dict[str, object] = {}
        self.maddr = ""

    def get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=60) as r:
            return json.loads(r.read())

    def sealed_rounds(self) -> int:
        return int(self.get("/api/summary")["sealed_rounds"])

    def start_coordinator(self) -> None:
        proc = self.running["coord"] = self.start(
            "coord", "serve", "--run-config", str(self.tmp / "run.json"),
            "--state-dir", str(self.tmp / "coord"), "--http", f"127.0.0.1:{self.http}",
            "--host-maddrs", f"/ip4/127.0.0.1/tcp/{self.p2p}", "--local-only", "--val-batches", "1",
            "--max-loss-increase", "5",
            module="coordinator",
        )  # fmt: skip
        wait_for(lambda: proc.poll() is not None or self.get("/api/summary"), 300, "the coordinator's API")
        assert proc.poll() is None, self.log("coord")
        self.record_daemon(proc)
        self.maddr = self.get("/api/summary")["multiaddrs"][0]

    def join(self, name: str, *extra: str) -> None:
        proc = self.running[name] = self.start(
            name, "join", "--run", RUN, "--initial-peers", self.maddr, "--state-dir", str(self.tmp / name),
            "--poll-s", "0.3", "--no-progress", "--local-only", "--device", "cpu", *extra,
            module="node",
        )  # fmt: skip
        self.record_daemon(proc)

    def kill(self, name: str) -> None:
        proc = self.running[name]
        assert proc.poll() is None, f"{name} died by itself:\n{self.log(name)}"
        proc.kill()
        proc.wait()


def sealed_hash(state_dir: Path) -> str:
    """The sealed weights a stopped peer's replica (on disk) builds on."""
    replica = Replica.open(state_dir / "replica", **replica_settings(RunConfig.load(state_dir / "run.json")))
    try:
        return replica.base_hash
    finally:
        replica.close()


def acknowledged(log: str) -> set[str]:
    """Ids (12-hex prefixes) of the contributions a worker's log says at least one peer accepted."""
    return {m[1] for m in SENT.finditer(log) if int(m[3]) >= 1}


def test_sigkill_at_random_moments_loses_nothing_and_leaves_nothing(tmp_path):
    rng = random.Random(SEED)
    rng_words = random.Random(0)
    words = "thou art the sun and moon of spring that walks upon green hills where rivers sing".split()
    (tmp_path / "text.txt").write_text(
        "\n\n".join(" ".join(rng_words.choice(words) for _ in range(300)) for _ in range(80))
    )
    with Swarm(tmp_path) as swarm:
        init = swarm.start(
            "init", "init", "--run", RUN, "--model", "tiny", "--source", str(tmp_path / "text.txt"),
            "--vocab-size", "512", "--quorum", "2", "--deadline", "600", "--inner-steps", "3",
            "--batch-size", "2", "--seq-len", "32", "--keep-checkpoints", "2",
            "--out", str(tmp_path / "run.json"),
            module="coordinator",
        )  # fmt: skip
        assert init.wait(timeout=300) == 0, swarm.log("init")
        swarm.start_coordinator()
        for name in WORKERS:
            swarm.join(name)

        # phase 1: a victim per kill, at a random moment once the swarm is making progress again
        for victim in [rng.choice(("coord", *WORKERS)) for _ in range(KILLS)]:
            progressed = swarm.sealed_rounds() + 1
            wait_for(lambda n=progressed: swarm.sealed_rounds() >= n, 600, f"round {progressed} sealed")
            time.sleep(rng.uniform(0.0, 4.0))  # the random moment: training, sending, sealing, writing
            swarm.kill(victim)
            if victim == "coord":
                swarm.start_coordinator()
            else:
                swarm.join(victim)

        # phase 2: stop the workers cleanly, then one more round each: every replica ends on its seal
        for name in WORKERS:
            swarm.running[name].terminate()
        for name in WORKERS:
            assert swarm.running[name].wait(timeout=120) == 0, swarm.log(name)
        for name in WORKERS:
            swarm.join(name, "--max-rounds", "1")
        for name in WORKERS:
            assert swarm.running[name].wait(timeout=600) == 0, swarm.log(name)
        final = swarm.get("/api/summary")
        swarm.stop()
        assert swarm.running["coord"].returncode == 0, swarm.log("coord")
        swarm.assert_daemons_gone()
        assert all(p.poll() is not None for p in swarm.procs)

    history = History.open(tmp_path / "coord" / "history.sqlite")
    try:
        rows = history.contributions()
        sealed = [r for r in history.rounds() if r["weights_hash"]]
    finally:
        history.close()
    for name in WORKERS:
        for prefix in acknowledged(swarm.log(name, tail=10**7)):
            matches = [r for r in rows if r["id"].startswith(prefix)]
            assert len(matches) == 1 and matches[0]["sealed_in"] is not None, (name, prefix, matches)
    for r in sealed:
        folded = [c["peer"] for c in rows if c["sealed_in"] == r["round"]]
        assert folded and len(folded) == len(set(folded)), (r["round"], folded)
    last = sealed[-1]
    assert last["round"] == final["sealed_rounds"] - 1
    for name in ("coord", *WORKERS):
        assert sealed_hash(tmp_path / name) == last["weights_hash"], name
