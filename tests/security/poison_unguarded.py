"""What the contribution attacks of test_contribution_attacks.py do to a run whose coordinator does not
validate: the same two runs (clean, then with tests/security/contribution_peer.py) with the thresholds
lifted (`--max-relative-norm 1e9 --max-loss-increase 1e9`), the honest worker's keys the same in both.

    python tests/security/poison_unguarded.py [--out DIR]

Prints, per sealed round, the validation loss of the clean and the attacked run and what the attacker got
sealed: the evidence that the test's 1% bound on the validation loss can fail.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO)]  # node/, nord/, coordinator/ (before tests/, whose coordinator/ is tests)
sys.path.append(str(REPO / "tests"))  # procs, swarm

from poisoned_runs import clean_and_attacked, start  # noqa: E402
from procs import wait_for  # noqa: E402
from swarm import Swarm  # noqa: E402

from coordinator.history import History  # noqa: E402
from nord.identity import Identity  # noqa: E402

UNGUARDED = ("--max-relative-norm", "1e9", "--max-loss-increase", "1e9")


class Unguarded(Swarm):
    """A swarm whose coordinator accepts any finite contribution (later flags override earlier ones)."""

    def spawn(self, name: str, module: str, *args: str):
        return super().spawn(name, module, *args, *(UNGUARDED if name == "coord" else ()))


def play(swarm: Swarm, attack: bool) -> dict:
    hostile = start(swarm, attack)
    worker = swarm.running["honest"]
    wait_for(lambda: worker.poll() is not None, 900, "the honest worker's end")
    print(f"{'attacked' if attack else 'clean'}: honest worker exited {worker.returncode}", flush=True)
    swarm.stop()
    history = History.open(swarm.tmp / "coord" / "history.sqlite")
    try:
        losses = {r: m.get("val_loss") for r, m in history.metrics().items()}
        mine = Identity.load_or_create(hostile / "identity.key").public_hex if attack else None
        sealed = [(c["sealed_in"], c["id"]) for c in history.contributions() if mine and c["peer"] == mine]
    finally:
        history.close()
    report = json.loads((hostile / "attacks.json").read_text()) if attack else {}
    names: dict[str, str] = {}  # the attack that first sent each id (a replay sends one again)
    for a in report.get("attacks", []):
        for cid in a["cids"]:
            names.setdefault(cid, a["attack"])
    return {"losses": losses, "sealed": {r: names.get(cid, cid[:12]) for r, cid in sealed if r is not None}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args()
    root = Path(args.out or tempfile.mkdtemp(prefix="nord-unguarded-"))
    baseline, poisoned = clean_and_attacked(root, play, Unguarded)
    print("round  clean val loss  attacked val loss  attacker's contribution sealed in it")
    for rnd in sorted(set(baseline["losses"]) | set(poisoned["losses"])):
        a, b = baseline["losses"].get(rnd), poisoned["losses"].get(rnd)
        print(f"{rnd:5d}  {a if a is None else f'{a:14.4f}'}  {b if b is None else f'{b:17.4f}'}  "
              f"{poisoned['sealed'].get(rnd, '')}")  # fmt: skip
    if not args.out:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
