"""The two runs test_contribution_attacks.py compares (and poison_unguarded.py, with the coordinator's
validation lifted): the same config and the same honest worker, the second with a hostile contributor
(tests/security/contribution_peer.py).

Both on 127.0.0.1: `nord-coordinator serve` (quorum 1, the tiny model, H = 2) and one honest
`nord-node join --max-rounds ROUNDS` with the same keys in both runs (so the same data shard and batches).
The merge's max_staleness is 0: a contribution that misses its round's seal is then refused instead of
rolling into the next round, where it could be sealed alone (quorum 1) and shift the honest worker's
rounds; with it the two runs differ only by what the attacker gets sealed.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from procs import wait_for
from swarm import Swarm

RUN = "poisoned"
ROUNDS = 12  # the attacker needs 7 rounds when no attack misses its round
BAN_AFTER = 4
HOSTILE = str(Path(__file__).with_name("contribution_peer.py"))
REPO = str(Path(__file__).resolve().parents[2])  # the hostile peer imports node/ and nord/ from here
Outcome = TypeVar("Outcome")


def clean_and_attacked(
    root: Path, play: Callable[[Swarm, bool], Outcome], swarm_class: type[Swarm] = Swarm
) -> tuple[Outcome, Outcome]:
    """`play(swarm, attack)` on the clean run, then on the attacked one (one corpus for both)."""
    clean, attacked = (swarm_class(root / name, run=RUN) for name in ("clean", "attacked"))
    for swarm in (clean, attacked):
        swarm.tmp.mkdir(parents=True)
        swarm.env |= {"NORD_DATA_DIR": str(root / "data"), "PYTHONPATH": REPO}
    with clean:
        clean.init(quorum=1, inner_steps=2)
        config = json.loads((clean.tmp / "run.json").read_text())
        config["merge"]["max_staleness"] = 0
        (clean.tmp / "run.json").write_text(json.dumps(config))
        baseline = play(clean, False)
    shutil.copy(clean.tmp / "run.json", attacked.tmp / "run.json")
    (attacked.tmp / "honest").mkdir()
    for key in ("p2p.key", "identity.key"):  # the same worker: same shard, same batches
        shutil.copy(clean.tmp / "honest" / key, attacked.tmp / "honest" / key)
    with attacked:
        attacked.quorum = 1
        return baseline, play(attacked, True)


def start(swarm: Swarm, attack: bool) -> Path:
    """The coordinator, the hostile peer if `attack`, then the honest worker; the hostile's state dir.

    The hostile peer starts first, so it is there from round 0 (its presence record names no shards:
    the honest worker plans its shards as in the clean run)."""
    # a ban after 4 rejections: the attacks the authority judges make 4 (x1000, fp16-max, the equivocating
    # pair), so one attack sent again because the attacker missed its verdict still leaves the pair judged
    swarm.start_coordinator("--ban-after", str(BAN_AFTER))
    hostile = swarm.tmp / "hostile"
    if attack:
        proc = swarm.start("hostile", sys.executable, HOSTILE, "--initial-peers", swarm.maddr, "--run", RUN,
                           "--state-dir", str(hostile))  # fmt: skip

        def started():
            assert proc.poll() is None, swarm.log("hostile")
            return (hostile / "attacks.json").is_file()

        wait_for(started, 300, "the hostile peer's start")
    swarm.join("honest", "--max-rounds", str(ROUNDS))
    return hostile
