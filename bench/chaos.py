"""Chaos benchmark: many SIGKILLs of the real coordinator and workers at random moments on 127.0.0.1,
each victim restarted on its own state dir, in scenarios that each end by healing and checking.

A scenario starts the coordinator and two workers (the tiny model, quorum 2, short rounds), then per kill:
once one more round is sealed, a seeded victim (coordinator or a worker) is SIGKILLed after a random
delay — training, sending, scoring, sealing, writing a checkpoint: wherever it lands, recorded from the
victim's status/API — and restarted. Then the workers are stopped cleanly and run one more round each,
everything is stopped, and the checks of tests/chaos/test_kill.py run (tests/swarm.py `ledger`): every
acknowledged contribution in the history exactly once and sealed once, no round folding two
contributions of a peer, every replica on the last seal, no p2pd or other process left in the groups the
scenario started. The next scenario restarts on the same state dirs.

    python bench/chaos.py --kills 50 --seed 0

Writes bench/results/chaos.json and prints the fault table.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the swarm and process helpers shared with the chaos tests

from swarm import Swarm, ledger  # noqa: E402

WORKERS = ["w0", "w1"]


def scenario(swarm: Swarm, victims: list[str], rng: random.Random, args: argparse.Namespace, bar) -> dict:
    """One scenario's kills, healing and checks; an error (a wait that timed out) ends it unhealed."""
    kills, error = [], None
    try:
        swarm.start_coordinator()
        for name in WORKERS:
            swarm.join(name)
        for victim in victims:
            at_checkpoint = victim == "coord" and args.on_checkpoint > 0 and rng.random() < args.on_checkpoint
            kills.append(swarm.kill_at_random_moment(victim, rng, args.max_delay_s, at_checkpoint))
            bar.update(1)
            bar.set_postfix(sealed=kills[-1]["after_round"], victim=victim, moment=kills[-1]["moment"])
        swarm.finish_workers(WORKERS)
        sealed = swarm.sealed_rounds()
    except AssertionError as e:
        error, sealed = str(e)[:3000], None
    swarm.stop()
    coord_exit = swarm.running["coord"].returncode
    try:
        swarm.assert_daemons_gone()
        daemons_left = []
    except AssertionError as e:
        daemons_left = [str(e)]
    leftovers = swarm.leftovers()
    book = ledger(swarm, WORKERS) if error is None else None
    return {
        "kills": kills, "error": error, "sealed_rounds": sealed, "coordinator_exit": coord_exit,
        "daemons_left": daemons_left, "processes_left": leftovers,
        "ledger": book and {**book, "lost": [p for p, _ in book["lost"]]},
        "passed": bool(
            error is None and coord_exit == 0 and not daemons_left and not leftovers
            and not book["lost"] and not book["double_folded"] and not book["empty_seals"]
            and not book["stale_replicas"] and book["last_sealed"]["round"] == sealed - 1
            and not any(k["p2pd_left"] for k in kills)
        ),
    }  # fmt: skip


def fault_table(scenarios: list[dict]) -> list[dict]:
    """Per victim and moment: faults injected, survived (the scenario healed and passed), p2pd left."""
    rows: dict[tuple[str, str], collections.Counter] = collections.defaultdict(collections.Counter)
    for s in scenarios:
        for k in s["kills"]:
            row = rows["coordinator" if k["victim"] == "coord" else "worker", k["moment"]]
            row["injected"] += 1
            row["survived"] += s["passed"]
            row["p2pd_left"] += bool(k["p2pd_left"])
    return [{"victim": v, "moment": m, **c} for (v, m), c in sorted(rows.items())]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=50)
    p.add_argument("--kills-per-scenario", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-delay-s", type=float, default=5.0, help="kill this long after a seal, at most")
    p.add_argument(
        "--on-checkpoint", type=float, default=0.0,
        help="share of coordinator kills made the moment its next checkpoint file appears",
    )  # fmt: skip
    p.add_argument("--max-minutes", type=float, default=600, help="start no new scenario after this long")
    p.add_argument("--tmp", type=Path, help="state and logs here (default: a temporary dir, removed)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "chaos.json")
    args = p.parse_args(argv)

    rng = random.Random(args.seed)
    load_before = os.getloadavg()
    started = time.time()
    scenarios: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="nord-chaos-") as scratch:
        tmp = args.tmp or Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        with Swarm(tmp) as swarm, tqdm(total=args.kills, desc="kills", unit="kill") as bar:
            swarm.init(quorum=2, inner_steps=2, batch_size=1, seq_len=16)
            lost_before = 0
            while bar.n < args.kills and time.time() - started < args.max_minutes * 60:
                n = min(args.kills_per_scenario, args.kills - bar.n)
                victims = [rng.choice(("coord", *WORKERS)) for _ in range(n)]
                result = scenario(swarm, victims, rng, args, bar)
                lost = len(result["ledger"]["lost"]) if result["ledger"] else None
                result["lost_in_scenario"] = None if lost is None else lost - lost_before
                lost_before = lost or lost_before
                scenarios.append(result)
                outcome = f"passed={result['passed']}, sealed {result['sealed_rounds']}, lost {lost}"
                error = f", error: {result['error'][:300]}" if result["error"] else ""
                tqdm.write(f"scenario {len(scenarios)}: {len(result['kills'])} kills, {outcome}{error}")
                if not result["passed"]:
                    break

    table = fault_table(scenarios)
    final = scenarios[-1]["ledger"] if scenarios and scenarios[-1]["ledger"] else {}
    totals = {
        "faults_injected": sum(r["injected"] for r in table),
        "survived": sum(r["survived"] for r in table),
        "contributions_acknowledged": final.get("acknowledged"),
        "contributions_lost": len(final["lost"]) if final else None,
        "scenarios": len(scenarios), "scenarios_passed": sum(s["passed"] for s in scenarios),
        "sealed_rounds": scenarios[-1]["sealed_rounds"] if scenarios else 0,
    }  # fmt: skip
    print(f"\n{'victim':<13}{'moment':<15}{'injected':>9}{'survived':>9}{'p2pd left':>10}")
    for r in table:
        print(f"{r['victim']:<13}{r['moment']:<15}{r['injected']:>9}{r['survived']:>9}{r['p2pd_left']:>10}")
    print(json.dumps(totals))
    report = {
        "command": "python bench/chaos.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "wall_s": time.time() - started, "totals": totals, "fault_table": table, "scenarios": scenarios,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {args.out}")
    return 0 if scenarios and all(s["passed"] for s in scenarios) else 1


if __name__ == "__main__":
    sys.exit(main())
